"""Linear stability of a sampler's update rule, measured on Dahlquist's test equation y' = lambda y.

With step h and z = h lambda, a rule is stable at z when its iterates stay bounded.  Wizadwongsa &
Suwajanakorn (ICLR 2024) trace the divergence artifacts of high-order samplers at few steps and high guidance
to small stability regions.  Known edges of the interval (edge, 0) on the negative real axis: Euler -2,
AB2 -1, AB4 -0.3; heavy ball multiplies them by (2 - beta) / beta.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .momentum import MomentumState

Direction = Callable[[MomentumState, torch.Tensor, int], torch.Tensor]


def real_axis_stability_edge(
    direction: Direction, order: int, beta: float, z_max: float = 8.0, resolution: float = 1e-3, steps: int = 4000
) -> float:
    """The empirical left edge of the stability interval of ``direction`` on the negative real axis.

    Runs y_{n+1} = y_n + direction(z y_n) (h = 1, f = z y, y_0 = 1) for every z = -resolution, -2 resolution,
    ..., -z_max at once (each z is one sample of a batch: the state is per sample), ``steps`` steps in float64,
    and returns the z closest to 0 whose run left |y| < 10; -inf when none did.  ``direction`` is e.g.
    :func:`~steerdiff.core.momentum.plms_hb_direction` or :func:`~steerdiff.core.momentum.ghvb_direction`.
    """
    z = -torch.arange(1, int(round(z_max / resolution)) + 1, dtype=torch.float64) * resolution
    y = torch.ones_like(z)
    state = MomentumState(beta, history_length=order)
    for _ in range(steps):
        y = y + direction(state, z * y, order)
    unstable = ~(y.abs() < 10)  # NaN counts as blown up
    return float(z[unstable.nonzero()[0, 0]]) if bool(unstable.any()) else float("-inf")
