"""Polyak's heavy-ball momentum for diffusion ODE solvers, and the two ways of using it.

Wizadwongsa & Suwajanakorn, "Diffusion Sampling with Momentum for Mitigating Divergence Artifacts"
(ICLR 2024).  The velocity is an exponential moving average of the values fed to it,

    v_0 = x_0,    v_n = (1 - beta) v_{n-1} + beta x_n,    0 < beta <= 1,

so beta = 1 switches momentum off.  Its real-axis stability interval is (2 - beta) / beta times that of the
method it damps (for HB on Euler -2 becomes -2 (2 - beta) / beta), at the price of first order for beta < 1.

- HB on a multistep method (PLMS-r + HB): average the method's update direction,
  v <- HB(AB_r(eps_n, eps_{n-1}, ...)); first order for beta < 1.
- Generalized heavy ball (GHVB of order r): average eps itself and combine the velocities with the
  beta-weighted Adams-Bashforth rule AB_r(v_n, v_{n-1}, ...; beta) of :mod:`.multistep`; order r.

Both directions are then applied by :func:`~.steps.euler_step` in (x_bar, sigma_bar).  DPM-Solver++ 2M with HB
averages the 2M data combination instead (see :class:`steerdiff.samplers.HeavyBallDPMSolverScheduler`).
"""

from __future__ import annotations

import math
from numbers import Integral, Real

import numpy as np
import torch

from .multistep import MAX_ORDER, History, adams_bashforth


def check_beta(beta: float) -> float:
    if isinstance(beta, bool) or not isinstance(beta, Real) or not 0.0 < float(beta) <= 1.0:
        raise ValueError(f"beta must be a number in (0, 1] (1 = no momentum), got {beta!r}")
    return float(beta)


def check_order(order: int, name: str = "order") -> int:
    if isinstance(order, bool) or not isinstance(order, Integral) or not 1 <= order <= MAX_ORDER:
        raise ValueError(f"{name} must be one of 1, 2, 3, 4, got {order!r}")
    return int(order)


def heavy_ball(velocity: torch.Tensor | None, value: torch.Tensor, beta: float) -> torch.Tensor:
    """One heavy-ball update v <- (1 - beta) v + beta x; the first value (``velocity`` None) is taken as is."""
    if velocity is None or beta == 1.0:
        return value
    return torch.lerp(velocity, value, beta)


class MomentumState:
    """What a momentum sampler remembers between steps: the velocity and a newest-first history.

    The history holds past eps (PLMS + HB), past velocities (GHVB) or the previous data prediction
    (DPM-Solver++ 2M + HB).  Every tensor stays on the sample's device and dtype and is updated per sample, so
    a sample's trajectory does not depend on the rest of its batch.
    """

    def __init__(self, beta: float, history_length: int):
        self.beta = check_beta(beta)
        self.history = History(history_length)
        self.velocity: torch.Tensor | None = None

    def reset(self) -> None:
        self.history.reset()
        self.velocity = None

    def average(self, value: torch.Tensor) -> torch.Tensor:
        """Feed ``value`` to the velocity and return the new velocity."""
        self.velocity = heavy_ball(self.velocity, value, self.beta)
        return self.velocity


def plms_hb_direction(state: MomentumState, eps: torch.Tensor, order: int, coefficients=None) -> torch.Tensor:
    """PLMS-r with heavy ball: push eps, then v <- (1 - beta) v + beta AB_r(eps history); returns v.
    ``coefficients``: this step's variable-step Adams-Bashforth weights (beta 1), else the fixed ones."""
    state.history.push(eps)
    return state.average(adams_bashforth(state.history, order, coefficients=coefficients))


def ghvb_direction(state: MomentumState, eps: torch.Tensor, order: int, coefficients=None) -> torch.Tensor:
    """GHVB of order r: v <- (1 - beta) v + beta eps, push v, return the beta-weighted AB_r(v history; beta).
    ``coefficients``: this step's variable-step weights for this beta, else the fixed ones."""
    state.history.push(state.average(eps))
    return adams_bashforth(state.history, order, state.beta, coefficients=coefficients)


def steady_state_velocity_weights(nodes, beta: float, tol: float = 1e-18) -> list[list[float]]:
    """Host weights W[j][l] such that v_j = sum_l W[j][l] f_l are the velocities a heavy-ball average
    v_n = (1 - beta) v_{n-1} + beta f_n would hold at the nodes j = 0..W had it been running since long before them:

        v_j = beta sum_{k >= 0} (1 - beta)^k P(y_{j-k}),

    with P the polynomial through the W + 1 values f_l at the nodes y_l (a Runge-Kutta start provides them) and
    y_{-m} (m > 0) the grid continued backwards by the polynomial of degree min(W, 2) through (l, y_l).  GHVB's
    Adams-Bashforth weights are consistent for that steady state; starting the velocity at v_0 = f_0 instead leaves
    an O(h) error in a mode decaying like (1 - beta)^n, which caps the global order at 2 (measured: GHVB 3.8 on a
    uniform flow grid goes from order 2 to 4 with this start)."""
    y = [float(v) for v in nodes]
    w = len(y) - 1
    q = 1.0 - float(beta)
    back = np.polynomial.Polynomial.fit(np.arange(w + 1), y, min(w, 2)).convert() if w >= 1 else None

    def lagrange(at: float) -> np.ndarray:
        out = np.ones(w + 1)
        for j in range(w + 1):
            for l in range(w + 1):
                if l != j:
                    out[j] *= (at - y[l]) / (y[j] - y[l])
        return out

    rows = []
    for j in range(w + 1):
        row, k = np.zeros(w + 1), 0
        while True:
            weight = float(beta) * q**k
            if j - k >= 0:
                row[j - k] += weight
            else:
                row += weight * lagrange(float(back(j - k)))
            k += 1
            if q == 0.0 or q**k < tol:
                break
        rows.append(row.tolist())
    return rows


def order_and_beta(momentum_number: float) -> tuple[int, float]:
    """GHVB's momentum number m = order - (1 - beta) split into order r = ceil(m) and beta = m - (r - 1)
    (beta = 1 for an integer m): GHVB 3.8 = order 4, beta 0.8."""
    m = momentum_number
    if isinstance(m, bool) or not isinstance(m, Real) or not 0.0 < float(m) <= MAX_ORDER:
        raise ValueError(f"momentum_number must be a number in (0, {MAX_ORDER}], got {m!r}")
    order = math.ceil(float(m))
    return order, round(float(m) - (order - 1), 12)
