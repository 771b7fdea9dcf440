"""A diffusers pipeline that restores x from a measurement y = A x + n with MCG, DPS, DDS or projections.

    pipe = RestorationPipeline(unet, scheduler, method=DPS(step_size=1.0))
    out = pipe(y, operator=Inpainting(box_mask((8, 8))), sigma_y=0.05, num_inference_steps=200,
               generator=[torch.Generator().manual_seed(i) for i in range(len(y))], return_residuals=True)

Two samplers:

- ``sampler="ancestral"`` (default): the ancestral DDPM sampler of both papers, built from the core
  (:func:`~steerdiff.core.sde.ancestral_step` with eta = 1 = the DDPM posterior q(x_{i-1} | x_i, x0_hat), written
  in (alpha, sigma) so it serves VP and flow-matching processes alike) on ``num_inference_steps`` timesteps
  from T - 1 down to 0 (DDPM's "linspace" rule, :func:`~steerdiff.core.timesteps.linspace_timesteps`), then the
  clean end, with the noise process of ``scheduler.config``; on a flow process N equal steps in s from 1 to 0.
- ``sampler="scheduler"``: ``self.scheduler.step`` of any diffusers or steerdiff scheduler.  The guidance works
  on x_t = alpha x0 + sigma eps: for schedulers whose state is x / alpha (k-diffusion style sigmas: Euler,
  Heun, LMS, ...; ``init_noise_sigma`` != 1) the state is converted to x and back around each update.  The noise
  level after step i is read from ``scheduler.sigmas`` when the scheduler has them (sigma / alpha on VP, the
  noise level s on flow matching), else from its noise process at the next timestep (the clean end after the
  last one).

The network is reached through the model boundary (:func:`~steerdiff.pipelines.conditioning.denoiser_for`), so
any guidance rule works (``guidance_rule``: APG, weight schedules, interval, ...) besides a plain CFG weight.
Per step the network is called once (twice the batch with classifier-free guidance) with autograd enabled
when the method needs the gradient (MCG, DPS: one backward pass per step).  Randomness (initial noise,
ancestral noise, the noise of the noised measurement) comes from the generators, one per sample when a list
is given, so a restoration does not depend on the batch it is computed in.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils import BaseOutput

from ..core.grid import Grid, make_grid
from ..core.nonfinite import NonFiniteWatch, finish_earliest
from ..core.process import model_process
from ..core.sde import ancestral_step, sample_noise
from ..core.tensors import batch_norm, expand_to
from ..core.timesteps import linspace_timesteps, with_final
from ..guidance.manifold import RestorationMethod, Unconditional
from ..guidance.operators import InverseProblem, LinearOperator
from .class_conditional import check_call_arguments, null_class_id, sample_shape
from .conditioning import denoiser_for

SAMPLERS = ("ancestral", "scheduler")


@dataclass
class RestorationPipelineOutput(BaseOutput):
    """``images``: the restorations; ``residuals``: (steps, B) float64 ||y - A x0_hat(x_i)|| per step, when
    requested; ``network_calls`` / ``backward_calls``: forward and backward passes of the network (batched)."""

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    residuals: torch.Tensor | None = None
    network_calls: int = 0
    backward_calls: int = 0


def _is_class_conditional(model) -> bool:
    try:
        null_class_id(model)
    except ValueError:
        return False
    return True


class RestorationPipeline(DiffusionPipeline):
    """Restore images from measurements with a diffusion prior (see the module docstring).

    ``method``: a :class:`~steerdiff.guidance.manifold.RestorationMethod` (``MCG``, ``DPS``, ``ProjectionOnly``,
    ``Unconditional``); None = ``Unconditional()``.  It is a plain attribute and may be swapped between calls.
    """

    model_cpu_offload_seq = "unet"

    def __init__(self, unet, scheduler, method: RestorationMethod | None = None):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)
        self.method = method
        self.image_processor = VaeImageProcessor(do_resize=False, do_normalize=True)

    # -- pieces -----------------------------------------------------------------------------------------------------
    def _labels(self, class_labels, batch: int, guided: bool):
        conditional = _is_class_conditional(self.unet)
        if class_labels is None:
            if guided:
                raise ValueError("guidance_scale != 1 needs class_labels (classifier-free guidance towards a class; so does a guidance_rule)")
            return torch.full((batch,), null_class_id(self.unet), device=self.device) if conditional else None
        if not conditional:
            raise ValueError(f"class_labels given, but {type(self.unet).__name__} is not class-conditional")
        labels = torch.as_tensor(class_labels, device=self.device)
        if labels.ndim == 0:
            labels = labels.expand(batch)
        null = null_class_id(self.unet)
        if labels.shape != (batch,) or labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise ValueError(f"class_labels must be {batch} integers (one per measurement), got {class_labels!r}")
        if bool(((labels < 0) | (labels > null)).any()):
            raise ValueError(f"class_labels must lie in 0..{null - 1} (or {null} = unconditional), got {labels.tolist()}")
        return labels

    def _ancestral_grid(self, process, num_steps: int) -> Grid:
        """VP: DDPM's timesteps T - 1 .. 0, then the clean end; flow: s = 1 - i / N, pure noise to data in N
        equal steps (t = 0 is already clean there)."""
        T = process.num_train_timesteps
        if process.kind == "flow":
            return make_grid(process, torch.linspace(T, 0, num_steps + 1, dtype=torch.float64), device=self.device)
        return make_grid(process, with_final(linspace_timesteps(T, num_steps)), device=self.device)

    def _scheduler_grid(self, process, num_steps: int):
        """Timesteps and the level (alpha, sigma) of the state before each step and after the last, plus the
        factor c with x = c * state (1, or alpha for schedulers whose state is x / alpha)."""
        sched = self.scheduler
        sched.set_timesteps(num_steps, device=self.device)
        ts = sched.timesteps
        sigmas = getattr(sched, "sigmas", None)
        has_sigmas = torch.is_tensor(sigmas) and sigmas.numel() == ts.numel() + 1
        if has_sigmas:  # flow s, or VP sigma_bar
            levels = process.alpha_sigma_of_sigmas(sigmas.to(self.device))
        else:
            levels = process.alpha_sigma(with_final(ts.to(self.device)))
        init = float(getattr(sched, "init_noise_sigma", 1.0))  # flow-matching schedulers start from unscaled noise
        if init == 1.0:
            scale = torch.ones_like(levels[0])
        elif has_sigmas and process.kind == "vp":
            scale = levels[0]
        else:
            raise ValueError(
                f"{type(sched).__name__} scales its state (init_noise_sigma = {init}) without "
                "exposing the sigmas of its steps; use sampler='ancestral' or a variance-preserving scheduler"
            )
        return ts, *levels, scale

    # -- the loop ---------------------------------------------------------------------------------------------------
    def __call__(
        self,
        measurement: torch.Tensor,
        operator: LinearOperator,
        sigma_y: float = 0.0,
        num_inference_steps: int = 100,
        sampler: str = "ancestral",
        class_labels: int | Sequence[int] | torch.Tensor | None = None,
        guidance_scale: float = 1.0,
        guidance_rule=None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_residuals: bool = False,
        return_dict: bool = True,
        nonfinite_check: str = "auto",
    ) -> RestorationPipelineOutput | tuple:
        """
        Args:
            measurement: y of shape (B, *operator.output_shape(sample shape)), finite.
            operator: the measurement operator A (:mod:`steerdiff.guidance.operators`).
            sigma_y: std of the measurement noise (>= 0), a property of the problem.
            num_inference_steps: steps (>= 1); each is one network call (and one backward pass for MCG/DPS).
            sampler: "ancestral" (the papers' DDPM sampler) or "scheduler" (``self.scheduler``).
            class_labels: one class id per measurement for class-conditional models (None = the null class).
            guidance_scale: classifier-free guidance w in u + w (c - u) (1 = none; needs class_labels).
            guidance_rule: any :mod:`steerdiff.guidance` rule instead of ``guidance_scale`` (needs class_labels).
            generator: one generator, or one per sample.
            latents: initial noise (B, C, H, W); drawn from ``generator`` when None.
            output_type: "pil", "np" or "pt" (images in [0, 1]) or "latent" (raw restorations in model space).
            return_residuals: also return ||y - A x0_hat|| per step and sample.
            nonfinite_check: NaN/Inf in the model output is a FloatingPointError naming the step, the timestep and
                how many samples: "auto", "eager", "deferred" or "off" (:mod:`steerdiff.core.nonfinite`); a
                diverging guidance step is caught on the restored samples at the end.
        """
        method = self.method if self.method is not None else Unconditional()
        if not isinstance(method, RestorationMethod):
            raise ValueError(f"method must be a RestorationMethod (MCG, DPS, ProjectionOnly, Unconditional), got {method!r}")
        problem = InverseProblem(operator, sigma_y)
        shape = sample_shape(self.unet)
        problem.check_measurement(measurement, shape)
        method.check_operator(operator)
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        if method.takes_own_step and sampler != "ancestral":
            raise ValueError(f"{type(method).__name__} takes its own DDIM step; use sampler='ancestral'")
        if sampler == "scheduler" and self.scheduler.config.get("use_dynamic_shifting"):
            raise ValueError(
                f"sampler='scheduler': {type(self.scheduler).__name__} shifts its grid by the mu a pipeline computes from "
                "its image sequence length (use_dynamic_shifting=True), which a restoration run has no rule for; use a "
                "static shift (use_dynamic_shifting=False, shift=...) or sampler='ancestral'"
            )
        check_call_arguments(num_inference_steps, guidance_scale, output_type)
        if guidance_rule is not None and guidance_scale != 1.0:
            raise ValueError("give guidance_scale or guidance_rule, not both (the rule sets the guidance)")
        guidance = guidance_scale if guidance_rule is None else guidance_rule
        process, prediction_type = model_process(self.scheduler)
        dtype, device = self.unet.dtype, self.device
        y = measurement.to(device=device, dtype=dtype)
        batch = y.shape[0]
        labels = self._labels(class_labels, batch, guided=guidance_rule is not None or guidance_scale != 1.0)
        denoiser = denoiser_for(self.unet, process, prediction_type, guidance, cond=labels)
        if latents is None:
            latents = sample_noise((batch, *shape), generator, device, dtype)
        elif tuple(latents.shape) != (batch, *shape):
            raise ValueError(f"latents must have shape {(batch, *shape)}, got {tuple(latents.shape)}")

        if sampler == "ancestral":
            grid = self._ancestral_grid(process, num_inference_steps)
            timesteps, alphas, sigmas = grid.timesteps, grid.alpha, grid.sigma
            scale = torch.ones_like(alphas)
            step_kwargs = {}
        else:
            timesteps, alphas, sigmas, scale = self._scheduler_grid(process, num_inference_steps)
            step_kwargs = {"generator": generator} if "generator" in inspect.signature(self.scheduler.step).parameters else {}
        denoiser.reset(timesteps)
        state = latents.to(device, dtype)
        if sampler == "scheduler":
            state = state * getattr(self.scheduler, "init_noise_sigma", 1.0)
        residuals, calls = [], 0
        what = "the guided model output" if denoiser.guided else "the model output"
        watch = NonFiniteWatch(nonfinite_check, what, len(timesteps))
        scale_input = getattr(self.scheduler, "scale_model_input", None) if sampler == "scheduler" else None
        update_watch = NonFiniteWatch(nonfinite_check, f"the restored samples after {type(method).__name__}'s update "
                                      "(the model output was finite; a smaller step_size may help)", len(timesteps))
        for i, t in enumerate(self.progress_bar(timesteps)):
            a, s = alphas[i], sigmas[i]
            x = scale_input(state, t) if scale_input is not None else state  # the VP sample (flow schedulers: the state)
            with torch.set_grad_enabled(method.uses_gradient):
                x = x.detach().requires_grad_(method.uses_gradient)
                pred = denoiser.predict(x, t, a, s, step=i)
                out, x0_hat = pred.output, pred.x0
                residual = y - operator.forward(x0_hat)
            calls += 1
            watch.update(i, out.detach(), t)
            if return_residuals:
                residuals.append(batch_norm(residual.detach()))
            with torch.no_grad():
                if sampler == "ancestral":
                    noise = sample_noise(x.shape, generator, device, dtype)
                    if method.takes_own_step:
                        x_next = method.step(x.detach(), x0_hat.detach(), a, s, alphas[i + 1], sigmas[i + 1], noise, y,
                                             operator, sigma_y)
                    else:
                        x_next = ancestral_step(x.detach(), x0_hat.detach(), a, s, alphas[i + 1], sigmas[i + 1], noise)
                else:
                    state = self.scheduler.step(out.detach(), t, state, **step_kwargs).prev_sample
                    x_next = state * expand_to(scale[i + 1], state)
                noised_y = None
                if method.uses_projection:
                    z = sample_noise(x.shape, generator, device, dtype)
                    noised_y = expand_to(alphas[i + 1], y) * y + expand_to(sigmas[i + 1], y) * operator.forward(z)
            x_next = method.update(x_next, x, residual, operator, noised_y)
            update_watch.update(i, x_next.detach(), t)
            state = x_next.detach() / expand_to(scale[i + 1], x_next)

        finish_earliest(watch, update_watch)
        if not bool(torch.isfinite(state).all()):  # also with nonfinite_check="off": nothing non-finite is returned
            raise FloatingPointError(
                f"the restored samples have {int((~torch.isfinite(state)).sum())} NaN/Inf values: the model output "
                "or a guidance step diverged (check the model, or lower the method's step_size)"
            )
        images = state if output_type == "latent" else self.image_processor.postprocess(state, output_type=output_type)
        self.maybe_free_model_hooks()
        res = torch.stack(residuals) if return_residuals else None
        backward = calls if method.uses_gradient else 0
        if not return_dict:
            return (images, res)
        return RestorationPipelineOutput(images=images, residuals=res, network_calls=calls, backward_calls=backward)
