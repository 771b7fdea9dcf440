"""Adapters that let steerdiff's guidance rules serve diffusers' modular pipelines as ``BaseGuidance`` guiders.

    from steerdiff.guidance import APG
    from steerdiff.pipelines.modular import RuleGuider      # also importable as steerdiff.guidance.modular
    pipe.update_components(guider=RuleGuider(APG(9.0), scheduler=pipe.scheduler))

A modular denoise loop calls, per step: ``set_state(step, num_inference_steps, timestep)``, ``prepare_inputs``
(one batch per prediction the guider needs), ``prepare_models(denoiser)`` / the denoiser / ``cleanup_models(denoiser)``
per batch, then ``guider(batches)``.  The adapter plans the step with the rule
(:func:`~steerdiff.core.guidance_protocol.plan_predictions`): the conditional batch always, the unconditional one
when any sample needs it, and one batch on the conditional inputs for each perturbed prediction the rule needs
(``pred_cond_<name>``; its perturbation is applied to the denoiser by ``prepare_models`` and undone by
``cleanup_models``, as diffusers' own perturbation guiders do).  It builds a
:class:`~steerdiff.guidance.GuidanceState` from the step's timestep, the scheduler's noise process and prediction
type, and the denoiser's input (captured by a forward pre-hook), then combines with
:func:`~steerdiff.core.guidance_protocol.guide_predictions`.  Modular loops run whole batches, so per-sample savings
(AdaptiveGuidance) apply only once every sample has converged.

The rule's state resets at step 0 of every run.  ``start`` / ``stop`` keep diffusers' meaning (fractions of the
steps outside which the guider returns the conditional prediction).
"""

from __future__ import annotations

import copy
from contextlib import ExitStack
from typing import Any

import torch
from diffusers.guiders.guider_utils import BaseGuidance, GuiderOutput

from ..core.guidance_protocol import COND, UNCOND, GuidanceState, Request, guide_predictions, rule_needs
from ..core.process import model_process
from ..guidance.base import GuidanceRule
from .perturb import check_perturbation, perturbed

_IDENTIFIERS = {COND: "pred_cond", UNCOND: "pred_uncond"}


def _identifier(name: str) -> str:
    return _IDENTIFIERS.get(name, f"pred_cond_{name}")


def _any(mask) -> bool:
    if mask is None or mask is True:
        return True
    if mask is False:
        return False
    return bool(torch.as_tensor(mask).any())


class RuleGuider(BaseGuidance):
    """A diffusers ``BaseGuidance`` that guides with a steerdiff rule.

    Args:
        rule: any steerdiff guidance rule (CFG, APG, PAG, SLG, AutoGuidance, GuidanceInterval, ...).
        scheduler: the pipeline's scheduler or its config (for the noise process, VP or flow matching, and the
            prediction type).
        start, stop, enabled: as in diffusers' guiders.
    """

    def __init__(self, rule: GuidanceRule, scheduler: Any, start: float = 0.0, stop: float = 1.0, enabled: bool = True):
        if not isinstance(rule, GuidanceRule):
            raise TypeError(f"rule must be a steerdiff GuidanceRule, got {type(rule).__name__}")
        if scheduler is None:
            raise ValueError("RuleGuider needs the pipeline's scheduler (or its config) for the noise schedule")
        self._input_predictions = [_identifier(name) for name in (COND, UNCOND, *rule.perturbations)]
        super().__init__(start, stop, enabled)
        config = scheduler.config if hasattr(scheduler, "config") else scheduler
        self.rule = rule
        # VP or flow matching, read from the config (a FlowMatch scheduler gives the flow process and the velocity
        # prediction); a config steerdiff cannot read is a ValueError naming the key
        self.process, self.prediction_type = model_process(scheduler)
        self._scheduler_config = dict(config)
        if not isinstance(scheduler, dict) and hasattr(scheduler, "config"):  # keep the class: it names the family
            self._scheduler_config.setdefault("_class_name", type(scheduler).__name__)
        self.register_to_config(rule=repr(rule), start=start, stop=stop, enabled=enabled)
        self._batches = [COND, UNCOND]
        self._sample: torch.Tensor | None = None
        self._handle = None
        self._stack: ExitStack | None = None
        self._checked: set = set()

    def new(self, **kwargs) -> "RuleGuider":
        """A copy with fresh rule state (``rule``, ``scheduler``, ``start``, ``stop``, ``enabled`` may be changed)."""
        args = dict(rule=copy.deepcopy(self.rule), scheduler=self._scheduler_config, start=self._start, stop=self._stop, enabled=self._enabled)
        unknown = set(kwargs) - set(args)
        if unknown:
            raise ValueError(f"RuleGuider.new accepts {sorted(args)}, got {sorted(unknown)}")
        args.update(kwargs)
        return RuleGuider(**args)

    # -- state --------------------------------------------------------------------------------------------
    def _in_range(self) -> bool:
        if not self._enabled:
            return False
        if self._num_inference_steps is None:
            return True
        return int(self._start * self._num_inference_steps) <= self._step < int(self._stop * self._num_inference_steps)

    def set_state(self, step: int, num_inference_steps: int, timestep: torch.Tensor) -> None:
        super().set_state(step, num_inference_steps, timestep)
        if step == 0:
            self.rule.reset()
        self._sample = None
        needs = rule_needs(self.rule, self._state(torch.zeros(1, 1)))
        self._batches = [COND] + [name for name in (UNCOND, *self.rule.perturbations) if _any(needs.get(name))]

    def _state(self, sample: torch.Tensor) -> GuidanceState:
        return GuidanceState(self.process, self._timestep, sample, self.prediction_type, self._step,
                             num_steps=self._num_inference_steps)

    @property
    def num_conditions(self) -> int:
        return len(self._batches) if self._in_range() else 1

    def _current(self) -> str:
        """The prediction of the batch being run (prepare_models counts the batches of a step)."""
        return self._batches[min(max(self._count_prepared - 1, 0), len(self._batches) - 1)]

    @property
    def is_conditional(self) -> bool:
        return self._current() != UNCOND

    # -- inputs and models ----------------------------------------------------------------------------------
    def _planned(self) -> list[str]:
        return self._batches[: self.num_conditions]

    def prepare_inputs(self, data: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> list:
        return [self._prepare_batch(data, 1 if name == UNCOND else 0, _identifier(name)) for name in self._planned()]

    def prepare_inputs_from_block_state(self, data, input_fields: dict[str, str | tuple[str, str]]) -> list:
        return [
            self._prepare_batch_from_block_state(input_fields, data, 1 if name == UNCOND else 0, _identifier(name))
            for name in self._planned()
        ]

    def prepare_models(self, denoiser: torch.nn.Module) -> None:
        super().prepare_models(denoiser)

        def capture(module, args, kwargs):
            if self._sample is None:
                sample = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
                if isinstance(sample, torch.Tensor):
                    self._sample = sample

        self._handle = denoiser.register_forward_pre_hook(capture, with_kwargs=True)
        name = self._current()
        if name in self.rule.perturbations:
            self._stack = ExitStack()
            self._stack.enter_context(self._perturbed(denoiser, name))

    def _perturbed(self, denoiser: torch.nn.Module, name: str):
        """The rule's perturbation ``name`` applied to ``denoiser`` (its weak model called instead, for AutoGuidance)."""
        perturbation = self.rule.perturbations[name]
        if name not in self._checked:
            check_perturbation(denoiser, perturbation)
            self._checked.add(name)
        sample = self._sample
        spatial = tuple(sample.shape[-2:]) if sample is not None and sample.ndim == 4 else None
        stack = ExitStack()
        other = stack.enter_context(perturbed(denoiser, perturbation, spatial=spatial))
        if other is not None:  # call the weak network in the denoiser's place for this batch
            saved = denoiser.__dict__.get("forward")
            denoiser.forward = other.__call__

            def restore():
                if saved is None:
                    denoiser.__dict__.pop("forward", None)
                else:
                    denoiser.forward = saved

            stack.callback(restore)
        return stack

    def cleanup_models(self, denoiser: torch.nn.Module) -> None:
        if self._stack is not None:
            self._stack.close()
            self._stack = None
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    # -- guidance -----------------------------------------------------------------------------------------
    def forward(self, pred_cond: torch.Tensor, pred_uncond: torch.Tensor | None = None, **perturbed) -> GuiderOutput:
        if not self._in_range():
            return GuiderOutput(pred=pred_cond, pred_cond=pred_cond, pred_uncond=pred_uncond)
        if self._sample is None:
            raise RuntimeError(
                "RuleGuider did not see the denoiser's input: call prepare_models(denoiser) before running the "
                "denoiser, as diffusers' modular denoise loops do"
            )
        channels = pred_cond.shape[1]
        sample = self._sample[:, :channels]
        if sample.shape[0] != pred_cond.shape[0]:
            raise ValueError(f"the denoiser input has batch {sample.shape[0]} but the prediction has {pred_cond.shape[0]}")
        batch, device = pred_cond.shape[0], pred_cond.device
        outputs = {COND: pred_cond}
        if pred_uncond is not None:
            outputs[UNCOND] = pred_uncond
        for name in self.rule.perturbations:
            if _identifier(name) in perturbed:
                outputs[name] = perturbed[_identifier(name)]
        none = torch.zeros(0, dtype=torch.long, device=device)
        rows = {name: (None if name in outputs else none) for name in (UNCOND, *self.rule.perturbations)}
        request = Request(batch, rows, dict(self.rule.perturbations))
        pred = guide_predictions(self.rule, self._state(sample), request, outputs)
        return GuiderOutput(pred=pred, pred_cond=pred_cond, pred_uncond=pred_uncond)

    def __repr__(self) -> str:
        return f"RuleGuider({self.rule!r}, step={self._step}, num_conditions={self.num_conditions})"
