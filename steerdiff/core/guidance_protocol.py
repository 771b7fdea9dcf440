"""The guidance-rule protocol, and the one function that applies a rule to a network evaluation.

A rule combines named predictions of one evaluation at x_t into the guided prediction:

- ``"cond"`` (:data:`COND`): the conditional prediction c, evaluated for every sample, unless the rule needs no
  prediction at all at this evaluation (``{"cond": False}``, e.g. CFG-Zero*'s zero-init steps): then the network is
  not run and the rule sees placeholders;
- ``"uncond"`` (:data:`UNCOND`): the unconditional prediction u;
- any number of *perturbed* predictions the rule declares in ``rule.perturbations`` (name -> a description of what
  to change in the network, or which other network to call, for that evaluation; see
  :mod:`steerdiff.guidance.perturbations`).  They are evaluated on the conditional inputs.

Per evaluation the rule says which samples need which prediction (``rule.predictions_needed(state)``: name -> None
or True (every sample), False (none) or a bool tensor (B,)).  :func:`apply_rule` then

1. turns that into the rows to evaluate (:func:`plan_predictions`; one host sync only for rules that can skip
   some samples but not others),
2. asks the caller's ``evaluate(request)`` for those rows and nothing else (the caller knows its network: a
   :class:`~steerdiff.core.Denoiser`, a hooked diffusers pipeline, a modular pipeline's loop), and
3. fills the rows it did not evaluate with the conditional prediction, records which rows were evaluated, and
   calls the rule (:func:`guide_predictions`).

Every caller (the Denoiser, :func:`steerdiff.pipelines.guide` in both CFG patterns, the modular ``RuleGuider``) goes
through these functions; none of them combines predictions itself.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch

from .prediction import check_prediction_type, convert_prediction
from .process import NoiseProcess

COND = "cond"
UNCOND = "uncond"

Mask = torch.Tensor | bool | None
"""Which samples need a prediction: None or True (every sample), False (none), or a bool tensor (B,) or (1,)."""


class GuidanceState:
    """What a guidance rule may read about the current network evaluation (one per call of the network).

    Args:
        process: the model's noise process (VP :class:`~steerdiff.core.NoiseSchedule` or flow-matching
            :class:`~steerdiff.core.FlowMatchSchedule`).
        timestep: the timestep the network received: a number, a 0-d tensor or one per sample (B,).
        sample: the network input x_t of the conditional samples (B, C, ...), guided channels only.
        prediction_type: "epsilon", "v_prediction", "sample" or "flow_prediction".
        step: index of this evaluation since the rule was last reset (0 at the first evaluation of a run).
        active: bool (B,) or None; samples to guide (the others get the conditional prediction).
        evaluated: bool (B,) or None; samples whose unconditional prediction came from the network.
        alpha, sigma: the noise level of ``sample`` when the caller knows it from its grid (scalar or (B,));
            None = the process at ``timestep``.
        num_steps: the number of evaluations of the run when the caller knows it (rules that act on a window of
            steps, such as skip-layer guidance, need it).
        perturbed: the perturbed predictions of this evaluation, name -> tensor in the model's parametrization
            (rows not evaluated hold the conditional prediction); read them with :meth:`perturbed_prediction`.
        perturbed_evaluated: name -> bool (B,) or None, like ``evaluated`` for each perturbed prediction.

    The derived per-sample quantities (float64, shape (B,), on the sample's device) are computed on first use:
    ``timestep``, ``alpha``, ``sigma``, ``sigma_bar`` (= sigma / alpha, the EDM / Karras noise level) and
    ``progress`` (noise-level progress in [0, 1]: 1 = pure noise, 0 = clean; t / (T - 1) on VP processes, the
    flow noise level s on flow processes).
    """

    def __init__(
        self,
        process: NoiseProcess,
        timestep,
        sample: torch.Tensor,
        prediction_type: str = "epsilon",
        step: int = 0,
        active: torch.Tensor | None = None,
        evaluated: torch.Tensor | None = None,
        alpha=None,
        sigma=None,
        num_steps: int | None = None,
        perturbed: Mapping[str, torch.Tensor] | None = None,
        perturbed_evaluated: Mapping[str, torch.Tensor | None] | None = None,
    ):
        if (alpha is None) != (sigma is None):
            raise ValueError("give both alpha and sigma, or neither")
        self.process = process
        self._raw_timestep = timestep
        self.sample = sample
        self.prediction_type = check_prediction_type(prediction_type)
        self.step = int(step)
        self.active = active
        self.evaluated = evaluated
        self._given_levels = None if alpha is None else (alpha, sigma)
        self.num_steps = None if num_steps is None else int(num_steps)
        self.perturbed = dict(perturbed) if perturbed else {}
        self.perturbed_evaluated = dict(perturbed_evaluated) if perturbed_evaluated else {}
        self.space: str | None = None  # the parametrization the rule combines in (set by GuidanceRule.__call__)

    @property
    def schedule(self) -> NoiseProcess:
        """The noise process (the name it had when only VP schedules existed)."""
        return self.process

    @property
    def batch_size(self) -> int:
        return self.sample.shape[0]

    @property
    def device(self) -> torch.device:
        return self.sample.device

    def _per_sample(self, value) -> torch.Tensor:
        if torch.is_tensor(value):
            v = value.to(device=self.device, dtype=torch.float64).reshape(-1)
        else:  # Python numbers: float64 directly, not through float32
            v = torch.as_tensor(value, dtype=torch.float64, device=self.device).reshape(-1)
        if v.numel() == 1:
            return v.expand(self.batch_size)
        if v.numel() != self.batch_size:
            raise ValueError(f"expected a scalar or one value per sample ({self.batch_size}), got {v.numel()} values")
        return v

    @cached_property
    def timestep(self) -> torch.Tensor:
        return self._per_sample(self._raw_timestep)

    @cached_property
    def _alpha_sigma(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._given_levels is not None:
            return self._per_sample(self._given_levels[0]), self._per_sample(self._given_levels[1])
        return self.process.alpha_sigma(self.timestep)

    @property
    def alpha(self) -> torch.Tensor:
        return self._alpha_sigma[0]

    @property
    def sigma(self) -> torch.Tensor:
        return self._alpha_sigma[1]

    @cached_property
    def sigma_bar(self) -> torch.Tensor:
        return self.sigma / self.alpha

    @cached_property
    def progress(self) -> torch.Tensor:
        if self.process.kind == "flow" and self._given_levels is not None:
            return self.sigma.clamp(0.0, 1.0)
        return self.process.progress(self.timestep)

    def to_space(self, pred: torch.Tensor, space: str | None) -> torch.Tensor:
        """``pred`` (a prediction of this evaluation in the model's parametrization) as a float64 prediction of type
        ``space`` (None: unchanged)."""
        if space is None:
            return pred
        if space == "v_prediction" and self.process.kind == "flow":
            raise ValueError("v_prediction is a VP parametrization; on a flow-matching model use 'flow_prediction'")
        if space == self.prediction_type:
            return pred.to(torch.float64)
        return convert_prediction(
            pred.to(torch.float64), self.sample.to(torch.float64), self.alpha, self.sigma, self.prediction_type, space
        )

    def perturbed_prediction(self, name: str) -> torch.Tensor:
        """The perturbed prediction ``name`` in the parametrization the rule combines in (``space``)."""
        if name not in self.perturbed:
            raise KeyError(
                f"this evaluation has no perturbed prediction {name!r} (has: {sorted(self.perturbed) or 'none'}); the "
                "rule must declare it in its perturbations so that the caller evaluates it"
            )
        return self.to_space(self.perturbed[name], self.space)

    _REPLACEABLE = frozenset({"step", "active", "evaluated", "sample", "perturbed", "perturbed_evaluated", "space"})

    def replace(self, **changes) -> "GuidanceState":
        """A copy with some of ``step``, ``active``, ``evaluated``, ``sample``, ``perturbed``,
        ``perturbed_evaluated``, ``space`` changed (derived values are kept unless ``sample`` changes)."""
        unknown = set(changes) - self._REPLACEABLE
        if unknown:
            raise ValueError(f"GuidanceState.replace accepts {sorted(self._REPLACEABLE)}, got {sorted(unknown)}")
        new = object.__new__(GuidanceState)
        new.__dict__.update(self.__dict__)
        if "sample" in changes:
            for key in ("timestep", "_alpha_sigma", "sigma_bar", "progress"):
                new.__dict__.pop(key, None)
        new.__dict__.update(changes)
        return new

    def __repr__(self) -> str:
        return (
            f"GuidanceState(step={self.step}, batch={self.batch_size}, prediction_type={self.prediction_type!r}, "
            f"timestep={self._raw_timestep!r})"
        )


@dataclass
class Request:
    """The rows to evaluate at one step: ``rows`` maps every prediction the rule may use but "cond" to None (every
    sample) or a long tensor of sample indices (possibly empty: none); ``perturbations`` maps each perturbed name to
    its description; ``cond`` is False when the rule needs no prediction at all (then nothing else is asked for, and
    the caller may skip the network and pass a zero placeholder shaped like the prediction as "cond")."""

    batch: int
    rows: dict[str, torch.Tensor | None]
    perturbations: dict[str, Any]
    cond: bool = True

    def wanted(self, name: str) -> bool:
        """Whether any row of ``name`` is to be evaluated."""
        rows = self.rows.get(name, _NONE)
        return rows is None or rows.numel() > 0

    def perturbed(self) -> list[tuple[str, torch.Tensor | None]]:
        """(name, rows) of the perturbed predictions to evaluate."""
        return [(name, self.rows[name]) for name in self.perturbations if self.wanted(name)]


_NONE = torch.zeros(0, dtype=torch.long)


def _rows(mask: Mask, batch: int, device) -> torch.Tensor | None:
    """None (every sample) or the long indices of the samples ``mask`` selects."""
    if mask is None or mask is True:
        return None
    if mask is False:
        return torch.zeros(0, dtype=torch.long, device=device)
    mask = torch.as_tensor(mask, device=device).to(torch.bool).reshape(-1)
    if mask.numel() == 1:
        mask = mask.expand(batch)
    if mask.numel() != batch:
        raise ValueError(f"a rule asked for {mask.numel()} flags' worth of rows for a batch of {batch}")
    index = torch.nonzero(mask).flatten()  # one host sync, for rules that can skip some samples only
    return None if index.numel() == batch else index


def rule_needs(rule, state: GuidanceState) -> dict[str, Mask]:
    """``rule.predictions_needed(state)``, or for a rule written against the two-prediction protocol only
    (``uncond_needed``), the unconditional prediction's mask."""
    needed = getattr(rule, "predictions_needed", None)
    if needed is not None:
        return dict(needed(state))
    return {UNCOND: rule.uncond_needed(state)}


def plan_predictions(rule, state: GuidanceState) -> Request:
    """Which rows of which prediction the rule needs at this evaluation."""
    perturbations = dict(getattr(rule, "perturbations", None) or {})
    needs = rule_needs(rule, state)
    unknown = set(needs) - {COND, UNCOND, *perturbations}
    if unknown:
        raise ValueError(f"{rule!r} asked for predictions it does not declare: {sorted(unknown)}")
    batch, device = state.batch_size, state.device
    rows = {name: _rows(needs.get(name), batch, device) for name in (UNCOND, *perturbations)}
    cond = needs.get(COND) is not False  # all or nothing: a per-sample mask keeps the conditional call
    request = Request(batch, rows, perturbations, cond)
    if not cond and any(request.wanted(name) for name in rows):
        raise ValueError(f"{rule!r} needs no conditional prediction but asks for others: {needs}")
    return request


def guide_predictions(rule, state: GuidanceState, request: Request, outputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The guided prediction from the evaluated rows (``outputs``: "cond" for every sample, each other name for the
    rows ``request`` asked for): rows not evaluated hold the conditional prediction, and the state says which were."""
    cond = outputs[COND]
    if not request.perturbations and request.rows[UNCOND] is None:  # plain CFG-style evaluation: nothing to fill
        return rule(cond, outputs[UNCOND], state)
    filled, evaluated = {}, {}
    for name, rows in request.rows.items():
        if rows is None:
            filled[name], evaluated[name] = outputs[name], None
            continue
        evaluated[name] = torch.zeros(request.batch, dtype=torch.bool, device=cond.device).index_fill(0, rows, True)
        filled[name] = cond.index_copy(0, rows, outputs[name]) if rows.numel() else cond
    uncond = filled.pop(UNCOND)
    state = state.replace(evaluated=evaluated.pop(UNCOND), perturbed=filled, perturbed_evaluated=evaluated)
    return rule(cond, uncond, state)


def apply_rule(rule, state: GuidanceState, evaluate: Callable[[Request], Mapping[str, torch.Tensor]]) -> torch.Tensor:
    """Apply ``rule`` at one evaluation: plan the rows, ``evaluate(request)`` them, fill the rest, combine."""
    request = plan_predictions(rule, state)
    return guide_predictions(rule, state, request, evaluate(request))


__all__ = [
    "COND", "UNCOND", "GuidanceState", "Mask", "Request", "apply_rule", "guide_predictions", "plan_predictions",
    "rule_needs",
]
