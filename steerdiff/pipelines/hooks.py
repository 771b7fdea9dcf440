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

One rule protocol.  Per step the hook plans with the rule which samples need which prediction
(:func:`~steerdiff.core.guidance_protocol.plan_predictions`: the unconditional one, and each perturbed prediction
the rule declares), evaluates those rows only, and combines with
:func:`~steerdiff.core.guidance_protocol.guide_predictions`: in the doubled-batch pattern the network runs on the
conditional half plus the unconditional rows still needed; in the two-call pattern the unconditional call runs on
those rows, or not at all.  Perturbed predictions (PAG, SEG, SLG, AutoGuidance; :mod:`.perturb`) run on the
conditional inputs with their perturbation applied for that call only: PAG shares the step's call where diffusers
has batched PAG processors ([u; c; p], or [c; p] when no unconditional row is needed), else each perturbed
prediction runs in a call of its own (in the two-call pattern, on the conditional call's inputs, kept from it).
A PAG pipeline's own tripled batch [u; c; p] (pag_scale > 0) always runs whole and cannot be combined with a rule
that perturbs too.  Deciding which rows to run synchronises with the device once per step, for rules that can
skip some samples only.

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
import math
from dataclasses import dataclass

import torch
from diffusers.models.modeling_outputs import Transformer2DModelOutput

from ..core.guidance_protocol import COND, UNCOND, GuidanceState, Request, guide_predictions, plan_predictions
from ..core.nonfinite import NonFiniteWatch
from ..core.process import model_process
from ..core.tensors import take_rows
from ..guidance.base import GuidanceRule
from ..guidance.perturbations import WeakModel
from .perturb import check_perturbation, perturbed, supports_groups

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


def _shaped_like_input(module: torch.nn.Module) -> bool:
    """Whether the network's prediction has its input's shape, read from its config (in_channels = out_channels,
    no learned sigma): then a placeholder of the input's shape stands for a prediction the rule does not need."""
    config = getattr(getattr(module, "_orig_mod", module), "config", None)
    if config is None:
        return False
    in_channels = config.get("in_channels")
    out_channels = config.get("out_channels") or in_channels
    return in_channels is not None and in_channels == out_channels


def _placeholder_output(like: torch.Tensor, kwargs: dict):
    """A network output holding zeros shaped like ``like``, in the form the pipeline asked for (return_dict)."""
    zeros = torch.zeros_like(like)
    return (zeros,) if kwargs.get("return_dict", True) is False else Transformer2DModelOutput(sample=zeros)


class GuidanceHook:
    """The installed hook; see :func:`guide`.  Counters (cumulative since installation): ``network_calls``
    (forward passes of the denoiser), ``network_evaluations`` (samples passed through it) and ``skipped_calls``
    (calls the pipeline made that were not run because the rule needed no prediction: CFG-Zero*'s zero-init)."""

    def __init__(self, pipe, rule: GuidanceRule, check_finite: bool = True):
        if not isinstance(rule, GuidanceRule):
            raise TypeError(f"rule must be a steerdiff GuidanceRule (CFG, APG, ...), got {type(rule).__name__}")
        self.layout = _layout(pipe)
        scheduler = pipe.scheduler
        config = scheduler.config
        process, prediction_type = model_process(scheduler)  # a config it cannot read is a ValueError naming the key
        if config.get("timestep_type", "discrete") != "discrete":
            raise ValueError(
                f"guide() needs the network's timesteps to be the scheduler's training timesteps; "
                f"{type(scheduler).__name__} has timestep_type={config.get('timestep_type')!r}"
            )
        self.pipe, self.rule, self.check_finite = pipe, rule, bool(check_finite)
        self._watches = (NonFiniteWatch("eager", "the network output"), NonFiniteWatch("eager", f"the guided prediction of {rule!r}"))
        self._check_perturbations()
        self.process, self.prediction_type = process, prediction_type
        self.network_calls = 0
        self.network_evaluations = 0
        self.skipped_calls = 0
        self._step = 0
        self._checked = False
        self._pending = None  # separate calls: the conditional call of this step, waiting for its partner
        self._installed = False
        self._install()

    def _check_perturbations(self) -> None:
        """Every perturbation of the rule applies to every network it may run on (before any sampling)."""
        perturbations = self.rule.perturbations
        networks = [getattr(self.pipe, name) for name in self.layout.denoisers]
        for perturbation in perturbations.values():
            if isinstance(perturbation, WeakModel) and len(networks) > 1:
                raise ValueError(
                    f"AutoGuidance's weak model stands in for one network, but {type(self.pipe).__name__} samples with "
                    f"{len(networks)} ({', '.join(self.layout.denoisers)})"
                )
            for network in networks:
                check_perturbation(network, perturbation)

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

            def forward(*args, _module=denoiser, _inner=inner, _names=names, **kwargs):
                return self._forward(_module, _inner, _names, *args, **kwargs)

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
        self._num_steps = None if timesteps is None else len(timesteps)
        self._sigmas = None
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
        if self._groups() == 3 and self.rule.perturbations:
            raise ValueError(
                f"{type(pipe).__name__} applies its own perturbed-attention guidance (pag_scale > 0) and {self.rule!r} "
                "adds perturbed predictions of its own: call the pipeline with pag_scale=0, or use its base pipeline"
            )
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
        if self.process.kind == "flow":
            sched = self._scheduler
            index = sched.step_index if sched.step_index is not None else (sched.begin_index or 0)
            if self._sigmas is None or self._sigmas[0] is not sched.sigmas:  # read once per run (one host read)
                self._sigmas = (sched.sigmas, sched.sigmas.tolist())
            s = self._sigmas[1][index]
            t = self.process.timestep_of_sigmas(s)
            alpha, sigma = self.process.alpha_sigma_of_sigmas(s)
            return GuidanceState(self.process, t, sample, self.prediction_type, self._step, alpha=alpha, sigma=sigma,
                                 num_steps=self._num_steps)
        return GuidanceState(self.process, timestep, sample, self.prediction_type, self._step, num_steps=self._num_steps)

    def _finite(self, guided: torch.Tensor, timestep, batch: int, *predictions: torch.Tensor) -> None:
        """One reduction over what the pipeline receives (NaN/Inf in a prediction reaches it through every rule: the
        sum is NaN/Inf whenever an entry is, and rarely on overflow, which the exact check then clears); the network
        outputs are read only to word the error."""
        if self.check_finite and not math.isfinite(float(guided.sum())):
            # the step, its timestep and how many samples (not CFG rows) went bad: the network's outputs first
            self._watches[0].update(self._step, torch.cat(predictions), timestep, batch=batch)
            self._watches[1].update(self._step, guided, timestep, batch=batch)

    def _forward(self, module, inner, names, *args, **kwargs):
        bound = dict(zip(names, args))
        bound.update(kwargs)
        x = bound[names[0]]
        if bound.get("skip_layers") is not None:
            raise ValueError(
                f"{type(self.pipe).__name__} was called with skip_guidance_layers, which runs a call of its own that "
                "guide() cannot pair; under guide() use the SLG rule (steerdiff.guidance.SLG) instead"
            )
        if not self._checked:
            self._check_call(bound, x)
            self._checked = True
        if self.layout.pattern == "separate":
            return self._forward_separate(module, inner, bound, x, args, kwargs)
        return self._forward_batched(module, inner, bound, x, args, kwargs)

    def _call(self, fn, args, kwargs, rows=None, n: int = 0):
        """``fn`` on the rows ``rows`` of every batched argument (all rows when None), counted."""
        if rows is not None:
            args = [take_rows(a, rows, n) for a in args]
            kwargs = {key: take_rows(v, rows, n) for key, v in kwargs.items()}
        out = fn(*args, **kwargs)
        self.network_calls += 1
        self.network_evaluations += n if rows is None else rows.numel()
        return out

    def _perturbed_call(self, module, inner, perturbation, args, kwargs, rows, n: int, spatial, groups=None):
        """The call of ``rows`` (pipeline rows) with ``perturbation`` applied to ``module`` (or its weak model)."""
        with perturbed(module, perturbation, groups=groups, spatial=spatial) as other:
            return self._call(inner if other is None else other, args, kwargs, rows, n)

    def _forward_batched(self, module, inner, bound, x, args, kwargs):
        n, groups = x.shape[0], self._groups()
        b = n // groups
        cond_first = self.layout.pattern == "cond_first"
        cond_rows, uncond_rows = (slice(0, b), slice(b, 2 * b)) if cond_first else (slice(b, 2 * b), slice(0, b))
        timestep = bound.get("timestep")
        if isinstance(timestep, torch.Tensor) and timestep.ndim and timestep.shape[0] == n:
            timestep = timestep[cond_rows]
        state = self._state(timestep, x[cond_rows])
        spatial = tuple(x.shape[-2:]) if x.ndim == 4 else None
        if groups == 3:  # a PAG pipeline's own [u; c; p]: the rule guides (u, c), the pipeline keeps its PAG term
            request = Request(b, {UNCOND: None}, {})
            out = self._call(inner, args, kwargs, None, n)
            prediction = _prediction(out)
            outputs = {COND: prediction[cond_rows], UNCOND: prediction[uncond_rows]}
        else:
            request = plan_predictions(self.rule, state)
            if not request.cond and _shaped_like_input(module):  # no prediction needed: the network is not run
                self.skipped_calls += 1
                out = _placeholder_output(x, kwargs)
                outputs = {COND: _prediction(out)[cond_rows]}
            else:
                out, outputs = self._evaluate_batched(module, inner, args, kwargs, n, b, cond_first, request, spatial, x.device)
        cond = outputs[COND]
        channels = _guided_channels(cond, x[cond_rows])
        if channels is not None:  # guide the prediction's channels only (learned sigma, inpainting inputs)
            state = state.replace(sample=x[cond_rows][:, :channels])
            outputs = {name: value[:, :channels] for name, value in outputs.items()}
        guided = guide_predictions(self.rule, state, request, outputs)
        if channels is not None:
            guided = torch.cat([guided, cond[:, channels:]], dim=1)
        self._finite(guided, timestep, b, *outputs.values())
        self._step += 1
        if groups == 3:  # [g, g, g - (c - p)]: the pipeline then adds pag_scale (c - p) to g, its PAG term unchanged
            prediction = _prediction(out)
            perturbed_rows = prediction[2 * b :]
            return _repack(out, torch.cat([guided, guided, guided - (cond - perturbed_rows)]))
        return _repack(out, torch.cat([guided, guided]))

    def _evaluate_batched(self, module, inner, args, kwargs, n, b, cond_first, request, spatial, device):
        """The rows ``request`` asks for, from a call on the pipeline's [uncond; cond] batch (or [cond; uncond]):
        the unconditional rows it needs and every conditional row in one call; a perturbed prediction of every
        sample shares that call when diffusers has batched processors for it (PAG: [u; c; p] or [c; p]), else it
        runs in a call of its own on the conditional rows."""
        cond_rows, uncond_rows = (slice(0, b), slice(b, n)) if cond_first else (slice(b, n), slice(0, b))
        u_rows = request.rows[UNCOND]
        wanted = request.perturbed()
        if u_rows is None and not wanted:  # the pipeline's own call, whole (views, no gathers)
            out = self._call(inner, args, kwargs, None, n)
            prediction = _prediction(out)
            return out, {COND: prediction[cond_rows], UNCOND: prediction[uncond_rows]}
        samples = torch.arange(b, device=device)
        cond_idx = samples if cond_first else b + samples
        uncond_idx = b + samples if cond_first else samples
        outputs = {}
        grouped = (
            len(wanted) == 1 and wanted[0][1] is None and (u_rows is None or u_rows.numel() == 0)
            and supports_groups(module, request.perturbations[wanted[0][0]])
        )
        if grouped:  # one call, perturbed rows last: [u; c; p] (pipeline order first) or [c; p]
            name = wanted[0][0]
            base = torch.arange(n, device=device) if u_rows is None else cond_idx
            groups = 3 if u_rows is None else 2
            out = self._perturbed_call(module, inner, request.perturbations[name], args, kwargs,
                                       torch.cat([base, cond_idx]), n, spatial, groups=groups)
            prediction = _prediction(out)
            if u_rows is None:
                outputs[COND], outputs[UNCOND] = prediction[cond_rows], prediction[uncond_rows]
            else:
                outputs[COND] = prediction[:b]
            outputs[name] = prediction[-b:]
            return out, outputs
        if u_rows is None:
            out = self._call(inner, args, kwargs, None, n)
            prediction = _prediction(out)
            outputs[COND], outputs[UNCOND] = prediction[cond_rows], prediction[uncond_rows]
        else:
            k = u_rows.numel()
            rows = torch.cat([cond_idx, uncond_idx[u_rows]]) if cond_first else torch.cat([uncond_idx[u_rows], cond_idx])
            out = self._call(inner, args, kwargs, rows, n)
            prediction = _prediction(out)
            outputs[COND], part = (prediction[:b], prediction[b:]) if cond_first else (prediction[k:], prediction[:k])
            if k:
                outputs[UNCOND] = part
        for name, rows in wanted:
            selected = cond_idx if rows is None else cond_idx[rows]
            p_out = self._perturbed_call(module, inner, request.perturbations[name], args, kwargs, selected, n, spatial)
            outputs[name] = _prediction(p_out)
        return out, outputs

    def _forward_separate(self, module, inner, bound, x, args, kwargs):
        """Conditional call first: run it and hand its output to the pipeline.  The unconditional call of the same
        step: run it (or the rows the rule needs, or nothing) and the perturbed predictions the rule needs (on the
        conditional call's inputs), form g, write g into the conditional output the pipeline holds and return g as
        the unconditional one, so that the pipeline's u + w (c - u) is g exactly."""
        timestep = bound.get("timestep")
        key = self._scheduler.step_index  # the same for both calls of a step (the scheduler steps in between)
        pending = self._pending
        if pending is not None and pending["key"] != key:
            raise self._no_uncond_branch()  # the last step's conditional call had no unconditional partner
        b = x.shape[0]
        skippable = _shaped_like_input(module) and not self.layout.rescale_to_cond_norm
        if pending is None:  # the step's plan, made once, at its first (conditional) call
            state = self._state(timestep, x)
            request = plan_predictions(self.rule, state)
            if skippable and not request.cond:
                self.skipped_calls += 1  # no prediction needed at this step: neither call runs
                out = _placeholder_output(x, kwargs)
            else:
                out = self._call(inner, args, kwargs, None, b)
            self._pending = {"key": key, "out": out, "args": args, "kwargs": kwargs, "state": state, "request": request}
            return out
        self._pending = None
        cond_out, state, request = pending["out"], pending["state"], pending["request"]
        cond = _prediction(cond_out)
        outputs = {COND: cond}
        u_rows = request.rows[UNCOND]
        if skippable and not request.cond:
            self.skipped_calls += 1
        elif u_rows is None or u_rows.numel():
            outputs[UNCOND] = _prediction(self._call(inner, args, kwargs, u_rows, b))
        spatial = tuple(x.shape[-2:]) if x.ndim == 4 else None
        for name, rows in request.perturbed():
            p_out = self._perturbed_call(module, inner, request.perturbations[name], pending["args"],
                                         pending["kwargs"], rows, b, spatial)
            outputs[name] = _prediction(p_out)
        guided = guide_predictions(self.rule, state, request, outputs)
        if self.layout.rescale_to_cond_norm:  # Qwen-Image's own rescale, kept: g |c| / |g| over the last dimension
            guided = guided * (torch.linalg.vector_norm(cond, dim=-1, keepdim=True)
                               / torch.linalg.vector_norm(guided, dim=-1, keepdim=True))
        self._finite(guided, timestep, b, *outputs.values())
        self._step += 1
        cond.copy_(guided)  # the tensor the pipeline holds as its conditional prediction
        return _repack(cond_out, guided)


def guide(pipe, rule: GuidanceRule, *, check_finite: bool = True) -> GuidanceHook:
    """Make ``pipe`` guide with ``rule``; reversible.

    Use it as a context manager, ``with guide(pipe, APG(9.0)): images = pipe(prompt, guidance_scale=2).images``,
    or as a plain call, ``hook = guide(pipe, rule)`` ... ``hook.remove()``.  The pipeline must be called with its
    CFG branch on (guidance_scale > 1); the rule alone sets the guidance.  A rule's perturbations are checked
    against the network here (layer names, block indices; a weak model folder is loaded), before any sampling.  ``check_finite`` raises a
    FloatingPointError naming the step when the network output or the guided prediction holds NaN/Inf (one
    device synchronisation per step; turn it off for speed).
    """
    return GuidanceHook(pipe, rule, check_finite=check_finite)
