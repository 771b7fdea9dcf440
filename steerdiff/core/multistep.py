"""Linear multistep machinery: the (beta-weighted) Adams-Bashforth combination and a history buffer.

Adams-Bashforth of order r over the newest-first history e_0, e_1, ... with the momentum weights of
Wizadwongsa & Suwajanakorn (ICLR 2024, "Diffusion Sampling with Momentum for Mitigating Divergence
Artifacts"), AB_r(e, b) divided by b:

    r=1: b e0
    r=2: ((2+b) e0 - (2-b) e1) / 2
    r=3: ((18+5b) e0 - (24-8b) e1 + (6-b) e2) / 12
    r=4: ((46+9b) e0 - (78-19b) e1 + (42-5b) e2 - (10-b) e3) / 24

b = 1 gives the classical coefficients (1), (3, -1)/2, (23, -16, 5)/12, (55, -59, 37, -9)/24 of PLMS.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence

import torch

MAX_ORDER = 4


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


def adams_bashforth(history: Sequence[torch.Tensor], order: int, beta: float = 1.0) -> torch.Tensor:
    """AB combination of the newest-first ``history``; uses the order the history allows (at most ``order``)."""
    if len(history) == 0:
        raise ValueError("adams_bashforth needs at least one history entry")
    r = min(order, len(history))
    coefs = adams_bashforth_coefficients(r, beta)
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
