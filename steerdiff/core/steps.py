"""Deterministic ODE steps from time s to time t (t < s), written once for every sampler.

All coefficients are scalars or per-sample tensors of shape (B,); they are combined in their own dtype
(float64 when they come from :class:`~steerdiff.core.schedule.NoiseSchedule`) and cast to the sample's
dtype only when applied, so a step costs two fused multiply-adds on the sample and never syncs.

In (x_bar, sigma_bar) = (x / alpha, sigma / alpha) the probability-flow ODE is d x_bar / d sigma_bar = eps
(Song et al. 2021; Zhang & Chen 2023, DEIS): Euler on it is DDIM (eta = 0) and linear multistep on it is
PLMS (Liu et al. 2022).  In lambda = log(alpha / sigma) with the data prediction D, the exact solution has
the linear part in closed form: DPM-Solver++ (Lu et al. 2022) integrates only D.
"""

from __future__ import annotations

import torch

from .tensors import expand_to


def euler_step(x, direction, alpha_s, sigma_s, alpha_t, sigma_t) -> torch.Tensor:
    """x_bar_t = x_bar_s + (sigma_bar_t - sigma_bar_s) * direction;  returns x_t = alpha_t x_bar_t.

    ``direction`` is eps(x_s) for DDIM, an Adams-Bashforth combination of past eps for PLMS, or a momentum
    velocity for the Heavy Ball samplers.
    """
    c_x = alpha_t / alpha_s
    c_d = sigma_t - alpha_t * sigma_s / alpha_s  # = alpha_t (sigma_bar_t - sigma_bar_s)
    return expand_to(c_x, x) * x + expand_to(c_d, x) * direction


def exp_neg_h(alpha_s, sigma_s, alpha_t, sigma_t) -> torch.Tensor:
    """e^{-h} with h = lambda_t - lambda_s, i.e. sigma_bar_t / sigma_bar_s (0 when sigma_t = 0)."""
    return (sigma_t * alpha_s) / (alpha_t * sigma_s)


def exponential_step(x, data, alpha_s, sigma_s, alpha_t, sigma_t) -> torch.Tensor:
    """First-order exponential integrator on the data prediction (DPM-Solver++ 1, equal to DDIM):

        x_t = (sigma_t / sigma_s) x_s + alpha_t (1 - e^{-h}) D.
    """
    c_x = sigma_t / sigma_s
    c_d = alpha_t * (1 - exp_neg_h(alpha_s, sigma_s, alpha_t, sigma_t))
    return expand_to(c_x, x) * x + expand_to(c_d, x) * data


def step_ratio(lambda_prev, lambda_s, lambda_t):
    """r0 = h_prev / h = (lambda_s - lambda_prev) / (lambda_t - lambda_s)."""
    return (lambda_s - lambda_prev) / (lambda_t - lambda_s)


def dpmpp_2m_data(d0: torch.Tensor, d1: torch.Tensor, r0) -> torch.Tensor:
    """Second-order multistep combination of data predictions (DPM-Solver++ 2M, midpoint form):

        D = D_0 + (D_0 - D_1) / (2 r0),  r0 = h_prev / h,

    to be applied with :func:`exponential_step`.  D_0 is the newest prediction.
    """
    return d0 + expand_to(0.5 / r0, d0) * (d0 - d1)


def dpmpp_3m_data(d0: torch.Tensor, d1: torch.Tensor, d2: torch.Tensor, lam_2, lam_1, lam_0, lam_t) -> torch.Tensor:
    """Third-order multistep combination of data predictions (DPM-Solver++ 3M, Lu et al. 2022, as diffusers'
    ``multistep_dpm_solver_third_order_update``), written as the single data term of :func:`exponential_step`:

        h = lambda_t - lambda_0,  r0 = (lambda_0 - lambda_1) / h,  r1 = (lambda_1 - lambda_2) / h,
        D1_0 = (D_0 - D_1) / r0,  D1_1 = (D_1 - D_2) / r1,
        D1 = D1_0 + r0 / (r0 + r1) (D1_0 - D1_1),  D2 = (D1_0 - D1_1) / (r0 + r1),
        x_t = (sigma_t / sigma_0) x + alpha_t (1 - e^{-h}) [D_0 + phi_1 D1 - phi_2 D2],
        phi_1 = ((e^{-h} - 1) / h + 1) / (1 - e^{-h}),  phi_2 = ((e^{-h} - 1 + h) / h^2 - 1/2) / (1 - e^{-h}).

    D_0 is the newest prediction (at lambda_0), D_2 the oldest.
    """
    h = lam_t - lam_0
    r0, r1 = (lam_0 - lam_1) / h, (lam_1 - lam_2) / h
    d1_0, d1_1 = (d0 - d1) / expand_to(r0, d0), (d1 - d2) / expand_to(r1, d0)
    first = d1_0 + expand_to(r0 / (r0 + r1), d0) * (d1_0 - d1_1)
    second = (d1_0 - d1_1) / expand_to(r0 + r1, d0)
    e = torch.exp(-h)
    phi_1 = ((e - 1) / h + 1) / (1 - e)
    phi_2 = ((e - 1 + h) / h**2 - 0.5) / (1 - e)
    return d0 + expand_to(phi_1, d0) * first - expand_to(phi_2, d0) * second


def dpmpp_2m_first_order(step_index: int, num_steps: int, lower_order_final: bool, ends_clean: bool) -> bool:
    """Whether DPM-Solver++ 2M takes its first-order step here, with diffusers' rule.

    The first step has no history; the last step is first order when the grid ends at sigma = 0
    (``final_sigmas_type="zero"``) or when ``lower_order_final`` and fewer than 15 steps are taken.
    """
    if step_index == 0:
        return True
    return step_index == num_steps - 1 and (ends_clean or (lower_order_final and num_steps < 15))


def dpm_solver_2m_eps(e0: torch.Tensor, e1: torch.Tensor, r0) -> torch.Tensor:
    """Second-order multistep direction on noise predictions (DPM-Solver-2M, Lu et al. 2022, midpoint form):

        x_t = (alpha_t / alpha_s) x_s - sigma_t (e^h - 1) [E_0 + (E_0 - E_1) / (2 r0)],  r0 = h_prev / h,

    i.e. :func:`euler_step` in (x_bar, sigma_bar) with the direction E_0 + (E_0 - E_1) / (2 r0), because
    sigma_t (e^h - 1) = alpha_t (sigma_bar_s - sigma_bar_t).  The combination is the one DPM-Solver++ 2M takes
    of data predictions (:func:`dpmpp_2m_data`); E_0 is the newest.  Any derivative of the ODE in
    (x_bar, sigma_bar) may be combined this way (the AdjointDPM adjoint states use it too).
    """
    return dpmpp_2m_data(e0, e1, r0)
