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

import functools
from collections import deque
from collections.abc import Iterator, Sequence

import numpy as np
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


_GAUSS_X, _GAUSS_W = (v.tolist() for v in np.polynomial.legendre.leggauss(2))  # exact for degree <= 3 (r <= 4)


def _weights_array(start: np.ndarray, older: np.ndarray, end: np.ndarray, beta: float) -> np.ndarray:
    """The weights c_j (M, r) of M steps at once, step m from ``start[m]`` to ``end[m]`` on the nodes start[m],
    older[0, m], older[1, m], ... (``older`` (r - 1, M)), in float64 array arithmetic (a few numpy calls, however
    large M is).  In tau = (sigma - start) / h the nodes are t_0 = 0, t_1, ..., and the forward weights are
    int_0^1 L_j(tau) d tau for the Lagrange basis L_j on them, by two-point Gauss-Legendre, exact for these degrees
    (<= 3): prod_{k != j} (tau - t_k) = P(tau) / (tau - t_j) with P = prod_k (tau - t_k), where the Gauss points lie
    strictly inside the interval and every node at its ends or outside it, so tau - t_j is never 0.  For beta < 1
    the backward integrals over [t_1, 0] enter as in the module docstring."""
    h = end - start
    nodes = np.concatenate([np.zeros((1, start.size)), (older - start) / h])  # (r, M), node 0 at 0
    r = nodes.shape[0]
    diff = nodes[:, None, :] - nodes[None, :, :]  # (r, r, M): t_j - t_k
    diff[np.arange(r), np.arange(r)] = 1.0
    denominators = diff.prod(axis=1)  # (r, M): prod_{k != j} (t_j - t_k)

    def integrals(lo, hi) -> np.ndarray:
        half, mid = (hi - lo) / 2, (hi + lo) / 2
        tau = mid + half * np.asarray(_GAUSS_X)[:, None]  # (2, M)
        shifted = tau[:, None, :] - nodes[None, :, :]  # (2, r, M)
        product = np.asarray(_GAUSS_W)[:, None] * shifted.prod(axis=1)  # (2, M): w P(tau)
        return half * (product[:, None, :] / shifted).sum(axis=0) / denominators  # (r, M)

    forward = integrals(0.0, 1.0)
    if beta == 1.0:
        return forward.T
    tau1 = nodes[1]  # = -h_{n-1} / h_n
    backward = integrals(tau1, 0.0)
    scale = (1 - beta) * (-1.0 / tau1)  # (1 - beta) h_n / h_{n-1}
    return ((forward - scale * backward) / beta).T


def _check_beta(beta) -> float:
    b = float(beta)
    if not 0.0 < b <= 1.0:
        raise ValueError(f"beta must lie in (0, 1], got {beta}")
    return b


def variable_adams_bashforth_coefficients(sigmas: Sequence[float], beta: float = 1.0) -> tuple[float, ...]:
    """Coefficients c_j of e_n, e_{n-1}, ... for the step from sigmas[1] to sigmas[0] (see the module docstring):

    ``sigmas`` = (sigma_{n+1}, sigma_n, sigma_{n-1}, ..., sigma_{n-r+1}) and, when ``beta`` < 1 and r >= 2, one more
    node sigma_{n-1} must be among them (r >= 2 gives it).  The update is x_{n+1} = x_n + h_n sum_j c_j e_{n-j}
    with h_n = sigma_{n+1} - sigma_n.  Computed on the host in float64 from grid values only."""
    b = _check_beta(beta)
    sig = np.asarray([float(v) for v in sigmas], dtype=np.float64)
    if sig.size <= 2:
        return (1.0,)
    return tuple(_weights_array(sig[1:2], sig[2:, None], sig[0:1], b)[0].tolist())


class AdamsWeights:
    """The variable-step weights of every step of a grid: ``weights[i]`` is the tuple of step i's coefficients
    (empty before the run's first step).  Held as arrays; a step's tuple is made when the step asks for it."""

    def __init__(self, orders: np.ndarray, coefficients: np.ndarray):
        self.orders, self.coefficients = orders, coefficients

    def __len__(self) -> int:
        return len(self.orders)

    def __getitem__(self, i: int) -> tuple[float, ...]:
        return tuple(self.coefficients[i, : self.orders[i]].tolist())


def variable_adams_bashforth_grid(nodes: Sequence[float], order: int, beta: float = 1.0, start: int = 0,
                                  history_start: int | None = None) -> AdamsWeights:
    """:func:`compute_variable_adams_bashforth_grid`, remembered for the last grids asked for: a pipeline calls
    ``set_timesteps`` with the same grid at every call, and the weights depend on nothing else."""
    x = np.ascontiguousarray(nodes, dtype=np.float64)
    return _remembered_grid(x.tobytes(), order, float(beta), start, start if history_start is None else history_start)


@functools.lru_cache(maxsize=32)
def _remembered_grid(nodes: bytes, order: int, beta: float, start: int, history_start: int) -> AdamsWeights:
    return compute_variable_adams_bashforth_grid(np.frombuffer(nodes, dtype=np.float64), order, beta, start, history_start)


def compute_variable_adams_bashforth_grid(nodes: Sequence[float], order: int, beta: float = 1.0, start: int = 0,
                                          history_start: int | None = None) -> AdamsWeights:
    """The weights of every step of a grid at once (what ``set_timesteps`` needs): step i (from ``nodes[i]`` to
    ``nodes[i + 1]``, i >= ``start``) on the nodes history_start..i, at most ``order`` of them (``history_start``
    defaults to ``start``; a node that cannot enter the history, such as sigma_bar = inf at pure noise, is left out
    by starting it one later).  The steps of full order, all but the first few, are computed together over sliding
    windows of the grid; the first few (lower orders) one by one.  Steps before ``start`` have no weights."""
    b = _check_beta(beta)
    x = np.asarray(nodes, dtype=np.float64)
    n = x.size - 1
    first = start if history_start is None else history_start
    orders = np.zeros(n, dtype=np.int64)
    coefficients = np.zeros((n, max(order, 1)))
    full = max(start, first + order - 1)  # the first step with a full history
    for i in range(start, min(full, n)):  # the warm-up: orders 1 .. order - 1
        r = max(1, min(order, i - first + 1))
        orders[i] = r
        coefficients[i, :r] = 1.0 if r == 1 else _weights_array(x[i : i + 1], x[i - r + 1 : i][::-1, None], x[i + 1 : i + 2], b)[0]
    if full < n:
        orders[full:] = order
        if order == 1:
            coefficients[full:, 0] = 1.0
        else:
            older = np.stack([x[full - j : n - j] for j in range(1, order)])
            coefficients[full:, :order] = _weights_array(x[full:n], older, x[full + 1 : n + 1], b)
    orders.setflags(write=False)
    coefficients.setflags(write=False)  # shared between runs on the same grid
    return AdamsWeights(orders, coefficients)


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
