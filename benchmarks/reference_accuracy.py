"""Accuracy of ``l2_to_reference``'s reference solution (``steerdiff.metrics.reference_error.reference_solution``).

1. Against exact flows: for Gaussian data N(mu, diag s^2) the probability-flow ODE keeps each standardised
   coordinate fixed, x_t = alpha_t mu + sqrt(alpha_t^2 s^2 + sigma_t^2) z, so the solution is known in closed form
   (VP: at t = 0, then the data prediction there, as the reference defines the clean end; flow: at s = 0).
2. On the digits Gaussian mixture (``fit_digits_mixture``, float64, exact network, CFG w = 1 and 3), VP and flow:
   against the same solve at rtol = 1e-13, and the 1,000-step DPM-Solver++ 2M the metric used before against both.

Errors are the metric's own quantity, the mean over samples of the per-sample L2 norm (max over samples in
brackets).

    python -m benchmarks.reference_accuracy [--samples 16] [--threads 1]
"""

from __future__ import annotations

import argparse
import time

import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

from steerdiff.pipelines.calling import GuidancePlan
from steerdiff.core import sample_dpmpp_2m, spaced_timesteps, with_final
from steerdiff.metrics.reference_error import DEFAULT_RTOL, reference_solution
from steerdiff.testbeds.mixture import GaussianMixtureDenoiser, fit_digits_mixture

F64 = torch.float64
CONFIGS = {"VP": lambda: DDPMScheduler(clip_sample=False), "flow": lambda: FlowMatchEulerDiscreteScheduler()}


def l2(a: torch.Tensor, b: torch.Tensor) -> str:
    e = (a - b).flatten(1).norm(dim=1)
    return f"{float(e.mean()):.2e} ({float(e.max()):.2e})"


def old_reference(model_fn, noise, process, prediction_type):
    """The metric's former reference: 1,000 steps of DPM-Solver++ 2M (VP: every timestep 999..0; flow: equal steps in s)."""
    T = process.num_train_timesteps
    grid = torch.linspace(T, 0, 1001, dtype=F64) if process.kind == "flow" else with_final(spaced_timesteps(T, 1000, "trailing"))
    return sample_dpmpp_2m(model_fn, noise, process, grid, prediction_type)


def exact_gaussian(kind: str, samples: int) -> None:
    gen = torch.Generator().manual_seed(1)
    mu, var = torch.randn(1, 1, 8, 8, generator=gen, dtype=F64), 0.01 + 0.3 * torch.rand(1, 1, 8, 8, generator=gen, dtype=F64)
    model = GaussianMixtureDenoiser.from_components(mu, var, scheduler_config=CONFIGS[kind]())
    process, pt = model.schedule, model.config.prediction_type
    x_T = torch.randn(samples, 1, 8, 8, generator=gen, dtype=F64)
    T = process.num_train_timesteps
    t_start, t_end = (torch.tensor(float(T)), torch.tensor(0.0)) if kind == "flow" else (torch.tensor(T - 1), torch.tensor(0))
    (a0, s0), (a1, s1) = process.alpha_sigma(t_start), process.alpha_sigma(t_end)
    z = (x_T - a0 * mu) / torch.sqrt(a0**2 * var + s0**2)
    exact = a1 * mu + torch.sqrt(a1**2 * var + s1**2) * z
    if kind == "VP":  # the clean end: the data prediction at t = 0
        exact = model.posterior_mean(exact, t_end)
    fn = lambda x, t: model(x, t).sample  # noqa: E731
    start = time.perf_counter()
    ref = reference_solution(fn, x_T, process, pt)
    seconds = time.perf_counter() - start
    print(f"| Gaussian, {kind} | exact flow | {l2(ref, exact)} | {l2(old_reference(fn, x_T, process, pt), exact)} | {seconds:.1f} s |")


def digits_mixture(kind: str, samples: int, scale: float) -> None:
    model = fit_digits_mixture(dtype=F64, scheduler_config=CONFIGS[kind]())
    process, pt = model.schedule, model.config.prediction_type
    gen = torch.Generator().manual_seed(0)
    x_T = torch.randn(samples, 1, 8, 8, generator=gen, dtype=F64)
    labels = torch.arange(samples) % 10
    fn = GuidancePlan({}, scale=scale).model_fn(model, labels, process, pt)
    start = time.perf_counter()
    ref = reference_solution(fn, x_T, process, pt)
    seconds = time.perf_counter() - start
    tight = reference_solution(fn, x_T, process, pt, rtol=1e-13)
    print(f"| digits mixture, {kind}, w = {scale:g} | rtol 1e-13 solve | {l2(ref, tight)} | "
          f"{l2(old_reference(fn, x_T, process, pt), tight)} | {seconds:.1f} s |")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"reference: DOP853 at rtol = atol = {DEFAULT_RTOL:g}; {args.samples} samples; float64\n")
    print("| case | against | reference error: mean (max) | former 1,000-step DPM-Solver++ 2M | reference time |")
    print("|---|---|---|---|---|")
    for kind in CONFIGS:
        exact_gaussian(kind, args.samples)
    for kind in CONFIGS:
        for scale in (1.0, 3.0):
            digits_mixture(kind, args.samples, scale)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
