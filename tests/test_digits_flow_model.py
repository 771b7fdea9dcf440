"""The embedded rectified-flow digits model (issue "A flow-matching embedded model"): shipped folder, loading with
the same API as the VP model, its velocity target, and guided samples the classifier recognises, offline."""

from __future__ import annotations

import pytest
import torch

from steerdiff.testbeds.digits import DIGITS_FLOW_MODEL_PATH, NULL_CLASS, NUM_CLASSES, load_digits_data, load_digits_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return load_digits_model(variant="flow")


def test_folder_and_loading(model):
    from diffusers import FlowMatchEulerDiscreteScheduler, UNet2DModel

    unet, scheduler = model
    assert isinstance(unet, UNet2DModel) and isinstance(scheduler, FlowMatchEulerDiscreteScheduler)
    assert unet.config.num_class_embeds == NUM_CLASSES + 1
    weights = DIGITS_FLOW_MODEL_PATH / "unet" / "diffusion_pytorch_model.safetensors"
    assert weights.is_file() and weights.stat().st_size < 20 * 2**20
    assert not list(DIGITS_FLOW_MODEL_PATH.rglob("*.bin"))
    with pytest.raises(ValueError, match="variant must be one of"):
        load_digits_model(variant="edm")


def test_model_predicts_the_velocity(model):
    """Velocity MSE at s = 0.3 on held-out digits, far below the trivial predictor's (E||eps - x0||^2 ~ 1.6)."""
    unet, _ = model
    x0, y = load_digits_data("test")
    x0, y = x0[:128], y[:128]
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    s = 0.3
    xs = (1 - s) * x0 + s * eps
    t = torch.full((x0.shape[0],), 1000 * s)
    with torch.no_grad():
        cond = unet(xs, t, class_labels=y).sample
        uncond = unet(xs, t, class_labels=torch.full_like(y, NULL_CLASS)).sample
    target = eps - x0
    mse_cond, mse_uncond = float((cond - target).pow(2).mean()), float((uncond - target).pow(2).mean())
    assert mse_cond < 0.5 and mse_cond <= mse_uncond


@pytest.mark.parametrize("scheduler", ["flow_euler", "dpmpp_2m", "ghvb"])
def test_guided_samples_are_recognised(scheduler):
    from steerdiff.metrics.classifier import classify_digits
    from steerdiff.pipelines.loading import load_pipeline
    from steerdiff.samplers import make_scheduler

    pipe = load_pipeline("digits-flow")
    pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config)
    labels = torch.arange(NUM_CLASSES).repeat(2)
    gens = [torch.Generator().manual_seed(100 + i) for i in range(labels.numel())]
    x = pipe(labels, 10, 3.0, generator=gens, output_type="latent").images
    assert float((classify_digits(x) == labels).double().mean()) >= 0.85


def test_generate_runs_offline_on_digits_flow(tmp_path):
    from steerdiff.cli import main

    out = tmp_path / "g.png"
    assert main(["generate", "model=digits-flow", "steps=5", "classes=[0, 1]", "samples_per_class=2", f"output={out}"]) == 0
    assert out.is_file()
    assert main(["generate", "model=digits-flow", "scheduler.name=ddim", f"output={out}"]) == 2  # DDIM is VP-only


def test_benchmark_cells_on_both_flow_models(tmp_path):
    """The harness on digits-flow and the analytic mixture as a flow model: diffusers' flow solvers in their flow
    mode and the momentum samplers, solver error against the flow reference and the exact likelihood."""
    from steerdiff.benchmark import BenchmarkConfig, run_benchmark

    cfg = BenchmarkConfig.model_validate(dict(
        output_dir=str(tmp_path / "run"), progress=False, cache_dir=str(tmp_path / "cache"), num_samples=6, batch_size=6,
        models=[{"model": "mixture-flow", "metrics": ["divergence", {"name": "l2_to_reference", "kwargs": {"rtol": 1e-8}},
                                                      "log_likelihood"]},
                {"model": "digits-flow", "metrics": ["divergence", "class_accuracy"]}],
        schedulers=["flow_euler", "FlowMatchHeunDiscreteScheduler", "dpmpp_2m", "unipc", "ghvb"],
        guidance=[{"scale": 1}, {"scale": 3}], nfe=[6],
    ))
    records = run_benchmark(cfg)
    assert len(records) == 2 * 5 * 2
    by = {(r["model"], r["scheduler"], r["guidance"]): r for r in records}
    heun = [r for r in records if r["scheduler"] == "FlowMatchHeunDiscreteScheduler"]
    assert all(r["status"] in ("ok", "skipped") for r in records), [r.get("error") for r in records]
    assert all(r["status"] == "ok" for r in records if r not in heun)
    mixture = [r for r in records if r["model"] == "mixture-flow" and r["status"] == "ok"]
    assert all(0 < r["metrics"]["l2_error"] < 5 and r["metrics"]["log_likelihood"] > -500 for r in mixture)
    euler = by[("mixture-flow", "flow_euler", "cfg 1")]["metrics"]["l2_error"]
    dpm = by[("mixture-flow", "dpmpp_2m", "cfg 1")]["metrics"]["l2_error"]
    assert dpm < euler  # the second-order solver is closer to the flow's own solution at equal NFE


@pytest.mark.parametrize("name", ["flow_baselines", "flow_momentum"])
def test_flow_benchmark_configs_plan(name, tmp_path):
    """The shipped flow grids validate and every scheduler builds in the flow process of both models."""
    from steerdiff.benchmark.runner import prepare
    from steerdiff.config import load_config
    from steerdiff.benchmark import BenchmarkConfig

    cfg = load_config(BenchmarkConfig, f"configs/benchmark/{name}.yaml", [f"output_dir={tmp_path}", "device=cpu"])
    assert [m.model for m in cfg.models] == ["digits-flow", "mixture-flow"]
    plans = prepare(cfg, torch.device("cpu"))
    assert all(p.scheduler.config.get("prediction_type", "flow_prediction") == "flow_prediction" for p in plans)
    heun = {p.cell.nfe for p in plans if type(p.scheduler).__name__ == "FlowMatchHeunDiscreteScheduler" and p.skip_reason}
    assert heun and all(n % 2 == 0 for n in heun)  # Heun reaches odd NFE only (2N - 1 calls)


@pytest.mark.parametrize("name", ["flow_guidance", "flow_cfg_zero_star"])
def test_flow_guidance_configs_build_every_rule(name):
    """The shipped flow guidance grids validate and every rule builds (LinearAG needs its calibration file)."""
    from steerdiff.benchmark import BenchmarkConfig
    from steerdiff.pipelines.calling import guidance_entry
    from steerdiff.config import load_config

    cfg = load_config(BenchmarkConfig, f"configs/benchmark/{name}.yaml")
    assert {m.model for m in cfg.models} <= {"digits-flow", "mixture-flow"}
    names = {g.name for g in cfg.guidance}
    assert {"cfg", "cfg_zero_star", "apg"} <= names
    for g in cfg.guidance:
        if g.name != "linear_ag":
            guidance_entry(g)
        else:
            assert "digits-flow_flow_euler_10" in g.kwargs["coefficients"]


@pytest.mark.parametrize("name", ["momentum_variable_vp", "momentum_variable_flow"])
def test_momentum_comparison_configs_plan(name, tmp_path):
    """The fixed-vs-variable momentum grids validate and build every scheduler on both of their models."""
    from steerdiff.benchmark import BenchmarkConfig
    from steerdiff.benchmark.runner import prepare
    from steerdiff.config import load_config

    cfg = load_config(BenchmarkConfig, f"configs/benchmark/{name}.yaml", [f"output_dir={tmp_path}", "device=cpu"])
    plans = prepare(cfg, torch.device("cpu"))
    rk4 = {p.cell.nfe: p.steps for p in plans if p.cell.scheduler.display == "GHVB 2.5 RK4"}
    assert rk4[10] == 4 and rk4[4] == 1  # 4 steps + 6 warm-up calls; one RK4 step
    weights = {p.scheduler.config.get("adams_weights") for p in plans if "GHVB" in p.cell.scheduler.display}
    assert weights == {"fixed", "variable"}


@pytest.mark.parametrize("name", ["momentum_hb_solvers_vp", "momentum_hb_solvers_flow"])
def test_heavy_ball_solver_configs_plan(name, tmp_path):
    from steerdiff.benchmark import BenchmarkConfig
    from steerdiff.benchmark.runner import prepare
    from steerdiff.config import load_config

    cfg = load_config(BenchmarkConfig, f"configs/benchmark/{name}.yaml", [f"output_dir={tmp_path}", "device=cpu"])
    plans = prepare(cfg, torch.device("cpu"))
    assert {type(p.scheduler).__name__ for p in plans} == {"DPMSolverMultistepScheduler", "UniPCMultistepScheduler",
                                                          "HeavyBallDPMSolverScheduler", "HeavyBallUniPCScheduler"}
    assert not any(p.skip_reason for p in plans)
