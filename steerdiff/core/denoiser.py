"""The one model boundary: a network, its noise process and prediction type, its conditioning and a guidance rule,
wrapped once into ``(x, t) -> guided prediction`` in any parametrization.

Like k-diffusion's ``external.py``, this is the only place a sampler, a restoration method, the adjoint, the
benchmark's reference solver or a metric meets a parametrization or classifier-free guidance:

    denoiser = Denoiser(network, process, "flow_prediction", guidance=APG(5.0), cond=labels)
    pred = denoiser.predict(x, t)          # pred.output (model's parametrization), pred.x0, pred.eps
    x0 = denoiser(x, t, space="sample")

``network(x, t, cond)`` returns the raw model output for a batch (x (B, ...), t (B,), cond: the conditioning of
those B rows or None).  A network with conditioning also provides ``null(batch, device)`` (the unconditional
input of classifier-free guidance) and may provide ``join(uncond, cond)`` (the conditioning of a batch whose
first rows are unconditional; default: concatenation); :class:`steerdiff.pipelines.conditioning.ConditionedNetwork`
adapts diffusers models.

Guidance (``guidance``): a number w is classifier-free guidance g = u + w (c - u) (Ho & Salimans 2022, diffusers'
convention; w = 1 runs the conditional branch alone), any object with the ``GuidanceRule`` interface
(``rule(cond, uncond, state)``, ``uncond_needed(state)``, ``reset(timesteps)``; :mod:`steerdiff.guidance`) is
applied on every evaluation with a :class:`GuidanceState`, and unconditional rows the rule does not need are not
run.  ``network_calls`` / ``network_evaluations`` count the forward passes and the rows they ran.

Noise levels.  alpha and sigma at t come from the process, unless the caller passes those of its grid (flow
pipelines may give the network timesteps that differ from s T).  Non-finite outputs are caught when
``check_finite`` is on (one device synchronisation per evaluation), naming the evaluation, the timestep and how
many samples went bad.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cached_property
from numbers import Real

import torch

from .prediction import check_prediction_type, convert_prediction, to_eps, to_x0
from .process import NoiseProcess


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

    def replace(self, **changes) -> "GuidanceState":
        """A copy with some of ``step``, ``active``, ``evaluated``, ``sample`` changed (derived values are kept
        unless ``sample`` changes)."""
        allowed = {"step", "active", "evaluated", "sample"}
        unknown = set(changes) - allowed
        if unknown:
            raise ValueError(f"GuidanceState.replace accepts {sorted(allowed)}, got {sorted(unknown)}")
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


class Prediction:
    """A model output with its noise level; ``x0``, ``eps`` and :meth:`as_` convert it (computed on use)."""

    def __init__(self, output: torch.Tensor, x: torch.Tensor, alpha, sigma, prediction_type: str):
        self.output, self.x, self.alpha, self.sigma, self.prediction_type = output, x, alpha, sigma, prediction_type

    @cached_property
    def x0(self) -> torch.Tensor:
        return to_x0(self.output, self.x, self.alpha, self.sigma, self.prediction_type)

    @cached_property
    def eps(self) -> torch.Tensor:
        return to_eps(self.output, self.x, self.alpha, self.sigma, self.prediction_type)

    def as_(self, space: str | None) -> torch.Tensor:
        """The prediction of type ``space`` (None: the model's own)."""
        if space is None or space == self.prediction_type:
            return self.output
        if space == "sample":
            return self.x0
        if space == "epsilon":
            return self.eps
        return convert_prediction(self.output, self.x, self.alpha, self.sigma, self.prediction_type, space)


def _join(uncond, cond):
    if uncond is None and cond is None:
        return None
    return torch.cat([uncond, cond])


def _take(cond, rows):
    return None if cond is None else cond[rows]


def _rows(cond, batch: int, name: str):
    if cond is None or not torch.is_tensor(cond) or cond.shape[0] == batch:
        return cond
    if cond.shape[0] == 1:
        return cond.expand(batch, *cond.shape[1:])
    raise ValueError(f"{name} has a batch of {cond.shape[0]} for {batch} samples; give one per sample or a single one")


class Denoiser:
    """See the module docstring.

    Args:
        network: ``(x, t, cond) -> output`` (with ``null`` / ``join`` when conditional; see the module docstring).
        process: the noise process the network was trained on.
        prediction_type: what the network outputs.
        guidance: a number w (classifier-free guidance; 1 = none) or a guidance rule.
        cond: the conditioning of the samples (B rows or one row), or None for an unconditional call.
        check_finite: raise a FloatingPointError naming the evaluation and timestep on NaN/Inf outputs.
    """

    def __init__(
        self,
        network: Callable,
        process: NoiseProcess,
        prediction_type: str,
        guidance=1.0,
        cond=None,
        check_finite: bool = False,
    ):
        if not isinstance(process, NoiseProcess):
            raise TypeError(f"process must be a steerdiff NoiseProcess, got {type(process).__name__}")
        self.network, self.process = network, process
        self.prediction_type = check_prediction_type(prediction_type)
        if process.kind == "vp" and prediction_type == "flow_prediction":
            raise ValueError("prediction_type='flow_prediction' needs a flow-matching process")
        if process.kind == "flow" and prediction_type == "v_prediction":
            raise ValueError("prediction_type='v_prediction' is not supported on a flow-matching process")
        if isinstance(guidance, Real) and not isinstance(guidance, bool):
            if not guidance >= 0 or guidance != guidance or guidance == float("inf"):
                raise ValueError(f"guidance scale must be a finite number >= 0, got {guidance!r}")
            self.rule, self.scale = None, float(guidance)
        elif callable(guidance) and hasattr(guidance, "uncond_needed"):
            self.rule, self.scale = guidance, None
        else:
            raise TypeError(f"guidance must be a number (CFG weight) or a guidance rule, got {type(guidance).__name__}")
        self.guided = self.rule is not None or self.scale != 1.0
        if self.guided and not hasattr(network, "null"):
            raise ValueError("guidance needs a conditional network (one with a null / unconditional input)")
        self.cond = cond
        self.check_finite = bool(check_finite)
        self.network_calls = 0
        self.network_evaluations = 0
        self._step = 0

    @classmethod
    def from_function(cls, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], process: NoiseProcess, prediction_type: str):
        """An unconditional, unguided boundary around ``fn(x, t) -> output``."""
        return cls(lambda x, t, cond: fn(x, t), process, prediction_type)

    def reset(self, timesteps=None) -> None:
        """Start a new sampling run: the evaluation counter (``GuidanceState.step``) and the rule's state."""
        self._step = 0
        if self.rule is not None:
            self.rule.reset(timesteps)

    # -- evaluation ----------------------------------------------------------------------------------
    def _run(self, x, t, cond):
        self.network_calls += 1
        self.network_evaluations += x.shape[0]
        return self.network(x, t, cond)

    def _null(self, batch: int, device):
        return self.network.null(batch, device)

    def _join(self, uncond, cond):
        join = getattr(self.network, "join", None)
        return join(uncond, cond) if join is not None else _join(uncond, cond)

    def output(self, x: torch.Tensor, t, alpha=None, sigma=None, step: int | None = None) -> torch.Tensor:
        """The guided model output at (x, t) in the model's parametrization.  ``alpha`` / ``sigma``: the noise
        level of x when the caller's grid knows it; ``step``: the evaluation index the rule sees (default: count
        evaluations since :meth:`reset`)."""
        batch = x.shape[0]
        t = torch.as_tensor(t, device=x.device)
        t = t.expand(batch) if t.ndim == 0 or t.numel() == 1 else t
        t = t.reshape(batch)
        k = self._step if step is None else int(step)
        cond = _rows(self.cond, batch, "conditioning")
        if not self.guided:
            out = self._run(x, t, cond)
            self._finite(out, k, t, batch)
        elif self.rule is None:
            u, c = self._run(torch.cat([x, x]), torch.cat([t, t]), self._join(self._null(batch, x.device), cond)).chunk(2)
            self._finite(torch.cat([u, c]), k, t, batch)
            out = u + self.scale * (c - u)
        else:
            out = self._apply_rule(x, t, cond, alpha, sigma, k)
        if step is None:
            self._step += 1
        return out

    def _apply_rule(self, x, t, cond, alpha, sigma, k):
        batch = x.shape[0]
        state = GuidanceState(self.process, t, x, self.prediction_type, k, alpha=alpha, sigma=sigma)
        need = self.rule.uncond_needed(state)
        if need is None or need is True:
            index = None
        elif need is False:
            index = torch.zeros(0, dtype=torch.long, device=x.device)
        else:
            mask = torch.as_tensor(need, device=x.device).to(torch.bool).reshape(-1).expand(batch)
            index = torch.nonzero(mask).flatten()  # one host sync, for rules that can skip only
            if index.numel() == batch:
                index = None
        null = self._null(batch, x.device)
        if index is None:
            u, c = self._run(torch.cat([x, x]), torch.cat([t, t]), self._join(null, cond)).chunk(2)
            self._finite(torch.cat([u, c]), k, t, batch)
        else:
            n = index.numel()
            out = self._run(torch.cat([x[index], x]), torch.cat([t[index], t]), self._join(_take(null, index), cond))
            self._finite(out, k, t, batch, index)
            c = out[n:]
            u = c.index_copy(0, index, out[:n])
            evaluated = torch.zeros(batch, dtype=torch.bool, device=x.device).index_fill(0, index, True)
            state = state.replace(evaluated=evaluated)
        guided = self.rule(c, u, state)
        if self.check_finite and not bool(torch.isfinite(guided).all()):
            self._raise(guided, f"the guided prediction of {self.rule!r}", k, t, batch)
        return guided

    def _finite(self, out: torch.Tensor, k: int, t: torch.Tensor, batch: int, uncond_index=None) -> None:
        if self.check_finite and not bool(torch.isfinite(out).all()):
            self._raise(out, "the network output", k, t, batch, uncond_index)

    def _raise(self, out: torch.Tensor, what: str, k: int, t: torch.Tensor, batch: int, uncond_index=None) -> None:
        """Name the evaluation, the timestep and how many samples (not rows of a CFG batch) went bad."""
        bad_rows = ~torch.isfinite(out.flatten(1)).all(dim=1)
        bad = bad_rows[-batch:].clone()
        n = bad_rows.numel() - batch
        if n:  # the first n rows were unconditional rows of samples uncond_index (all samples when None)
            index = torch.arange(batch, device=bad.device) if uncond_index is None else uncond_index
            bad[index] |= bad_rows[:n]
        raise FloatingPointError(
            f"{what} holds NaN/Inf at evaluation {k} (timestep {float(t[0]):g}) in {int(bad.sum())} of {batch} samples"
        )

    def predict(self, x: torch.Tensor, t, alpha=None, sigma=None, step: int | None = None) -> Prediction:
        """The guided prediction at (x, t) with its conversions (``.output``, ``.x0``, ``.eps``, ``.as_(space)``)."""
        out = self.output(x, t, alpha, sigma, step)
        if alpha is None:
            alpha, sigma = self.process.alpha_sigma(torch.as_tensor(t, device=x.device))
        return Prediction(out, x, alpha, sigma, self.prediction_type)

    def __call__(self, x: torch.Tensor, t, space: str | None = None) -> torch.Tensor:
        return self.predict(x, t).as_(space)

    def __repr__(self) -> str:
        guidance = repr(self.rule) if self.rule is not None else f"w={self.scale:g}"
        return f"Denoiser({self.process!r}, {self.prediction_type!r}, {guidance})"


def as_denoiser(model, process: NoiseProcess, prediction_type: str | None = None) -> Denoiser:
    """``model`` itself when it is a :class:`Denoiser` (its process and prediction type must then agree with the
    ones given), else a boundary around the plain function ``model(x, t) -> output``."""
    if isinstance(model, Denoiser):
        if prediction_type is not None and prediction_type != model.prediction_type:
            raise ValueError(f"prediction_type {prediction_type!r} differs from the denoiser's {model.prediction_type!r}")
        return model
    return Denoiser.from_function(model, process, prediction_type or "epsilon")


__all__ = ["Denoiser", "GuidanceState", "Prediction", "as_denoiser"]
