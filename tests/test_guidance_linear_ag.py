"""LinearAG: least-squares calibration, skipped calls really skipped, file round trip, refusals."""

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from safetensors.torch import save_file

from steerdiff.guidance import CFG, GuidanceRule, LinearAG, get_rule
from steerdiff.pipelines import ClassConditionalPipeline, guide
from steerdiff.testbeds.mixture import GaussianMixtureDenoiser

STEPS, LABELS, SCALE = 20, [0, 1, 2, 0, 1, 2, 0, 1], 1.5


def gens(*seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def calls(*first_seeds):
    return [
        dict(class_labels=LABELS, num_inference_steps=STEPS, guidance_scale=2.0, generator=gens(*range(s, s + len(LABELS))), output_type="latent")
        for s in first_seeds
    ]


class CountingMixture(GaussianMixtureDenoiser):
    """Records the batch of every real evaluation (the hook calls ``forward`` itself on the rows it keeps)."""

    def forward(self, sample, timestep, class_labels=None, return_dict=True):
        self.counts.append(sample.shape[0])
        return super().forward(sample, timestep, class_labels, return_dict)


@pytest.fixture
def pipe64():
    """The exact denoiser of a small class-conditional Gaussian mixture (3 classes, 2 components each), float64."""
    g = torch.Generator().manual_seed(0)
    means = torch.randn(6, 1, 4, 4, generator=g, dtype=torch.float64)
    variances = 0.05 + 0.1 * torch.rand(6, 1, 4, 4, generator=g, dtype=torch.float64)
    scheduler = DDIMScheduler.from_config(DDPMScheduler().config)
    model = CountingMixture.from_components(means, variances, scheduler_config=scheduler, component_classes=[0, 0, 1, 1, 2, 2])
    model.counts = []
    pipe = ClassConditionalPipeline(unet=model, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe




class Recorder(GuidanceRule):
    def __init__(self, rule):
        self.rule, self.c, self.u = rule, [], []

    def __call__(self, cond, uncond, state):
        self.c.append(cond.clone())
        self.u.append(uncond.clone())
        return self.rule(cond, uncond, state)


class SkipToConditional(GuidanceRule):
    """The naive alternative: at the skipped steps use the conditional prediction (no guidance)."""

    def __init__(self, rule, skip):
        self.rule, self.skip = rule, skip

    def uncond_needed(self, state):
        return not self.skip[state.step]

    def __call__(self, cond, uncond, state):
        return cond if self.skip[state.step] else self.rule(cond, uncond, state)


def test_calibration_is_least_squares_and_skipped_calls_do_not_run(pipe64, tmp_path):
    lag = LinearAG.calibrate(pipe64, CFG(SCALE), calls(0, 10, 20))
    assert lag.skip.tolist() == [False, True] * (STEPS // 2)
    grid = DDIMScheduler.from_config(pipe64.scheduler.config)
    grid.set_timesteps(STEPS)
    assert torch.equal(lag.timesteps, grid.timesteps.double())

    # the same fit, done independently: lstsq on the stacked design matrix of recorded full-CFG runs
    recorders = []
    for kwargs in calls(0, 10, 20):
        recorders.append(Recorder(CFG(SCALE)))
        with guide(pipe64, recorders[-1]):
            pipe64(**kwargs)
    for i in range(1, STEPS, 2):
        X = torch.cat([torch.stack([r.c[i].flatten(), r.c[i - 1].flatten(), r.u[i - 1].flatten(), torch.ones(r.c[i].numel(), dtype=torch.float64)], 1) for r in recorders])
        y = torch.cat([r.u[i].flatten() for r in recorders])
        expected = torch.linalg.lstsq(X, y.unsqueeze(1)).solution.squeeze(1)
        assert torch.allclose(lag.coefficients[i], expected, atol=1e-8), i
        residual = (X @ lag.coefficients[i] - y).norm()
        baseline = min((X[:, 2] - y).norm(), (X[:, 0] - y).norm())  # u_prev alone, c alone
        assert residual <= baseline + 1e-10

    pipe64.unet.counts.clear()
    with guide(pipe64, lag) as hook:
        latents = pipe64(**calls(100)[0]).images
    b = len(LABELS)
    assert pipe64.unet.counts == [2 * b, b] * (STEPS // 2) and hook.network_evaluations == 3 * b * STEPS // 2

    # closer to CFG than simply dropping guidance at the same steps
    with guide(pipe64, CFG(SCALE)):
        reference = pipe64(**calls(100)[0]).images
    with guide(pipe64, SkipToConditional(CFG(SCALE), lag.skip.tolist())):
        naive = pipe64(**calls(100)[0]).images
    error = lambda x: float((x - reference).flatten(1).norm(dim=1).median())
    assert error(latents) < 0.5 * error(naive)

    path = lag.save(tmp_path / "lag.safetensors")
    loaded = get_rule("linear_ag", rule={"name": "cfg", "scale": SCALE}, coefficients=str(path))
    assert torch.equal(loaded.coefficients, lag.coefficients) and torch.equal(loaded.skip, lag.skip)
    with guide(pipe64, loaded):
        again = pipe64(**calls(100)[0]).images
    assert torch.equal(again, latents)


def test_linear_ag_refuses_other_grids_and_foreign_files(pipe64, tmp_path):
    lag = LinearAG.calibrate(pipe64, CFG(SCALE), calls(0), skip=[2, 5])
    assert lag.skip.nonzero().flatten().tolist() == [2, 5]
    with guide(pipe64, lag):
        with pytest.raises(ValueError, match="calibrated on 20 steps .* this run has 6"):
            pipe64(LABELS, 6, guidance_scale=2.0, output_type="latent")
    foreign = tmp_path / "foreign.safetensors"
    save_file({"coefficients": torch.zeros(8, 4)}, str(foreign))
    with pytest.raises(ValueError, match="is not a LinearAG coefficients file"):
        LinearAG.load(foreign, CFG(SCALE))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LinearAG.load(tmp_path / "missing.safetensors", CFG(SCALE))
    with pytest.raises(ValueError, match=r"skip steps must be integers in 1\.\.19"):
        LinearAG.calibrate(pipe64, CFG(SCALE), calls(0), skip=[0, 3])
    with pytest.raises(ValueError, match="cannot skip step 0"):
        LinearAG(CFG(SCALE), torch.zeros(2, 4), torch.tensor([999.0, 499.0]), torch.tensor([True, False]))
    with pytest.raises(ValueError, match="calls must hold at least one"):
        LinearAG.calibrate(pipe64, CFG(SCALE), [])
