"""A diffusers pipeline that restores x from a measurement y = A x + n with MCG, DPS or projections.

    pipe = RestorationPipeline(unet, scheduler, method=DPS(step_size=1.0))
    out = pipe(y, operator=Inpainting(box_mask((8, 8))), sigma_y=0.05, num_inference_steps=200,
               generator=[torch.Generator().manual_seed(i) for i in range(len(y))], return_residuals=True)

Two samplers:

- ``sampler="ancestral"`` (default): the ancestral DDPM sampler of both papers, built from the core
  (:func:`~steerdiff.core.sde.ancestral_step` with eta = 1 = the DDPM posterior q(x_{i-1} | x_i, x0_hat)) on
  ``num_inference_steps`` timesteps spaced "linspace" from T - 1 down to the clean end, using the schedule of
  ``scheduler.config``.
- ``sampler="scheduler"``: ``self.scheduler.step`` of any diffusers or steerdiff scheduler.  The guidance works
  in the variance-preserving coordinates of the papers: for schedulers whose state is x / alpha
  (k-diffusion style sigmas: Euler, Heun, LMS, ...; ``init_noise_sigma`` != 1) the state is converted to x and
  back around each update.  The noise level after step i is read from ``scheduler.sigmas`` when the scheduler
  has them, else from its ``alphas_cumprod`` at the next timestep (the clean end after the last one).

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

from ..core.prediction import to_x0
from ..core.schedule import NoiseSchedule
from ..core.sde import ancestral_step, sample_noise
from ..core.tensors import batch_norm, expand_to
from ..core.timesteps import check_num_steps, spaced_timesteps, with_final
from ..guidance.manifold import RestorationMethod, Unconditional
from ..guidance.operators import InverseProblem, LinearOperator
from .class_conditional import check_call_arguments, null_class_id, sample_shape

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
    def _labels(self, class_labels, batch: int, guidance_scale: float):
        conditional = _is_class_conditional(self.unet)
        if class_labels is None:
            if guidance_scale != 1.0:
                raise ValueError("guidance_scale != 1 needs class_labels (classifier-free guidance towards a class)")
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

    def _predict(self, x, t, labels, guidance_scale):
        """The network output at (x, t), with classifier-free guidance u + w (c - u) when w != 1."""
        t = t.expand(x.shape[0])
        if guidance_scale == 1.0:
            return self.unet(x, t, class_labels=labels).sample
        null = torch.full_like(labels, null_class_id(self.unet))
        uncond, cond = self.unet(torch.cat([x, x]), torch.cat([t, t]), class_labels=torch.cat([null, labels])).sample.chunk(2)
        return uncond + guidance_scale * (cond - uncond)

    def _ancestral_grid(self, num_steps: int):
        schedule = NoiseSchedule.from_config(self.scheduler.config)
        ts = with_final(spaced_timesteps(schedule.num_train_timesteps, num_steps, "linspace", device=self.device))
        alphas, sigmas = schedule.alpha_sigma(ts)
        return ts[:-1], alphas, sigmas, torch.ones_like(alphas)

    def _scheduler_grid(self, num_steps: int):
        """Timesteps and the VP level (alpha, sigma) of the state before each step and after the last, plus the
        factor c with x_VP = c * state (1, or alpha for schedulers whose state is x / alpha)."""
        sched = self.scheduler
        sched.set_timesteps(num_steps, device=self.device)
        ts = sched.timesteps
        sigmas = getattr(sched, "sigmas", None)
        if torch.is_tensor(sigmas) and sigmas.numel() == ts.numel() + 1:
            sb = sigmas.to(device=self.device, dtype=torch.float64)
            alphas = torch.rsqrt(1 + sb * sb)
            levels = alphas, sb * alphas
        else:
            levels = NoiseSchedule.from_config(sched.config).alpha_sigma(with_final(ts.to(self.device)))
        if float(sched.init_noise_sigma) == 1.0:
            scale = torch.ones_like(levels[0])
        elif torch.is_tensor(sigmas) and sigmas.numel() == ts.numel() + 1:
            scale = levels[0]
        else:
            raise ValueError(
                f"{type(sched).__name__} scales its state (init_noise_sigma = {float(sched.init_noise_sigma)}) without "
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
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_residuals: bool = False,
        return_dict: bool = True,
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
            generator: one generator, or one per sample.
            latents: initial noise (B, C, H, W); drawn from ``generator`` when None.
            output_type: "pil", "np" or "pt" (images in [0, 1]) or "latent" (raw restorations in model space).
            return_residuals: also return ||y - A x0_hat|| per step and sample.
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
        check_call_arguments(num_inference_steps, guidance_scale, output_type)
        dtype, device = self.unet.dtype, self.device
        y = measurement.to(device=device, dtype=dtype)
        batch = y.shape[0]
        labels = self._labels(class_labels, batch, guidance_scale)
        if latents is None:
            latents = sample_noise((batch, *shape), generator, device, dtype)
        elif tuple(latents.shape) != (batch, *shape):
            raise ValueError(f"latents must have shape {(batch, *shape)}, got {tuple(latents.shape)}")

        if sampler == "ancestral":
            check_num_steps(num_inference_steps, NoiseSchedule.from_config(self.scheduler.config).num_train_timesteps)
            timesteps, alphas, sigmas, scale = self._ancestral_grid(num_inference_steps)
            step_kwargs = {}
        else:
            timesteps, alphas, sigmas, scale = self._scheduler_grid(num_inference_steps)
            step_kwargs = {"generator": generator} if "generator" in inspect.signature(self.scheduler.step).parameters else {}
        prediction_type = self.scheduler.config.get("prediction_type", "epsilon")
        state = latents.to(device, dtype)
        if sampler == "scheduler":
            state = state * self.scheduler.init_noise_sigma
        residuals, calls = [], 0
        for i, t in enumerate(self.progress_bar(timesteps)):
            a, s = alphas[i], sigmas[i]
            x = self.scheduler.scale_model_input(state, t) if sampler == "scheduler" else state  # the VP sample
            with torch.set_grad_enabled(method.uses_gradient):
                x = x.detach().requires_grad_(method.uses_gradient)
                out = self._predict(x, t, labels, guidance_scale)
                x0_hat = to_x0(out, x, a, s, prediction_type)
                residual = y - operator.forward(x0_hat)
            calls += 1
            if return_residuals:
                residuals.append(batch_norm(residual.detach()))
            with torch.no_grad():
                if sampler == "ancestral":
                    noise = sample_noise(x.shape, generator, device, dtype)
                    x_next = ancestral_step(x.detach(), x0_hat.detach(), a, s, alphas[i + 1], sigmas[i + 1], noise)
                else:
                    state = self.scheduler.step(out.detach(), t, state, **step_kwargs).prev_sample
                    x_next = state * expand_to(scale[i + 1], state)
                noised_y = None
                if method.uses_projection:
                    z = sample_noise(x.shape, generator, device, dtype)
                    noised_y = expand_to(alphas[i + 1], y) * y + expand_to(sigmas[i + 1], y) * operator.forward(z)
            x_next = method.update(x_next, x, residual, operator, noised_y)
            state = x_next.detach() / expand_to(scale[i + 1], x_next)

        if not bool(torch.isfinite(state).all()):
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
