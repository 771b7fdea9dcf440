"""``guide(pipe, rule)``: make an existing diffusers pipeline combine its predictions with a steerdiff guidance
rule instead of its built-in classifier-free guidance, without copying the pipeline.

How.  The hook recognises how a pipeline does CFG, not which class it is, and wraps its denoiser's ``forward``
(both transformers of Wan 2.2) and its scheduler's ``set_timesteps`` (every pipeline calls it once at the start
of a call: the rule's per-run state resets there).  The patches are instance attributes, undone by
:meth:`GuidanceHook.remove` (or on leaving the ``with`` block, also on an exception).  Two patterns:

- **one call on a doubled batch** [uncond; cond] (SD, SD img2img / inpainting / ControlNet, SDXL, SDXL img2img,
  PixArt, AnimateDiff, SD3, Sana, the class-conditional pipeline; [cond; uncond] in DiT): the hook computes the
  guided prediction g and returns [g, g]; the pipeline's u + w (c - u) maps that back to g for any w.  With
  perturbed-attention guidance on (the PAG pipelines) the batch is [uncond; cond; perturbed]: the hook returns
  [g; g; g - (c - p)], so the pipeline's PAG term pag_scale (c - p) is kept on top of the rule.
- **two calls per step**, conditional then unconditional (Flux with ``true_cfg_scale``, Qwen-Image, Wan): the
  conditional call runs as usual; at the unconditional call the hook forms g, writes it into the conditional
  output the pipeline holds and returns g, so that u + w (c - u) = g exactly.  Qwen-Image's rescale of the guided
  velocity to the conditional one's norm is applied by the hook to the rule's output (so CFG under the hook is the
  pipeline's own true CFG); Wan 2.2's ``guidance_scale_2`` must be unset or equal to ``guidance_scale`` (the rule
  guides both stages; a weight schedule varies it), else a clear error.

Per-row inputs follow the rows: control-net residuals, ``added_cond_kwargs``, ``encoder_hidden_states``, attention
masks, per-sample timesteps, and inputs repeated per sample (AnimateDiff's per-frame embeddings) are sliced the
same way.  The guided channels are the prediction's: the first half of a learned-sigma output (DiT, PixArt), the
latent channels of an inpainting UNet's wider input.  SD's ``guidance_rescale`` is refused under a rule (use
CFGRescale).  The pipeline must be called with its CFG on; the value it receives is not used.

Skipping.  Before the unconditional evaluation the rule says which samples need it
(:meth:`~steerdiff.guidance.GuidanceRule.uncond_needed`): in the doubled-batch pattern the network runs on the
conditional half plus the unconditional rows still needed, in the two-call pattern the unconditional call runs
on those rows, or not at all.  (PAG's tripled batch always runs whole: its attention processors split the batch
in three.)  Deciding which rows to run synchronises with the device once per step, for rules that can skip only.

Noise levels.  On VP pipelines alpha and sigma come from the scheduler config's noise process at the network's
timestep; on flow-matching pipelines, whose networks may see rescaled timesteps (Flux: t / 1000), from the
scheduler's sigma at its current step.

Robust installation.  The network's arguments are matched to the parameters of its class's own ``forward``, so a
forward wrapped by an accelerate hook (``enable_model_cpu_offload``), a ``functools.wraps`` wrapper taking
``*args, **kwargs`` or ``torch.compile`` is hooked like a plain one.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from dataclasses import dataclass

import torch

from ..core.process import noise_process_from_config, prediction_type_from_config
from ..core.nonfinite import NonFiniteWatch
from ..guidance.base import GuidanceRule, GuidanceState

DIT_NULL_CLASS = 1000  # DiTPipeline's hard-coded unconditional label
_MISSING = object()

# How each pipeline family runs classifier-free guidance (by class name; subclasses match too).
#   batch:      one call on the rows [uncond; cond] (diffusers' SD family, SDXL, PixArt, AnimateDiff, SD3, Sana, ...)
#   cond_first: one call on [cond; uncond] (DiT)
#   pag:        one call on [uncond; cond; perturbed] when perturbed-attention guidance is on, else "batch"
#   separate:   a call on the conditional inputs, then one on the unconditional inputs (Flux true CFG, Qwen-Image, Wan)
_PATTERNS = {
    "batch": (
        "StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline",
        "StableDiffusionControlNetPipeline", "StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline",
        "StableDiffusionXLInpaintPipeline", "StableDiffusionXLControlNetPipeline", "PixArtSigmaPipeline",
        "PixArtAlphaPipeline", "AnimateDiffPipeline", "StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline",
        "SanaPipeline", "ClassConditionalPipeline",
    ),
    "cond_first": ("DiTPipeline",),
    "pag": ("StableDiffusionPAGPipeline", "StableDiffusionXLPAGPipeline"),
    "separate": ("FluxPipeline", "QwenImagePipeline", "WanPipeline"),
}
SUPPORTED_PIPELINES = tuple(name for names in _PATTERNS.values() for name in names)
DENOISERS = ("unet", "transformer", "transformer_2")  # where diffusers pipelines keep their networks
CFG_ON = 2.0  # the guidance scale a pipeline is called with under guide(): its CFG branch must run, the rule guides


def main_denoiser(pipe) -> torch.nn.Module:
    """The network a pipeline samples with first: its ``unet``, else its ``transformer``."""
    return next(getattr(pipe, name) for name in DENOISERS if getattr(pipe, name, None) is not None)


def output_tensor(output) -> torch.Tensor:
    """The prediction in a network's output: the tensor itself, the first of a tuple, or ``.sample``."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    if isinstance(getattr(output, "sample", None), torch.Tensor):
        return output.sample
    raise TypeError(f"cannot find the output tensor in a {type(output).__name__}")


@dataclass(frozen=True)
class _Layout:
    kind: str  # the matched pipeline class
    pattern: str  # one of _PATTERNS
    denoisers: tuple[str, ...]  # attributes of the pipeline holding the networks
    rescale_to_cond_norm: bool = False  # Qwen-Image rescales the guided velocity to the conditional one's norm


def _layout(pipe) -> _Layout:
    mro = [c.__name__ for c in type(pipe).__mro__]
    for name in mro:
        for pattern, names in _PATTERNS.items():
            if name in names:
                denoisers = tuple(d for d in DENOISERS if getattr(pipe, d, None) is not None)
                return _Layout(name, pattern, denoisers, rescale_to_cond_norm=name == "QwenImagePipeline")
    raise TypeError(
        f"guide() supports pipelines that run classifier-free guidance in one of diffusers' ways: "
        f"{', '.join(SUPPORTED_PIPELINES)} (and their subclasses); got {type(pipe).__name__}"
    )


def _forward_names(module) -> list[str]:
    """The parameter names of the network's own ``forward``, whatever wraps it (an accelerate hook, a
    ``functools.wraps`` wrapper taking ``*args, **kwargs``, ``torch.compile``'s OptimizedModule)."""
    base = getattr(module, "_orig_mod", module)
    params = list(inspect.signature(type(base).forward).parameters)
    return params[1:]  # without self


def _take(value, rows, n: int):
    """``value`` with the rows ``rows`` of every tensor whose first dimension is the batch ``n``, or k * n for inputs
    repeated per sample (``repeat_interleave``, e.g. AnimateDiff's text embeddings per frame)."""
    if isinstance(value, torch.Tensor):
        if not value.ndim or n == 0:
            return value
        if value.shape[0] == n:
            return value[rows]
        if value.shape[0] % n == 0 and value.shape[0] > n:
            k = value.shape[0] // n
            return value.reshape(n, k, *value.shape[1:])[rows].reshape(-1, *value.shape[1:])
        return value
    if isinstance(value, dict):
        return {k: _take(v, rows, n) for k, v in value.items()}
    if type(value) in (list, tuple):
        return type(value)(_take(v, rows, n) for v in value)
    return value


def _prediction(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out.sample


def _repack(out, prediction: torch.Tensor):
    if isinstance(out, tuple):
        return (prediction, *out[1:])
    return dataclasses.replace(out, sample=prediction)


def _guided_channels(prediction: torch.Tensor, x: torch.Tensor) -> int | None:
    """How many leading channels of the output are the prediction to guide: all (None) when it is shaped like the
    input; the first half of a learned-sigma output (DiT, PixArt); the output's channels when the input carries
    extra conditioning channels (SD inpainting: latents, mask, masked image)."""
    if prediction.shape == x.shape or prediction.ndim < 4:
        return None
    c_out, c_in = prediction.shape[1], x.shape[1]
    if c_out == 2 * c_in:
        return c_in
    if c_out < c_in:
        return c_out
    return None


def _as_mask(mask, batch: int, device) -> torch.Tensor | None:
    """None (every sample) or a bool tensor (B,) from what ``rule.uncond_needed`` returned."""
    if mask is None or mask is True:
        return None
    if mask is False:
        return torch.zeros(batch, dtype=torch.bool, device=device)
    mask = torch.as_tensor(mask, device=device).to(torch.bool).reshape(-1)
    if mask.numel() == 1:
        return mask.expand(batch)
    if mask.numel() != batch:
        raise ValueError(f"uncond_needed returned {mask.numel()} flags for a batch of {batch}")
    return mask


class GuidanceHook:
    """The installed hook; see :func:`guide`.  Counters (cumulative since installation): ``network_calls``
    (forward passes of the denoiser) and ``network_evaluations`` (samples passed through it)."""

    def __init__(self, pipe, rule: GuidanceRule, check_finite: bool = True):
        if not isinstance(rule, GuidanceRule):
            raise TypeError(f"rule must be a steerdiff GuidanceRule (CFG, APG, ...), got {type(rule).__name__}")
        self.layout = _layout(pipe)
        scheduler = pipe.scheduler
        config = scheduler.config
        process = noise_process_from_config(scheduler)  # a config it cannot read is a ValueError naming the key
        if config.get("timestep_type", "discrete") != "discrete":
            raise ValueError(
                f"guide() needs the network's timesteps to be the scheduler's training timesteps; "
                f"{type(scheduler).__name__} has timestep_type={config.get('timestep_type')!r}"
            )
        self.pipe, self.rule, self.check_finite = pipe, rule, bool(check_finite)
        self.schedule = process
        self.prediction_type = prediction_type_from_config(scheduler)
        self.network_calls = 0
        self.network_evaluations = 0
        self._step = 0
        self._checked = False
        self._pending = None  # separate calls: the conditional call of this step, waiting for its partner
        self._installed = False
        self._install()

    # -- installation -----------------------------------------------------------------------------------
    def _install(self) -> None:
        denoisers = [getattr(self.pipe, name) for name in self.layout.denoisers]
        for denoiser in denoisers:
            if getattr(denoiser, "_steerdiff_guidance_hook", None) is not None:
                raise RuntimeError(
                    f"{type(self.pipe).__name__} is already guided; remove() the first hook before adding another"
                )
        self._scheduler = self.pipe.scheduler
        self._patches = []  # (object, attribute, saved value)
        for denoiser in denoisers:
            inner, names = denoiser.forward, _forward_names(denoiser)

            def forward(*args, _inner=inner, _names=names, **kwargs):
                return self._forward(_inner, _names, *args, **kwargs)

            self._patch(denoiser, "forward", functools.wraps(inner)(forward))
            denoiser._steerdiff_guidance_hook = self
        inner_set = self._scheduler.set_timesteps

        @functools.wraps(inner_set)
        def set_timesteps(*args, **kwargs):
            result = inner_set(*args, **kwargs)
            self._begin_run(getattr(self._scheduler, "timesteps", None))
            return result

        self._patch(self._scheduler, "set_timesteps", set_timesteps)
        self._denoisers = denoisers
        self._installed = True
        self._begin_run(None)

    def _patch(self, obj, name: str, value) -> None:
        self._patches.append((obj, name, obj.__dict__.get(name, _MISSING)))
        setattr(obj, name, value)

    def remove(self) -> None:
        """Undo every patch (idempotent)."""
        if not self._installed:
            return
        for obj, name, saved in reversed(self._patches):
            if saved is _MISSING:
                obj.__dict__.pop(name, None)
            else:
                obj.__dict__[name] = saved
        for denoiser in self._denoisers:
            denoiser.__dict__.pop("_steerdiff_guidance_hook", None)
        self._installed = False

    def __enter__(self) -> "GuidanceHook":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "installed" if self._installed else "removed"
        return f"GuidanceHook({type(self.pipe).__name__}, {self.rule!r}, {state})"

    # -- per call ----------------------------------------------------------------------------------------
    def _begin_run(self, timesteps) -> None:
        self._step = 0
        self._checked = False
        self._pending = None
        self.rule.reset(timesteps)

    def _no_uncond_branch(self) -> ValueError:
        return ValueError(
            f"guide() replaces the classifier-free guidance of {type(self.pipe).__name__}, but this call runs no "
            f"unconditional branch: call the pipeline with its CFG on (guidance_scale > 1; Flux and Qwen-Image: "
            f"true_cfg_scale > 1 and a negative prompt); its value is not used, the rule {self.rule!r} sets the guidance"
        )

    def _check_call(self, bound: dict, x: torch.Tensor) -> None:
        """Once per pipeline call: the pipeline must run its CFG branch, and no knob of its own may conflict."""
        if self.pipe.scheduler is not self._scheduler:
            raise RuntimeError("pipe.scheduler was replaced after guide(); set the scheduler first, then guide the pipeline")
        n, pattern, pipe = x.shape[0], self.layout.pattern, self.pipe
        if pattern == "cond_first":
            labels = bound.get("class_labels")
            half = n // 2
            doubled = (
                n % 2 == 0 and isinstance(labels, torch.Tensor) and labels.shape[0] == n
                and bool((labels[half:] == DIT_NULL_CLASS).all()) and torch.equal(x[:half], x[half:])
            )
        elif pattern == "separate":
            doubled = bool(getattr(pipe, "do_classifier_free_guidance", True))  # else: checked by pairing calls
        else:
            groups = self._groups()
            flag = getattr(pipe, "do_classifier_free_guidance", None)  # PixArt keeps it local: compare the halves
            doubled = n % groups == 0 and (bool(flag) if flag is not None else torch.equal(x[: n // groups], x[n // groups : 2 * n // groups]))
        if not doubled:
            raise self._no_uncond_branch()
        if float(getattr(pipe, "guidance_rescale", 0.0) or 0.0) > 0.0:
            raise ValueError(
                "guidance_rescale > 0 would be applied by the pipeline after the guided prediction and is not supported "
                "under guide(): call with guidance_rescale=0 and use CFGRescale(scale, phi) as the rule"
            )
        scale_2 = getattr(pipe, "_guidance_scale_2", None)
        if scale_2 is not None and scale_2 != getattr(pipe, "_guidance_scale", scale_2):
            raise ValueError(
                f"guidance_scale_2={scale_2} (Wan 2.2's weight for the low-noise transformer) differs from guidance_scale; "
                "under guide() the rule sets the guidance of both stages: call with guidance_scale_2 unset or equal, "
                "and give the rule a weight schedule to vary it along sampling"
            )

    def _groups(self) -> int:
        """Rows per sample in a batched call: 2 (uncond, cond) or 3 with perturbed-attention guidance."""
        if self.layout.pattern == "pag" and getattr(self.pipe, "do_perturbed_attention_guidance", False):
            return 3
        return 2

    def _state(self, timestep, sample: torch.Tensor) -> GuidanceState:
        """The rule's view of this evaluation.  Flow-matching pipelines give their networks rescaled timesteps (Flux:
        t / 1000), so the noise level comes from the scheduler's sigma at its current step there."""
        if self.schedule.kind == "flow":
            sched = self._scheduler
            index = sched.step_index if sched.step_index is not None else (sched.begin_index or 0)
            s = float(sched.sigmas[index])
            t = s * self.schedule.num_train_timesteps
            return GuidanceState(self.schedule, t, sample, self.prediction_type, self._step, alpha=1.0 - s, sigma=s)
        return GuidanceState(self.schedule, timestep, sample, self.prediction_type, self._step)

    def _finite(self, guided: torch.Tensor, timestep, batch: int, *predictions: torch.Tensor) -> None:
        """One pass over what the pipeline receives (NaN/Inf in a prediction reaches it through every rule); the
        network outputs are read only to word the error."""
        if self.check_finite and not bool(torch.isfinite(guided).all()):
            # the step, its timestep and how many samples (not CFG rows) went bad
            NonFiniteWatch("eager", "the network output").update(self._step, torch.cat(predictions), timestep, batch=batch)
            NonFiniteWatch("eager", f"the guided prediction of {self.rule!r}").update(self._step, guided, timestep, batch=batch)

    def _forward(self, inner, names, *args, **kwargs):
        bound = dict(zip(names, args))
        bound.update(kwargs)
        x = bound[names[0]]
        if not self._checked:
            self._check_call(bound, x)
            self._checked = True
        if self.layout.pattern == "separate":
            return self._forward_separate(inner, bound, x, args, kwargs)
        return self._forward_batched(inner, bound, x, args, kwargs)

    def _forward_batched(self, inner, bound, x, args, kwargs):
        n, groups = x.shape[0], self._groups()
        b = n // groups
        cond_first = self.layout.pattern == "cond_first"
        cond_rows, uncond_rows = (slice(0, b), slice(b, 2 * b)) if cond_first else (slice(b, 2 * b), slice(0, b))
        timestep = bound.get("timestep")
        if isinstance(timestep, torch.Tensor) and timestep.ndim and timestep.shape[0] == n:
            timestep = timestep[cond_rows]
        need, index = None, None
        state = None
        if groups == 2:  # rows can be skipped (the perturbed-attention processors need all three groups)
            state = self._state(timestep, x[cond_rows])
            need = _as_mask(self.rule.uncond_needed(state), b, x.device)
            if need is not None:
                index = torch.nonzero(need).flatten()  # one host sync, for rules that can skip only
                if index.numel() == b:
                    need = index = None
        if need is None:
            out = inner(*args, **kwargs)
            prediction = _prediction(out)
            self.network_evaluations += n
            cond, uncond = prediction[cond_rows], prediction[uncond_rows]
        else:
            k = index.numel()
            all_rows = torch.arange(b, device=x.device)
            rows = torch.cat([all_rows, b + index]) if cond_first else torch.cat([index, b + all_rows])
            out = inner(*[_take(a, rows, n) for a in args], **{key: _take(v, rows, n) for key, v in kwargs.items()})
            prediction = _prediction(out)
            cond, part = (prediction[:b], prediction[b:]) if cond_first else (prediction[k:], prediction[:k])
            uncond = cond.index_copy(0, index, part)
            self.network_evaluations += b + k
        self.network_calls += 1
        channels = _guided_channels(prediction, x)
        guided_slice = slice(None) if channels is None else slice(0, channels)
        if state is None:
            state = self._state(timestep, x[cond_rows][:, guided_slice])
        elif channels is not None:
            state = state.replace(sample=x[cond_rows][:, guided_slice])
        if need is not None:
            state = state.replace(evaluated=need)
        guided = self.rule(cond[:, guided_slice], uncond[:, guided_slice], state)
        if channels is not None:
            guided = torch.cat([guided, cond[:, channels:]], dim=1)
        self._finite(guided, timestep, b, prediction)
        self._step += 1
        if groups == 3:  # [g, g, g - (c - p)]: the pipeline then adds pag_scale (c - p) to g, its PAG term unchanged
            perturbed = prediction[2 * b :]
            return _repack(out, torch.cat([guided, guided, guided - (cond - perturbed)]))
        return _repack(out, torch.cat([guided, guided]))

    def _forward_separate(self, inner, bound, x, args, kwargs):
        """Conditional call first: run it and hand its output to the pipeline.  The unconditional call of the same
        step: run it (or the rows the rule needs, or nothing), form g, write g into the conditional output the
        pipeline holds and return g as the unconditional one, so that the pipeline's u + w (c - u) is g exactly."""
        timestep = bound.get("timestep")
        key = self._scheduler.step_index  # the same for both calls of a step (the scheduler steps in between)
        pending = self._pending
        if pending is not None and pending["key"] != key:
            raise self._no_uncond_branch()  # the last step's conditional call had no unconditional partner
        if pending is None:
            out = inner(*args, **kwargs)
            self.network_calls += 1
            self.network_evaluations += x.shape[0]
            self._pending = {"key": key, "out": out}
            return out
        self._pending = None
        cond_out = pending["out"]
        cond = _prediction(cond_out)
        b = x.shape[0]
        state = self._state(timestep, x)
        need = _as_mask(self.rule.uncond_needed(state), b, x.device)
        index = None if need is None else torch.nonzero(need).flatten()
        if index is None or index.numel() == b:
            out = inner(*args, **kwargs)
            uncond = _prediction(out)
            self.network_calls += 1
            self.network_evaluations += b
        elif index.numel() == 0:
            uncond = cond  # nothing ran; the rule sees evaluated = False everywhere
            state = state.replace(evaluated=need)
        else:
            out = inner(*[_take(a, index, b) for a in args], **{k: _take(v, index, b) for k, v in kwargs.items()})
            uncond = cond.index_copy(0, index, _prediction(out))
            self.network_calls += 1
            self.network_evaluations += index.numel()
            state = state.replace(evaluated=need)
        guided = self.rule(cond, uncond, state)
        if self.layout.rescale_to_cond_norm:  # Qwen-Image's own rescale, kept: g |c| / |g| over the last dimension
            guided = guided * (torch.linalg.vector_norm(cond, dim=-1, keepdim=True)
                               / torch.linalg.vector_norm(guided, dim=-1, keepdim=True))
        self._finite(guided, timestep, b, cond, uncond)
        self._step += 1
        cond.copy_(guided)  # the tensor the pipeline holds as its conditional prediction
        return _repack(cond_out, guided)


def guide(pipe, rule: GuidanceRule, *, check_finite: bool = True) -> GuidanceHook:
    """Make ``pipe`` guide with ``rule``; reversible.

    Use it as a context manager, ``with guide(pipe, APG(9.0)): images = pipe(prompt, guidance_scale=2).images``,
    or as a plain call, ``hook = guide(pipe, rule)`` ... ``hook.remove()``.  The pipeline must be called with its
    CFG branch on (guidance_scale > 1); the rule alone sets the guidance.  ``check_finite`` raises a
    FloatingPointError naming the step when the network output or the guided prediction holds NaN/Inf (one
    device synchronisation per step; turn it off for speed).
    """
    return GuidanceHook(pipe, rule, check_finite=check_finite)
