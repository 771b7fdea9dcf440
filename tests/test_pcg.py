"""Predictor-corrector guidance (steerdiff.core.sample_pcg) against the claims of Bradley & Nakkiran (2024), on
Gaussian data where everything is in closed form (benchmarks/pcg_gaussian.py): p(x | c) = N(1, 0.25), p(x) = N(0, 1), so the
gamma-powered distribution of the noisy marginals is Gaussian with precision gamma / Vc + (1 - gamma) / Vu.

1. PCG with enough corrector steps samples the gamma-powered distribution (up to the unadjusted Langevin
   algorithm's known O(eta) variance factor, computed exactly), on VP and on flow;
2. CFG-DDIM and CFG-DDPM at the matching w = (gamma + 1) / 2 do not, and differ from each other;
3. CFG-DDPM approaches PCG with one corrector step as the number of steps grows."""

import pytest
import torch

from benchmarks.pcg_gaussian import GAMMA, W, last_eta, moments, powered
from benchmarks.pcg_gaussian import setup as _setup
from steerdiff.core import Denoiser, sample_ddim, sample_pcg

SAMPLES = 4000


def setup(kind, steps):
    return _setup(kind, steps, SAMPLES)


@pytest.mark.parametrize("kind", ["vp", "flow"])
def test_pcg_samples_the_gamma_powered_distribution_and_cfg_does_not(kind):
    process, grid, x, make = setup(kind, 100)
    eta = last_eta(grid)  # the last level's corrector step (the CFG-DDPM-matching choice)
    mean, var = powered(grid, GAMMA, eta)
    exact_mean, exact_var = powered(grid, GAMMA)
    assert abs(var - exact_var) / exact_var < 0.01  # the Langevin factor is small on this grid
    se_mean, se_var = (var / SAMPLES) ** 0.5, var * (2 / SAMPLES) ** 0.5
    pcg = moments(sample_pcg(make(1.0), x, process, grid, gamma=GAMMA, corrector_steps=100, generator=torch.Generator().manual_seed(2)))
    assert abs(pcg[0] - mean) < 4 * se_mean and abs(pcg[1] - var) < 4 * se_var, (pcg, mean, var)
    ddim = moments(sample_ddim(make(W), x, process, grid))
    ddpm = moments(sample_ddim(make(W), x, process, grid, eta=1.0, generator=torch.Generator().manual_seed(3)))
    # neither CFG sampler reaches the gamma-powered law: DDIM overshoots the mean and collapses the variance,
    # DDPM overshoots the mean less and keeps more of the variance (Bradley & Nakkiran, section 3)
    assert ddim[0] - exact_mean > 0.15 and ddim[1] < 0.3 * exact_var
    assert ddpm[0] - exact_mean > 10 * se_mean and ddpm[0] < ddim[0] - 0.1 and ddpm[1] > 2 * ddim[1]


@pytest.mark.parametrize("kind", ["vp", "flow"])
def test_cfg_ddpm_approaches_pcg_with_one_corrector_step(kind):
    gaps = []
    for steps in (10, 40, 160):
        process, grid, x, make = setup(kind, steps)
        pcg = moments(sample_pcg(make(1.0), x, process, grid, gamma=GAMMA, corrector_steps=1, generator=torch.Generator().manual_seed(4)))
        ddpm = moments(sample_ddim(make(W), x, process, grid, eta=1.0, generator=torch.Generator().manual_seed(5)))
        gaps.append(abs(pcg[0] - ddpm[0]) + abs(pcg[1] - ddpm[1]))
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 0.3 * gaps[0], gaps


def test_ddpm_predictor_and_inputs():
    process, grid, x, make = setup("vp", 20)
    out = sample_pcg(make(1.0), x[:64], process, grid, gamma=2.0, predictor="ddpm", generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out).all()
    zero = sample_pcg(make(1.0), x[:64], process, grid, gamma=2.0, corrector_steps=0)
    torch.testing.assert_close(zero, sample_ddim(make(1.0), x[:64], process, grid))  # no corrector: conditional DDIM
    for bad, match in [(dict(gamma=-1.0), "gamma must be"), (dict(gamma=2.0, corrector_steps=-1), "corrector_steps must be"),
                       (dict(gamma=2.0, step_size=0.0), "step_size must be"), (dict(gamma=2.0, predictor="euler"), "predictor must be one of")]:
        with pytest.raises(ValueError, match=match):
            sample_pcg(make(1.0), x[:4], process, grid, **bad)
    unconditional = Denoiser(lambda x_t, t, cond: torch.zeros_like(x_t), process, "epsilon")
    with pytest.raises(ValueError, match="needs a conditional network"):
        sample_pcg(unconditional, x[:4], process, grid, gamma=2.0)
