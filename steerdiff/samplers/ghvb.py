"""Generalized heavy ball (GHVB), as a diffusers scheduler.

Wizadwongsa & Suwajanakorn, "Diffusion Sampling with Momentum for Mitigating Divergence Artifacts" (ICLR 2024).
GHVB puts the momentum inside the multistep method: it averages eps and combines the velocities with
Adams-Bashforth weights corrected for beta, so it keeps the order r of PLMS-r while its stability region grows
as beta falls.  Named by its momentum number m = r - (1 - beta): GHVB 3.8 = order 4, beta 0.8.  One network
call per step; NFE = num_inference_steps.

    pipe.scheduler = GHVBScheduler.from_config(pipe.scheduler.config, momentum_number=3.8)
"""

from __future__ import annotations

import torch

from ..core.grid import check_choice
from ..core.momentum import MomentumState, check_order, ghvb_direction, order_and_beta, steady_state_velocity_weights
from ..core.multistep import ADAMS_WEIGHTS, WARMUPS, adams_bashforth
from .base import AdamsBashforthScheduler, schedule_options


class GHVBScheduler(AdamsBashforthScheduler):
    """GHVB of order r = 1-4 and momentum beta in (x_bar, sigma_bar) = (x / alpha, sigma / alpha):

        v_n = (1 - beta) v_{n-1} + beta eps_n,   v_0 = eps_0,
        x_bar_{n+1} = x_bar_n + (sigma_bar_{n+1} - sigma_bar_n) AB_r(v_n, v_{n-1}, ...; beta),

    with the beta-weighted Adams-Bashforth rule of :mod:`steerdiff.core.multistep` (of lower order while fewer
    than r velocities exist).  The first step is DDIM; ``beta=1`` is PLMS-r.

    ``adams_weights``: "variable" (default) uses the weights of the actual steps in the ODE's variable (sigma_bar
    on VP grids, s with the velocity on flow grids), with the beta weighting derived in
    :mod:`steerdiff.core.multistep` (equal to the paper's on a uniform grid); "fixed" uses the paper's equal-step
    weights in sigma_bar on every grid, as its code does.

    With ``warmup="rk4"`` on flow grids (variable weights, in s) the velocities at the Runge-Kutta start's nodes are
    then set to the steady state a long-running average would hold
    (:func:`~steerdiff.core.momentum.steady_state_velocity_weights`) instead of starting at v_0 = eps_0, which
    otherwise caps GHVB with beta < 1 at order 2.  Not on VP grids: continuing them backwards in sigma_bar from its
    first, very long step extrapolates far outside the data, and at few steps that start measured much worse.

    ``momentum_number`` m in (0, 4], when given, sets ``order = ceil(m)`` and ``beta = m - (order - 1)``
    (overriding ``order`` and ``beta``, which the config then records).
    """

    @schedule_options
    def __init__(self, order: int = 4, beta: float = 0.8, momentum_number: float | None = None,
                 adams_weights: str = "variable", warmup: str = "none", **schedule_options):
        check_choice("adams_weights", adams_weights, ADAMS_WEIGHTS)
        check_choice("warmup", warmup, WARMUPS)
        if momentum_number is not None:
            order, beta = order_and_beta(momentum_number)
            self.register_to_config(order=order, beta=beta)
        super().__init__(**schedule_options)
        self._momentum = MomentumState(beta, history_length=check_order(order))
        self._weights = None

    _beta_weighted = True

    def _feed(self, derivative: torch.Tensor) -> None:
        """A warm-up step's k1 enters the memory as a multistep value would (and is kept for the velocity's start)."""
        self._warm.append(derivative)
        self._momentum.history.push(self._momentum.average(derivative))

    def _multistep(self, i: int, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        derivative = self._derivative(i, model_output, sample)
        if self._stages is not None and i == len(self._warm) and self._momentum.beta < 1.0 and self._in_s:
            return self._advance(i, sample, self._steady_start(i, derivative), model_output)
        direction = ghvb_direction(self._momentum, derivative, self.config.order, self._coefficients(i))
        return self._advance(i, sample, direction, model_output)

    def _steady_start(self, i: int, derivative: torch.Tensor) -> torch.Tensor:
        """After the Runge-Kutta start: the velocities at its nodes set to their steady state
        (:func:`~steerdiff.core.momentum.steady_state_velocity_weights`), then the first multistep direction."""
        values = self._warm + [derivative]
        grid = self._grid
        nodes = (grid.sigma_host if self._in_s else grid.sigma_bar_host)[: len(values)].tolist()
        weights = steady_state_velocity_weights(nodes, self._momentum.beta)
        velocities = [sum(w * f for w, f in zip(row, values)) for row in weights]
        history = self._momentum.history
        history.reset()
        for v in velocities:
            history.push(v)
        self._momentum.velocity = velocities[-1]
        return adams_bashforth(history, self.config.order, self._momentum.beta, coefficients=self._coefficients(i))

    def start_run(self, grid) -> None:
        super().start_run(grid)
        self._warm = []
