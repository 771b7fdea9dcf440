"""Linear multistep machinery: the (beta-weighted) Adams-Bashforth combination and a history buffer.

Adams-Bashforth of order r over the newest-first history e_0, e_1, ... with the momentum weights of
Wizadwongsa & Suwajanakorn (ICLR 2024, "Diffusion Sampling with Momentum for Mitigating Divergence
Artifacts"), AB_r(e, b) divided by b:

    r=1: b e0
    r=2: ((2+b) e0 - (2-b) e1) / 2
    r=3: ((18+5b) e0 - (24-8b) e1 + (6-b) e2) / 12
    r=4: ((46+9b) e0 - (78-19b) e1 + (42-5b) e2 - (10-b) e3) / 24

b = 1 gives the classical coefficients (1), (3, -1)/2, (23, -16, 5)/12, (55, -59, 37, -9)/24 of PLMS.

Variable steps (:func:`variable_adams_bashforth_coefficients`).  The fixed weights assume equal steps in the
ODE's variable sigma (here sigma_bar = sigma / alpha); diffusers' grids are equal in t, not in sigma_bar.  On
nodes sigma_n, sigma_{n-1}, ..., sigma_{n-r+1} with the step h_n = sigma_{n+1} - sigma_n, write
tau = (sigma - sigma_n) / h_n (so the step is tau in [0, 1] and tau_j = (sigma_{n-j} - sigma_n) / h_n) and let L_j
be the Lagrange basis polynomials on the tau_j.  Adams-Bashforth integrates the interpolating polynomial
P = sum_j e_{n-j} L_j over the step:

    x_{n+1} - x_n = h_n sum_j a_j e_{n-j},    a_j = int_0^1 L_j(tau) d tau.

GHVB with beta.  Its velocity v_n = (1 - beta) v_{n-1} + beta e_n gives e_n = (v_n - (1 - beta) v_{n-1}) / beta:
the derivative at step n is a difference of the velocity at this node and at the previous one.  Carrying that
over to the integral, with P now the polynomial interpolating the velocities v_{n-j} at the nodes and the previous
node's value taken one step back along the grid (the step [sigma_{n-1}, sigma_n] mapped affinely onto
[sigma_n, sigma_{n+1}], i.e. scaled by h_n / h_{n-1}):

    x_{n+1} - x_n = (1 / beta) [ int_{sigma_n}^{sigma_{n+1}} P - (1 - beta) (h_n / h_{n-1}) int_{sigma_{n-1}}^{sigma_n} P ]
                  = h_n sum_j c_j v_{n-j},   c_j = (1 / beta) [ int_0^1 L_j - (1 - beta) (h_n / h_{n-1}) int_{tau_1}^0 L_j ],

with tau_1 = -h_{n-1} / h_n.  Checks: beta = 1 gives variable-step Adams-Bashforth; on a uniform grid
(tau_j = -j, h_n = h_{n-1}) int_{-1}^0 L_j(tau) d tau = int_0^1 L_j(tau - 1) d tau, and c_j reduces to the fixed
beta-weighted weights above (for r = 2: ((2 + b) / 2, -(2 - b) / 2) / b; all r are tested to 1e-12); for one node
(r = 1) c_0 = 1 on any grid; for a constant e the update is exactly h_n e (v = e, sum_j c_j = 1).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence

import torch

MAX_ORDER = 4
ADAMS_WEIGHTS = ("variable", "fixed")  # the schedulers' adams_weights option
WARMUPS = ("none", "rk4")  # their warmup option: the first r - 1 steps


def adams_bashforth_coefficients(order: int, beta: float = 1.0) -> tuple[float, ...]:
    """Coefficients of e_0, e_1, ... for AB_order with momentum weight ``beta`` (already divided by beta)."""
    b = float(beta)
    if not 0.0 < b <= 1.0:
        raise ValueError(f"beta must lie in (0, 1], got {beta}")
    if order == 1:
        coefs = (b,)
    elif order == 2:
        coefs = ((2 + b) / 2, -(2 - b) / 2)
    elif order == 3:
        coefs = ((18 + 5 * b) / 12, -(24 - 8 * b) / 12, (6 - b) / 12)
    elif order == 4:
        coefs = ((46 + 9 * b) / 24, -(78 - 19 * b) / 24, (42 - 5 * b) / 24, -(10 - b) / 24)
    else:
        raise ValueError(f"order must be one of 1, 2, 3, 4, got {order}")
    return tuple(c / b for c in coefs)


def _lagrange_integrals(nodes: Sequence[float], lo: float, hi: float) -> list[float]:
    """int_lo^hi L_j(tau) d tau for the Lagrange basis polynomials L_j on ``nodes`` (exact, float64)."""
    from numpy.polynomial import polynomial as P

    out = []
    for j, tj in enumerate(nodes):
        poly = [1.0]
        for k, tk in enumerate(nodes):
            if k != j:
                poly = P.polymul(poly, [-tk / (tj - tk), 1.0 / (tj - tk)])
        anti = P.polyint(poly)
        out.append(float(P.polyval(hi, anti) - P.polyval(lo, anti)))
    return out


def variable_adams_bashforth_coefficients(sigmas: Sequence[float], beta: float = 1.0) -> tuple[float, ...]:
    """Coefficients c_j of e_n, e_{n-1}, ... for the step from sigmas[1] to sigmas[0] (see the module docstring):

    ``sigmas`` = (sigma_{n+1}, sigma_n, sigma_{n-1}, ..., sigma_{n-r+1}) and, when ``beta`` < 1 and r >= 2, one more
    node sigma_{n-1} must be among them (r >= 2 gives it).  The update is x_{n+1} = x_n + h_n sum_j c_j e_{n-j}
    with h_n = sigma_{n+1} - sigma_n.  Computed on the host in float64 from grid values only."""
    b = float(beta)
    if not 0.0 < b <= 1.0:
        raise ValueError(f"beta must lie in (0, 1], got {beta}")
    end, start, *older = (float(v) for v in sigmas)
    h = end - start
    nodes = [0.0] + [(s - start) / h for s in older]
    if len(nodes) == 1:
        return (1.0,)
    forward = _lagrange_integrals(nodes, 0.0, 1.0)
    if b == 1.0:
        return tuple(forward)
    tau1 = nodes[1]  # = -h_{n-1} / h_n
    backward = _lagrange_integrals(nodes, tau1, 0.0)
    scale = -1.0 / tau1  # h_n / h_{n-1}
    return tuple((f - (1 - b) * scale * g) / b for f, g in zip(forward, backward))


def adams_bashforth(history: Sequence[torch.Tensor], order: int, beta: float = 1.0,
                    coefficients: Sequence[float] | None = None) -> torch.Tensor:
    """AB combination of the newest-first ``history``: the fixed weights of the order the history allows (at most
    ``order``), or the given ``coefficients`` (variable steps; their number is the order used)."""
    if len(history) == 0:
        raise ValueError("adams_bashforth needs at least one history entry")
    r = min(order, len(history)) if coefficients is None else len(coefficients)
    coefs = adams_bashforth_coefficients(r, beta) if coefficients is None else coefficients
    out = coefs[0] * history[0]
    for c, e in zip(coefs[1:], list(history)[1:r]):
        out = out + c * e
    return out


class History:
    """Newest-first buffer of the last ``maxlen`` tensors (past model outputs or velocities)."""

    def __init__(self, maxlen: int):
        if maxlen < 1:
            raise ValueError(f"maxlen must be >= 1, got {maxlen}")
        self._items: deque[torch.Tensor] = deque(maxlen=maxlen)

    def push(self, x: torch.Tensor) -> None:
        self._items.appendleft(x)

    def reset(self) -> None:
        self._items.clear()

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self._items[i]

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter(self._items)
