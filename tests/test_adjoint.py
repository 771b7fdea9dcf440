"""AdjointDPM gradients through the sampler: exactness of "checkpoint", convergence of "adjoint", finite
differences, zero gradients, LoRA, text conditioning, memory counted with saved-tensor hooks, bad input.

Everything runs in float64 on tiny problems: the analytic Gaussian mixture (exact eps, parameters = its means)
and tiny random UNets.
"""

import math

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler
from tiny_pipelines import tiny_sd_pipeline

from conftest import tiny_class_unet
from steerdiff.core import NoiseSchedule, sample_ddim, spaced_timesteps, with_final
from steerdiff.memory import SavedTensorMeter
from steerdiff.pipelines.adjoint import sample, sample_with_grad
from steerdiff.pipelines.conditioning import class_embeddings
from steerdiff.testbeds.mixture import GaussianMixtureDenoiser

F64 = torch.float64
SCHED = DDPMScheduler(timestep_spacing="trailing")  # linear betas 1e-4..0.02, 1000 steps: the digits schedule


pytestmark = pytest.mark.usefixtures("one_thread")


def rel(a, b):
    return float((a - b).norm() / b.norm())


def randn(*shape, seed=0):
    return torch.randn(*shape, dtype=F64, generator=torch.Generator().manual_seed(seed))


def mixture(prediction_type="epsilon", shape=(1, 4, 4)):
    """A 3-class diagonal mixture whose means are a parameter (so dL/dtheta has something to act on)."""
    k = 6
    model = GaussianMixtureDenoiser.from_components(
        0.8 * randn(k, *shape, seed=1), 0.05 + 0.2 * torch.rand(k, *shape, dtype=F64, generator=torch.Generator().manual_seed(2)),
        component_classes=torch.arange(k) % 3, num_classes=3, prediction_type=prediction_type,
    )
    model.means = torch.nn.Parameter(model.means.clone())
    return model


def squared_loss(target):
    return lambda x0: ((x0 - target) ** 2).sum()


def unet64():
    return tiny_class_unet().to(F64).requires_grad_(True)


UNET_PARAMS = ["conv_in.weight", "class_embedding.weight", "down_blocks.1.resnets.0.conv1.weight", "conv_out.bias"]


# -- exactness of "checkpoint" ------------------------------------------------------------------------
@pytest.mark.parametrize("order", [1, 2])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_checkpoint_equals_autograd_on_the_mixture(order, prediction_type):
    model = mixture(prediction_type)
    x, target = randn(2, 1, 4, 4, seed=3), randn(2, 1, 4, 4, seed=4)
    kw = dict(num_inference_steps=7, conditioning=torch.tensor([0, 2]), guidance_scale=2.5,
              loss_fn=squared_loss(target), params=["means"], order=order)
    ref = sample_with_grad(model, x, SCHED, mode="autograd", **kw)
    got = sample_with_grad(model, x, SCHED, mode="checkpoint", **kw)
    assert torch.equal(got.x0, ref.x0) and torch.equal(got.loss, ref.loss)
    assert rel(got.grad_x_T, ref.grad_x_T) < 1e-10
    assert rel(got.grad_params["means"], ref.grad_params["means"]) < 1e-10
    assert got.grad_conditioning is None  # integer labels have no gradient


@pytest.mark.parametrize("order", [1, 2])
def test_checkpoint_equals_autograd_on_a_tiny_unet_with_cfg(order):
    unet = unet64()
    emb = class_embeddings(unet, [1]).detach()  # (1, E), broadcast to the batch of 2
    x, target = randn(2, 1, 8, 8, seed=5), randn(2, 1, 8, 8, seed=6)
    kw = dict(num_inference_steps=5, conditioning=emb, guidance_scale=3.0, loss_fn=squared_loss(target),
              params=UNET_PARAMS, order=order)
    ref = sample_with_grad(unet, x, SCHED, mode="autograd", **kw)
    got = sample_with_grad(unet, x, SCHED, mode="checkpoint", **kw)
    assert got.grad_conditioning.shape == emb.shape
    assert rel(got.grad_x_T, ref.grad_x_T) < 1e-10
    assert rel(got.grad_conditioning, ref.grad_conditioning) < 1e-10
    for name in UNET_PARAMS:
        assert rel(got.grad_params[name], ref.grad_params[name]) < 1e-10, name
    # the null class's embedding row gets gradient through the unconditional branch, the others none
    g_table = got.grad_params["class_embedding.weight"]
    assert g_table[3].abs().sum() > 0 and torch.count_nonzero(g_table[:3]) == 0


def test_text_conditioned_unet():
    unet = tiny_sd_pipeline().unet.to(F64).requires_grad_(True)
    text, empty = randn(1, 4, 32, seed=7), randn(1, 4, 32, seed=8)
    x, target = randn(1, 4, 16, 16, seed=9), randn(1, 4, 16, 16, seed=10)
    kw = dict(num_inference_steps=4, conditioning=text, uncond_conditioning=empty, guidance_scale=4.0,
              loss_fn=squared_loss(target), params=["conv_in.weight"])
    ref = sample_with_grad(unet, x, SCHED, mode="autograd", **kw)
    got = sample_with_grad(unet, x, SCHED, mode="checkpoint", **kw)
    adj = sample_with_grad(unet, x, SCHED, mode="adjoint", **kw)
    assert got.grad_conditioning.shape == text.shape
    for g in (got.grad_x_T, got.grad_conditioning, got.grad_params["conv_in.weight"]):
        assert g.abs().sum() > 0
    assert rel(got.grad_x_T, ref.grad_x_T) < 1e-10
    assert rel(got.grad_conditioning, ref.grad_conditioning) < 1e-10
    assert rel(got.grad_params["conv_in.weight"], ref.grad_params["conv_in.weight"]) < 1e-10
    assert torch.equal(adj.x0, ref.x0) and torch.isfinite(adj.grad_conditioning).all()


# -- the forward pass is the samplers' ----------------------------------------------------------------
def test_forward_is_ddim_and_dpm_solver_2m():
    model = mixture()
    x = randn(2, 1, 4, 4, seed=11)
    grid = with_final(spaced_timesteps(1000, 9))
    first = sample_with_grad(model, x, SCHED, timesteps=grid, grad_x0=torch.ones_like(x), mode="autograd", order=1)
    ddim = sample_ddim(lambda x, t: model(x, t).sample, x, NoiseSchedule.from_config(SCHED.config), grid)
    assert torch.allclose(first.x0, ddim, rtol=0, atol=1e-12)
    assert torch.equal(sample(model, x, SCHED, timesteps=grid, order=1), first.x0)
    # num_inference_steps takes the scheduler config's timestep spacing (the digits model's is "trailing")
    spaced = sample_with_grad(model, x, SCHED, num_inference_steps=4, grad_x0=torch.ones_like(x), mode="checkpoint")
    assert torch.equal(spaced.timesteps, with_final(spaced_timesteps(1000, 4, "trailing")))

    # order 2 = diffusers' DPM-Solver (noise prediction) 2M, midpoint, ending at sigma_min with lower_order_final
    ref = DPMSolverMultistepScheduler(algorithm_type="dpmsolver", solver_order=2, solver_type="midpoint",
                                      final_sigmas_type="sigma_min", lower_order_final=True)
    ref.set_timesteps(9)
    y = x.clone()
    for t in ref.timesteps:
        y = ref.step(model(y, t).sample, t, y).prev_sample
    grid0 = torch.cat([ref.timesteps, torch.zeros(1, dtype=ref.timesteps.dtype)])
    second = sample_with_grad(model, x, SCHED, timesteps=grid0, grad_x0=torch.ones_like(x), mode="checkpoint", order=2)
    assert torch.allclose(second.x0, y, rtol=0, atol=1e-5)


# -- convergence of the continuous adjoint -----------------------------------------------------------------
def fitted_slope(steps, errors):
    return float(np.polyfit(np.log(steps), np.log(errors), 1)[0])


@pytest.mark.parametrize("order, max_slope", [(1, -0.5), (2, -1.2)])
def test_adjoint_error_shrinks_as_steps_grow_on_the_mixture(order, max_slope):
    model = mixture()
    x, target = randn(2, 1, 4, 4, seed=12), randn(2, 1, 4, 4, seed=13)
    steps, errors, param_errors = [10, 20, 40, 80], [], []
    for n in steps:
        kw = dict(num_inference_steps=n, conditioning=torch.tensor([1, 2]), loss_fn=squared_loss(target),
                  params=["means"], order=order)
        ref = sample_with_grad(model, x, SCHED, mode="autograd", **kw)
        adj = sample_with_grad(model, x, SCHED, mode="adjoint", **kw)
        errors.append(rel(adj.grad_x_T, ref.grad_x_T))
        param_errors.append(rel(adj.grad_params["means"], ref.grad_params["means"]))
    assert all(b < a for a, b in zip(errors, errors[1:])), errors
    assert all(b < a for a, b in zip(param_errors, param_errors[1:])), param_errors
    assert fitted_slope(steps, errors) < max_slope, errors
    assert fitted_slope(steps, param_errors) < max_slope, param_errors
    assert errors[-1] < (0.05 if order == 1 else 0.005)


def test_adjoint_error_shrinks_as_steps_grow_on_a_tiny_unet():
    unet = unet64()
    emb = class_embeddings(unet, [2]).detach()
    x, target = randn(1, 1, 8, 8, seed=14), randn(1, 1, 8, 8, seed=15)
    steps, errors = [10, 20, 40], {"x_T": [], "cond": [], "param": []}
    for n in steps:
        kw = dict(num_inference_steps=n, conditioning=emb, loss_fn=squared_loss(target), params=["conv_in.weight"], order=2)
        ref = sample_with_grad(unet, x, SCHED, mode="autograd", **kw)
        adj = sample_with_grad(unet, x, SCHED, mode="adjoint", **kw)
        errors["x_T"].append(rel(adj.grad_x_T, ref.grad_x_T))
        errors["cond"].append(rel(adj.grad_conditioning, ref.grad_conditioning))
        errors["param"].append(rel(adj.grad_params["conv_in.weight"], ref.grad_params["conv_in.weight"]))
    for name, errs in errors.items():
        assert all(b < a for a, b in zip(errs, errs[1:])), (name, errs)
        assert fitted_slope(steps, errs) < -1.0, (name, errs)


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_adjoint_with_other_prediction_types(prediction_type):
    model = mixture(prediction_type)
    x, target = randn(2, 1, 4, 4, seed=40), randn(2, 1, 4, 4, seed=41)
    kw = dict(num_inference_steps=40, conditioning=torch.tensor([0, 1]), guidance_scale=2.0,
              loss_fn=squared_loss(target), params=["means"], order=2)
    ref = sample_with_grad(model, x, SCHED, mode="autograd", **kw)
    adj = sample_with_grad(model, x, SCHED, mode="adjoint", **kw)
    assert torch.equal(adj.x0, ref.x0)
    assert rel(adj.grad_x_T, ref.grad_x_T) < 0.02 and rel(adj.grad_params["means"], ref.grad_params["means"]) < 0.02


def test_adjoint_with_one_step_is_exact():
    model = mixture()
    x, target = randn(2, 1, 4, 4, seed=16), randn(2, 1, 4, 4, seed=17)
    kw = dict(num_inference_steps=1, loss_fn=squared_loss(target), params="all")
    ref = sample_with_grad(model, x, SCHED, mode="autograd", **kw)
    adj = sample_with_grad(model, x, SCHED, mode="adjoint", **kw)
    assert rel(adj.grad_x_T, ref.grad_x_T) < 1e-12 and rel(adj.grad_params["means"], ref.grad_params["means"]) < 1e-12


# -- finite differences -----------------------------------------------------------------------------------
def directional_fd(f, x, v, h=1e-5):
    return (f(x + h * v) - f(x - h * v)) / (2 * h)


@pytest.mark.parametrize("order", [1, 2])
def test_grad_x_T_matches_finite_differences_on_the_mixture(order):
    model = mixture()
    x, target = randn(2, 1, 4, 4, seed=18), randn(2, 1, 4, 4, seed=19)
    kw = dict(num_inference_steps=6, conditioning=torch.tensor([0, 1]), guidance_scale=2.0, order=order)
    loss = squared_loss(target)
    res = sample_with_grad(model, x, SCHED, loss_fn=loss, mode="checkpoint", **kw)

    def f(x_T):
        return sample_with_grad(model, x_T, SCHED, loss_fn=loss, mode="adjoint", **kw).loss

    for seed in range(3):
        v = randn(*x.shape, seed=100 + seed)
        fd = float(directional_fd(f, x, v))
        assert math.isclose(float((res.grad_x_T * v).sum()), fd, rel_tol=1e-7, abs_tol=1e-9)


def test_grad_x_T_and_embedding_match_finite_differences_on_a_tiny_unet():
    unet = unet64()
    emb = class_embeddings(unet, [0]).detach()
    x, target = randn(1, 1, 8, 8, seed=20), randn(1, 1, 8, 8, seed=21)
    loss = squared_loss(target)
    kw = dict(num_inference_steps=4, guidance_scale=2.0, order=2)
    res = sample_with_grad(unet, x, SCHED, conditioning=emb, loss_fn=loss, mode="checkpoint", **kw)

    def f(x_T, c):
        return sample_with_grad(unet, x_T, SCHED, conditioning=c, grad_x0=torch.zeros_like(x_T), mode="autograd", **kw).x0

    v, w = randn(*x.shape, seed=22), randn(*emb.shape, seed=23)
    fd_x = directional_fd(lambda z: loss(f(z, emb)), x, v)
    fd_c = directional_fd(lambda c: loss(f(x, c)), emb, w)
    assert math.isclose(float((res.grad_x_T * v).sum()), float(fd_x), rel_tol=1e-6)
    assert math.isclose(float((res.grad_conditioning * w).sum()), float(fd_c), rel_tol=1e-6)


# -- zero gradients and LoRA ------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["adjoint", "checkpoint", "autograd"])
def test_parameters_that_do_not_affect_the_output_get_zero_gradient(mode):
    unet = unet64()
    emb = class_embeddings(unet, [1]).detach()
    # without guidance the embedding table is never looked up: the given embedding replaces it
    res = sample_with_grad(unet, randn(1, 1, 8, 8, seed=24), SCHED, num_inference_steps=3, conditioning=emb,
                           grad_x0=randn(1, 1, 8, 8, seed=25), params=["class_embedding.weight", "conv_in.weight"],
                           mode=mode)
    assert torch.count_nonzero(res.grad_params["class_embedding.weight"]) == 0
    assert res.grad_params["class_embedding.weight"].shape == unet.class_embedding.weight.shape
    assert res.grad_params["conv_in.weight"].abs().sum() > 0


def test_lora_adapters_via_peft():
    from peft import LoraConfig, inject_adapter_in_model

    unet = inject_adapter_in_model(
        LoraConfig(r=2, lora_alpha=2, target_modules=["conv1", "time_emb_proj"]), tiny_class_unet().to(F64)
    )
    x, target = randn(1, 1, 8, 8, seed=26), randn(1, 1, 8, 8, seed=27)
    kw = dict(num_inference_steps=4, conditioning=torch.tensor([2]), guidance_scale=2.0,
              loss_fn=squared_loss(target), params="all")
    fresh = sample_with_grad(unet, x, SCHED, mode="checkpoint", **kw)
    assert set(fresh.grad_params) == {n for n, p in unet.named_parameters() if p.requires_grad}
    assert all("lora_" in n for n in fresh.grad_params)
    # lora_B starts at zero, so lora_A does not affect the output yet: zero gradient; lora_B's is not zero
    for name, g in fresh.grad_params.items():
        assert (torch.count_nonzero(g) == 0) == ("lora_A" in name), name

    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * randn(*p.shape, seed=len(name)))
    ref = sample_with_grad(unet, x, SCHED, mode="autograd", **kw)
    got = sample_with_grad(unet, x, SCHED, mode="checkpoint", **kw)
    for name in ref.grad_params:
        assert rel(got.grad_params[name], ref.grad_params[name]) < 1e-10, name
    # the continuous adjoint is an approximation: close at 32 second-order steps
    kw["num_inference_steps"] = 32
    ref = sample_with_grad(unet, x, SCHED, mode="autograd", **kw)
    adj = sample_with_grad(unet, x, SCHED, mode="adjoint", order=2, **kw)
    flat = lambda r: torch.cat([g.flatten() for g in r.grad_params.values()])  # noqa: E731
    assert torch.nn.functional.cosine_similarity(flat(adj), flat(ref), dim=0) > 0.95


# -- memory ----------------------------------------------------------------------------------------------------
def test_saved_tensor_memory_is_constant_for_adjoint_and_checkpoint_and_linear_for_autograd():
    model = mixture()
    x, target = randn(1, 1, 4, 4, seed=28), randn(1, 1, 4, 4, seed=29)
    steps = [10, 50, 200]
    peak, state = {}, {}
    for mode in ("adjoint", "checkpoint", "autograd"):
        for n in steps:
            with SavedTensorMeter(exclude=model.parameters()) as meter:
                res = sample_with_grad(model, x, SCHED, num_inference_steps=n, loss_fn=squared_loss(target),
                                       params=["means"], mode=mode, order=2)
            assert meter.current_bytes == 0  # every graph was freed
            peak[mode, n], state[mode, n] = meter.peak_bytes, res.state_bytes
    for mode in ("adjoint", "checkpoint"):
        assert peak[mode, 200] <= 1.3 * peak[mode, 10] and peak[mode, 50] <= 1.3 * peak[mode, 10], peak
    # autograd holds every step's graph: affine in N with a positive slope, 200 steps ~ 20x 10 steps
    a = [peak["autograd", n] for n in steps]
    slope = (a[2] - a[0]) / (steps[2] - steps[0])
    assert slope > 0 and abs(a[0] + slope * (steps[1] - steps[0]) - a[1]) <= 0.02 * a[1], a
    assert a[2] > 10 * a[0]
    # what is carried outside the graph: constant for adjoint, the per-step states (x_i, eps_i) for checkpoint
    assert state["adjoint", 200] == state["adjoint", 10]
    per_state = 2 * x.numel() * x.element_size()
    assert [state["checkpoint", n] for n in steps] == [n * per_state for n in steps]
    assert all(state["autograd", n] == 0 for n in steps)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_peak_memory():
    model = mixture().cuda()
    x, target = randn(4, 1, 4, 4, seed=30).cuda(), randn(4, 1, 4, 4, seed=31).cuda()
    peak = {}
    for mode in ("adjoint", "checkpoint", "autograd"):
        for n in (10, 200):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            sample_with_grad(model, x, SCHED, num_inference_steps=n, loss_fn=squared_loss(target), mode=mode)
            peak[mode, n] = torch.cuda.max_memory_allocated() - base
    assert peak["adjoint", 200] <= 1.3 * peak["adjoint", 10]
    assert peak["autograd", 200] > 5 * peak["autograd", 10]


# -- dtypes -----------------------------------------------------------------------------------------------
def test_float32_state_and_gradients():
    model = mixture()
    x, target = randn(2, 1, 4, 4, seed=32), randn(2, 1, 4, 4, seed=33)
    kw = dict(num_inference_steps=10, loss_fn=squared_loss(target), params=["means"], order=2)
    ref = sample_with_grad(model, x, SCHED, mode="checkpoint", **kw)
    model32 = mixture()
    model32.to(torch.float32)
    for mode in ("adjoint", "checkpoint", "autograd"):
        got = sample_with_grad(model32, x.float(), SCHED, mode=mode, **dict(kw, loss_fn=squared_loss(target.float())))
        assert got.x0.dtype == torch.float32 and got.grad_x_T.dtype == torch.float32
        tol = 1e-4 if mode != "adjoint" else 0.2
        assert rel(got.grad_x_T.double(), ref.grad_x_T) < tol, mode


# -- bad input ------------------------------------------------------------------------------------------------
@pytest.fixture
def small():
    model = mixture()
    return model, randn(1, 1, 4, 4, seed=34)


def test_rejects_bad_mode_order_and_steps(small):
    model, x = small
    g = torch.ones_like(x)
    with pytest.raises(ValueError, match=r"mode must be one of \('adjoint', 'checkpoint', 'autograd'\)"):
        sample_with_grad(model, x, SCHED, num_inference_steps=3, grad_x0=g, mode="backprop")
    with pytest.raises(ValueError, match=r"order must be one of \(1, 2\)"):
        sample_with_grad(model, x, SCHED, num_inference_steps=3, grad_x0=g, order=3)
    with pytest.raises(ValueError, match="num_inference_steps must be an integer >= 1"):
        sample_with_grad(model, x, SCHED, num_inference_steps=0, grad_x0=g)
    with pytest.raises(ValueError, match="exactly one of num_inference_steps"):
        sample_with_grad(model, x, SCHED, grad_x0=g)
    with pytest.raises(ValueError, match="timestep_spacing must be one of"):
        sample_with_grad(model, x, SCHED, num_inference_steps=3, timestep_spacing="uniform", grad_x0=g)
    with pytest.raises(ValueError, match="strictly decreasing"):
        sample_with_grad(model, x, SCHED, timesteps=torch.tensor([10, 500, -1]), grad_x0=g)


def test_rejects_bad_losses(small):
    model, x = small
    with pytest.raises(ValueError, match=r"loss_fn must return a scalar tensor.*\(1, 1, 4, 4\)"):
        sample_with_grad(model, x, SCHED, num_inference_steps=2, loss_fn=lambda x0: x0 ** 2)
    with pytest.raises(ValueError, match="exactly one of loss_fn"):
        sample_with_grad(model, x, SCHED, num_inference_steps=2)
    with pytest.raises(ValueError, match=r"grad_x0 must have the shape of x0 \(1, 1, 4, 4\)"):
        sample_with_grad(model, x, SCHED, num_inference_steps=2, grad_x0=torch.ones(2, 1, 4, 4, dtype=F64))
    with pytest.raises(FloatingPointError, match="dL/dx0"):
        sample_with_grad(model, x, SCHED, num_inference_steps=2, loss_fn=lambda x0: (x0 * float("nan")).sum())


def test_rejects_parameters_without_grad(small):
    model, x = small
    g = torch.ones_like(x)
    model.means.requires_grad_(False)
    with pytest.raises(ValueError, match=r"do not require grad: \['means'\]"):
        sample_with_grad(model, x, SCHED, num_inference_steps=2, grad_x0=g, params=["means"])
    with pytest.raises(ValueError, match="no parameter of the model requires grad"):
        sample_with_grad(model, x, SCHED, num_inference_steps=2, grad_x0=g, params="all")
    with pytest.raises(ValueError, match=r"unknown parameter names \['weights'\]"):
        sample_with_grad(model, x, SCHED, num_inference_steps=2, grad_x0=g, params=["weights"])


def test_rejects_bad_conditioning():
    unet = unet64()
    x, g = randn(1, 1, 8, 8), torch.ones(1, 1, 8, 8, dtype=F64)
    with pytest.raises(ValueError, match=r"class embedding must have shape \(B, 32\)"):
        sample_with_grad(unet, x, SCHED, num_inference_steps=2, conditioning=torch.zeros(1, 5, dtype=F64), grad_x0=g)
    with pytest.raises(ValueError, match="needs a conditioning"):
        sample_with_grad(unet, x, SCHED, num_inference_steps=2, grad_x0=g)
    with pytest.raises(ValueError, match="a batch of 3 for 1 samples"):
        sample_with_grad(unet, x, SCHED, num_inference_steps=2, conditioning=torch.zeros(3, 32, dtype=F64), grad_x0=g)
    text_unet = tiny_sd_pipeline().unet
    with pytest.raises(ValueError, match="uncond_conditioning is required"):
        sample_with_grad(text_unet, randn(1, 4, 16, 16), SCHED, num_inference_steps=2, guidance_scale=3.0,
                         conditioning=torch.zeros(1, 4, 32), grad_x0=torch.ones(1, 4, 16, 16))


class PoisonGrad(torch.autograd.Function):
    """Identity forward; NaN gradient where ``bad``."""

    @staticmethod
    def forward(ctx, x, bad):
        ctx.save_for_backward(bad)
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        (bad,) = ctx.saved_tensors
        return torch.where(bad, float("nan"), grad), None


class NaNBand(torch.nn.Module):
    """An unconditional wrapper of a model whose VJP is NaN at timesteps in (lo, hi) while its output stays finite,
    or whose output itself is NaN there when ``forward_nan``."""

    def __init__(self, model, lo, hi, forward_nan=False):
        super().__init__()
        self.model, self.lo, self.hi, self.forward_nan = model, lo, hi, forward_nan
        self.config = model.config

    def forward(self, x, t):
        out = self.model(x, t).sample
        bad = ((t > self.lo) & (t < self.hi)).reshape(-1, 1, 1, 1)
        if self.forward_nan:
            out = torch.where(bad, float("nan"), out)
        else:
            out = PoisonGrad.apply(out, bad)
        return type("Output", (), {"sample": out})


def test_nan_errors_name_the_step(small):
    model, x = small
    grid, g = torch.tensor([900, 700, 500, 300, 100, -1]), torch.ones_like(x)
    with pytest.raises(FloatingPointError, match=r"adjoint state \(a_y, a_c or a_theta\) became NaN/Inf in the backward step from timestep 300"):
        sample_with_grad(NaNBand(model, 200, 400), x, SCHED, timesteps=grid, grad_x0=g, mode="adjoint")
    with pytest.raises(FloatingPointError, match=r"dL/dx is NaN/Inf at step 3 \(timestep 300\)"):
        sample_with_grad(NaNBand(model, 200, 400), x, SCHED, timesteps=grid, grad_x0=g, mode="checkpoint")
    with pytest.raises(FloatingPointError, match=r"model output \(guided eps\) has NaN/Inf at step 2 \(timestep 500\)"):
        sample_with_grad(NaNBand(model, 400, 600, forward_nan=True), x, SCHED, timesteps=grid, grad_x0=g, mode="adjoint")


def test_the_prediction_type_is_never_guessed():
    """A UNet's config says nothing of what it predicts and a NoiseProcess has no scheduler config: an error asking
    for prediction_type (it used to fall back to epsilon); with the scheduler, or prediction_type given, it runs."""
    unet = unet64()
    x = randn(1, 1, 8, 8, seed=1)
    kw = dict(num_inference_steps=2, loss_fn=squared_loss(torch.zeros_like(x)), conditioning=torch.tensor([1]))
    with pytest.raises(ValueError, match="prediction_type: the model's config does not say what it predicts"):
        sample_with_grad(unet, x, NoiseSchedule.from_config(SCHED.config), **kw)
    given = sample_with_grad(unet, x, NoiseSchedule.from_config(SCHED.config), prediction_type="epsilon",
                             timestep_spacing="trailing", **kw)  # what the scheduler's config says
    from_config = sample_with_grad(unet, x, SCHED, **kw)
    assert torch.equal(given.grad_x_T, from_config.grad_x_T)
