"""Heavy-ball UniPC on flow grids that start at pure noise (s = 1, lambda = -inf): every solver type and order, at
beta 1 and below, on SD3-, Flux- and Wan-shaped grids, is finite, converges to the exact Gaussian flow, and is at
least as accurate as diffusers' UniPC (which moves s = 1 to 1 - 1e-6); a NaN the scheduler's own arithmetic makes is
named as such, not blamed on the next model output."""

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

from benchmarks.multistep_order import exact_state, gaussian
from steerdiff.core.steps import unipc_data
from steerdiff.samplers import HeavyBallUniPCScheduler

# (name, FlowMatch config of the pipeline family, set_timesteps keywords for N steps)
GRIDS = {
    "sd3": (dict(shift=3.0), lambda n: dict(num_inference_steps=n)),
    "flux": (dict(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15),
             lambda n: dict(sigmas=np.linspace(1.0, 1.0 / n, n), mu=1.15)),
    "wan": (dict(shift=5.0), lambda n: dict(num_inference_steps=n)),
}
CASES = [(st, order) for st in ("bh1", "bh2") for order in (1, 2, 3)]


def run(grid: str, solver_type: str, order: int, beta: float, n: int):
    config, model, mu, s0 = gaussian("flow")
    shape, steps = GRIDS[grid]
    sched = HeavyBallUniPCScheduler.from_config(FlowMatchEulerDiscreteScheduler(**shape).config, beta=beta,
                                                solver_type=solver_type, solver_order=order)
    sched.set_timesteps(**steps(n))
    assert sched.grid.starts_at_pure_noise
    x_t = torch.randn(4, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = x_t.clone()
    for i, t in enumerate(sched.timesteps):
        x = sched.step(model(x, sched.grid.sigma[i] * 1000).sample, t, x).prev_sample
    return x, float((x - exact_state(sched, n, x_t, mu, s0)).abs().max())


@pytest.mark.parametrize("grid", list(GRIDS))
@pytest.mark.parametrize("solver_type,order", CASES)
@pytest.mark.parametrize("beta", [1.0, 0.8])
def test_unipc_from_pure_noise_is_finite_and_converges(grid, solver_type, order, beta):
    """Finite on every grid; on Flux's (linspace sigmas) the error against the exact flow falls at least 2x from 8 to
    32 steps.  (The shifted SD3 / Wan grids end with a step from s = 0.34 to 0.009 that dominates their error at
    few steps, for diffusers' UniPC alike.)"""
    errors = []
    for n in (8, 32):
        x, error = run(grid, solver_type, order, beta, n)
        assert bool(torch.isfinite(x).all()), (grid, solver_type, order, beta, n)
        errors.append(error)
    if grid == "flux":
        assert errors[1] < errors[0] / 2, errors


@pytest.mark.parametrize("order", [1, 2, 3])
def test_bh2_at_beta_1_is_at_least_as_accurate_as_diffusers_shifted_start(order):
    """diffusers' UniPC in flow mode lays out the same grid but starts at s = 1 - 1e-6; ours takes the step's s = 1
    limit.  Both against the exact Gaussian flow from the same x_T."""
    config, model, mu, s0 = gaussian("flow")
    n = 8
    ref = UniPCMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", solver_type="bh2",
                                  solver_order=order, flow_shift=1.0)
    ref.set_timesteps(sigmas=np.linspace(1.0, 1.0 / n, n))
    ours = HeavyBallUniPCScheduler.from_config(config, beta=1.0, solver_order=order)
    ours.set_timesteps(sigmas=np.linspace(1.0, 1.0 / n, n))
    assert 0 < 1.0 - float(ref.sigmas[0]) < 1e-5 and ours.grid.starts_at_pure_noise
    assert torch.allclose(ref.sigmas[1:].double(), ours.grid.sigma_host[1:], atol=1e-6)
    x_t = torch.randn(4, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    errors = []
    for sched, sigmas in ((ref, ref.sigmas.double()), (ours, ours.grid.sigma_host)):
        x = x_t.clone()
        for i, t in enumerate(sched.timesteps):
            x = sched.step(model(x, sigmas[i] * 1000).sample, t, x).prev_sample
        errors.append(float((x - exact_state(ours, n, x_t, mu, s0)).abs().max()))
    theirs, exact = errors
    assert np.isfinite(theirs) and exact <= theirs * 1.001, (exact, theirs)


def test_the_limits_of_the_data_term():
    """At lambda_0 = -inf the step's data term is bh2's limit (B / phi_1 = 1, the order-1 corrector averages m_0 and
    m_t) for both solver types; an older point at -inf drops out of the solved system (its rho and D1 tend to 0)."""
    m0, m1, mt = torch.randn(3, 2, 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    lam_t = torch.tensor(-1.0, dtype=torch.float64)
    for solver_type in ("bh1", "bh2"):
        d = unipc_data(m0, [], [], torch.tensor(float("-inf"), dtype=torch.float64), lam_t, 1, solver_type, corrected=mt,
                       infinite_start=True)
        assert torch.allclose(d, 0.5 * (m0 + mt))
    lam_0, lam_1 = torch.tensor(-1.0, dtype=torch.float64), torch.tensor(0.5, dtype=torch.float64)
    exact = unipc_data(m0, [m1], [torch.tensor(float("-inf"), dtype=torch.float64)], lam_0, lam_1, 3, "bh2", corrected=mt,
                       infinite_older=1)
    near = unipc_data(m0, [m1], [torch.tensor(-1e9, dtype=torch.float64)], lam_0, lam_1, 3, "bh2", corrected=mt)
    assert torch.allclose(exact, near, atol=1e-8) and bool(torch.isfinite(exact).all())


def test_a_nan_from_the_schedulers_arithmetic_is_named_as_such():
    config, model, _, _ = gaussian("flow")
    for check in ("eager", "deferred"):
        sched = HeavyBallUniPCScheduler.from_config(config, nonfinite_check=check)
        sched.set_timesteps(4)
        sched._update = lambda i, out, x: x * float("nan")  # the solver's arithmetic goes wrong, the model does not
        x = torch.randn(2, 1, 4, 4, dtype=torch.float64)
        with pytest.raises(FloatingPointError, match=r"HeavyBallUniPCScheduler's own update \(prev_sample; the model "
                                                     r"output was finite\) holds NaN/Inf at step 0 of 4"):
            for i, t in enumerate(sched.timesteps):
                out = model(torch.nan_to_num(x), sched.grid.sigma[i] * 1000).sample  # finite model output
                x = sched.step(out, t, x).prev_sample
