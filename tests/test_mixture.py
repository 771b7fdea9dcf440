"""The analytic Gaussian-mixture testbed: exact eps / v / x0 of a diagonal Gaussian mixture under a VP schedule.

Reference quantities are computed independently of the model's closed forms wherever possible: the score by
autograd of the log density, the log density by scipy, the schedule by diffusers' own ``alphas_cumprod``.
"""

import math
import time

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DiffusionPipeline
from scipy import integrate
from scipy.special import logsumexp
from scipy.stats import multivariate_normal

from steerdiff.core import NoiseSchedule
from steerdiff.testbeds.mixture import GaussianMixtureDenoiser, fit_digits_mixture

DDPM_CONFIG = dict(DDPMScheduler().config)
SCHEDULE = NoiseSchedule.from_config(DDPM_CONFIG)
SHAPE = (2, 3)  # D = 6
CLASSES = [0, 0, 1, 2, 2]  # K = 5 components, C = 3 classes, null label 3
NULL = 3


def small_mixture(prediction_type="epsilon", dtype=torch.float64, spread=1.0, var_range=(0.02, 0.3), seed=0):
    g = torch.Generator().manual_seed(seed)
    k, d = len(CLASSES), math.prod(SHAPE)
    means = spread * (2 * torch.rand(k, *SHAPE, generator=g, dtype=torch.float64) - 1)
    variances = var_range[0] + (var_range[1] - var_range[0]) * torch.rand(k, *SHAPE, generator=g, dtype=torch.float64)
    weights = 0.2 + torch.rand(k, generator=g, dtype=torch.float64)
    assert means.reshape(k, d).shape == (k, d)
    return GaussianMixtureDenoiser.from_components(
        means, variances, weights, scheduler_config=DDPM_CONFIG, component_classes=torch.tensor(CLASSES),
        prediction_type=prediction_type, dtype=dtype,
    )


def noised_params(model, t, label=None):
    """Numpy (log w (K',), means (K', D), variances (K', D)) of p_t(x | label), written from the definition."""
    mu = model.means.double().numpy()
    s2 = model.variances.double().numpy()
    w = np.exp(model.log_weights.double().numpy())
    if label is not None and label != model.config.num_classes:
        keep = model.component_classes.numpy() == label
        mu, s2, w = mu[keep], s2[keep], w[keep]
    if t is None:
        a, s = 1.0, 0.0
    else:
        a, s = (float(v) for v in SCHEDULE.alpha_sigma(torch.tensor(float(t), dtype=torch.float64)))
    return np.log(w / w.sum()), a * mu, a * a * s2 + s * s


def scipy_log_joint(model, x, t, label=None):
    """(B, K') log w_k + log N(x; alpha mu_k, diag(v_k)) by scipy."""
    log_w, m, v = noised_params(model, t, label)
    xf = x.reshape(x.shape[0], -1).double().numpy()
    cols = [log_w[k] + multivariate_normal(m[k], np.diag(v[k])).logpdf(xf) for k in range(len(log_w))]
    return np.stack(cols, axis=-1).reshape(xf.shape[0], -1)


# -- exactness: eps, v, x0 against autograd of the log density --------------------------------------------------------
TIMESTEPS = torch.tensor([0.0, 0.5, 3.25, 17.7, 120.0, 499.5, 998.9, 999.0, -1.0], dtype=torch.float64)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("labels", [None, "mixed"])
def test_output_is_the_autograd_score(prediction_type, labels):
    model = small_mixture(prediction_type)
    b = TIMESTEPS.numel()
    g = torch.Generator().manual_seed(1)
    class_labels = None if labels is None else torch.tensor([0, 1, 2, NULL, 0, 1, 2, NULL, 1])
    alpha, sigma = SCHEDULE.alpha_sigma(TIMESTEPS)
    x0 = model.sample(class_labels=class_labels, num_samples=b, generator=g)
    x = (alpha.reshape(b, 1, 1) * x0 + sigma.reshape(b, 1, 1) * torch.randn(b, *SHAPE, generator=g, dtype=torch.float64))
    x.requires_grad_(True)
    (grad,) = torch.autograd.grad(model.log_prob(x, TIMESTEPS, class_labels).sum(), x)
    a, s = alpha.reshape(b, 1, 1), sigma.reshape(b, 1, 1)
    eps = -s * grad
    x0_hat = (x.detach() + s * s * grad) / a  # Tweedie
    expected = {"epsilon": eps, "sample": x0_hat, "v_prediction": a * eps - s * x0_hat}[prediction_type]
    out = model(x.detach(), TIMESTEPS, class_labels=class_labels)
    assert out.sample.dtype == torch.float64 and out.sample.shape == (b, *SHAPE)
    torch.testing.assert_close(out.sample, expected, atol=1e-8, rtol=0)
    torch.testing.assert_close(model.score(x.detach(), TIMESTEPS, class_labels), grad, atol=1e-8, rtol=1e-10)
    torch.testing.assert_close(model.posterior_mean(x.detach(), TIMESTEPS, class_labels), x0_hat, atol=1e-8, rtol=0)
    preds = model.predictions(x.detach(), TIMESTEPS, class_labels)
    torch.testing.assert_close(preds[prediction_type], out.sample, atol=1e-12, rtol=0)
    # the clean end (t = -1, sigma = 0): eps = 0 and x0_hat = x exactly
    assert torch.equal(preds["epsilon"][-1], torch.zeros(SHAPE, dtype=torch.float64))
    torch.testing.assert_close(preds["sample"][-1], x.detach()[-1], atol=1e-15, rtol=0)


def test_scalar_timesteps_and_return_tuple():
    model = small_mixture()
    x = torch.randn(3, *SHAPE, dtype=torch.float64)
    ref = model(x, torch.full((3,), 250)).sample
    for t in (250, 250.0, torch.tensor(250), torch.tensor([250]), np.int64(250)):
        assert torch.equal(model(x, t).sample, ref)
    (out,) = model(x, 250, return_dict=False)
    assert torch.equal(out, ref)
    # a Python float timestep is taken in float64 (not rounded to float32 on its way to the schedule)
    t = 17.3
    assert torch.equal(model(x, t).sample, model(x, torch.full((3,), t, dtype=torch.float64)).sample)
    assert not torch.equal(model(x, t).sample, model(x, torch.tensor(t, dtype=torch.float32)).sample)


def test_float64_arithmetic_and_dtypes():
    m32 = small_mixture(dtype=torch.float32)
    assert m32.dtype == torch.float32
    m64 = GaussianMixtureDenoiser.from_config(m32.config)
    m64.load_state_dict(m32.state_dict())
    m64 = m64.to(torch.float64)
    assert m64.means.dtype == torch.float64 and m64.component_classes.dtype == torch.long
    x = torch.randn(4, *SHAPE, dtype=torch.float64)
    t = torch.tensor([3.5, 10, 400, 900.25], dtype=torch.float64)
    # a float64 input is computed in float64 whatever the buffers' dtype; the output follows the input's dtype
    assert torch.equal(m32(x, t).sample, m64(x, t).sample)
    out32 = m64(x.float(), t).sample
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32, m64(x.float().double(), t).sample.float())


# -- sigma -> 0: the nearest-mode denoiser ----------------------------------------------------------------------------
@pytest.mark.parametrize("t", [0, 0.25, 2])
def test_small_sigma_responsibilities_concentrate(t):
    """Well separated components (every coordinate >= 1 apart, std <= 0.23) at the smallest timesteps.

    With l_k the log joint of component k and j its argmax, 1 - r_j = sum_{k != j} r_k <= sum_{k != j} e^{l_k - l_j},
    and x0_hat - m_j = sum_{k != j} r_k (m_k - m_j), so |x0_hat - m_j| <= (1 - r_j) max_k |m_k - m_j| with
    m_k = mu_k + alpha s_k^2 (x - alpha mu_k) / v_k each component's posterior mean.  l comes from scipy.
    """
    model = small_mixture(spread=1.0, var_range=(0.01, 0.05))
    with torch.no_grad():  # shift component k by 3k: every coordinate differs by >= 1 between components
        model.means.add_(3.0 * torch.arange(len(CLASSES), dtype=torch.float64).unsqueeze(1))
    g = torch.Generator().manual_seed(2)
    b = 64
    alpha, sigma = (float(v) for v in SCHEDULE.alpha_sigma(torch.tensor(float(t), dtype=torch.float64)))
    x = alpha * model.sample(b, generator=g) + sigma * torch.randn(b, *SHAPE, generator=g, dtype=torch.float64)
    l = scipy_log_joint(model, x, t)
    j = l.argmax(axis=1)
    others = np.where(np.arange(l.shape[1]) == j[:, None], -np.inf, l - l[np.arange(b), j][:, None])
    bound_r = np.exp(others).sum(axis=1)
    r = model.responsibilities(x, t).numpy()
    assert np.array_equal(r.argmax(axis=1), j)
    assert np.all(1 - r[np.arange(b), j] <= bound_r * (1 + 1e-9) + 1e-15)
    assert bound_r.max() < 1e-10  # they do concentrate here
    _, mu, v = noised_params(model, t)
    mu, v = mu / alpha, v  # the clean means
    s2 = model.variances.numpy()
    xf = x.reshape(b, -1).numpy()
    m = mu[None] + alpha * s2[None] * (xf[:, None] - alpha * mu[None]) / v[None]  # (B, K, D)
    m_j = m[np.arange(b), j]
    spread_m = np.abs(m - m_j[:, None]).max(axis=(1, 2))
    tol = bound_r * spread_m + 64 * np.finfo(np.float64).eps * np.abs(m).max()
    err = np.abs(model.posterior_mean(x, t).reshape(b, -1).numpy() - m_j).max(axis=1)
    assert np.all(err <= tol)


@pytest.mark.parametrize("t", [0, 1, 5])
def test_point_masses_snap_to_the_nearest_mean(t):
    """Components N(mu_k, s^2 I) with s^2 = 1e-12, equal weights, means >= 1 apart.  The component posterior mean is
    m_k = mu_k + c (x - alpha mu_k), c = alpha s^2 / (alpha^2 s^2 + sigma^2), and (equal v) the nearest mean j in
    x / alpha has 1 - r_j <= sum_{k != j} exp(-(|x - alpha mu_k|^2 - |x - alpha mu_j|^2) / (2 v)), so
    |x0_hat - mu_j| <= c |x - alpha mu_j|_inf + (1 - r_j) max_k |m_k - m_j|_inf."""
    k, d = 6, 4
    lattice = torch.tensor([[i % 3, i // 3, (i * 7) % 2, 0.5 * (i % 2)] for i in range(k)], dtype=torch.float64)
    dists = torch.cdist(lattice, lattice) + torch.eye(k) * 10
    assert float(dists.min()) >= 1.0
    s2 = 1e-12
    model = GaussianMixtureDenoiser.from_components(lattice - 0.5, torch.full((k, d), s2, dtype=torch.float64))
    alpha, sigma = (float(v) for v in SCHEDULE.alpha_sigma(torch.tensor(float(t), dtype=torch.float64)))
    g = torch.Generator().manual_seed(3)
    idx = torch.randint(0, k, (50,), generator=g)
    mu = model.means
    x = alpha * mu[idx] + sigma * torch.randn(50, d, generator=g, dtype=torch.float64)
    nearest = torch.cdist(x / alpha, mu).argmin(dim=1)
    v = alpha**2 * s2 + sigma**2
    sq = ((x.unsqueeze(1) - alpha * mu.unsqueeze(0)) ** 2).sum(-1)  # (B, K)
    sq_j = sq.gather(1, nearest[:, None])
    bound_r = torch.where(sq == sq_j, 0.0, torch.exp(-(sq - sq_j) / (2 * v))).sum(1)
    c = alpha * s2 / v
    m = mu.unsqueeze(0) + c * (x.unsqueeze(1) - alpha * mu.unsqueeze(0))
    m_j = m.gather(1, nearest[:, None, None].expand(-1, 1, d)).squeeze(1)
    tol = (c * (x - alpha * mu[nearest]).abs().amax(1) + bound_r * (m - m_j.unsqueeze(1)).abs().amax((1, 2))
           + 16 * torch.finfo(torch.float64).eps)
    x0_hat = model.posterior_mean(x, t)
    assert torch.all((x0_hat - mu[nearest]).abs().amax(1) <= tol)
    assert float(tol.max()) < 1e-8  # i.e. x0_hat is the nearest mean to 1e-8
    assert torch.equal(model.responsibilities(x, t).argmax(1), nearest)


# -- the density and the samples --------------------------------------------------------------------------------------
@pytest.mark.parametrize("t", [None, 0, 37.5, 600])
def test_log_prob_matches_scipy(t):
    model = small_mixture()
    x = 1.5 * torch.randn(7, *SHAPE, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    expected = logsumexp(scipy_log_joint(model, x, t), axis=1)
    np.testing.assert_allclose(model.log_prob(x, t).numpy(), expected, rtol=1e-12, atol=1e-10)
    for label in range(NULL + 1):
        labels = torch.full((7,), label)
        expected = logsumexp(scipy_log_joint(model, x, t, label), axis=1)
        np.testing.assert_allclose(model.log_prob(x, t, labels).numpy(), expected, rtol=1e-12, atol=1e-10)
    r = model.responsibilities(x, t, torch.full((7,), 1))
    assert torch.all(r[:, torch.tensor(CLASSES) != 1] == 0)
    torch.testing.assert_close(r.sum(1), torch.ones(7, dtype=torch.float64), atol=1e-14, rtol=0)


@pytest.mark.parametrize("t", [None, 300.5])
def test_log_prob_integrates_to_one(t):
    means = torch.tensor([[-1.0], [0.3], [2.0]], dtype=torch.float64)
    model = GaussianMixtureDenoiser.from_components(means, torch.tensor([0.04, 0.5, 0.01]), torch.tensor([1.0, 2.0, 0.5]))

    def density(z):
        return float(torch.exp(model.log_prob(torch.tensor([[z]], dtype=torch.float64), t)))

    total, err = integrate.quad(density, -np.inf, np.inf, points=None, epsabs=1e-12, epsrel=1e-12, limit=200)
    assert abs(total - 1.0) < 1e-8 + err


def test_sample_moments_within_monte_carlo_bounds():
    """Mean within 5 standard errors sqrt(Var_d / N); second moments E[(x - m)(x - m)^T] within 5 plug-in standard
    errors std((x_i - m_i)(x_j - m_j)) / sqrt(N); component frequencies within 5 binomial standard errors."""
    model = small_mixture()
    n = 20000
    for label in (None, 2, NULL):
        labels = None if label is None else torch.full((n,), label)
        x, comp = model.sample(n, class_labels=labels, generator=torch.Generator().manual_seed(5), return_components=True)
        assert x.shape == (n, *SHAPE) and x.dtype == torch.float64
        log_w, mu, s2 = noised_params(model, None, label)
        w = np.exp(log_w)
        mean = w @ mu
        cov = np.einsum("k,kd,ke->de", w, mu, mu) + np.diag(w @ s2) - np.outer(mean, mean)
        xs = x.reshape(n, -1).numpy()
        assert np.all(np.abs(xs.mean(0) - mean) <= 5 * np.sqrt(np.diag(cov) / n))
        centred = xs - mean
        prods = centred[:, :, None] * centred[:, None, :]
        se = prods.std(axis=0) / np.sqrt(n)
        assert np.all(np.abs(prods.mean(0) - cov) <= 5 * se)
        keep = np.arange(len(CLASSES)) if label in (None, NULL) else np.flatnonzero(np.array(CLASSES) == label)
        freq = np.bincount(comp.numpy(), minlength=len(CLASSES)) / n
        assert freq[np.setdiff1d(np.arange(len(CLASSES)), keep)].sum() == 0
        assert np.all(np.abs(freq[keep] - w) <= 5 * np.sqrt(w * (1 - w) / n))


def test_per_sample_generators_make_samples_batch_independent():
    model = small_mixture()
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    labels = torch.tensor([0, NULL, 2, 1])
    batch = model.sample(class_labels=labels, generator=gens([10, 11, 12, 13]))
    alone = model.sample(class_labels=labels[1:2], generator=gens([11]))
    assert torch.equal(batch[1:2], alone)
    again = model.sample(class_labels=labels, generator=gens([10, 11, 12, 13]))
    assert torch.equal(batch, again)
    with pytest.raises(ValueError, match="one per sample"):
        model.sample(class_labels=labels, generator=gens([1, 2]))


# -- diffusers integration --------------------------------------------------------------------------------------------
def test_save_load_round_trip_and_pipeline_registration(tmp_path):
    model = small_mixture("v_prediction", dtype=torch.float32)
    x = torch.randn(3, *SHAPE)
    labels = torch.tensor([0, 2, NULL])
    model.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "diffusion_pytorch_model.safetensors").is_file()
    loaded = GaussianMixtureDenoiser.from_pretrained(tmp_path / "m")
    assert {k: v for k, v in loaded.config.items() if not k.startswith("_")} == {
        k: v for k, v in model.config.items() if not k.startswith("_")
    }
    for name, buf in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], buf) and loaded.state_dict()[name].dtype == buf.dtype
    assert torch.equal(loaded(x, 321, labels).sample, model(x, 321, labels).sample)

    m64 = model.to(torch.float64)
    m64.save_pretrained(tmp_path / "m64")
    loaded64 = GaussianMixtureDenoiser.from_pretrained(tmp_path / "m64", torch_dtype=torch.float64)
    assert loaded64.means.dtype == torch.float64 and torch.equal(loaded64.means, m64.means)
    assert torch.equal(loaded64(x.double(), 321, labels).sample, m64(x.double(), 321, labels).sample)

    class TestbedPipeline(DiffusionPipeline):
        def __init__(self, unet, scheduler):
            super().__init__()
            self.register_modules(unet=unet, scheduler=scheduler)

    pipe = TestbedPipeline(unet=model, scheduler=DDIMScheduler.from_config(DDPM_CONFIG))
    pipe.save_pretrained(tmp_path / "pipe")
    reloaded = TestbedPipeline.from_pretrained(tmp_path / "pipe")
    assert isinstance(reloaded.unet, GaussianMixtureDenoiser)
    assert torch.equal(reloaded.unet.means, model.means)


def test_schedule_and_prediction_type_follow_the_scheduler_config():
    scheduler = DDIMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="v_prediction",
        set_alpha_to_one=False,
    )
    model = GaussianMixtureDenoiser.from_components(torch.zeros(2, 3), torch.ones(2, 3), scheduler_config=scheduler)
    assert model.config.prediction_type == "v_prediction"
    assert torch.equal(model.alphas_cumprod, scheduler.alphas_cumprod)
    a, _ = model.schedule.alpha_sigma(torch.tensor([0, 500, 999, -1]))
    expected = torch.cat([scheduler.alphas_cumprod[[0, 500, 999]], scheduler.final_alpha_cumprod.reshape(1)])
    torch.testing.assert_close(a**2, expected.double(), atol=1e-7, rtol=0)
    explicit = GaussianMixtureDenoiser.from_components(
        torch.zeros(2, 3), torch.ones(2, 3), scheduler_config=scheduler.config, prediction_type="epsilon"
    )
    assert explicit.config.prediction_type == "epsilon"


@pytest.fixture(scope="module")
def digits_train_fit():
    return fit_digits_mixture(split="train")


def test_drops_into_a_ddim_loop(digits_train_fit):
    model = digits_train_fit
    scheduler = DDIMScheduler.from_config(DDPM_CONFIG)
    scheduler.set_timesteps(10)
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 10])
    x = torch.randn(12, 1, 8, 8, generator=torch.Generator().manual_seed(6))
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, t, class_labels=labels).sample, t, x).prev_sample
    assert x.shape == (12, 1, 8, 8) and x.dtype == torch.float32 and torch.isfinite(x).all()
    assert float(x.abs().max()) < 3.0  # the data lie in [-1, 1] (std >= 0.036 around it)


# -- the digits fit ---------------------------------------------------------------------------------------------------
def test_fit_digits_is_deterministic_and_uses_the_ddpm_schedule():
    start = time.perf_counter()
    a = fit_digits_mixture(seed=0)
    elapsed = time.perf_counter() - start
    b = fit_digits_mixture(seed=0)
    assert elapsed < 10
    for name, buf in a.state_dict().items():
        assert torch.equal(buf, b.state_dict()[name]), name
    assert not torch.equal(fit_digits_mixture(seed=1).means, a.means)
    cfg = a.config
    assert (cfg.sample_shape, cfg.num_components, cfg.num_classes, cfg.prediction_type) == ([1, 8, 8], 50, 10, "epsilon")
    assert torch.equal(a.component_classes, torch.arange(10).repeat_interleave(5))
    assert torch.equal(a.alphas_cumprod, DDPMScheduler().alphas_cumprod)
    assert float(a.variances.min()) >= 1 / 768 * (1 - 1e-6)
    # class weights are the class frequencies
    _, labels = __import__("steerdiff.testbeds.digits", fromlist=["load_digits_data"]).load_digits_data("all")
    class_mass = torch.exp(a.log_weights.double()).reshape(10, 5).sum(1)
    torch.testing.assert_close(class_mass, torch.bincount(labels).double() / len(labels), atol=1e-6, rtol=0)


def test_digits_fit_models_held_out_digits(digits_train_fit):
    """Held-out digits are likelier under their own class (measured ~94%), and class-conditional samples are
    recognised as their class by a logistic regression trained on real digits (measured in the test output)."""
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    from steerdiff.testbeds.digits import load_digits_data

    model = digits_train_fit
    x_test, y_test = load_digits_data("test")
    ll = torch.stack([model.log_prob(x_test, None, torch.full((len(y_test),), c)) for c in range(10)], dim=1)
    accuracy = float((ll.argmax(1) == y_test).double().mean())
    assert accuracy >= 0.9, accuracy

    x_train, y_train = load_digits_data("train")
    with threadpool_limits(limits=1):  # tiny problem: threads only add contention on a shared machine
        clf = LogisticRegression(max_iter=2000).fit(x_train.reshape(len(x_train), -1).numpy(), y_train.numpy())
    labels = torch.arange(10).repeat(30)
    samples = model.sample(class_labels=labels, generator=torch.Generator().manual_seed(7))
    sample_accuracy = float(np.mean(clf.predict(samples.reshape(len(labels), -1).numpy()) == labels.numpy()))
    assert sample_accuracy >= 0.9, sample_accuracy


# -- bad input --------------------------------------------------------------------------------------------------------
def test_bad_input_raises_clear_errors():
    model = small_mixture()
    x = torch.randn(2, *SHAPE, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"sample must have shape \(B, 2, 3\)"):
        model(torch.randn(2, 6, dtype=torch.float64), 10)
    with pytest.raises(ValueError, match=r"class_labels must lie in 0\.\.2 or 3"):
        model(x, 10, class_labels=torch.tensor([0, 4]))
    with pytest.raises(ValueError, match=r"class_labels must lie in"):
        model(x, 10, class_labels=torch.tensor([-1, 0]))
    with pytest.raises(ValueError, match="class_labels must be integers"):
        model(x, 10, class_labels=torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"class_labels must have shape \(2,\)"):
        model(x, 10, class_labels=torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="timestep must not be NaN"):
        model(x, torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="timestep must not be NaN"):
        model(x, float("nan"))
    with pytest.raises(ValueError, match=r"timestep must be a scalar or have shape \(2,\)"):
        model(x, torch.tensor([1, 2, 3]))
    unconditional = GaussianMixtureDenoiser.from_components(torch.zeros(2, 3), torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"0 \(null: the model is unconditional\)"):
        unconditional(torch.zeros(1, 3), 5, class_labels=torch.tensor([1]))
    unconditional(torch.zeros(1, 3), 5, class_labels=torch.tensor([0]))  # the null label is allowed

    means = torch.zeros(3, 4)
    with pytest.raises(ValueError, match="variances must be finite and > 0"):
        GaussianMixtureDenoiser.from_components(means, torch.tensor([1.0, 0.0, 1.0]).unsqueeze(1))
    with pytest.raises(ValueError, match="variances must be finite and > 0"):
        GaussianMixtureDenoiser.from_components(means, -torch.ones(3, 4))
    with pytest.raises(ValueError, match="do not broadcast"):
        GaussianMixtureDenoiser.from_components(means, torch.ones(2, 4))
    with pytest.raises(ValueError, match="weights must be finite, >= 0, and sum to a positive value"):
        GaussianMixtureDenoiser.from_components(means, torch.ones(3, 4), torch.zeros(3))
    with pytest.raises(ValueError, match="weights must be finite, >= 0"):
        GaussianMixtureDenoiser.from_components(means, torch.ones(3, 4), torch.tensor([1.0, -0.5, 1.0]))
    with pytest.raises(ValueError, match=r"weights must have shape \(3,\)"):
        GaussianMixtureDenoiser.from_components(means, torch.ones(3, 4), torch.ones(2))
    with pytest.raises(ValueError, match=r"classes \[1\] own no component"):
        GaussianMixtureDenoiser.from_components(means, torch.ones(3, 4), component_classes=torch.tensor([0, 0, 2]))
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        GaussianMixtureDenoiser.from_components(means, torch.ones(3, 4), prediction_type="flow")
    with pytest.raises(ValueError, match="give num_samples or class_labels"):
        model.sample()
