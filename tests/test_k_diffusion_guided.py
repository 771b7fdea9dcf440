"""steerdiff.k_diffusion.GuidedDenoiser: k-diffusion's CFGDenoiser for a number, and for any rule the same guided
prediction as steerdiff's own model boundary (Denoiser) at the same VP noise level; rows a rule does not need are
not run; stateful rules start over with each run; perturbation rules (PAG on the network, AutoGuidance's weak
denoiser); works under k-diffusion-style samplers; clear errors."""

import pytest
import torch
from conftest import tiny_class_unet
from test_k_diffusion import karras, ref_euler

from steerdiff.core import NoiseSchedule
from steerdiff.guidance import APG, CFG, PAG, AutoGuidance, CFGRescale, GuidanceInterval
from steerdiff.k_diffusion import GuidedDenoiser, sample_ghvb
from steerdiff.pipelines.conditioning import denoiser_for

PROCESS = NoiseSchedule.from_config(dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012))
LABELS = torch.tensor([0, 1, 2])
NULL = torch.tensor([3])  # tiny_class_unet's null class, one row (expanded to the batch)


def k_diffusion_wrapper(unet, calls=None):
    """A VP eps network as a k-diffusion denoiser (k-diffusion's DiscreteEpsDDPMDenoiser / CompVisDenoiser):
    x_vp = x / sqrt(1 + sigma^2), t = t(sigma_bar), x0 = x - sigma eps."""

    def model(x, sigma, cond):
        if calls is not None:
            calls.append(x.shape[0])
        alpha = torch.rsqrt(1 + sigma.double() ** 2).float().view(-1, 1, 1, 1)
        t = PROCESS.timestep_from_sigma_bar(sigma.double()).float()
        with torch.no_grad():
            eps = unet(x * alpha, t, class_labels=cond).sample
        return x - sigma.view(-1, 1, 1, 1) * eps

    return model


def reference(unet, rule, x, sigma):
    """steerdiff's Denoiser on the VP process at the same noise level, converted to x0."""
    s = torch.full((x.shape[0],), sigma, dtype=torch.float64)
    alpha, sigma_vp = torch.rsqrt(1 + s**2), s * torch.rsqrt(1 + s**2)
    t = PROCESS.timestep_from_sigma_bar(s).float()
    denoiser = denoiser_for(unet, PROCESS, "epsilon", rule, cond=LABELS)
    with torch.no_grad():
        eps = denoiser.output(x * alpha.float().view(-1, 1, 1, 1), t, alpha=alpha, sigma=sigma_vp)
    return x - sigma * eps


def test_a_number_is_k_diffusions_cfg_denoiser():
    def model(x, sigma, cond):
        return 0.5 * x + cond.view(-1, 1, 1, 1).float()

    x = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    sigma = torch.full((3,), 2.0)
    guided = GuidedDenoiser(model, 4.0, process=PROCESS)(x, sigma, cond=LABELS, uncond=NULL)
    u, c = model(x, sigma, NULL.expand(3)), model(x, sigma, LABELS)
    torch.testing.assert_close(guided, u + (c - u) * 4.0)


@pytest.mark.parametrize("rule", [
    lambda: CFG(3.0),
    lambda: APG(6.0, eta=0.0, momentum=-0.5),
    lambda: CFGRescale(5.0, phi=0.7),  # combines in v_prediction: needs the VP alpha and sigma of k-diffusion's sigma
    lambda: PAG(3.0, pag_scale=2.0, layers=["mid"]),
], ids=["cfg", "apg", "rescale", "pag"])
def test_rules_give_the_model_boundarys_prediction(rule):
    unet = tiny_class_unet()
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 3.0
    wrapped = GuidedDenoiser(k_diffusion_wrapper(unet), rule(), process=PROCESS, network=unet)
    with torch.no_grad():
        got = wrapped(x, torch.full((3,), 2.5), cond=LABELS, uncond=NULL)
    torch.testing.assert_close(got, reference(unet, rule(), x, 2.5), rtol=1e-5, atol=1e-5)
    plain = k_diffusion_wrapper(unet)(x, torch.full((3,), 2.5), LABELS)
    assert (got - plain).abs().max() > 1e-3  # guidance changed something


def test_rows_a_rule_does_not_need_are_not_run():
    """GuidanceInterval outside its window needs no unconditional rows: the model runs on the conditional rows."""
    calls = []
    unet = tiny_class_unet()
    wrapped = GuidedDenoiser(k_diffusion_wrapper(unet, calls), GuidanceInterval(CFG(4.0), sigma_low=1.0, sigma_high=5.0), process=PROCESS)
    x = torch.randn(3, 1, 8, 8)
    wrapped(x, torch.full((3,), 10.0), cond=LABELS, uncond=NULL)
    wrapped(x, torch.full((3,), 2.0), cond=LABELS, uncond=NULL)
    assert calls == [3, 6]


def test_stateful_rules_start_over_with_each_run():
    """APG's momentum is reset when sigma rises (a new run): the same run twice gives the same sample, under
    k-diffusion's Euler (written out) and under steerdiff's GHVB function."""
    unet = tiny_class_unet()
    wrapped = GuidedDenoiser(k_diffusion_wrapper(unet), APG(5.0, momentum=-0.5), process=PROCESS)
    sigmas = karras(4, sigma_min=0.1, sigma_max=10.0).float()
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(2)) * sigmas[0]
    extra = {"cond": LABELS, "uncond": NULL}
    model = lambda x_t, sigma: wrapped(x_t, sigma, **extra)
    first, second = ref_euler(model, x, sigmas), ref_euler(model, x, sigmas)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    ghvb = sample_ghvb(wrapped, x, sigmas, extra_args=extra, disable=True)
    assert torch.isfinite(ghvb).all() and ghvb.shape == x.shape
    wrapped.reset(sigmas)
    assert wrapped._num_steps == 4


def test_autoguidance_calls_the_weak_denoiser():
    good, weak = tiny_class_unet(seed=0), tiny_class_unet(seed=1)
    weak_model = k_diffusion_wrapper(weak)
    wrapped = GuidedDenoiser(k_diffusion_wrapper(good), AutoGuidance(2.0, weak_model), process=PROCESS)
    x = torch.randn(3, 1, 8, 8)
    sigma = torch.full((3,), 1.5)
    got = wrapped(x, sigma, cond=LABELS, uncond=NULL)
    d_good, d_weak = k_diffusion_wrapper(good)(x, sigma, LABELS), weak_model(x, sigma, LABELS)
    torch.testing.assert_close(got, d_weak + 2.0 * (d_good - d_weak), rtol=1e-5, atol=1e-5)


def test_errors_are_clear():
    model = lambda x, sigma, cond: x
    with pytest.raises(ValueError, match="cannot read the model's noise process: pass process="):
        GuidedDenoiser(model, CFG(2.0))
    with pytest.raises(ValueError, match="process must be a steerdiff NoiseProcess or one of"):
        GuidedDenoiser(model, CFG(2.0), process="eps")
    with pytest.raises(TypeError, match="model must be a k-diffusion denoiser"):
        GuidedDenoiser("not a model", CFG(2.0), process="ve")
    with pytest.raises(ValueError, match="nonfinite_check must be one of"):
        GuidedDenoiser(model, CFG(2.0), process="ve", nonfinite_check="sometimes")
    with pytest.raises(ValueError, match="has no sigmas table; pass process="):
        from steerdiff.k_diffusion import process_of_model_sampling
        process_of_model_sampling(type("ModelSampling", (type("EPS", (), {}),), {})())
    with pytest.raises(TypeError, match="rule must be a steerdiff guidance rule"):
        GuidedDenoiser(model, "cfg", process="ve")
    with pytest.raises(ValueError, match="needs both cond= and uncond="):
        GuidedDenoiser(model, 2.0, process="ve")(torch.zeros(1, 1, 2, 2), torch.ones(1), cond=LABELS[:1])
    with pytest.raises(ValueError, match="pass network="):
        GuidedDenoiser(model, PAG(2.0, 2.0, layers=["mid"]), process="ve")(torch.zeros(1, 1, 2, 2), torch.ones(1), cond=LABELS[:1], uncond=NULL)
    nan = lambda x, sigma, cond: x * float("nan")
    with pytest.raises(FloatingPointError, match=r"the model's denoised output holds NaN/Inf at step 0 \(timestep 2\)"):
        GuidedDenoiser(nan, 2.0, process="ve")(torch.zeros(1, 1, 2, 2), torch.full((1,), 2.0), cond=LABELS[:1], uncond=NULL)
    table = type("DiscreteSchedule", (), {"sigmas": PROCESS.sigma_bar(torch.arange(1000)), "__call__": lambda self, x, s, cond: x})()
    assert isinstance(GuidedDenoiser(table, 2.0).process, NoiseSchedule)  # k-diffusion's DiscreteSchedule table
