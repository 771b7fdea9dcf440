"""Edges of the real-axis stability intervals of PLMS-r + HB and GHVB(r, beta), measured on y' = lambda y.

Each edge is found by running the update rule itself (steerdiff.core.stability.real_axis_stability_edge: 4000
steps, z on a grid of step 1e-3, so edges carry about -1e-3 of grid bias) and printed next to the heavy-ball
formula of Wizadwongsa & Suwajanakorn (ICLR 2024), edge(beta) = edge(1) (2 - beta) / beta.  GHVB has no closed form there.

    python -m benchmarks.momentum_stability        # from the repository root, about a minute
"""

from __future__ import annotations

import torch

from steerdiff.core.momentum import ghvb_direction, plms_hb_direction
from steerdiff.core.stability import real_axis_stability_edge

PLAIN_EDGES = {1: -2.0, 2: -1.0, 3: -6.0 / 11.0, 4: -0.3}  # Euler, AB2, AB3, AB4


def main() -> None:
    torch.set_num_threads(1)
    print("| order r | beta | PLMS-r + HB measured | (2 - beta) / beta formula | GHVB(r, beta) measured |")
    print("|---|---|---|---|---|")
    for order, plain in PLAIN_EDGES.items():
        for beta in (1.0, 0.9, 0.8, 0.5):
            hb = real_axis_stability_edge(plms_hb_direction, order, beta)
            ghvb = real_axis_stability_edge(ghvb_direction, order, beta)
            print(f"| {order} | {beta} | {hb:.3f} | {plain * (2 - beta) / beta:.3f} | {ghvb:.3f} |")


if __name__ == "__main__":
    main()
