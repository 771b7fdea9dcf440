"""Ablation of the adjoint solve: exact alpha factors (steerdiff's clocks) against plain Euler in rho.

``sample_with_grad(mode="adjoint")`` advances a_y in atan(rho) and a_c / a_theta in asinh(rho), i.e. it
integrates the factors alpha(rho)^2 and alpha(rho) of the adjoint ODE exactly and holds only the network terms
constant over a step.  A generic solver on AdjointDPM's augmented ODE in rho (plain Euler, the first-order
member of the fixed-grid solvers the reference code hands to torchdiffeq) freezes alpha at the start of the
step too: a_y += (rho_{k-1} - rho_k) alpha_k^2 V_k.  On a fixed grid that is again an Euler step in a
clock, whose increments are alpha_k^2 (rho_{k-1} - rho_k); this script swaps those clocks in and measures
both against the exact gradient of the discrete sampler (autograd), on the digits Gaussian mixture in float64
(exact eps; the means are the parameters), 8 samples, classifier-free guidance 2, loss = squared distance to
fixed random targets.

    python -m benchmarks.adjoint_clocks
"""

from __future__ import annotations

import argparse
import time
from unittest import mock

import torch

from steerdiff.pipelines import adjoint
from steerdiff.pipelines.adjoint import sample_with_grad
from steerdiff.testbeds.mixture import fit_digits_mixture


class FrozenAlphaForm(adjoint._ExponentialForm):
    """The adjoint's VP variables with the clocks of plain Euler in rho: increments alpha_k^p (rho_{k-1} - rho_k),
    p = 2 for a_y and 1 for a_c / a_theta."""

    def __init__(self, process, grid):
        super().__init__(process, grid)
        rho = grid.sigma_bar
        d_rho = rho[:-1] - rho[1:]  # rho_{k-1} - rho_k for k = 1..N, indexed k - 1
        clocks = []
        for power in (2, 1):
            steps = grid.alpha[1:] ** power * d_rho
            clock = torch.zeros_like(rho)
            clock[:-1] = torch.flip(torch.cumsum(torch.flip(steps, [0]), 0), [0])  # clock_{k-1} - clock_k = steps[k-1]
            clocks.append(clock)
        self.clock_y, self.clock_c = clocks


def rel(a, b):
    return float((a - b).norm() / b.norm())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, nargs="+", default=[5, 10, 20, 40, 80, 160])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()

    model = fit_digits_mixture(dtype=torch.float64)
    model.means = torch.nn.Parameter(model.means.clone())
    gen = torch.Generator().manual_seed(0)
    x_T = torch.randn(args.batch, 1, 8, 8, dtype=torch.float64, generator=gen)
    target = torch.randn(args.batch, 1, 8, 8, dtype=torch.float64, generator=gen)
    labels = torch.arange(args.batch) % 10

    def loss_fn(x0):
        return ((x0 - target) ** 2).sum()

    print("| order | steps | dL/dx_T: exact alpha (clocks) | dL/dx_T: plain Euler in rho | "
          "dL/dmeans: exact alpha | dL/dmeans: plain Euler in rho |")
    print("|---|---|---|---|---|---|")
    for order in (1, 2):
        for n in args.steps:
            kw = dict(num_inference_steps=n, conditioning=labels, guidance_scale=2.0, loss_fn=loss_fn,
                      params=["means"], order=order)
            ref = sample_with_grad(model, x_T, model.schedule, mode="autograd", **kw)
            clocks = sample_with_grad(model, x_T, model.schedule, mode="adjoint", **kw)
            with mock.patch.object(adjoint, "_adjoint_form", FrozenAlphaForm):
                frozen = sample_with_grad(model, x_T, model.schedule, mode="adjoint", **kw)
            print(f"| {order} | {n} | {rel(clocks.grad_x_T, ref.grad_x_T):.3e} | {rel(frozen.grad_x_T, ref.grad_x_T):.3e} | "
                  f"{rel(clocks.grad_params['means'], ref.grad_params['means']):.3e} | "
                  f"{rel(frozen.grad_params['means'], ref.grad_params['means']):.3e} |", flush=True)
    print(f"\nrelative errors against autograd (the exact discrete gradient); {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
