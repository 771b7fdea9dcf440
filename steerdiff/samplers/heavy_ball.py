"""Heavy-ball (HB) momentum on PLMS and on DPM-Solver++ 2M, as diffusers schedulers.

Wizadwongsa & Suwajanakorn, "Diffusion Sampling with Momentum for Mitigating Divergence Artifacts" (ICLR 2024).
High-order solvers diverge at few steps and high guidance because their stability regions are small; HB
averages the solver's update direction, v <- (1 - beta) v + beta * direction, which widens the real-axis
stability interval by (2 - beta) / beta and makes the method first order for beta < 1.  beta = 1 is the base
solver.  One network call per step; NFE = num_inference_steps.

    pipe.scheduler = HeavyBallPLMSScheduler.from_config(pipe.scheduler.config, order=4, beta=0.8)
"""

from __future__ import annotations

import torch

from ..core.grid import check_choice
from ..core.momentum import MomentumState, check_order, plms_hb_direction
from ..core.multistep import ADAMS_WEIGHTS, WARMUPS
from ..core.steps import dpmpp_2m_data, dpmpp_3m_data
from .base import AdamsBashforthScheduler, MomentumScheduler, schedule_options


class HeavyBallPLMSScheduler(AdamsBashforthScheduler):
    """PLMS of order 1-4 with heavy-ball momentum, in (x_bar, sigma_bar) = (x / alpha, sigma / alpha):

        v_n = (1 - beta) v_{n-1} + beta AB_r(eps_n, eps_{n-1}, ...),   v_0 = eps_0,
        x_bar_{n+1} = x_bar_n + (sigma_bar_{n+1} - sigma_bar_n) v_n.

    AB_r is the Adams-Bashforth combination (PLMS, Liu et al. 2022), of lower order while fewer than r model
    outputs exist (no pseudo-Runge-Kutta warm-up, as in the paper's code: every step is one network call).  The
    first step is DDIM.  ``beta=1`` is PLMS-r; ``order=1`` is DDIM with HB.

    ``adams_weights``: "variable" (default) integrates the polynomial through the past derivatives over the actual
    step in the ODE's variable (sigma_bar on VP grids, s with the velocity on flow grids; see
    :class:`~steerdiff.samplers.base.AdamsBashforthScheduler`); "fixed" uses the classical equal-step weights, as
    PLMS and the paper's code do, which are consistent beyond second order only on grids uniform in sigma_bar.
    """

    _beta_weighted = False  # heavy ball averages the AB_r combination; the weights are plain Adams-Bashforth

    @schedule_options
    def __init__(self, order: int = 4, beta: float = 0.8, adams_weights: str = "variable", warmup: str = "none", **schedule_options):
        check_choice("adams_weights", adams_weights, ADAMS_WEIGHTS)
        check_choice("warmup", warmup, WARMUPS)
        super().__init__(**schedule_options)
        self._momentum = MomentumState(beta, history_length=check_order(order))
        self._weights = None

    def _feed(self, derivative: torch.Tensor) -> None:
        """A warm-up step's k1 enters the memory as a multistep value would."""
        self._momentum.history.push(derivative)  # heavy ball starts with the first multistep direction

    def _multistep(self, i: int, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        derivative = self._derivative(i, model_output, sample)
        direction = plms_hb_direction(self._momentum, derivative, self.config.order, self._coefficients(i))
        return self._advance(i, sample, direction, model_output)


class HeavyBallDPMSolverScheduler(MomentumScheduler):
    """DPM-Solver++ 2M or 3M (Lu et al. 2022, multistep) with heavy-ball momentum on its data term.

    2M (midpoint form): D_n = D_0 + (D_0 - D_1) / (2 r0); 3M: the third-order combination of
    :func:`~steerdiff.core.steps.dpmpp_3m_data` (diffusers' ``multistep_dpm_solver_third_order_update``).  Either way

        v_n = (1 - beta) v_{n-1} + beta D_n,    x_{n+1} = (sigma_{n+1} / sigma_n) x_n + alpha_{n+1} (1 - e^{-h_n}) v_n,

    with v = D the first time it is formed.  The lower orders follow diffusers' rules: first order on the first step
    and on the final one under its lower-order-final rule (plain, leaving v alone, as the paper's code does for 2M);
    with ``solver_order=3`` second order (averaged into v) on the second step and, below 15 steps with
    ``lower_order_final``, on the second-to-last.  ``beta=1`` is diffusers' DPMSolverMultistepScheduler (dpmsolver++,
    midpoint) of the same ``solver_order`` on the same grid.

    The paper's own setting is ``final_sigmas_type="sigma_min"``: its runs used diffusers 0.18, whose DPM-Solver++
    ends at timestep 0 (sigma_min, not sigma = 0) and takes a second-order last step from 15 steps on.  With that
    preset (and the default linspace spacing and lower_order_final) the 2M samples equal the official code's to 1e-12
    in float64; a test writes that code's loop out independently.  The default ``"zero"`` follows today's diffusers.
    """

    @schedule_options
    def __init__(self, beta: float = 0.8, solver_order: int = 2, lower_order_final: bool = True, **schedule_options):
        if solver_order not in (2, 3):
            raise ValueError(f"solver_order must be 2 (DPM-Solver++ 2M) or 3 (3M) with heavy ball, got {solver_order!r}")
        super().__init__(**schedule_options)
        self._momentum = MomentumState(beta, history_length=solver_order - 1)

    def _update(self, i: int, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        grid, c = self._grid, self.config
        data = self._data(i, model_output, sample)
        previous = self._momentum.history
        n = grid.num_steps
        second = c.solver_order == 2 or len(previous) < 2 or (i == n - 2 and c.lower_order_final and n < 15)
        if len(previous) == 0 or grid.first_order(i, c.lower_order_final):
            combined = data
        elif second:
            combined = self._momentum.average(dpmpp_2m_data(data, previous[0], grid.ratio(i)))
        else:
            lam = grid.lam
            combined = self._momentum.average(dpmpp_3m_data(data, previous[0], previous[1], lam[i - 2], lam[i - 1], lam[i], lam[i + 1]))
        previous.push(data)
        return grid.exponential(i, sample, combined)
