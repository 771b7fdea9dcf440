"""Measured orders of convergence of the solvers on flow-matching grids, against the closed-form flow of a Gaussian.

For data N(mu, s0^2 I) under x_s = (1 - s) x0 + s eps the probability-flow ODE is linear and its solution from
x_1 (pure noise, s = 1) is  x_s = (1 - s) mu + sqrt((1 - s)^2 s0^2 + s^2) x_1,  so x_0 = mu + s0 x_1 exactly.  The
network is the exact velocity of that Gaussian (the analytic mixture with one component, float64), so the error
at s = 0 is pure discretisation error.  Grids: FlowMatchEulerDiscreteScheduler's ``set_timesteps(N)`` (shift 3 as
SD3, shift 1), which start at s = 1 and end with a step from a fixed sigma_min to 0 (see
benchmarks/multistep_order.py for pipeline-style sigmas, whose last step shrinks with N).  Adams-Bashforth samplers
use their default variable-step weights in s unless marked "fixed weights" (the paper's, in sigma_bar); "RK4
start" is ``warmup="rk4"`` (3 extra calls per warm-up step, not counted in N here).  The order is the least-squares slope of log error against log N over the step counts.

    python -m benchmarks.flow_orders            # prints the table (a few seconds)
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from steerdiff.samplers import GHVBScheduler, HeavyBallDPMSolverScheduler, HeavyBallPLMSScheduler
from steerdiff.testbeds.mixture import GaussianMixtureDenoiser

F64 = torch.float64
FIXED = dict(adams_weights="fixed")  # the paper's equal-step weights in sigma_bar
SOLVERS = {
    "Euler (GHVB 1)": lambda c: GHVBScheduler.from_config(c, momentum_number=1.0),
    "DPM-Solver++ 2M (HB-DPM beta 1)": lambda c: HeavyBallDPMSolverScheduler.from_config(c, beta=1.0),
    "HB-DPM beta 0.8": lambda c: HeavyBallDPMSolverScheduler.from_config(c, beta=0.8),
    "PLMS-2 (GHVB 2), fixed weights": lambda c: GHVBScheduler.from_config(c, momentum_number=2.0, **FIXED),
    "PLMS-2 (GHVB 2)": lambda c: GHVBScheduler.from_config(c, momentum_number=2.0),
    "PLMS-4 (HB-PLMS beta 1), fixed weights": lambda c: HeavyBallPLMSScheduler.from_config(c, order=4, beta=1.0, **FIXED),
    "PLMS-4 (HB-PLMS beta 1)": lambda c: HeavyBallPLMSScheduler.from_config(c, order=4, beta=1.0),
    "PLMS-4, RK4 start": lambda c: HeavyBallPLMSScheduler.from_config(c, order=4, beta=1.0, warmup="rk4"),
    "HB-PLMS-4 beta 0.8": lambda c: HeavyBallPLMSScheduler.from_config(c, order=4, beta=0.8),
    "GHVB 1.5": lambda c: GHVBScheduler.from_config(c, momentum_number=1.5),
    "GHVB 2.5": lambda c: GHVBScheduler.from_config(c, momentum_number=2.5),
    "GHVB 3.8, fixed weights": lambda c: GHVBScheduler.from_config(c, momentum_number=3.8, **FIXED),
    "GHVB 3.8": lambda c: GHVBScheduler.from_config(c, momentum_number=3.8),
    "GHVB 3.8, RK4 start": lambda c: GHVBScheduler.from_config(c, momentum_number=3.8, warmup="rk4"),
}
STEPS = (10, 20, 40, 80, 160)


def gaussian_flow(shift: float, s0: float = 0.5, dim: int = 16):
    config = FlowMatchEulerDiscreteScheduler(shift=shift).config
    mu = torch.linspace(-0.8, 0.8, dim, dtype=F64).reshape(1, 1, 4, 4)
    model = GaussianMixtureDenoiser.from_components(mu, torch.full((1, 1, 4, 4), s0**2, dtype=F64), scheduler_config=config)
    return config, model, mu, s0


def final_error(make, config, model, mu, s0, steps: int, batch: int = 4) -> float:
    x1 = torch.randn(batch, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=F64)
    sched = make(config)
    sched.set_timesteps(steps)
    x = x1.clone()
    for t in sched.timesteps:
        x = sched.step(model(x, t).sample, t, x).prev_sample
    exact = mu + s0 * x1
    return float((x - exact).flatten(1).norm(dim=1).max())


def measured_order(make, shift: float, steps=STEPS) -> tuple[float, list[float]]:
    config, model, mu, s0 = gaussian_flow(shift)
    errors = [final_error(make, config, model, mu, s0, n) for n in steps]
    return -float(np.polyfit(np.log(steps), np.log(errors), 1)[0]), errors


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shifts", type=float, nargs="+", default=[3.0, 1.0])
    args = p.parse_args(argv)
    print(f"| solver | " + " | ".join(f"order, shift {s:g}" for s in args.shifts) + f" | error at N = {STEPS[-1]}, shift {args.shifts[0]:g} |")
    print("|---|" + "---|" * (len(args.shifts) + 1))
    for name, make in SOLVERS.items():
        cells, last = [], None
        for shift in args.shifts:
            order, errors = measured_order(make, shift)
            cells.append(f"{order:.2f}")
            last = errors[-1] if last is None else last
        print(f"| {name} | " + " | ".join(cells) + f" | {last:.2e} |")


if __name__ == "__main__":
    main()
