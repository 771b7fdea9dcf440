"""RestorationPipeline with MCG / DPS: the papers' update written out by hand, the gradient pitfalls, schedulers,
batch independence, network-call counts and bad input."""

import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, UNet2DModel
from diffusers.models.unets.unet_2d import UNet2DOutput

from conftest import tiny_class_unet
from steerdiff.core import NoiseSchedule, spaced_timesteps, to_x0
from steerdiff.guidance import DPS, MCG, ProjectionOnly, Unconditional
from steerdiff.guidance.manifold import make_method, step_coefficients
from steerdiff.guidance.operators import (
    Colorization, GaussianBlur, Inpainting, SuperResolution, box_mask, random_mask,
)
from steerdiff.pipelines import RestorationPipeline
from steerdiff.pipelines.class_conditional import ClassConditionalPipeline
from steerdiff.testbeds.mixture import GaussianMixtureDenoiser

F64 = torch.float64


def gens(*seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def pipeline(unet, scheduler, method=None):
    pipe = RestorationPipeline(unet, scheduler, method)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def gaussian_prior(mean: float, var: float, scheduler, shape=(1, 4, 4)):
    """A single Gaussian N(mean, var I): x0_hat is affine in x with Jacobian alpha var / (alpha^2 var + sigma^2)."""
    return GaussianMixtureDenoiser.from_components(
        torch.full((1, *shape), mean, dtype=F64), var, scheduler_config=scheduler.config, dtype=F64)


@pytest.fixture
def tiny64():
    return tiny_class_unet().to(F64)


# -- the update, written out from the papers against diffusers' DDPM step ---------------------------------------------
@pytest.mark.parametrize("method", [DPS(0.7), MCG(0.7)], ids=["dps", "mcg"])
def test_matches_a_hand_written_loop_from_the_papers(tiny64, method):
    """x' = DDPM posterior step (diffusers), then x' - step * grad ||r|| per sample (the reference code's unsquared
    norm, i.e. the "norm" rule), for MCG restricted to (1 - M) and followed by (1 - M) x'' + M y_{i-1},
    y_{i-1} = sqrt(abar_{i-1}) y + sqrt(1 - abar_{i-1}) M z."""
    steps, n = 4, 3
    mask = random_mask((8, 8), 0.5, generator=gens(0, 1, 2))
    op = Inpainting(mask)
    y = op.forward(torch.rand(n, 1, 8, 8, generator=gens(3)[0], dtype=F64) * 2 - 1)
    latents = torch.randn(n, 1, 8, 8, generator=gens(4)[0], dtype=F64)
    labels = torch.full((n,), 3)
    pipe = pipeline(tiny64, DDPMScheduler(clip_sample=False), method)
    got = pipe(y, op, num_inference_steps=steps, generator=gens(5, 6, 7), latents=latents, output_type="latent").images

    sched = DDPMScheduler(clip_sample=False, timestep_spacing="linspace")  # T - 1 down to 0, both included
    sched.set_timesteps(steps)
    ac = sched.alphas_cumprod.to(F64)
    g, x, m = gens(5, 6, 7), latents.clone(), mask.to(F64)
    for i, t in enumerate(sched.timesteps):
        x = x.detach().requires_grad_(True)
        eps = tiny64(x, t, class_labels=labels).sample
        x0 = (x - (1 - ac[t]).sqrt() * eps) / ac[t].sqrt()
        norms = (y - m * x0).flatten(1).norm(dim=1)
        (grad,) = torch.autograd.grad(norms.sum(), x)
        x_prev = sched.step(eps.detach(), t, x.detach(), generator=g).prev_sample
        if isinstance(method, DPS):
            x = x_prev - 0.7 * grad
        else:
            a_prev = ac[sched.timesteps[i + 1]] if i + 1 < steps else torch.tensor(1.0, dtype=F64)
            z = torch.stack([torch.randn(1, 8, 8, generator=gi, dtype=F64) for gi in g])
            y_prev = a_prev.sqrt() * y + (1 - a_prev).sqrt() * m * z
            x = (1 - m) * (x_prev - 0.7 * (1 - m) * grad) + m * y_prev
    assert torch.allclose(got, x.detach(), atol=1e-8)


def test_step_size_rules():
    norm = torch.tensor([0.5, 2.0], dtype=F64)
    assert torch.allclose(step_coefficients(1.0, "norm", norm), torch.tensor([1.0, 0.25], dtype=F64))
    assert torch.allclose(step_coefficients(1.0, "residual", norm), torch.tensor([2.0, 0.5], dtype=F64))
    assert torch.allclose(step_coefficients(0.3, "constant", norm), torch.tensor([0.3, 0.3], dtype=F64))
    assert torch.equal(step_coefficients(1.0, "norm", torch.zeros(1, dtype=F64)), torch.zeros(1, dtype=F64))
    assert torch.isfinite(step_coefficients(1.0, "residual", torch.zeros(1, dtype=F64))).all()


# -- the gradient flows through the network ----------------------------------------------------------------------------
SHORT = DDPMScheduler(num_train_timesteps=10, clip_sample=False)  # alpha^2 ~ 0.9 at t = 9: a sizeable Jacobian


def test_correction_is_not_zeroed_by_clipping():
    """x0_hat = 1.5 lies outside [-1, 1]; a clamp would zero the gradient (the reference code's pitfall).  Here the
    DPS correction of one step equals the analytic 2 zeta J (y - x0_hat) on measured pixels, J = alpha s^2 / v."""
    prior = gaussian_prior(1.5, 0.04, SHORT)
    op = Inpainting(box_mask((4, 4)))
    alpha, sigma = NoiseSchedule.from_config(SHORT.config).alpha_sigma(torch.tensor(9))
    x_t = alpha * 1.5 + sigma * torch.randn(2, 1, 4, 4, generator=gens(0)[0], dtype=F64)  # a typical x_t
    y = op.forward(torch.full((2, 1, 4, 4), 0.9, dtype=F64))
    run = lambda method: pipeline(prior, SHORT, method)(  # noqa: E731
        y, op, num_inference_steps=1, generator=gens(1, 2), latents=x_t, output_type="latent").images
    plain, dps = run(Unconditional()), run(DPS(1.0, step_size_rule="constant"))

    jac = alpha * 0.04 / (alpha**2 * 0.04 + sigma**2)
    x0_hat = 1.5 + jac * (x_t - alpha * 1.5)
    assert bool((x0_hat > 1.2).all())  # every pixel of the Tweedie estimate would be clipped
    assert torch.allclose(plain, x0_hat, atol=1e-12)  # one step to the clean end lands on x0_hat
    m = box_mask((4, 4)).to(F64)
    expected = 2 * jac * m * (y - x0_hat)
    assert torch.allclose(dps - plain, expected, atol=1e-12)
    assert float((dps - plain).abs()[..., m.bool()[0]].min()) > 0.05
    # the pitfall, for contrast: the same gradient through a clamp is exactly zero
    x = x_t.clone().requires_grad_(True)
    clamped = (1.5 + jac * (x - alpha * 1.5)).clamp(-1, 1)
    (g,) = torch.autograd.grad((y - op.forward(clamped)).square().sum(), x)
    assert torch.count_nonzero(g) == 0


@pytest.mark.parametrize("method", [DPS(1.0), MCG(1.0)], ids=["dps", "mcg"])
def test_correction_vanishes_when_the_measurement_is_explained(method):
    """y = A x0_hat(x_T): the residual is 0, so DPS reduces to plain sampling and MCG to projection-only
    (no 0/0 from the residual-normalised step)."""
    prior = gaussian_prior(0.3, 0.1, SHORT)
    op = Inpainting(box_mask((4, 4)))
    x_t = torch.randn(2, 1, 4, 4, generator=gens(0)[0], dtype=F64)
    alpha, sigma = NoiseSchedule.from_config(SHORT.config).alpha_sigma(torch.tensor(9))
    y = op.forward(to_x0(prior(x_t, 9).sample, x_t, alpha, sigma, "epsilon"))
    baseline = ProjectionOnly() if isinstance(method, MCG) else Unconditional()
    run = lambda m: pipeline(prior, SHORT, m)(  # noqa: E731
        y, op, num_inference_steps=1, generator=gens(1, 2), latents=x_t, output_type="latent", return_residuals=True)
    out, ref = run(method), run(baseline)
    assert float(out.residuals.abs().max()) < 1e-12
    assert torch.allclose(out.images, ref.images, atol=1e-14)


# -- schedulers, batches, residuals, calls -----------------------------------------------------------------------------
@pytest.mark.parametrize("scheduler", [DDIMScheduler, EulerDiscreteScheduler])
def test_scheduler_sampler_without_guidance_is_the_plain_pipeline(tiny64, scheduler):
    sched = scheduler.from_config(DDPMScheduler().config)
    latents = torch.randn(2, 1, 8, 8, generator=gens(0)[0], dtype=F64)
    plain = ClassConditionalPipeline(tiny64, scheduler.from_config(sched.config))
    plain.set_progress_bar_config(disable=True)
    ref = plain([3, 3], 5, latents=latents, output_type="latent").images
    op = Inpainting(box_mask((8, 8)))
    got = pipeline(tiny64, sched, Unconditional())(
        torch.zeros(2, 1, 8, 8, dtype=F64), op, num_inference_steps=5, sampler="scheduler", latents=latents,
        output_type="latent").images
    assert torch.allclose(got, ref, atol=1e-6)


@pytest.mark.parametrize("scheduler", [None, DDIMScheduler, EulerDiscreteScheduler, DPMSolverMultistepScheduler],
                         ids=["ancestral", "ddim", "euler", "dpmpp"])
def test_mcg_restorations_keep_exact_measurements(tiny64, scheduler):
    """sigma_y = 0: the last projection is onto y itself, so measured pixels equal y (VP and x / alpha states)."""
    op = Inpainting(random_mask((8, 8), 0.5, generator=gens(0, 1)))
    y = op.forward(torch.rand(2, 1, 8, 8, generator=gens(2)[0], dtype=F64) * 2 - 1)
    sched = DDPMScheduler() if scheduler is None else scheduler.from_config(DDPMScheduler().config)
    x = pipeline(tiny64, sched, MCG(0.5))(
        y, op, num_inference_steps=4, sampler="ancestral" if scheduler is None else "scheduler",
        generator=gens(3, 4), output_type="latent").images
    assert torch.allclose(op.forward(x), y, atol=1e-12)


def test_colorization_on_an_rgb_model():
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4).eval().to(F64)
    op = Colorization()
    y = op.forward(torch.rand(2, 3, 8, 8, generator=gens(0)[0], dtype=F64) * 2 - 1)
    x = pipeline(unet, DDPMScheduler(), MCG(0.5))(y, op, num_inference_steps=3, generator=gens(1, 2), output_type="latent").images
    assert x.shape == (2, 3, 8, 8) and torch.allclose(op.forward(x), y, atol=1e-12)
    with pytest.raises(ValueError, match="Colorization needs an RGB model"):
        pipeline(tiny_class_unet().to(F64), DDPMScheduler(), DPS())(torch.zeros(1, 1, 8, 8, dtype=F64), op)


@pytest.mark.parametrize("method", [DPS(0.5), MCG(0.5)], ids=["dps", "mcg"])
def test_batch_equals_single_restorations(tiny64, method):
    op = SuperResolution(2)
    y = torch.rand(3, 1, 4, 4, generator=gens(0)[0], dtype=F64) * 2 - 1
    pipe = pipeline(tiny64, DDPMScheduler(), method)
    batch = pipe(y, op, 0.05, 4, generator=gens(10, 11, 12), output_type="latent").images
    for i in range(3):
        single = pipe(y[i : i + 1], op, 0.05, 4, generator=gens(10 + i), output_type="latent").images
        assert torch.allclose(batch[i : i + 1], single, atol=1e-10)


def test_residuals_and_network_calls_with_cfg(tiny64):
    op = GaussianBlur(3, 0.8)
    y = op.forward(torch.rand(2, 1, 8, 8, generator=gens(0)[0], dtype=F64) * 2 - 1)
    pipe = pipeline(tiny64, DDPMScheduler(), DPS(0.5))
    batches = []
    hook = tiny64.register_forward_hook(lambda m, args, out: batches.append(args[0].shape[0]))
    out = pipe(y, op, 0.0, 6, class_labels=[0, 2], guidance_scale=3.0, generator=gens(1, 2), output_type="pt",
               return_residuals=True)
    hook.remove()
    assert batches == [4] * 6 and out.network_calls == 6 and out.backward_calls == 6
    assert out.residuals.shape == (6, 2) and out.residuals.dtype == F64
    assert out.images.shape == (2, 1, 8, 8) and 0 <= float(out.images.min()) and float(out.images.max()) <= 1
    # the first residual is ||y - A x0_hat(x_T)|| with the guided prediction
    latents = torch.stack([torch.randn(1, 8, 8, generator=g, dtype=F64) for g in gens(1, 2)])
    schedule = NoiseSchedule.from_config(DDPMScheduler().config)
    with torch.no_grad():
        t = torch.tensor([999, 999])
        u = tiny64(latents, t, class_labels=torch.tensor([3, 3])).sample
        c = tiny64(latents, t, class_labels=torch.tensor([0, 2])).sample
        a, s = schedule.alpha_sigma(torch.tensor(999))
        x0 = (latents - s * (u + 3.0 * (c - u))) / a
    assert torch.allclose(out.residuals[0], (y - op.forward(x0)).flatten(1).norm(dim=1), rtol=1e-9)
    plain = pipeline(tiny64, DDPMScheduler(), ProjectionOnly())(y[:, :, :, :], SuperResolution(1), 0.0, 3, generator=gens(1, 2))
    assert plain.backward_calls == 0 and plain.network_calls == 3


# -- bad input ---------------------------------------------------------------------------------------------------------
def test_bad_input_errors(tiny64):
    pipe = pipeline(tiny64, DDPMScheduler(), MCG())
    y = torch.zeros(1, 1, 8, 8, dtype=F64)
    box = Inpainting(box_mask((8, 8)))
    cases = [
        (dict(measurement=y, operator=Inpainting(box_mask((16, 16)))),
         r"mask of shape \(1, 16, 16\) does not match the model's sample shape \(1, 8, 8\)"),
        (dict(measurement=y, operator=box, sigma_y=-0.1), "sigma_y must be a finite number >= 0"),
        (dict(measurement=y, operator=GaussianBlur(3, 1.0)), "MCG projects onto the measurements, but GaussianBlur has no projection.*use DPS"),
        (dict(measurement=y * float("nan"), operator=box), "measurement has 64 NaN/Inf values"),
        (dict(measurement=torch.zeros(1, 1, 4, 4), operator=box), r"measurement must have shape \(B, 1, 8, 8\)"),
        (dict(measurement=y, operator=box, num_inference_steps=0), "num_inference_steps must be an integer >= 1"),
        (dict(measurement=y, operator=box, sampler="euler"), r"sampler must be one of \('ancestral', 'scheduler'\)"),
        (dict(measurement=y, operator=box, latents=torch.zeros(2, 1, 8, 8)), r"latents must have shape \(1, 1, 8, 8\)"),
        (dict(measurement=y, operator=box, guidance_scale=2.0), "guidance_scale != 1 needs class_labels"),
        (dict(measurement=y, operator=box, class_labels=[7]), r"class_labels must lie in 0..2"),
        (dict(measurement=y, operator=box, output_type="jpg"), "output_type must be one of"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            pipe(**kwargs)
    pipe.method = "dps"
    with pytest.raises(ValueError, match="method must be a RestorationMethod"):
        pipe(y, box)


def test_bad_method_arguments():
    with pytest.raises(ValueError, match="step_size must be a finite number >= 0"):
        DPS(-1.0)
    with pytest.raises(ValueError, match=r"step_size_rule must be one of \('norm', 'residual', 'constant'\)"):
        MCG(1.0, step_size_rule="paper")
    with pytest.raises(ValueError, match="unknown restoration method 'ddrm'"):
        make_method("ddrm")
    assert make_method("dps", step_size=0.3) == DPS(0.3)


def test_unconditional_model_rejects_class_labels():
    prior = gaussian_prior(0.0, 1.0, DDPMScheduler())
    pipe = pipeline(prior, DDPMScheduler(), DPS())
    with pytest.raises(ValueError, match="class_labels given, but GaussianMixtureDenoiser is not class-conditional"):
        pipe(torch.zeros(1, 1, 4, 4, dtype=F64), Inpainting(box_mask((4, 4))), class_labels=[0])


def test_non_finite_model_output_is_reported(tiny64):
    hook = tiny64.register_forward_hook(lambda m, args, out: UNet2DOutput(sample=out.sample * math.inf))
    try:
        run = lambda check: pipeline(tiny64, DDPMScheduler(), DPS())(  # noqa: E731
            torch.zeros(1, 1, 8, 8, dtype=F64), Inpainting(box_mask((8, 8))), num_inference_steps=2, generator=gens(0),
            nonfinite_check=check)
        with pytest.raises(FloatingPointError, match=r"the model output holds NaN/Inf at step 0 of 2 \(timestep 999\)"):
            run("auto")
        with pytest.raises(FloatingPointError, match="the restored samples have 64 NaN/Inf values"):
            run("off")  # the final check still catches what the per-step watch was told to ignore
    finally:
        hook.remove()


def test_a_diverging_update_is_named_at_its_step(tiny64):
    """A finite model output but a method update that overflows: the step-wise watch names the update and the step
    (it used to surface only at the end, as the restored samples' count)."""

    class Exploding(DPS):
        def update(self, x_next, x, residual, operator, noised_y):
            return x_next * math.inf

    with pytest.raises(FloatingPointError, match=r"the restored samples after Exploding's update \(the model output was finite.*\) holds NaN/Inf at step 0 of 2"):
        pipeline(tiny64, DDPMScheduler(), Exploding())(
            torch.zeros(1, 1, 8, 8, dtype=F64), Inpainting(box_mask((8, 8))), num_inference_steps=2, generator=gens(0))


def test_a_dynamic_shift_scheduler_is_refused_before_sampling():
    """A flow scheduler that needs a pipeline's mu (use_dynamic_shifting) has no rule here: a clear error naming the
    way out, not diffusers' missing-mu error from inside set_timesteps; a static shift runs."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    y = torch.zeros(1, 1, 4, 4, dtype=F64)
    dynamic = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    prior = gaussian_prior(0.0, 1.0, FlowMatchEulerDiscreteScheduler())
    with pytest.raises(ValueError, match=r"sampler='scheduler': FlowMatchEulerDiscreteScheduler shifts its grid .* use a static shift"):
        pipeline(prior, dynamic, DPS())(y, Inpainting(box_mask((4, 4))), sampler="scheduler", num_inference_steps=2)
    # a static shift runs (FlowMatchEulerDiscreteScheduler has no init_noise_sigma nor scale_model_input: the state
    # is x), and without guidance it is the scheduler's own loop
    from steerdiff.guidance import Unconditional

    static = FlowMatchEulerDiscreteScheduler(shift=3.0)
    prior = gaussian_prior(0.5, 0.3, static)
    latents = torch.randn(1, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=F64)
    out = pipeline(prior, static, Unconditional())(y, Inpainting(box_mask((4, 4))), sampler="scheduler", latents=latents,
                                                   num_inference_steps=3, output_type="latent").images
    own = FlowMatchEulerDiscreteScheduler(shift=3.0)
    own.set_timesteps(3)
    x = latents
    for t in own.timesteps:
        x = own.step(prior(x, t).sample, t, x).prev_sample
    torch.testing.assert_close(out, x, rtol=0, atol=1e-12)
