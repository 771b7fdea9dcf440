"""`steerdiff benchmark` in one process: the grid, NFE and call counting, identical noise, records and report,
divergence and failure handling, re-scoring, and config errors that name the entry."""

import json

import pytest
import torch
import yaml

from steerdiff.benchmark import BenchmarkConfig, run_benchmark
from steerdiff.benchmark import runner as runner_module
from steerdiff.benchmark.grid import initial_noise, steps_for_nfe
from steerdiff.benchmark.probe import NetworkProbe
from steerdiff.benchmark.storage import RunFolder
from steerdiff.cli import main
from steerdiff.config import load_config
from steerdiff.pipelines.loading import load_pipeline
from steerdiff.samplers.registry import make_scheduler


def _config(tmp_path, model, **extra):
    base = dict(output_dir=str(tmp_path / "run"), models=[{"model": str(model), "metrics": ["divergence"]}],
                schedulers=["ddim"], nfe=[3], num_samples=6, batch_size=4, progress=False,
                cache_dir=str(tmp_path / "cache"))
    return BenchmarkConfig.model_validate({**base, **extra})


def test_shipped_baselines_config_is_the_issue_grid():
    cfg = load_config(BenchmarkConfig, "configs/benchmark/baselines.yaml")
    assert [m.model for m in cfg.models] == ["digits", "mixture"]
    assert [s.name for s in cfg.schedulers] == ["ddim", "dpmpp_2m", "unipc", "plms", "euler", "deis"]
    assert [g.scale for g in cfg.guidance] == [1, 5] and cfg.nfe == [5, 6, 8, 10, 15, 20, 50]


def test_shipped_momentum_config_is_the_issue_grid():
    cfg = load_config(BenchmarkConfig, "configs/benchmark/momentum.yaml")
    assert [m.model for m in cfg.models] == ["digits", "mixture"]
    ours = [(s.name, s.kwargs.get("beta"), s.kwargs.get("momentum_number")) for s in cfg.schedulers[5:]]
    assert ours == [("plms_hb", 0.8, None), ("plms_hb", 0.9, None), ("dpmpp_2m_hb", 0.8, None), ("ghvb", None, 1.5),
                    ("ghvb", None, 2.5), ("ghvb", None, 3.5), ("ghvb", None, 3.8)]
    assert [s.name for s in cfg.schedulers[:5]] == ["ddim", "plms", "dpmpp_2m", "unipc", "euler"]
    assert [g.scale for g in cfg.guidance] == [1, 5, 9] and cfg.nfe == [5, 6, 8, 10, 15, 20]
    for spec in cfg.schedulers:  # every entry builds from the digits model's scheduler config
        make_scheduler(spec.name, load_pipeline("digits").scheduler.config, **spec.kwargs)


def test_shipped_guidance_config_covers_every_rule_at_every_scale():
    from steerdiff.pipelines.calling import guidance_entry

    cfg = load_config(BenchmarkConfig, "configs/benchmark/guidance.yaml")
    names = {(g.name, str(g.scale.get("schedule") if isinstance(g.scale, dict) else "")) for g in cfg.guidance}
    assert names >= {("cfg", ""), ("apg", ""), ("cfg_rescale", ""), ("cfg_zero_star", ""), ("cfg", "linear"),
                     ("cfg", "cosine"), ("interval", ""), ("adaptive", ""), ("linear_ag", "")}
    for g in cfg.guidance:
        scale = g.scale["w0"] if isinstance(g.scale, dict) else g.scale if g.scale is not None else g.kwargs["rule"]["scale"]
        assert scale in (1, 3, 5, 9, 15)
        if g.name != "linear_ag":  # LinearAG reads the calibration file scripts/calibrate_linear_ag.py writes
            guidance_entry(g)


@pytest.mark.parametrize("name,expected", [("ddim", 7), ("plms", 6), ("heun", 4), ("dpmpp_2m", 7)])
def test_steps_for_nfe_counts_loop_iterations(name, expected):
    assert steps_for_nfe(make_scheduler(name), 7) == expected  # PNDM: N + 1 calls; Heun: 2N - 1
    assert steps_for_nfe(make_scheduler("heun"), 6) is None


def test_noise_of_a_sample_does_not_depend_on_the_chunk():
    whole = initial_noise(5, 0, 7, (1, 2, 2))
    parts = torch.cat([initial_noise(5, 0, 3, (1, 2, 2)), initial_noise(5, 3, 7, (1, 2, 2))])
    assert torch.equal(whole, parts)
    assert not torch.equal(whole, initial_noise(6, 0, 7, (1, 2, 2)))


def test_probe_finds_the_first_nonfinite_call():
    class Blows(torch.nn.Module):
        calls = 0

        def forward(self, x):
            self.calls += 1
            return x * (float("nan") if self.calls == 3 else 1.0)

    net = Blows()
    with NetworkProbe(net) as probe:
        for _ in range(5):
            net(torch.ones(2, 3))
    assert (probe.calls, probe.rows, probe.first_nonfinite_call()) == (5, 10, 2)


def test_grid_counts_calls_records_and_reports(tmp_path, tiny_model_dir):
    cfg = _config(
        tmp_path, tiny_model_dir,
        models=[{"model": str(tiny_model_dir), "label": "tiny", "metrics": ["divergence"]},
                {"model": "mixture", "metrics": [{"name": "l2_to_reference", "kwargs": {"rtol": 1e-8}}, "log_likelihood"]}],
        schedulers=["ddim", "plms", "heun"], guidance=[{"scale": 1}, {"scale": 3}], nfe=[3, 4],
    )
    records = run_benchmark(cfg)
    assert len(records) == 2 * 2 * 3 * 2
    by = {(r["model"], r["scheduler"], r["guidance"], r["nfe"]): r for r in records}
    assert by["tiny", "heun", "cfg 1", 4]["status"] == "skipped" and "cannot make exactly 4" in by["tiny", "heun", "cfg 1", 4]["reason"]
    for r in records:
        if r["status"] == "skipped":
            continue
        assert r["status"] == "ok" and r["nfe_measured"] == r["nfe"]
        expected_steps = {"ddim": r["nfe"], "plms": r["nfe"] - 1, "heun": (r["nfe"] + 1) // 2}[r["scheduler"]]
        assert r["steps"] == expected_steps
        assert r["network_calls"]["evaluations_per_sample"] == r["nfe"] * (2 if r["guidance"] == "cfg 3" else 1)
        assert r["timing"]["chunks"] == 2 and r["machine"]["cpu_count"] >= 1 and "torch" in r["versions"]
    assert set(by["mixture", "ddim", "cfg 3", 4]["metrics"]) == {"l2_error", "log_likelihood"}
    assert set(by["tiny", "ddim", "cfg 3", 4]["metrics"]) == {"magnitude_score", "out_of_range"}

    run = tmp_path / "run"
    lines = (run / "results.jsonl").read_text().splitlines()
    assert [json.loads(x)["cell_id"] for x in lines] == [r["cell_id"] for r in records]
    table = (run / "table.md").read_text()
    assert "## l2_error: mixture, cfg 3" in table and "| heun | " in table and "n/a" in table
    assert {p.name for p in (run / "plots").iterdir()} == {"magnitude_score.png", "out_of_range.png", "l2_error.png", "log_likelihood.png"}

    # the stored samples are exactly what the pipeline makes from the same noise, labels and steps
    cell = by["tiny", "plms", "cfg 3", 4]
    chunk = RunFolder(run).load_chunk(cell["cell_id"], 1)
    pipe = load_pipeline(str(tiny_model_dir))
    pipe.scheduler = make_scheduler("plms", pipe.scheduler.config)
    direct = pipe(chunk.labels, 3, 3.0, latents=initial_noise(0, 4, 6, (1, 8, 8)), output_type="latent").images
    assert torch.equal(direct, chunk.samples)
    assert chunk.labels.tolist() == [1, 2]  # sample i has class i mod 3


def test_named_guidance_rules_run_through_the_hook(tmp_path, tiny_model_dir):
    cfg = _config(tmp_path, tiny_model_dir, nfe=[4], guidance=[
        {"scale": 3},
        {"name": "cfg", "scale": {"schedule": "constant", "w0": 3}},  # steerdiff's CFG rule through guide()
        {"name": "adaptive", "kwargs": {"rule": {"name": "cfg", "scale": 3}, "threshold": -1.0}},
    ])
    builtin, hooked, adaptive = run_benchmark(cfg)
    assert hooked["guidance"] == "cfg constant(w0=3)" and adaptive["status"] == "ok"
    folder = RunFolder(tmp_path / "run")
    for k in range(2):
        torch.testing.assert_close(folder.load_chunk(hooked["cell_id"], k).samples,
                                   folder.load_chunk(builtin["cell_id"], k).samples, atol=1e-5, rtol=0)
    assert builtin["network_calls"]["evaluations_per_sample"] == hooked["network_calls"]["evaluations_per_sample"] == 8
    # threshold -1: every sample stops guiding after the first evaluation, so the unconditional half runs once
    assert adaptive["network_calls"]["evaluations_per_sample"] == 4 + 1 and adaptive["nfe_measured"] == 4


def test_diverging_cell_is_recorded_with_its_step(tmp_path):
    cfg = _config(tmp_path, "mixture", schedulers=["ddim"], guidance=[{"scale": 1}, {"scale": 1e10}], nfe=[5])
    ok, diverged = run_benchmark(cfg)
    assert ok["status"] == "ok"
    assert diverged["status"] == "diverged" and diverged["metrics"] == {}
    assert 1 <= diverged["diverged"]["samples"] <= 6 and 0 < diverged["diverged"]["step"] < 5
    assert f"diverged@{diverged['diverged']['step']} |" in (tmp_path / "run" / "table.md").read_text()


def test_failed_chunk_fails_its_cell_only_and_is_retried(tmp_path, tiny_model_dir, monkeypatch, capsys):
    real = runner_module.generate_chunk

    def flaky(plan, start, stop, device):
        if plan.cell.nfe == 2:
            raise RuntimeError("out of memory (simulated)")
        return real(plan, start, stop, device)

    monkeypatch.setattr(runner_module, "generate_chunk", flaky)
    cfg = _config(tmp_path, tiny_model_dir, nfe=[2, 3])
    failed, ok = run_benchmark(cfg)
    assert failed["status"] == "failed" and "out of memory (simulated)" in failed["error"] and ok["status"] == "ok"
    monkeypatch.setattr(runner_module, "generate_chunk", real)
    again = run_benchmark(cfg)
    assert [r["status"] for r in again] == ["ok", "ok"]
    assert "1 finished earlier and reused" in capsys.readouterr().out


def test_new_metrics_rescore_stored_samples_without_sampling(tmp_path, tiny_model_dir, monkeypatch):
    cfg = _config(tmp_path, tiny_model_dir)
    (first,) = run_benchmark(cfg)
    chunk = RunFolder(tmp_path / "run").chunk_path(first["cell_id"], 0)
    stamp = chunk.stat().st_mtime_ns

    def no_sampling(*args):
        raise AssertionError("sampled again")

    monkeypatch.setattr(runner_module, "generate_chunk", no_sampling)
    models = [{"model": str(tiny_model_dir), "metrics": ["divergence", "fd", "precision_recall", "class_accuracy"]}]
    with pytest.raises(ValueError, match=r"holds results of another config \(differs in models"):  # samples differ
        run_benchmark(_config(tmp_path, tiny_model_dir, models=[{"model": str(tiny_model_dir), "dtype": "float64"}]))
    # metrics only: the samples do not depend on them, so the folder is resumed without overwrite and rescored
    (second,) = run_benchmark(_config(tmp_path, tiny_model_dir, models=models))
    assert second["cell_id"] == first["cell_id"] and chunk.stat().st_mtime_ns == stamp
    assert second["metrics"]["magnitude_score"] == first["metrics"]["magnitude_score"]
    assert {"fd", "precision", "recall", "class_accuracy"} <= set(second["metrics"]) and second["metrics"]["fd"] > 0
    cached = list((tmp_path / "cache" / "reference").glob("digits__digits-classifier-*__8px.npz"))
    assert len(cached) == 1


@pytest.mark.parametrize(
    "override,message",
    [
        ("schedulers=[dpm_fast]", "schedulers[0] ('dpm_fast') for model 'tiny': unknown scheduler 'dpm_fast'; available:"),
        ("schedulers=[{name: ddim, kwargs: {etaa: 1}}]", "has no option(s) ['etaa']"),
        ("models=[{model: MODEL, metrics: [fdd]}]", "metrics[0] ('fdd'): unknown metric 'fdd'; available: class_accuracy, clip_score, divergence, fd, fd_dinov2, fid,"),
        ("models=[{model: MODEL, metrics: [{name: precision_recall, kwargs: {kk: 3}}]}]", "feature space 'digits' has no option(s) ['kk']"),
        ("models=[{model: MODEL, metrics: [{name: fid, kwargs: {weights: /no/inception.safetensors}}]}]",
         "Inception weights file '/no/inception.safetensors' does not exist"),
        ("models=[{model: MODEL, metrics: [log_likelihood]}]", "needs a model with an exact density"),
        ("models=[{model: MODEL, metrics: [psnr]}]", "metrics[0] ('psnr'): psnr compares each sample with its original "
         "image; a benchmark samples from noise and has none"),
        ("classes=12", "classes: models[0] ('MODEL') has 3 classes (ids 0..2); the config asks for 12"),
        ("classes=[0, 5]", "has 3 classes (ids 0..2); the config asks for [5]"),
        ("guidance=[{name: apgx, scale: 3}]", "guidance[0] ('apgx'): unknown guidance rule 'apgx'; available: cfg, apg,"),
        ("guidance=[{name: apg, scale: 3, kwargs: {mom: 1}}]", "guidance[0] ('apg'): rule 'apg' has no option(s) ['mom']"),
        ("guidance=[{scale: -2}]", "guidance.0: Value error, scale must be a finite number >= 0, got -2"),
        ("nfe=[0]", "nfe.0: Input should be greater than or equal to 1"),
        ("nfe=[3, 3]", "nfe lists a value twice"),
        ("schedulers=[ddim, ddim]", "schedulers: entries ['ddim'] appear twice"),
        ("stepz=3", "unknown key 'stepz'; allowed keys here:"),
        ("device=tpu", "device: 'tpu' is not a torch device; use cpu, cuda, cuda:<index> or mps (or auto)"),
        ("models=[/no/such/model]", "models[0] ('/no/such/model'): model: '/no/such/model' is neither a built-in model"),
    ],
)
def test_config_errors_name_the_entry(tmp_path, tiny_model_dir, capsys, override, message):
    config = tmp_path / "bench.yaml"
    config.write_text(yaml.safe_dump({
        "output_dir": str(tmp_path / "run"), "models": [{"model": str(tiny_model_dir), "label": "tiny", "metrics": ["divergence"]}],
        "schedulers": ["ddim"], "nfe": [2], "num_samples": 2, "progress": False,
    }))
    override = override.replace("MODEL", str(tiny_model_dir))
    assert main(["benchmark", "--config", str(config), override]) == 2
    assert message.replace("MODEL", str(tiny_model_dir)) in capsys.readouterr().err
    assert not (tmp_path / "run" / "cells").exists()  # nothing was sampled


def test_a_run_folder_written_in_the_older_config_format_is_recognised(tmp_path):
    """Configs stored before the one spec type (scale beside the name, no label / prompts keys) still match."""
    import yaml

    from steerdiff.run_folder import RunFolderError, claim_run_folder

    cfg = load_config(BenchmarkConfig, "configs/benchmark/guidance.yaml", [f"output_dir={tmp_path}"])
    old = cfg.model_dump()
    old["guidance"] = [{"name": g.name, "scale": g.kwargs.get("scale"), "label": g.label,
                        "kwargs": {k: v for k, v in g.kwargs.items() if k != "scale"}} for g in cfg.guidance]
    for m in old["models"]:
        for key in ("prompts", "negative_prompts", "height", "width", "call_kwargs"):
            m.pop(key)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    current = lambda stored: BenchmarkConfig.model_validate(stored).model_dump()  # noqa: E731
    claim_run_folder(tmp_path, cfg.model_dump(), normalize=current).release()
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({**old, "nfe": [5]}))
    with pytest.raises(RunFolderError, match="differs in nfe"):
        claim_run_folder(tmp_path, cfg.model_dump(), normalize=current)
