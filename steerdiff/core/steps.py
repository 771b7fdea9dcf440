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


def unipc_data(newest: torch.Tensor, older: list[torch.Tensor], lam_older: list, lam_0, lam_t, order: int,
               solver_type: str = "bh2", corrected: torch.Tensor | None = None, infinite_older: int = 0,
               infinite_start: bool = False) -> torch.Tensor:
    """UniPC's data term (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of
    Diffusion Models"; diffusers' ``multistep_uni_p_bh_update`` / ``multistep_uni_c_bh_update`` with
    ``predict_x0``), written as the single data term D of :func:`exponential_step` from lambda_0 to lambda_t:

        h = lambda_t - lambda_0,  r_k = (lambda_k - lambda_0) / h,  D1_k = (m_k - m_0) / r_k  (k = 1 .. order - 1),
        B(h) = -h (bh1) or e^{-h} - 1 (bh2),  phi_1 = e^{-h} - 1,  g_1 = phi_1 / (-h) - 1,  g_{i+1} = g_i / (-h) - 1 / (i+1)!,
        R_{ik} = r_k^{i-1},  b_i = g_i i! / B(h)  (i = 1 .. order),
        predictor:  rho = R[:-1, :-1]^{-1} b[:-1]  (1/2 at order 2),    D = m_0 + (B(h) / phi_1) sum_k rho_k D1_k,
        corrector:  rho = R^{-1} b  (1/2 at order 1),  D = m_0 + (B(h) / phi_1) [sum_k rho_k D1_k + rho_last (m_t - m_0)],

    with ``corrected`` = m_t, the data prediction at the predicted point, for the corrector (the rows of R then
    include r = 1 for it).  ``newest`` is m_0, ``older`` the m_k newest first with their lambdas ``lam_older``.

    Points at pure noise (s = 1 on a flow grid, lambda = -inf), by their limits:

    - ``infinite_older``: how many of the oldest points used (``older[: order - 1]``) sit at lambda = -inf.  Their
      r_k is -inf, so D1_k -> 0 and, in the solved systems, rho_k -> 0 while the other unknowns tend to the solution
      of the system without them (its highest-power rows dropped): they are left out.
    - ``infinite_start``: lambda_0 = -inf (the step from s = 1; there is no older point then).  h = inf: e^{-h} = 0,
      phi_1 = -1, g_i = -1 / i!, and bh2's B(h) = -1.  bh1's B(h) = -h has no limit and its order-1 corrector
      (rho = 1/2, scaled by B(h) / phi_1 = h / (1 - e^{-h})) grows without bound, so this step takes bh2's B (the
      two agree to first order in h; in every solved system B cancels).  diffusers instead moves s = 1 to 1 - 1e-6,
      a finite but arbitrary h.
    """
    if infinite_start:
        if older[: order - 1]:
            raise ValueError("a UniPC step from s = 1 has no older points")
        phi_1 = b_h = -torch.ones_like(torch.as_tensor(lam_t, dtype=torch.float64))
        gs, factorial = [], 1
        for i in range(1, order + 1):
            factorial *= i
            gs.append(-1.0 / factorial * torch.ones_like(phi_1))
        h = None
    else:
        h = lam_t - lam_0
        hh = -h
        phi_1 = torch.expm1(hh)
        if solver_type == "bh1":
            b_h = hh
        elif solver_type == "bh2":
            b_h = torch.expm1(hh)
        else:
            raise ValueError(f"solver_type must be 'bh1' or 'bh2', got {solver_type!r}")
        gs, g, factorial = [], phi_1 / hh - 1, 1
        for i in range(1, order + 1):
            gs.append(g)
            factorial *= i + 1
            g = g / hh - 1 / factorial
    finite = max(len(older[: order - 1]) - infinite_older, 0)
    rks = [(lam - lam_0) / h for lam in lam_older[:finite]]
    d1s = [(m - newest) / expand_to(r, newest) for m, r in zip(older[:finite], rks)]
    scale = expand_to(b_h / phi_1, newest)  # 1 for bh2

    def solve(points: list) -> torch.Tensor:
        """rho of the system over ``points`` (r values), rows i = 1 .. len(points)."""
        r = torch.stack(points)
        rows, rhs, factorial = [], [], 1
        for i in range(1, len(points) + 1):
            rows.append(r ** (i - 1))
            rhs.append(gs[i - 1] * factorial / b_h)
            factorial *= i + 1
        return torch.linalg.solve(torch.stack(rows), torch.stack(rhs))

    one = torch.ones_like(phi_1)
    if corrected is None:
        if not d1s:
            return newest
        rho = torch.full((1,), 0.5, dtype=phi_1.dtype, device=phi_1.device) if order == 2 else solve(rks)
        return newest + scale * sum(expand_to(rho[k], newest) * d for k, d in enumerate(d1s))
    rho = torch.full((1,), 0.5, dtype=phi_1.dtype, device=phi_1.device) if order == 1 else solve(rks + [one])
    res = expand_to(rho[-1], newest) * (corrected - newest)
    for k, d in enumerate(d1s):
        res = res + expand_to(rho[k], newest) * d
    return newest + scale * res


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
