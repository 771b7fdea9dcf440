"""``guide(pipe, rule)``: make an existing diffusers pipeline combine its predictions with a steerdiff guidance
rule instead of its built-in classifier-free guidance, without copying the pipeline.

How.  Every supported pipeline runs its denoiser once per step on a doubled batch (unconditional and
conditional halves) and then forms u + w (c - u).  The hook wraps the denoiser's ``forward`` so that it
computes the guided prediction g itself and returns [g, g]; the pipeline's own formula maps that back to g for
any w (g + w (g - g) = g exactly).  The hook also wraps the scheduler's ``set_timesteps``, which every pipeline
calls once at the start of a call, to reset the rule's per-run state (APG momentum, AdaptiveGuidance flags).
Both patches are instance attributes and are undone by :meth:`GuidanceHook.remove` (or on leaving the ``with``
block, also on an exception).

Skipping.  Before each network call the rule says which samples need the unconditional prediction
(:meth:`~steerdiff.guidance.GuidanceRule.uncond_needed`).  The network then really runs on the conditional
half plus the unconditional rows still needed only; every batched argument (``encoder_hidden_states``,
``added_cond_kwargs``, ``class_labels``, per-sample ``timestep``, ...) is sliced the same way.  Deciding which
rows to run synchronises with the device once per step, for rules that can skip only.

Noise levels.  The network input is the VP sample x_t (after ``scale_model_input``), so alpha and sigma at the
network's (possibly fractional) timestep come from the scheduler config's noise process
(:func:`~steerdiff.core.noise_process_from_config`).  At
Euler's fractional timesteps that schedule (log alpha linear in t) and Euler's (sigma linear in t) differ by at
most 7e-5 relative (SD betas, 50 linspace steps); at integer timesteps they agree.

Supported pipelines (batch order, guided channels):
StableDiffusionPipeline and StableDiffusionXLPipeline ([uncond, cond], all), DiTPipeline ([cond, uncond], the
first ``in_channels`` of the learned-sigma output) and ClassConditionalPipeline ([uncond, cond], all).
The pipeline must be called with its CFG branch on (guidance_scale > 1); the value it receives is not used.
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

SUPPORTED_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline", "DiTPipeline", "ClassConditionalPipeline")
DIT_NULL_CLASS = 1000  # DiTPipeline's hard-coded unconditional label
_MISSING = object()


@dataclass(frozen=True)
class _Layout:
    kind: str
    denoiser: str  # attribute of the pipeline holding the network
    cond_first: bool  # batch order of the doubled batch
    guided_channels: int | None  # None: every output channel


def _layout(pipe) -> _Layout:
    from diffusers import DiTPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

    from .class_conditional import ClassConditionalPipeline

    if isinstance(pipe, (StableDiffusionPipeline, StableDiffusionXLPipeline)):
        return _Layout("sd", "unet", False, None)
    if isinstance(pipe, DiTPipeline):
        return _Layout("dit", "transformer", True, int(pipe.transformer.config.in_channels))
    if isinstance(pipe, ClassConditionalPipeline):
        return _Layout("class_conditional", "unet", False, None)
    raise TypeError(f"guide() supports {', '.join(SUPPORTED_PIPELINES)}; got {type(pipe).__name__}")


def _take(value, rows, n: int):
    """``value`` with the rows ``rows`` of every tensor whose first dimension is the doubled batch ``n``."""
    if isinstance(value, torch.Tensor):
        return value[rows] if value.ndim and value.shape[0] == n else value
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
        if process.kind != "vp" or config.get("timestep_type", "discrete") != "discrete":
            raise ValueError(
                f"guide() hooks pipelines whose network sees the VP sample at discrete training timesteps; "
                f"{type(scheduler).__name__} ({process.kind} process, timestep_type="
                f"{config.get('timestep_type', 'discrete')!r}) is not supported"
            )
        self.pipe, self.rule, self.check_finite = pipe, rule, bool(check_finite)
        self.schedule = process
        self.prediction_type = prediction_type_from_config(scheduler)
        self.network_calls = 0
        self.network_evaluations = 0
        self._step = 0
        self._checked = False
        self._installed = False
        self._install()

    # -- installation -----------------------------------------------------------------------------------
    def _install(self) -> None:
        denoiser = getattr(self.pipe, self.layout.denoiser)
        if getattr(denoiser, "_steerdiff_guidance_hook", None) is not None:
            raise RuntimeError(f"{type(self.pipe).__name__} is already guided; remove() the first hook before adding another")
        self._denoiser, self._scheduler = denoiser, self.pipe.scheduler
        self._saved_forward = denoiser.__dict__.get("forward", _MISSING)
        self._saved_set_timesteps = self._scheduler.__dict__.get("set_timesteps", _MISSING)
        self._inner = denoiser.forward
        self._names = list(inspect.signature(self._inner).parameters)
        inner_set = self._scheduler.set_timesteps

        @functools.wraps(inner_set)
        def set_timesteps(*args, **kwargs):
            result = inner_set(*args, **kwargs)
            self._begin_run(getattr(self._scheduler, "timesteps", None))
            return result

        def forward(*args, **kwargs):
            return self._forward(*args, **kwargs)

        denoiser.forward = functools.wraps(self._inner)(forward)
        self._scheduler.set_timesteps = set_timesteps
        denoiser._steerdiff_guidance_hook = self
        self._installed = True
        self._begin_run(None)

    def remove(self) -> None:
        """Undo every patch (idempotent)."""
        if not self._installed:
            return
        for obj, name, saved in (
            (self._denoiser, "forward", self._saved_forward),
            (self._scheduler, "set_timesteps", self._saved_set_timesteps),
        ):
            if saved is _MISSING:
                obj.__dict__.pop(name, None)
            else:
                obj.__dict__[name] = saved
        self._denoiser.__dict__.pop("_steerdiff_guidance_hook", None)
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
        self.rule.reset(timesteps)

    def _check_call(self, bound: dict, x: torch.Tensor) -> None:
        """Once per pipeline call: the pipeline must run its CFG branch (a doubled batch)."""
        if self.pipe.scheduler is not self._scheduler:
            raise RuntimeError("pipe.scheduler was replaced after guide(); set the scheduler first, then guide the pipeline")
        n = x.shape[0]
        if self.layout.kind == "dit":
            labels = bound.get("class_labels")
            half = n // 2
            doubled = (
                n % 2 == 0 and isinstance(labels, torch.Tensor) and labels.shape[0] == n
                and bool((labels[half:] == DIT_NULL_CLASS).all()) and torch.equal(x[:half], x[half:])
            )
        else:
            doubled = n % 2 == 0 and bool(self.pipe.do_classifier_free_guidance)
        if not doubled:
            raise ValueError(
                f"guide() replaces the classifier-free guidance of {type(self.pipe).__name__}, but this call runs no "
                f"unconditional branch: call the pipeline with guidance_scale > 1 (its value is not used; the rule "
                f"{self.rule!r} sets the guidance)"
            )
        if self.layout.kind == "sd" and float(getattr(self.pipe, "guidance_rescale", 0.0) or 0.0) > 0.0:
            raise ValueError(
                "guidance_rescale > 0 would be applied by the pipeline after the guided prediction and is not supported "
                "under guide(): call with guidance_rescale=0 and use CFGRescale(scale, phi) as the rule"
            )

    def _forward(self, *args, **kwargs):
        bound = dict(zip(self._names, args))
        bound.update(kwargs)
        x = bound[self._names[0]]
        if not self._checked:
            self._check_call(bound, x)
            self._checked = True
        n = x.shape[0]
        half = n // 2
        cond_rows, uncond_rows = (slice(0, half), slice(half, n)) if self.layout.cond_first else (slice(half, n), slice(0, half))
        channels = slice(None) if self.layout.guided_channels is None else slice(0, self.layout.guided_channels)
        timestep = bound.get("timestep")
        if isinstance(timestep, torch.Tensor) and timestep.ndim and timestep.shape[0] == n:
            timestep = timestep[cond_rows]
        state = GuidanceState(self.schedule, timestep, x[cond_rows, channels], self.prediction_type, self._step)

        need = _as_mask(self.rule.uncond_needed(state), half, x.device)
        index = None
        if need is not None:
            index = torch.nonzero(need).flatten()
            if index.numel() == half:
                need = index = None
        if need is None:
            out = self._inner(*args, **kwargs)
            prediction = _prediction(out)
            cond, uncond = prediction[cond_rows], prediction[uncond_rows]
            self.network_evaluations += n
        else:
            k = index.numel()
            all_rows = torch.arange(half, device=x.device)
            rows = torch.cat([all_rows, half + index]) if self.layout.cond_first else torch.cat([index, half + all_rows])
            out = self._inner(*[_take(a, rows, n) for a in args], **{key: _take(v, rows, n) for key, v in kwargs.items()})
            prediction = _prediction(out)
            cond, part = (prediction[:half], prediction[half:]) if self.layout.cond_first else (prediction[k:], prediction[:k])
            uncond = cond.index_copy(0, index, part)
            state = state.replace(evaluated=need)
            self.network_evaluations += half + k
        self.network_calls += 1
        guided = self.rule(cond[:, channels], uncond[:, channels], state)
        if self.check_finite and not bool(torch.isfinite(prediction).all() & torch.isfinite(guided).all()):
            at = bound.get("timestep")  # the step, its timestep and how many samples (not CFG rows) went bad
            NonFiniteWatch("eager", "the network output").update(self._step, prediction, at, batch=half)
            NonFiniteWatch("eager", f"the guided prediction of {self.rule!r}").update(self._step, guided, at, batch=half)
        if self.layout.guided_channels is not None:
            guided = torch.cat([guided, cond[:, self.layout.guided_channels :]], dim=1)
        self._step += 1
        return _repack(out, torch.cat([guided, guided]))


def guide(pipe, rule: GuidanceRule, *, check_finite: bool = True) -> GuidanceHook:
    """Make ``pipe`` guide with ``rule``; reversible.

    Use it as a context manager, ``with guide(pipe, APG(9.0)): images = pipe(prompt, guidance_scale=2).images``,
    or as a plain call, ``hook = guide(pipe, rule)`` ... ``hook.remove()``.  The pipeline must be called with its
    CFG branch on (guidance_scale > 1); the rule alone sets the guidance.  ``check_finite`` raises a
    FloatingPointError naming the step when the network output or the guided prediction holds NaN/Inf (one
    device synchronisation per step; turn it off for speed).
    """
    return GuidanceHook(pipe, rule, check_finite=check_finite)
