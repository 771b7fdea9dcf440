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
from ..core.steps import dpmpp_2m_data, dpmpp_3m_data, unipc_data
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


class HeavyBallUniPCScheduler(MomentumScheduler):
    """UniPC (Zhao et al. 2023; predictor UniP and corrector UniC on data predictions, B(h) ``bh1`` / ``bh2``) with
    heavy-ball momentum on the predictor and on the corrector, each its own velocity:

        predictor at step n (order p):  u_n = (1 - beta) u_{n-1} + beta D^P_n,   x^P_{n+1} = E_n(x_n, u_n),
        corrector at the next call:     w_n = (1 - beta) w_{n-1} + beta D^C_n,   x_{n+1} = E_n(x_n, w_n),

    where D^P / D^C are the data terms of :func:`~steerdiff.core.steps.unipc_data` and E_n the exponential step from
    lambda_n to lambda_{n+1}.  The corrector's velocity w is separate from the predictor's u, so correcting a step
    never rewrites the predictor's momentum (the official code's UniPC + HB does: its corrector averages into the
    velocity the predictor has just updated).  First-order predictor steps (the first, and the last under
    ``lower_order_final``) are plain and leave u alone, as for DPM-Solver++ + HB.  As in diffusers, the corrector is
    applied when the model output at the predicted point arrives (the next ``step()``), except after the steps listed
    in ``disable_corrector``; the last step is not corrected.  ``beta=1`` is diffusers' UniPCMultistepScheduler
    (``predict_x0``, the same ``solver_order``, ``solver_type``, ``lower_order_final``) on the same grid.
    """

    @schedule_options
    def __init__(self, beta: float = 0.8, solver_order: int = 2, solver_type: str = "bh2", lower_order_final: bool = True,
                 disable_corrector: list | None = None, **schedule_options):
        if solver_order not in (1, 2, 3):
            raise ValueError(f"solver_order must be 1, 2 or 3, got {solver_order!r}")
        if solver_type in ("midpoint", "heun", "logrho"):  # a DPM-Solver config's solver_type: bh2, as diffusers' UniPC reads it
            solver_type = "bh2"
            self.register_to_config(solver_type=solver_type)
        if solver_type not in ("bh1", "bh2"):
            raise ValueError(f"solver_type must be 'bh1' or 'bh2', got {solver_type!r}")
        super().__init__(**schedule_options)
        self._momentum = MomentumState(beta, history_length=solver_order)  # the predictor's u and the data history
        self._corrector = MomentumState(beta, history_length=1)  # the corrector's w
        self._last = None  # (step, x_n, order) of the predictor step waiting for its correction

    def start_run(self, grid) -> None:
        super().start_run(grid)
        self._corrector.reset()
        self._last = None

    def _update(self, i: int, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        grid, c = self._grid, self.config
        data = self._data(i, model_output, sample)
        history = self._momentum.history  # data predictions m_{i-1}, m_{i-2}, ... (newest first)
        lam = grid.lam
        noise = grid.starts_at_pure_noise  # point 0 at s = 1 (lambda = -inf): unipc_data takes its limits there
        if self._last is not None:
            n, x_n, order = self._last
            if n not in (c.disable_corrector or []):
                d = unipc_data(history[0], list(history)[1:], [lam[n - k] for k in range(1, order)], lam[n], lam[n + 1],
                               order, c.solver_type, corrected=data, infinite_older=int(noise and order > 1 and n - order + 1 == 0),
                               infinite_start=noise and n == 0)
                sample = grid.exponential(n, x_n, self._corrector.average(d))
        history.push(data)
        n_steps = grid.num_steps
        order = min(c.solver_order, n_steps - i) if c.lower_order_final else c.solver_order
        order = min(order, len(history))
        d = unipc_data(data, list(history)[1:], [lam[i - k] for k in range(1, order)], lam[i], lam[i + 1], order, c.solver_type,
                       infinite_older=int(noise and order > 1 and i - order + 1 == 0), infinite_start=noise and i == 0)
        self._last = (i, sample, order)
        return grid.exponential(i, sample, d if order == 1 else self._momentum.average(d))
