"""Adaptive Guidance and LinearAG (Castillo et al., "Adaptive Guidance: Training-free Acceleration of Conditional
Diffusion Models", AAAI 2025).

AdaptiveGuidance.  gamma_t = cos(eps_c, eps_u) per sample (flattened, float64).  CFG's updates align with
plain conditional ones as sampling goes on; once gamma_t > threshold (about 0.99) for a sample, every later
evaluation of that sample uses the conditional prediction only, and its unconditional branch is not run.  The
evaluation at which gamma_t first passes the threshold is still guided (both predictions exist by then).
In a batch the decision is per sample: a caller such as :func:`steerdiff.pipelines.guide` runs the network's
unconditional half for the samples still guided only.  Reported: CFG's quality at 25% fewer network calls.

LinearAG.  At the evaluations listed in ``skip`` the unconditional call is not made; its prediction is replaced
by an affine combination of the current conditional and the previous step's estimates (in eps):

    u_hat_i = b_i0 c_i + b_i1 c_{i-1} + b_i2 u_{i-1} + b_i3

with per-step scalars b fitted offline by least squares over a few full-CFG calibration runs
(:meth:`LinearAG.calibrate`), saved and loaded as a small safetensors file.  Cheaper than AdaptiveGuidance where
it skips, and it drifts from CFG (its estimate is not the network's).  The coefficients belong to one timestep
grid (scheduler, number of steps): a run on another grid is refused.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch

from ..atomic_io import atomic_save_safetensors
from ..core.guidance_protocol import COND, UNCOND
from ..core.prediction import PREDICTION_TYPES
from ..core.tensors import batch_dot, batch_norm
from .base import GuidanceRule, GuidanceState, and_masks, check_scalar, from_space, mask_like, restrict_needs, to_space

LINEAR_AG_FEATURES = ("cond", "cond_prev", "uncond_prev", "bias")
LINEAR_AG_FORMAT = "steerdiff.guidance.LinearAG"


def cosine_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample cosine of the flattened tensors, float64, clamped to [-1, 1] (0 where either is zero)."""
    tiny = torch.finfo(torch.float64).tiny
    cos = batch_dot(a, b) / (batch_norm(a) * batch_norm(b)).clamp_min(tiny)
    return cos.clamp(-1.0, 1.0)


def _check_rule(rule) -> GuidanceRule:
    if not isinstance(rule, GuidanceRule):
        raise TypeError(f"rule must be a GuidanceRule (CFG, APG, ...), got {type(rule).__name__}")
    return rule


class AdaptiveGuidance(GuidanceRule):
    """Guide with ``rule`` until cos(eps_c, eps_u) > ``threshold`` for a sample, then conditional only.

    ``threshold`` lies in [-1, 1]; 1.0 never triggers (the cosine never exceeds 1), so the rule equals ``rule``.
    ``similarity_space``: the predictions the cosine compares, "epsilon" (the paper's) or "sample" / "v_prediction".
    At high noise both eps predictions are close to x_t / sigma_t, so their cosine starts near 1 whatever the
    condition does; on a schedule whose sigma / alpha starts high (linear betas: 157 at t = 999) it passes 0.99 at
    the first evaluation and guidance stops at once.  The data predictions x0 differ there, so "sample" lets the
    switch follow the guidance signal instead.
    """

    stateful = True  # which samples still guide

    def __init__(self, rule: GuidanceRule, threshold: float = 0.99, similarity_space: str = "epsilon"):
        self.rule = _check_rule(rule)
        self.threshold = check_scalar(threshold, "threshold", low=-1.0, high=1.0)
        if similarity_space not in PREDICTION_TYPES:
            raise ValueError(f"similarity_space must be one of {PREDICTION_TYPES}, got {similarity_space!r}")
        self.similarity_space = similarity_space
        self._guiding: torch.Tensor | None = None

    def reset(self, timesteps=None) -> None:
        self._guiding = None
        self.rule.reset(timesteps)

    @property
    def guiding(self) -> torch.Tensor | None:
        """bool (B,): the samples still guided in this run (None before the first evaluation)."""
        return self._guiding

    @property
    def perturbations(self) -> dict:
        return self.rule.perturbations

    def uncond_needed(self, state):
        return and_masks(self._guiding, self.rule.uncond_needed(state))

    def predictions_needed(self, state):
        """Converged samples need neither the unconditional nor any perturbed prediction of ``rule``."""
        return restrict_needs(self.rule.predictions_needed(state), self._guiding)

    def __call__(self, cond, uncond, state):
        guiding = self._guiding
        if guiding is None or guiding.shape[0] != state.batch_size:
            guiding = torch.ones(state.batch_size, dtype=torch.bool, device=cond.device)
        active = and_masks(state.active, guiding)
        guided = self.rule(cond, uncond, state.replace(active=active))
        space = self.similarity_space
        gamma = cosine_similarity(to_space(cond, state, space), to_space(uncond, state, space))
        converged = (gamma > self.threshold) & active
        if state.evaluated is not None:
            converged = converged & state.evaluated
        self._guiding = guiding & ~converged
        return guided

    def __repr__(self) -> str:
        return f"AdaptiveGuidance({self.rule!r}, threshold={self.threshold:g}, similarity_space={self.similarity_space!r})"


def _skip_steps(skip, num_steps: int) -> torch.Tensor:
    """bool (num_steps,) from "alternate" (every odd evaluation) or a sequence of evaluation indices >= 1."""
    if isinstance(skip, str):
        if skip != "alternate":
            raise ValueError(f'skip must be "alternate" or a list of step indices, got {skip!r}')
        mask = torch.zeros(num_steps, dtype=torch.bool)
        mask[1::2] = True
        return mask
    steps = list(skip)
    bad = [i for i in steps if isinstance(i, bool) or not isinstance(i, int) or not 1 <= i < num_steps]
    if bad:
        raise ValueError(f"skip steps must be integers in 1..{num_steps - 1} (step 0 has no history), got {bad}")
    mask = torch.zeros(num_steps, dtype=torch.bool)
    mask[steps] = True
    return mask


class _Recorder(GuidanceRule):
    """Applies ``rule`` and keeps (timestep, eps_c, eps_u) of every evaluation of the current run, on the CPU."""

    def __init__(self, rule: GuidanceRule):
        self.rule = rule
        self.runs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._current: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def reset(self, timesteps=None) -> None:
        self.finish_run()
        self.rule.reset(timesteps)

    def finish_run(self) -> None:
        if self._current:
            t, c, u = zip(*self._current)
            self.runs.append((torch.stack(t), torch.stack(c), torch.stack(u)))
        self._current = []

    @property
    def perturbations(self) -> dict:
        return self.rule.perturbations

    def uncond_needed(self, state):
        return None

    def predictions_needed(self, state):
        return {name: None for name in (UNCOND, *self.rule.perturbations)}  # and c, always

    def __call__(self, cond, uncond, state):
        if state.evaluated is not None:
            raise RuntimeError("LinearAG calibration needs the unconditional prediction of every sample")
        self._current.append(
            (
                state.timestep[0].cpu(),
                to_space(cond, state, "epsilon").cpu(),
                to_space(uncond, state, "epsilon").cpu(),
            )
        )
        return self.rule(cond, uncond, state)


class LinearAG(GuidanceRule):
    """``rule`` with the unconditional prediction of the ``skip`` steps estimated instead of evaluated.

    Build it with :meth:`calibrate` (or :meth:`load` a saved calibration).  Args: ``coefficients`` float64
    (N, 4) over (c_i, c_{i-1}, u_{i-1}, 1), ``timesteps`` (N,) of the calibration grid, ``skip`` bool (N,).
    """

    stateful = True  # the previous step's predictions

    def __init__(self, rule: GuidanceRule, coefficients: torch.Tensor, timesteps: torch.Tensor, skip: torch.Tensor):
        self.rule = _check_rule(rule)
        coefficients = torch.as_tensor(coefficients, dtype=torch.float64)
        timesteps = torch.as_tensor(timesteps, dtype=torch.float64).reshape(-1)
        skip = torch.as_tensor(skip).to(torch.bool).reshape(-1)
        n = timesteps.numel()
        if coefficients.shape != (n, len(LINEAR_AG_FEATURES)):
            raise ValueError(f"coefficients must have shape ({n}, {len(LINEAR_AG_FEATURES)}), got {tuple(coefficients.shape)}")
        if skip.numel() != n:
            raise ValueError(f"skip must hold {n} flags (one per step), got {skip.numel()}")
        if n == 0 or bool(skip[0]):
            raise ValueError("LinearAG needs at least one step and cannot skip step 0 (it has no history)")
        if not bool(torch.isfinite(coefficients[skip]).all()):
            raise ValueError("LinearAG coefficients of the skipped steps must be finite")
        self.coefficients, self.timesteps, self.skip = coefficients, timesteps, skip
        self._prev: tuple[torch.Tensor, torch.Tensor] | None = None
        self._coef_device: dict[torch.device, torch.Tensor] = {}

    @property
    def num_steps(self) -> int:
        return self.timesteps.numel()

    def reset(self, timesteps=None) -> None:
        self._prev = None
        self.rule.reset(timesteps)
        if timesteps is not None:
            t = torch.as_tensor(timesteps).detach().to("cpu", torch.float64).reshape(-1)
            if t.numel() != self.num_steps or not torch.allclose(t, self.timesteps, atol=1e-3, rtol=0):
                raise ValueError(
                    f"LinearAG was calibrated on {self.num_steps} steps at timesteps {self.timesteps.tolist()}; this run "
                    f"has {t.numel()} at {t.tolist()}: calibrate again for this scheduler and number of steps"
                )

    def _skipped(self, state: GuidanceState) -> bool:
        if state.step >= self.num_steps:
            raise ValueError(
                f"LinearAG was calibrated for {self.num_steps} network evaluations per run; this run reached evaluation "
                f"{state.step + 1}"
            )
        return bool(self.skip[state.step])

    @property
    def perturbations(self) -> dict:
        return self.rule.perturbations

    def uncond_needed(self, state):
        return False if self._skipped(state) else self.rule.uncond_needed(state)

    def predictions_needed(self, state):
        """The inner rule's, without the unconditional prediction at the skipped steps (it is estimated there)."""
        needs = self.rule.predictions_needed(state)
        needs.pop(COND, None)  # its estimates need c at every step
        if self._skipped(state):
            needs[UNCOND] = False
        return needs

    def _coef(self, device: torch.device) -> torch.Tensor:
        if device not in self._coef_device:
            self._coef_device[device] = self.coefficients.to(device)
        return self._coef_device[device]

    def __call__(self, cond, uncond, state):
        c = to_space(cond, state, "epsilon")
        u = to_space(uncond, state, "epsilon")
        if self._skipped(state):
            if self._prev is None:
                raise RuntimeError("LinearAG needs the previous step's predictions: call reset() at the start of a run")
            b = self._coef(cond.device)[state.step]
            c_prev, u_prev = self._prev
            if state.evaluated is not None:  # None: the caller evaluated every u anyway; keep them
                estimate = b[0] * c + b[1] * c_prev + b[2] * u_prev + b[3]
                u = torch.where(mask_like(state.evaluated, u), u, estimate)
                uncond = from_space(u, state, "epsilon", uncond.dtype)
                state = state.replace(evaluated=None)
        self._prev = (c, u)
        return self.rule(cond, uncond, state)

    # -- calibration and files ---------------------------------------------------------------------------
    @classmethod
    def calibrate(
        cls,
        pipe,
        rule: GuidanceRule,
        calls: Iterable[Mapping],
        skip: str | Sequence[int] = "alternate",
    ) -> "LinearAG":
        """Fit the coefficients on full-CFG runs of ``pipe`` guided by ``rule``.

        ``calls``: keyword arguments of each calibration call of the pipeline (same scheduler and number of steps
        in all; a handful of calls with a few samples each is enough for 4 scalars per step).  ``skip``:
        "alternate" (every odd step) or the step indices to skip.  Least squares over every element of every
        sample of every run, in float64 (normal equations).
        """
        from ..pipelines.hooks import guide

        recorder = _Recorder(_check_rule(rule))
        with guide(pipe, recorder):
            for kwargs in calls:
                pipe(**kwargs)
                recorder.finish_run()
        if not recorder.runs:
            raise ValueError("calls must hold at least one set of pipeline arguments")
        timesteps = recorder.runs[0][0]
        for t, _, _ in recorder.runs:
            if t.shape != timesteps.shape or not torch.allclose(t, timesteps):
                raise ValueError("every calibration call must use the same scheduler and number of steps")
        skip_mask = _skip_steps(skip, timesteps.numel())
        coefficients = torch.zeros(timesteps.numel(), len(LINEAR_AG_FEATURES), dtype=torch.float64)
        for i in torch.nonzero(skip_mask).flatten().tolist():
            gram = torch.zeros(4, 4, dtype=torch.float64)
            moment = torch.zeros(4, dtype=torch.float64)
            for _, c, u in recorder.runs:
                features = torch.stack([c[i].flatten(), c[i - 1].flatten(), u[i - 1].flatten(), torch.ones(c[i].numel(), dtype=torch.float64)], dim=1)
                gram += features.T @ features
                moment += features.T @ u[i].flatten()
            coefficients[i] = torch.linalg.lstsq(gram, moment.unsqueeze(1), driver="gelsd").solution.squeeze(1)
        return cls(rule, coefficients, timesteps, skip_mask)

    def save(self, path: str | Path) -> Path:
        """Write the calibration (coefficients, timesteps, skip flags) as a safetensors file."""
        return atomic_save_safetensors(
            path,
            {"coefficients": self.coefficients, "timesteps": self.timesteps, "skip": self.skip.to(torch.uint8)},
            metadata={"format": LINEAR_AG_FORMAT, "version": "1", "features": ",".join(LINEAR_AG_FEATURES), "space": "epsilon", "rule": repr(self.rule)},
        )

    @classmethod
    def load(cls, path: str | Path, rule: GuidanceRule) -> "LinearAG":
        """A LinearAG guiding with ``rule`` from a file written by :meth:`save`."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"LinearAG coefficients file {str(path)!r} does not exist; create it by calibrating on the model, "
                "scheduler and number of steps you sample with, e.g. python -m scripts.calibrate_linear_ag --model "
                "digits --scheduler dpmpp_2m --timestep-spacing trailing --steps 20 --scales 3 5 9 15 (LinearAG.calibrate(...).save(path) in Python)"
            )
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != LINEAR_AG_FORMAT or meta.get("features") != ",".join(LINEAR_AG_FEATURES):
                raise ValueError(f"{str(path)!r} is not a LinearAG coefficients file (format {meta.get('format')!r})")
            tensors = {k: f.get_tensor(k) for k in ("coefficients", "timesteps", "skip")}
        return cls(rule, tensors["coefficients"], tensors["timesteps"], tensors["skip"])

    def __repr__(self) -> str:
        skipped = torch.nonzero(self.skip).flatten().tolist()
        return f"LinearAG({self.rule!r}, steps={self.num_steps}, skip={skipped})"
