"""Measured order of convergence of the momentum samplers on the analytic digits mixture.

The model is :func:`steerdiff.testbeds.fit_digits_mixture` in float64 (50 diagonal Gaussians on 1x8x8, DDPM
linear schedule, exact eps).  16 samples start from the same noise at t = 999 and are integrated to t = 0
(``final_sigmas_type="sigma_min"``) with N steps; the error is the RMS difference per pixel to a high-accuracy
reference from the same noise (scipy's DOP853 on d x_bar / d sigma_bar = eps, rtol = atol = 1e-12; its own
error is estimated against rtol = 1e-10 and printed).  The order is the least-squares slope of log(error)
against log(N) over the three largest N.

Grids (N steps from t = 999 to t = 0):

- ``linspace``: diffusers' default spacing (``set_timesteps(N)``), what a pipeline uses;
- ``lambda``: uniform in lambda = log(alpha / sigma), DPM-Solver's grid;
- ``sigma_bar``: uniform in sigma_bar = sigma / alpha, the variable PLMS / GHVB integrate in; the only grid on
  which fixed Adams-Bashforth weights are consistent beyond second order.  The digits' smallest standard
  deviation (0.036) against sigma_bar's range (0.01 .. 157) makes it need thousands of steps.

    python -m benchmarks.momentum_order            # from the repository root; a few minutes on one core
"""

from __future__ import annotations

import argparse
import math
import platform
import time

import numpy as np
import torch
from scipy.integrate import solve_ivp

from steerdiff.core import NoiseSchedule
from steerdiff.samplers import GHVBScheduler, HeavyBallDPMSolverScheduler, HeavyBallPLMSScheduler
from steerdiff.testbeds import fit_digits_mixture

END = dict(final_sigmas_type="sigma_min")
FIXED = dict(END, adams_weights="fixed")  # the paper's equal-step weights, what docs/samplers.md's table measured
METHODS = {
    "DDIM (GHVB 1)": lambda: GHVBScheduler(momentum_number=1, **FIXED),
    "PLMS4 (GHVB 4)": lambda: GHVBScheduler(momentum_number=4, **FIXED),
    "PLMS4 + HB 0.9": lambda: HeavyBallPLMSScheduler(order=4, beta=0.9, **FIXED),
    "PLMS4 + HB 0.8": lambda: HeavyBallPLMSScheduler(order=4, beta=0.8, **FIXED),
    "DPM-Solver++ 2M": lambda: HeavyBallDPMSolverScheduler(beta=1.0, **END),
    "DPM-Solver++ 2M + HB 0.8": lambda: HeavyBallDPMSolverScheduler(beta=0.8, **END),
    "GHVB 0.5": lambda: GHVBScheduler(momentum_number=0.5, **FIXED),
    "GHVB 1.5": lambda: GHVBScheduler(momentum_number=1.5, **FIXED),
    "GHVB 2.5": lambda: GHVBScheduler(momentum_number=2.5, **FIXED),
    "GHVB 3.5": lambda: GHVBScheduler(momentum_number=3.5, **FIXED),
    "GHVB 3.8": lambda: GHVBScheduler(momentum_number=3.8, **FIXED),
}
ADAMS_BASHFORTH_FAMILY = [name for name in METHODS if "DPM" not in name]
STEPS = {"linspace": [10, 20, 40, 80, 160, 320, 640], "lambda": [10, 20, 40, 80, 160, 320, 640],
         "sigma_bar": [500, 1000, 2000, 4000, 8000]}


def reference(model, schedule: NoiseSchedule, x: torch.Tensor, rtol: float) -> torch.Tensor:
    """x at t = 0 from x at t = 999 by DOP853 on d x_bar / d sigma_bar = eps(alpha x_bar, t(sigma_bar))."""
    ends = schedule.sigma_bar(torch.tensor([999, 0]))

    def velocity(sigma_bar, y):
        t = schedule.timestep_from_sigma_bar(torch.tensor(sigma_bar, dtype=torch.float64))
        x_bar = torch.from_numpy(y).reshape(x.shape)
        return model(schedule.alpha(t) * x_bar, t).sample.flatten().numpy()

    x_bar = (x / schedule.alpha(torch.tensor(999))).flatten().numpy()
    sol = solve_ivp(velocity, ends.tolist(), x_bar, method="DOP853", rtol=rtol, atol=rtol)
    if not sol.success:
        raise RuntimeError(f"reference solve failed: {sol.message}")
    return schedule.alpha(torch.tensor(0)) * torch.from_numpy(sol.y[:, -1]).reshape(x.shape)


def grid(schedule: NoiseSchedule, kind: str, n: int) -> list[float] | None:
    """The N timesteps before the end (None = the scheduler's own linspace spacing)."""
    if kind == "linspace":
        return None
    ends = torch.tensor([999, 0])
    if kind == "lambda":
        ts = schedule.timestep_from_lambda(torch.linspace(*schedule.lambda_(ends).tolist(), n + 1, dtype=torch.float64))
    else:
        ts = schedule.timestep_from_sigma_bar(torch.linspace(*schedule.sigma_bar(ends).tolist(), n + 1, dtype=torch.float64))
    return ts[:-1].tolist()


@torch.no_grad()
def solve(scheduler, model, x: torch.Tensor, n: int, timesteps) -> torch.Tensor:
    scheduler.set_timesteps(None if timesteps is not None else n, timesteps=timesteps)
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, t).sample, t, x).prev_sample
    return x


def fitted_order(steps: list[int], errors: list[float]) -> float:
    slope = np.polyfit(np.log(steps[-3:]), np.log(errors[-3:]), 1)[0]
    return -float(slope)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--grids", nargs="+", default=list(STEPS), choices=list(STEPS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()

    model = fit_digits_mixture(dtype=torch.float64).eval()
    schedule = NoiseSchedule.from_config(GHVBScheduler().config)
    assert torch.equal(schedule.alphas_cumprod, model.alphas_cumprod), "model and samplers must share the schedule"
    x = torch.randn(args.samples, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = reference(model, schedule, x, 1e-12)
        ref_error = float((reference(model, schedule, x, 1e-10) - ref).pow(2).mean().sqrt())
    print(f"digits mixture (float64, {args.samples} samples, t 999 -> 0); reference DOP853 rtol 1e-12, "
          f"RMS change from rtol 1e-10: {ref_error:.1e}")

    rows = []
    for kind in args.grids:
        names = METHODS if kind != "sigma_bar" else ADAMS_BASHFORTH_FAMILY
        steps = STEPS[kind]
        print(f"\ngrid {kind}: RMS error at t = 0 for N = {steps}; order = slope over the last three")
        for name in names:
            errors = [float((solve(METHODS[name](), model, x, n, grid(schedule, kind, n)) - ref).pow(2).mean().sqrt())
                      for n in steps]
            order = fitted_order(steps, errors)
            rows.append((name, kind, order))
            print(f"  {name:<26s} " + " ".join(f"{e:8.2e}" for e in errors) + f"   order {order:5.2f}")

    print("\n| method | " + " | ".join(f"order ({k} grid)" for k in args.grids) + " |")
    print("|---|" + "---|" * len(args.grids))
    for name in METHODS:
        cells = [next((f"{o:.2f}" for n, k, o in rows if n == name and k == kind), "-") for kind in args.grids]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print(f"\n{platform.machine()}, torch {torch.__version__}, {args.threads} thread(s), {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
