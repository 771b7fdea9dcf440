"""Predictor-corrector guidance on Gaussian data, where the gamma-powered distribution is known in closed form.

p(x | c) = N(1, 0.25), p(x) = N(0, 1) per coordinate; CFG scale w = 3, gamma = 2 w - 1 = 5.  For VP (DDPM's linear
betas, N steps ending at t = 0) and flow (s from 1 to 0.01 in N equal steps), prints the sample mean and variance at
the grid's last point of PCG (corrector_steps K, the CFG-DDPM-matching step size), CFG-DDIM and CFG-DDPM at w, and
the gamma-powered distribution of the noisy marginals there (with the unadjusted Langevin algorithm's exact
stationary variance factor for PCG's step size).  tests/test_pcg.py checks the same claims at a smaller size.

    python -m benchmarks.pcg_gaussian [--samples 20000] [--steps 100] [--corrector-steps 300]
"""

from __future__ import annotations

import argparse
import time

import torch

from steerdiff.core import Denoiser, FlowMatchSchedule, NoiseSchedule, sample_ddim, sample_pcg
from steerdiff.core.grid import make_grid, resolve_grid

MC, VC, MU, VU = 1.0, 0.25, 0.0, 1.0
W = 3.0
GAMMA = 2 * W - 1


class TwoGaussians:
    """Conditional network: label 0 = the condition, 1 = null (unconditional); the exact eps (VP) or velocity (flow)."""

    def __init__(self, process):
        self.process = process

    def null(self, batch, device):
        return torch.ones(batch, dtype=torch.long, device=device)

    def __call__(self, x, t, cond):
        a, s = self.process.alpha_sigma(t)
        a, s = a.view(-1, 1).to(x.dtype), s.view(-1, 1).to(x.dtype)
        conditional = (cond == 0).view(-1, 1)
        mu = torch.where(conditional, MC, MU).to(x.dtype)
        v = torch.where(conditional, VC, VU).to(x.dtype)
        eps = s * (x - a * mu) / (a * a * v + s * s)
        if self.process.kind == "flow":
            return eps - (mu + a * v * (x - a * mu) / (a * a * v + s * s))
        return eps


def setup(kind: str, steps: int, samples: int):
    """(process, grid, x_T, make) with make(w) the Denoiser at CFG scale w."""
    if kind == "vp":
        process = NoiseSchedule.from_config({})
        grid = resolve_grid(process, steps, final_sigmas_type="sigma_min")  # ends at t = 0, sigma > 0
        prediction = "epsilon"
    else:
        process = FlowMatchSchedule()
        s = torch.linspace(1, 0.01, steps + 1, dtype=torch.float64)
        grid = make_grid(process, s * 1000, s)
        prediction = "flow_prediction"
    x = torch.randn(samples, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * float(grid.sigma[0])
    cond = torch.zeros(1, dtype=torch.long)  # one row, for every sample
    make = lambda w: Denoiser(TwoGaussians(process), process, prediction, w, cond)  # noqa: E731
    return process, grid, x, make


def powered(grid, gamma: float, eta: float = 0.0) -> tuple[float, float]:
    """Mean and variance of the gamma-powered distribution of the noisy marginals at the grid's last point, in x;
    with ``eta``, the stationary law of the unadjusted Langevin algorithm of step eta (in x_bar) on it: the mean is
    exact and the variance v / (1 - eta / (4 v)) (x_bar' - m = (1 - eta / (2 v)) (x_bar - m) + sqrt(eta) z)."""
    a, s = float(grid.alpha[-1]), float(grid.sigma[-1])
    vc, vu = VC + (s / a) ** 2, VU + (s / a) ** 2  # in x_bar = x / alpha
    precision = gamma / vc + (1 - gamma) / vu
    mean, var = (gamma * MC / vc + (1 - gamma) * MU / vu) / precision, 1 / precision
    var = var / (1 - eta / (4 * var))
    return a * mean, a * a * var


def last_eta(grid) -> float:
    bar = grid.sigma_bar_host.tolist()
    return bar[-2] ** 2 - bar[-1] ** 2


def moments(x) -> tuple[float, float]:
    return float(x.mean()), float(x.var())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=20000)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--corrector-steps", type=int, default=300)
    args = p.parse_args(argv)
    print("| process | sampler | mean | variance |")
    print("|---|---|---|---|")
    for kind in ("vp", "flow"):
        started = time.perf_counter()
        process, grid, x, make = setup(kind, args.steps, args.samples)
        rows = {
            f"PCG, K = {args.corrector_steps}": sample_pcg(make(1.0), x, process, grid, gamma=GAMMA,
                                                        corrector_steps=args.corrector_steps, generator=torch.Generator().manual_seed(2)),
            "PCG, K = 1": sample_pcg(make(1.0), x, process, grid, gamma=GAMMA, corrector_steps=1, generator=torch.Generator().manual_seed(4)),
            f"CFG-DDIM, w = {W:g}": sample_ddim(make(W), x, process, grid),
            f"CFG-DDPM, w = {W:g}": sample_ddim(make(W), x, process, grid, eta=1.0, generator=torch.Generator().manual_seed(3)),
        }
        for name, out in rows.items():
            m, v = moments(out)
            print(f"| {kind} | {name} | {m:.4f} | {v:.5f} |")
        m, v = powered(grid, GAMMA)
        print(f"| {kind} | gamma-powered, gamma = {GAMMA:g} (exact) | {m:.4f} | {v:.5f} |")
        m, v = powered(grid, GAMMA, last_eta(grid))
        print(f"| {kind} | gamma-powered under Langevin of PCG's last step size (exact) | {m:.4f} | {v:.5f} |")
        print(f"<!-- {kind}: {time.perf_counter() - started:.0f} s -->")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
