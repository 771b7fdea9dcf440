"""Adapters that let steerdiff's guidance rules serve diffusers' modular pipelines as ``BaseGuidance`` guiders.

    from steerdiff.guidance import APG
    from steerdiff.guidance.modular import RuleGuider
    pipe.update_components(guider=RuleGuider(APG(9.0), scheduler=pipe.scheduler))

A modular denoise loop calls, per step: ``set_state(step, num_inference_steps, timestep)``, ``prepare_inputs``
(one batch per prediction the guider needs: conditional, and unconditional when ``num_conditions`` is 2),
``prepare_models(denoiser)`` / the denoiser / ``cleanup_models(denoiser)`` per batch, then ``guider(batches)``.
The adapter builds a :class:`~steerdiff.guidance.GuidanceState` from the step's timestep, the scheduler's noise
schedule and prediction type, and the denoiser's input (captured by a forward pre-hook that ``prepare_models``
installs and ``cleanup_models`` removes), then calls the rule.  When the rule needs no unconditional prediction
at a step (guidance interval, AdaptiveGuidance once every sample has converged, LinearAG's skipped steps),
``num_conditions`` is 1 and the unconditional batch is not run.  Modular loops run whole batches, so the
per-sample savings of AdaptiveGuidance apply only once every sample has converged.

The rule's state resets at step 0 of every run.  ``start`` / ``stop`` keep diffusers' meaning (fractions of the
steps outside which the guider returns the conditional prediction).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from diffusers.guiders.guider_utils import BaseGuidance, GuiderOutput

from ..core.process import noise_process_from_config, prediction_type_from_config
from .base import GuidanceRule, GuidanceState


class RuleGuider(BaseGuidance):
    """A diffusers ``BaseGuidance`` that guides with a steerdiff rule.

    Args:
        rule: the guidance rule (CFG, APG, CFGRescale, CFGZeroStar, GuidanceInterval, AdaptiveGuidance, LinearAG).
        scheduler: the pipeline's scheduler or its config (for the noise process, VP or flow matching, and the
            prediction type).
        start, stop, enabled: as in diffusers' guiders.
    """

    _input_predictions = ["pred_cond", "pred_uncond"]

    def __init__(self, rule: GuidanceRule, scheduler: Any, start: float = 0.0, stop: float = 1.0, enabled: bool = True):
        if not isinstance(rule, GuidanceRule):
            raise TypeError(f"rule must be a steerdiff GuidanceRule, got {type(rule).__name__}")
        if scheduler is None:
            raise ValueError("RuleGuider needs the pipeline's scheduler (or its config) for the noise schedule")
        super().__init__(start, stop, enabled)
        config = scheduler.config if hasattr(scheduler, "config") else scheduler
        self.rule = rule
        # VP or flow matching, read from the config (a FlowMatch scheduler gives the flow process and the velocity
        # prediction); a config steerdiff cannot read is a ValueError naming the key
        self.schedule = noise_process_from_config(scheduler)
        self.prediction_type = prediction_type_from_config(scheduler)
        self._scheduler_config = dict(config)
        if not isinstance(scheduler, dict) and hasattr(scheduler, "config"):  # keep the class: it names the family
            self._scheduler_config.setdefault("_class_name", type(scheduler).__name__)
        self.register_to_config(rule=repr(rule), start=start, stop=stop, enabled=enabled)
        self._need_uncond = True
        self._sample: torch.Tensor | None = None
        self._handle = None

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
        need = self.rule.uncond_needed(self._state(torch.zeros(1, 1)))
        if isinstance(need, torch.Tensor):
            need = bool(need.any())
        self._need_uncond = need is None or bool(need)

    def _state(self, sample: torch.Tensor, evaluated: torch.Tensor | None = None) -> GuidanceState:
        return GuidanceState(self.schedule, self._timestep, sample, self.prediction_type, self._step, evaluated=evaluated)

    @property
    def num_conditions(self) -> int:
        return 2 if self._in_range() and self._need_uncond else 1

    @property
    def is_conditional(self) -> bool:
        return self._count_prepared == 1

    # -- inputs and models ----------------------------------------------------------------------------------
    def prepare_inputs(self, data: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> list:
        indices = [0] if self.num_conditions == 1 else [0, 1]
        return [self._prepare_batch(data, i, name) for i, name in zip(indices, self._input_predictions)]

    def prepare_inputs_from_block_state(self, data, input_fields: dict[str, str | tuple[str, str]]) -> list:
        indices = [0] if self.num_conditions == 1 else [0, 1]
        return [
            self._prepare_batch_from_block_state(input_fields, data, i, name)
            for i, name in zip(indices, self._input_predictions)
        ]

    def prepare_models(self, denoiser: torch.nn.Module) -> None:
        super().prepare_models(denoiser)

        def capture(module, args, kwargs):
            if self._sample is None:
                sample = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
                if isinstance(sample, torch.Tensor):
                    self._sample = sample

        self._handle = denoiser.register_forward_pre_hook(capture, with_kwargs=True)

    def cleanup_models(self, denoiser: torch.nn.Module) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    # -- guidance -----------------------------------------------------------------------------------------
    def forward(self, pred_cond: torch.Tensor, pred_uncond: torch.Tensor | None = None) -> GuiderOutput:
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
        if pred_uncond is None:
            evaluated = torch.zeros(pred_cond.shape[0], dtype=torch.bool, device=pred_cond.device)
            pred = self.rule(pred_cond, pred_cond, self._state(sample, evaluated))
        else:
            pred = self.rule(pred_cond, pred_uncond, self._state(sample))
        return GuiderOutput(pred=pred, pred_cond=pred_cond, pred_uncond=pred_uncond)

    def __repr__(self) -> str:
        return f"RuleGuider({self.rule!r}, step={self._step}, num_conditions={self.num_conditions})"
