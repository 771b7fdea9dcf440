"""The guidance-rule interface and the per-evaluation state a rule may read.

A guidance rule combines the conditional prediction c, the unconditional prediction u and any perturbed
predictions it declares (:attr:`GuidanceRule.perturbations`; read with ``state.perturbed_prediction(name)``) of one
network evaluation into the guided prediction g, all in the model's own parametrization (its
``prediction_type``).  The protocol and the one function that applies a rule are in
:mod:`steerdiff.core.guidance_protocol`.  Weight convention everywhere (diffusers', Ho & Salimans 2022 as written
in Imagen):

    g = u + w (c - u)        w = 1: conditional only,  w = 0: unconditional only.

Papers that write eps = c + w' (c - u) use w' = w - 1.

A rule that needs another parametrization (APG works on the data prediction, CFG-Zero* on the velocity) declares
it in ``space`` (or per evaluation with :meth:`GuidanceRule.space_for`); :class:`GuidanceRule` converts c and u there (in float64, through
:func:`steerdiff.core.prediction.convert_prediction`) and converts the result back, so every rule serves
epsilon, v_prediction and sample models alike.

Per-sample masks.  ``state.active`` marks the samples a wrapper wants guided at this evaluation (None = all);
the others get g = c.  ``state.evaluated`` marks the samples whose u really came from the network (None =
all); where it is False the caller passed c in u's place (``state.perturbed_evaluated[name]`` likewise for each
perturbed prediction).  :meth:`GuidanceRule.predictions_needed` (by default: :meth:`GuidanceRule.uncond_needed` for
u, every sample for each perturbed prediction) lets a rule say, before the network runs, which samples need which
prediction, so that a caller (:func:`steerdiff.pipelines.guide`) runs the network on those rows only.
"""

from __future__ import annotations

import math
from numbers import Real

import torch

from ..core.guidance_protocol import COND, UNCOND, GuidanceState, Mask
from ..core.prediction import convert_prediction

UncondMask = Mask
"""What :meth:`GuidanceRule.uncond_needed` returns: None or True (every sample), False (none), or a bool
tensor of shape (B,) or (1,)."""


def to_space(pred: torch.Tensor, state: GuidanceState, space: str) -> torch.Tensor:
    """``pred`` (in the model's parametrization) as a float64 prediction of type ``space``."""
    return state.to_space(pred, space)


def from_space(pred: torch.Tensor, state: GuidanceState, space: str, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of :func:`to_space`, cast to ``dtype``."""
    if space != state.prediction_type:
        pred = convert_prediction(
            pred.to(torch.float64), state.sample.to(torch.float64), state.alpha, state.sigma, space, state.prediction_type
        )
    return pred.to(dtype)


def mask_like(mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A per-sample bool mask (B,) shaped to broadcast against ``x`` (B, ...), on ``x``'s device."""
    return mask.to(device=x.device, dtype=torch.bool).reshape(-1, *([1] * (x.ndim - 1)))


def restrict_needs(needs: dict[str, Mask], mask: Mask) -> dict[str, Mask]:
    """Every prediction of ``needs`` restricted to the samples ``mask`` selects (a wrapper guiding some samples only).
    The conditional prediction is not restricted: the samples left out get it; the inner rule's "none at all" is kept
    only when the wrapper keeps every sample."""
    restricted = {name: and_masks(mask, need) for name, need in needs.items() if name != COND}
    if COND in needs and (mask is None or mask is True):
        restricted[COND] = needs[COND]
    return restricted


def and_masks(a: UncondMask | torch.Tensor, b: UncondMask | torch.Tensor) -> UncondMask:
    """Conjunction of two masks where None / True mean "all" and False means "none"."""
    if a is None or a is True:
        return b
    if b is None or b is True:
        return a
    if a is False or b is False:
        return False
    return a & b


class GuidanceRule:
    """Base class: subclasses implement :meth:`combine` (and :meth:`reset` if they keep per-run state).

    Calling a rule, ``rule(cond, uncond, state)``, checks the shapes, converts to the rule's ``space``, combines,
    converts back to the model's parametrization and dtype, and keeps the conditional prediction for samples
    that ``state.active`` leaves out.
    """

    space: str | None = None
    """The parametrization :meth:`combine` works in; None = the model's own (for rules that are affine in the
    predictions with coefficients that do not depend on them, such as CFG, the result is the same in every
    parametrization)."""

    stateful: bool = False
    """Whether :meth:`combine` keeps state from one evaluation to the next within a run (momentum buffers,
    convergence flags): such a rule must see the evaluations of a run once each, in order."""

    def space_for(self, state: GuidanceState) -> str | None:
        """The parametrization of this evaluation (default: ``space``)."""
        return self.space

    def reset(self, timesteps: torch.Tensor | None = None) -> None:
        """Forget per-run state.  Called at the start of every sampling run (``timesteps``: the run's grid,
        when the caller knows it)."""

    @property
    def perturbations(self) -> dict:
        """The perturbed predictions this rule combines: name -> a :class:`~steerdiff.guidance.perturbations.
        Perturbation` (what to change in the network, or which other network to call; evaluated on the conditional
        inputs).  None by default."""
        return {}

    def uncond_needed(self, state: GuidanceState) -> UncondMask:
        """Which samples need the unconditional prediction at this evaluation (None = all)."""
        return None

    def predictions_needed(self, state: GuidanceState) -> dict[str, Mask]:
        """Which samples need which prediction at this evaluation: "uncond" and each perturbed name -> None (all),
        False (none) or a bool (B,).  Default: :meth:`uncond_needed` for u, every sample for each perturbed one."""
        needs = {UNCOND: self.uncond_needed(state)}
        for name in self.perturbations:
            needs[name] = None
        return needs

    def combine(self, cond: torch.Tensor, uncond: torch.Tensor, state: GuidanceState) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, cond: torch.Tensor, uncond: torch.Tensor, state: GuidanceState) -> torch.Tensor:
        check_pair(cond, uncond, state)
        space = self.space_for(state)
        if space != state.space:
            state = state.replace(space=space)  # perturbed predictions are read in the same parametrization
        if space is None:
            guided = self.combine(cond, uncond, state)
        else:
            guided = from_space(
                self.combine(to_space(cond, state, space), to_space(uncond, state, space), state), state, space, cond.dtype
            )
        if state.active is not None:
            guided = torch.where(mask_like(state.active, guided), guided, cond)
        return guided


def check_pair(cond: torch.Tensor, uncond: torch.Tensor, state: GuidanceState) -> None:
    if not isinstance(cond, torch.Tensor) or not isinstance(uncond, torch.Tensor):
        raise TypeError("cond and uncond must be tensors")
    if cond.shape != uncond.shape:
        raise ValueError(f"cond and uncond must have the same shape, got {tuple(cond.shape)} and {tuple(uncond.shape)}")
    if cond.ndim < 2 or cond.shape[0] != state.batch_size:
        raise ValueError(
            f"cond must have shape (B, ...) with B = {state.batch_size} (the state's batch), got {tuple(cond.shape)}"
        )
    if cond.shape != state.sample.shape:  # a rule never broadcasts predictions against the sample
        raise ValueError(
            f"the predictions must have the shape of the sample {tuple(state.sample.shape)}, got {tuple(cond.shape)}"
        )


def check_scalar(value, name: str, low: float | None = None, high: float | None = None, low_open: bool = False) -> float:
    """A finite real number within [low, high] (or (low, high] with ``low_open``), else a ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(float(value)):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    value = float(value)
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and value > high
    if too_low or too_high:
        lo = "-inf" if low is None else f"{low:g}"
        hi = "inf" if high is None else f"{high:g}"
        bracket = "(" if low_open else "["
        raise ValueError(f"{name} must lie in {bracket}{lo}, {hi}], got {value:g}")
    return value
