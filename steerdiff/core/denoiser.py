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
(``rule(cond, uncond, state)``, ``uncond_needed(state)`` or ``predictions_needed(state)``, ``reset(timesteps)``;
:mod:`steerdiff.guidance`) is applied on every evaluation through :func:`~steerdiff.core.guidance_protocol.apply_rule`:
rows the rule does not need are not run, and the perturbed predictions it declares (``rule.perturbations``) are
evaluated under the network's own ``perturbed(perturbation)`` context (``ConditionedNetwork`` provides it for
diffusers models).  ``network_calls`` / ``network_evaluations`` count the forward passes and the rows they ran.

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

from ..config import check_guidance_scale
from .guidance_protocol import COND, UNCOND, GuidanceState, Request, apply_rule
from .nonfinite import NonFiniteWatch
from .prediction import check_prediction_type, convert_prediction, to_eps, to_x0
from .process import NoiseProcess


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
            self.rule, self.scale = None, check_guidance_scale(guidance)
        elif callable(guidance) and hasattr(guidance, "uncond_needed"):
            self.rule, self.scale = guidance, None
        else:
            raise TypeError(f"guidance must be a number (CFG weight) or a guidance rule, got {type(guidance).__name__}")
        self.guided = self.rule is not None or self.scale != 1.0
        if self.guided and not hasattr(network, "null"):
            raise ValueError("guidance needs a conditional network (one with a null / unconditional input)")
        self.cond = cond
        self.check_finite = bool(check_finite)
        self._watches: dict[str, NonFiniteWatch] = {}
        self.network_calls = 0
        self.network_evaluations = 0
        self.skipped_calls = 0  # evaluations whose rule needed no prediction at all (the network was not run)
        self._step = 0
        self._num_steps: int | None = None

    @classmethod
    def from_function(cls, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], process: NoiseProcess, prediction_type: str):
        """An unconditional, unguided boundary around ``fn(x, t) -> output``."""
        return cls(lambda x, t, cond: fn(x, t), process, prediction_type)

    def reset(self, timesteps=None, num_steps: int | None = None) -> None:
        """Start a new sampling run: the evaluation counter (``GuidanceState.step``) and the rule's state.
        ``num_steps``: the number of evaluations of the run, for rules that act on a window of steps (default: the
        number of ``timesteps``)."""
        self._step = 0
        if num_steps is None and timesteps is not None:
            num_steps = len(timesteps)
        self._num_steps = num_steps
        if self.rule is not None:
            self.rule.reset(timesteps)

    # -- evaluation ----------------------------------------------------------------------------------
    def _run(self, x, t, cond, network=None):
        self.network_calls += 1
        self.network_evaluations += x.shape[0]
        return (network or self.network)(x, t, cond)

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
            state = GuidanceState(self.process, t, x, self.prediction_type, k, alpha=alpha, sigma=sigma,
                                  num_steps=self._num_steps)
            out = apply_rule(self.rule, state, lambda request: self._evaluate(x, t, cond, k, request))
            self._finite(out, k, t, batch, what=f"the guided prediction of {self.rule!r}")
        if step is None:
            self._step += 1
        return out

    def _evaluate(self, x, t, cond, k, request: Request) -> dict[str, torch.Tensor]:
        """The rows ``request`` asks for: the conditional and unconditional ones in one call on [uncond rows; cond],
        each perturbed prediction in a call of its own on the conditional inputs of its rows."""
        if not request.cond:  # the rule needs no prediction here (CFG-Zero*'s zero-init): nothing runs
            self.skipped_calls += 1
            return {COND: torch.zeros_like(x)}
        batch = x.shape[0]
        index = request.rows[UNCOND]
        null = self._null(batch, x.device)
        if index is None:
            u, c = self._run(torch.cat([x, x]), torch.cat([t, t]), self._join(null, cond)).chunk(2)
            self._finite(torch.cat([u, c]), k, t, batch)
            outputs = {COND: c, UNCOND: u}
        else:
            n = index.numel()
            out = self._run(torch.cat([x[index], x]), torch.cat([t[index], t]), self._join(_take(null, index), cond))
            self._finite(out, k, t, batch, index)
            outputs = {COND: out[n:], UNCOND: out[:n]}
        for name, rows in request.perturbed():
            xs, ts, cs = (x, t, cond) if rows is None else (x[rows], t[rows], _take(cond, rows))
            with self._perturbed_network(name, request.perturbations[name], x) as network:
                outputs[name] = self._run(xs, ts, cs, network)
            self._finite(outputs[name], k, t, batch, what=f"the perturbed prediction {name!r}", rows=rows)
        return outputs

    def _perturbed_network(self, name: str, perturbation, x: torch.Tensor):
        """The network's own ``perturbed(perturbation)`` context, giving the network to call for that prediction."""
        perturbed = getattr(self.network, "perturbed", None)
        if perturbed is None:
            raise TypeError(
                f"{self.rule!r} needs the perturbed prediction {name!r} ({perturbation!r}), but the network "
                f"{type(self.network).__name__} cannot be perturbed: wrap a diffusers model with "
                "steerdiff.pipelines.conditioning.denoiser_for"
            )
        return perturbed(perturbation, spatial=tuple(x.shape[-2:]) if x.ndim == 4 else None)

    def _finite(self, out: torch.Tensor, k: int, t: torch.Tensor, batch: int, uncond_index=None,
                what: str = "the network output", rows=None) -> None:
        """With ``check_finite``: NaN/Inf in ``out`` is an error naming the evaluation, the timestep and how many
        samples went bad (:class:`~.nonfinite.NonFiniteWatch`).  ``out`` is one row per sample, [uncond rows of
        ``uncond_index`` (all samples when None); cond rows], or the rows ``rows`` of a perturbed prediction."""
        if not self.check_finite:
            return
        row_samples = rows
        if rows is None and out.shape[0] != batch:
            everyone = torch.arange(batch, device=out.device)
            row_samples = torch.cat([everyone if uncond_index is None else uncond_index.to(out.device), everyone])
        watch = self._watches.get(what)
        if watch is None:
            watch = self._watches[what] = NonFiniteWatch("eager", what, unit="evaluation")
        watch.update(k, out, t, batch=batch, row_samples=row_samples)

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
