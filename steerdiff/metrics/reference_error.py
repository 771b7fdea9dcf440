"""Error of a sampler's final samples against a high-accuracy solution of the same ODE from the same noise.

The reference integrates the (guided) probability-flow ODE of the cell's network from the same initial noise
with scipy's DOP853 (Dormand and Prince's explicit Runge-Kutta method of order 8 with adaptive steps; Hairer,
Norsett and Wanner, "Solving Ordinary Differential Equations I", II.10), in float64, relative and absolute
tolerance ``rtol`` per value, one solve for the whole batch:

- VP: d x_bar / d sigma_bar = eps(alpha x_bar, t(sigma_bar)) with x_bar = x / alpha, sigma_bar = sigma / alpha, from
  t = T - 1 (where the VP samplers start) to t = 0, fractional timesteps on the schedule's own interpolation
  (log alpha linear between integer timesteps).  The schedule, and any network trained on it, defines no noise
  level between t = 0 and the clean end; the clean sample is the data prediction at t = 0, the last step of every
  VP sampler (DDIM, DPM-Solver, UniPC, PLMS and steerdiff's, with ``final_sigmas_type="zero"``).
- Flow matching: dx/ds = v(x, s), regular on all of [0, 1], from s = 1 (pure noise, where the flow samplers
  start) to s = 0.

The metric is the mean over samples of

    e_i = || x_i - x_ref,i ||_2        (over all C x H x W values),

the quantity whose decay with NFE gives a solver's order of convergence.  The reference's own error is measured
by ``python -m benchmarks.reference_accuracy`` against exact Gaussian flows and against a solve at rtol = 1e-13
(docs/benchmarks/reference_accuracy.md); the tests hold it below 1e-6 at the default rtol.
On the analytic Gaussian mixture (:class:`steerdiff.testbeds.mixture.GaussianMixtureDenoiser`)
the network is exact, so this is the pure discretisation error; on a trained network it is the error relative to
that network's own ODE.  The guidance must be a function of (x, t): a rule that keeps state between evaluations
or acts on evaluation indices has no reference solution.  The reference is computed once per (model, guidance,
noise, rtol) and cached in the run folder.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch

from ..atomic_io import atomic_save_safetensors
from ..core.denoiser import as_denoiser
from ..core.tensors import batch_norm
from .base import Metric, SampleSet

DEFAULT_RTOL = 1e-10


def _check_rtol(rtol) -> float:
    if isinstance(rtol, bool) or not isinstance(rtol, (int, float)) or not 0 < rtol <= 1e-3:
        raise ValueError(f"l2_to_reference: rtol must be a number in (0, 1e-3], got {rtol!r}")
    return float(rtol)


def _check_rule(denoiser) -> None:
    rule = denoiser.rule
    if rule is not None and getattr(rule, "stateful", False):
        raise ValueError(
            f"l2_to_reference: {rule!r} keeps state from one evaluation to the next, so the guided ODE it samples "
            "depends on the solver's steps and has no reference solution; use a stateless rule (e.g. APG with momentum=0)"
        )


def reference_solution(model_fn, noise: torch.Tensor, schedule, prediction_type: str | None = None,
                       rtol: float = DEFAULT_RTOL) -> torch.Tensor:
    """x_0 from ``noise`` = x_T by an adaptive DOP853 solve of the probability-flow ODE (module docstring), in
    noise's dtype.

    ``model_fn``: the model boundary (:class:`steerdiff.core.Denoiser`) or a plain ``(x, t) -> output`` of
    ``prediction_type``; ``schedule``: the noise process (VP or flow); ``rtol``: DOP853's relative and absolute
    tolerance per value (in (0, 1e-3])."""
    from scipy.integrate import solve_ivp

    rtol = _check_rtol(rtol)
    denoiser = as_denoiser(model_fn, schedule, prediction_type)
    _check_rule(denoiser)
    denoiser.reset()
    shape, device, f64 = noise.shape, noise.device, torch.float64
    T = schedule.num_train_timesteps

    def state(y: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(y).reshape(shape).to(device)

    def predict(x_of, t: torch.Tensor):
        """The prediction at timestep t for the state ``x_of(alpha)`` (alpha, sigma computed once)."""
        alpha, sigma = (v.to(device) for v in schedule.alpha_sigma(t))
        return denoiser.predict(x_of(alpha), t.to(device), alpha, sigma)

    def host(v: torch.Tensor, t: torch.Tensor) -> np.ndarray:
        out = v.detach().to("cpu", f64).flatten().numpy()
        if not np.isfinite(out).all():
            raise FloatingPointError(f"the model output has NaN/Inf at timestep {float(t):g} of the reference solve")
        return out

    def solve(rhs, span, y0: np.ndarray) -> np.ndarray:
        sol = solve_ivp(rhs, span, y0, method="DOP853", rtol=rtol, atol=rtol)
        if not sol.success:
            raise RuntimeError(f"the reference solve failed: {sol.message}")
        return sol.y[:, -1]

    x = noise.detach().to(device, f64)
    with torch.no_grad():
        if schedule.kind == "flow":
            def velocity(s, y):
                t = torch.tensor(s * T, dtype=f64)
                return host(predict(lambda a: state(y), t).as_("flow_prediction"), t)

            end = state(solve(velocity, (1.0, 0.0), x.flatten().cpu().numpy()))
        else:
            ends = torch.tensor([T - 1, 0])
            alpha, sigma = schedule.alpha_sigma(ends)
            sigma_bar = (sigma / alpha).tolist()

            def eps(sb, y):
                t = schedule.timestep_from_lambda(torch.tensor(-math.log(sb), dtype=f64))
                return host(predict(lambda a: a * state(y), t).eps, t)

            x_bar = solve(eps, (sigma_bar[0], sigma_bar[1]), (x / alpha[0].to(device)).flatten().cpu().numpy())
            end = predict(lambda a: a * state(x_bar), ends[1]).x0  # the clean end: the data prediction at t = 0
    return end.to(noise.dtype)


def float64_network(denoiser):
    """The denoiser evaluated in float64: the mixture computes in its input's dtype; other networks are copied."""
    from ..testbeds.mixture import GaussianMixtureDenoiser

    if isinstance(denoiser, GaussianMixtureDenoiser):
        return denoiser
    return copy.deepcopy(denoiser).to(torch.float64)


class ReferenceL2(Metric):
    """``l2_error``: mean per-sample L2 distance to the adaptive DOP853 reference from the same noise (``rtol``: its
    tolerance; ``batch_size``: samples per solve)."""

    name = "l2_to_reference"
    keys = ("l2_error",)

    def __init__(self, rtol: float = DEFAULT_RTOL, batch_size: int = 1000):
        rtol = _check_rtol(rtol)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"l2_to_reference: batch_size must be an integer >= 1, got {batch_size!r}")
        self.rtol, self.batch_size = rtol, batch_size

    def reference(self, samples: SampleSet) -> torch.Tensor:
        path = None
        if samples.work_dir is not None and samples.reference_key is not None:
            path = samples.work_dir / "references" / f"{samples.reference_key}-dop853-rtol{self.rtol:g}.safetensors"
            if path.is_file():
                from safetensors.torch import load_file

                return load_file(str(path))["reference"]
        network = float64_network(samples.denoiser)
        device = next(network.buffers(), next(network.parameters(), torch.empty(0))).device
        parts = []
        for start in range(0, samples.noise.shape[0], self.batch_size):
            labels = samples.labels[start : start + self.batch_size].to(device)
            model_fn = samples.guidance.model_fn(network, labels, samples.process, samples.prediction_type)
            noise = samples.noise[start : start + self.batch_size].to(device, torch.float64)
            parts.append(reference_solution(model_fn, noise, samples.process, samples.prediction_type, self.rtol).cpu())
        ref = torch.cat(parts)
        if path is not None:
            atomic_save_safetensors(path, {"reference": ref})
        return ref

    def __call__(self, samples: SampleSet) -> dict[str, float]:
        if samples.noise is None or samples.guidance is None or samples.process is None:
            raise ValueError("l2_to_reference needs the cell's noise, guidance and noise schedule")
        error = batch_norm(samples.samples.to(torch.float64) - self.reference(samples))
        return {"l2_error": float(error.mean())}
