"""Weight schedules: each formula, and its direction and run-averaged weight on the noise levels a pipeline
really visits (5, 20, 50 steps of DDIM, Euler and DPM-Solver), read through guide()."""

import math

import pytest
import torch

from steerdiff.guidance import CFG, SCHEDULES, GuidanceRule, get_schedule
from steerdiff.pipelines import guide
from steerdiff.samplers import make_scheduler

W0, C, P = 6.0, 3.0, 2.0
KWARGS = {"clamp_linear": {"c": C}, "clamp_cosine": {"c": C}, "power_cosine": {"p": P}}


def paper_weight(name, s):
    """The schedules of Wang et al. ("Analysis of Classifier-Free Guidance Weight Schedulers", TMLR 2024) on the paper's strength w' = w - 1, returned as diffusers' w."""
    w0 = W0 - 1
    linear, cosine = 2 * w0 * (1 - s), w0 * (1 + torch.cos(math.pi * s))
    half = s >= 0.5
    wp = {
        "constant": torch.full_like(s, w0),
        "linear": linear,
        "cosine": cosine,
        "inverse_linear": 2 * w0 * s,
        "sine": w0 * (torch.sin(math.pi * s - math.pi / 2) + 1),
        "v_shape": torch.where(half, 4 * w0 * (s - 0.5), 4 * w0 * (0.5 - s)),
        "lambda_shape": torch.where(half, 4 * w0 * (1 - s), 4 * w0 * s),
        "clamp_linear": linear.clamp_min(C - 1),
        "clamp_cosine": cosine.clamp_min(C - 1),
        "power_cosine": w0 * (1 - torch.cos(math.pi * (1 - s) ** P)) / 2,
    }[name]
    return 1 + wp


def continuous_mean_and_variation(name):
    s = torch.linspace(0, 1, 200001, dtype=torch.float64)
    w = paper_weight(name, s)
    mean = float(((w[1:] + w[:-1]) / 2).mean())
    return mean, float((w[1:] - w[:-1]).abs().sum())


def test_every_schedule_is_covered_and_matches_its_formula():
    assert set(SCHEDULES) == {
        "constant", "linear", "cosine", "inverse_linear", "sine", "v_shape", "lambda_shape", "clamp_linear",
        "clamp_cosine", "power_cosine",
    }
    s = torch.linspace(0, 1, 101, dtype=torch.float64)
    for name in SCHEDULES:
        schedule = get_schedule(name, w0=W0, **KWARGS.get(name, {}))
        assert torch.allclose(schedule(s), paper_weight(name, s), atol=1e-12), name
    for name in ("constant", "linear", "cosine", "inverse_linear", "sine", "v_shape", "lambda_shape"):
        assert abs(continuous_mean_and_variation(name)[0] - W0) < 1e-6, name  # mean-preserving shapes


class WeightRecorder(GuidanceRule):
    """Guides with CFG and records, per evaluation, the timestep and every schedule's weight."""

    def __init__(self):
        self.schedules = {name: get_schedule(name, w0=W0, **KWARGS.get(name, {})) for name in SCHEDULES}
        self.timesteps, self.weights = [], {name: [] for name in SCHEDULES}
        self.cfg = CFG(2.0)

    def __call__(self, cond, uncond, state):
        self.timesteps.append(float(state.timestep[0]))
        for name, schedule in self.schedules.items():
            self.weights[name].append(float(schedule(state.progress)[0]))
        return self.cfg(cond, uncond, state)


INCREASING = ("linear", "cosine", "clamp_linear", "clamp_cosine", "power_cosine")
DECREASING = ("inverse_linear", "sine")


@pytest.mark.parametrize("scheduler", ["ddim", "euler", "dpmpp_2m"])
def test_direction_and_run_mean_on_real_timestep_grids(tiny_pipe, scheduler):
    tiny_pipe.scheduler = make_scheduler(scheduler, tiny_pipe.scheduler.config)
    for steps in (5, 20, 50):
        recorder = WeightRecorder()
        with guide(tiny_pipe, recorder):
            tiny_pipe([0], steps, guidance_scale=2.0, generator=[torch.Generator().manual_seed(0)], output_type="latent")
        ts = torch.tensor(recorder.timesteps, dtype=torch.float64)
        assert ts.numel() == steps
        assert torch.allclose(ts, tiny_pipe.scheduler.timesteps.to(torch.float64))  # the network's own timesteps
        s = ts / 999
        for name, weights in recorder.weights.items():
            w = torch.tensor(weights, dtype=torch.float64)
            assert torch.allclose(w, paper_weight(name, s), atol=1e-12), (scheduler, steps, name)
            diffs = w[1:] - w[:-1]  # in sampling order: noise falls along the run
            if name in INCREASING:
                assert bool((diffs >= -1e-12).all()) and w[-1] > w[0], (scheduler, steps, name, w)
            elif name in DECREASING:
                assert bool((diffs <= 1e-12).all()) and w[-1] < w[0], (scheduler, steps, name, w)
            elif name == "constant":
                assert torch.equal(w, torch.full_like(w, W0))
            else:
                middle = int((s - 0.5).abs().argmin())  # the step nearest s = 1/2
                extreme = int(w.argmin()) if name == "v_shape" else int(w.argmax())
                assert abs(extreme - middle) <= 1, (scheduler, steps, name, w)
                assert (w[0] > w[extreme] < w[-1]) if name == "v_shape" else (w[0] < w[extreme] > w[-1])
            # the run average is a Riemann sum of the schedule over [0, 1] with one noise level per 1/N-cell,
            # so it is within (total variation) / N of the continuous mean (w0 for the mean-preserving shapes)
            mean, variation = continuous_mean_and_variation(name)
            assert abs(float(w.mean()) - mean) <= variation / steps + 1e-9, (scheduler, steps, name, float(w.mean()), mean)
            if steps == 50 and name in ("linear", "cosine", "inverse_linear", "sine"):
                assert abs(float(w.mean()) - W0) < 0.05 * W0
