"""Faults a user or a fault tester runs into: each gives a clear error (naming the step, the field or the file) before
work is lost, never a silent wrong result."""

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from steerdiff.cli import main

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _generate(tmp_path, model, *args):
    return main(["generate", f"model={model}", "steps=3", "classes=[0, 1]", "samples_per_class=2",
                 f"output={tmp_path / 'g.png'}", *args])


# -- non-finite outputs -----------------------------------------------------------------------------------------------
def test_generate_with_an_infinite_guidance_scale_stops(tmp_path, tiny_model_dir, capsys):
    assert _generate(tmp_path, tiny_model_dir, "guidance.kwargs.scale=.inf") == 2  # refused before sampling
    assert "scale must be a finite number >= 0, got inf" in capsys.readouterr().err
    assert _generate(tmp_path, tiny_model_dir, "guidance.kwargs.scale=1e300") == 1  # finite, but the guided output is not
    err = capsys.readouterr().err
    assert "sampling diverged: the guided model output holds NaN/Inf at step 0 of 3 (timestep" in err
    assert "in 4 of 4 samples" in err
    assert not (tmp_path / "g.png").exists()


@pytest.mark.parametrize("scheduler", ["dpmpp_2m", "ddim", "ghvb"])
def test_generate_with_nan_weights_names_the_step(tmp_path, tiny_model_dir, capsys, scheduler):
    weights = next((tiny_model_dir / "unet").glob("*.safetensors"))
    tensors = load_file(str(weights))
    key = next(k for k in tensors if k.endswith("conv_out.bias"))
    tensors[key] = torch.full_like(tensors[key], float("nan"))
    save_file(tensors, str(weights))
    assert _generate(tmp_path, tiny_model_dir, f"scheduler.name={scheduler}") == 1
    assert "holds NaN/Inf at step 0 of 3 (timestep" in capsys.readouterr().err


def test_a_diverging_cell_under_steerdiffs_scheduler_is_recorded_as_diverged(tmp_path, tiny_model_dir):
    from steerdiff.benchmark import BenchmarkConfig, run_benchmark

    cfg = BenchmarkConfig.model_validate(dict(
        output_dir=str(tmp_path / "run"), models=[{"model": str(tiny_model_dir), "metrics": ["divergence"]}],
        schedulers=["ghvb", "plms_hb"], guidance=[{"scale": 1e300}], nfe=[3], num_samples=4, batch_size=4,
        progress=False, cache_dir=str(tmp_path / "cache"),
    ))
    records = run_benchmark(cfg)
    assert [r["status"] for r in records] == ["diverged", "diverged"]
    assert all(r["diverged"]["samples"] == 4 for r in records)


@pytest.mark.parametrize("shape", [(4, 1, 8, 1), (4, 1, 4, 4)])
def test_rules_refuse_predictions_not_shaped_like_the_sample(shape):
    from steerdiff.core import NoiseSchedule
    from steerdiff.guidance import APG, CFGRescale, CFGZeroStar, GuidanceState

    state = GuidanceState(NoiseSchedule.from_config({}), 500, torch.zeros(4, 1, 8, 8))
    c, u = torch.randn(*shape), torch.randn(*shape)
    for rule in (APG(3.0), CFGRescale(3.0), CFGZeroStar(3.0)):
        with pytest.raises(ValueError, match=r"the predictions must have the shape of the sample \(4, 1, 8, 8\)"):
            rule(c, u, state)


# -- run folders ------------------------------------------------------------------------------------------------------
def _benchmark_config(path: Path, model: Path, output: Path, **extra) -> Path:
    cfg = {"output_dir": str(output), "models": [{"model": str(model), "metrics": ["divergence"]}],
           "schedulers": ["ddim", "plms", "dpmpp_2m", "ghvb"], "guidance": [{"scale": 1}, {"scale": 3}],
           "nfe": [20, 30], "num_samples": 400, "batch_size": 400, "device": "cpu", "progress": False,
           "cache_dir": str(path.parent / "cache"), **extra}
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_a_second_benchmark_process_on_the_same_folder_is_refused(tmp_path, tiny_model_dir, capsys):
    """A benchmark takes its folder's lock; while another process holds it a benchmark is refused, naming that
    process; the lock goes with a killed process; then the folder's config decides.  The other process is a small
    one holding steerdiff's lock (a whole benchmark process costs 8 s of imports and adds nothing to this)."""
    run = tmp_path / "run"
    small = _benchmark_config(tmp_path / "small.yaml", tiny_model_dir, run, schedulers=["ddim"], nfe=[3], num_samples=4,
                              batch_size=4)
    assert main(["benchmark", "--config", str(small)]) == 0
    assert (run / ".lock").read_text() == f"process {os.getpid()}\n"  # the benchmark held the folder's lock
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from steerdiff.run_folder import RunFolderLock; "
         "lock = RunFolderLock(Path(sys.argv[1])); print('held', flush=True); time.sleep(300)", str(run)],
        cwd=ROOT, env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(["benchmark", "--config", str(small)]) == 2
        assert f"run folder {str(run)!r} is in use by process {holder.pid}" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()
    # the lock went with the killed process: the folder can be used again, by its own config only ...
    other = _benchmark_config(tmp_path / "other.yaml", tiny_model_dir, run, schedulers=["ddim", "plms"], nfe=[2],
                              num_samples=2, batch_size=2)
    assert main(["benchmark", "--config", str(other)]) == 2
    assert "holds results of another config (differs in batch_size, nfe, num_samples, schedulers" in capsys.readouterr().err
    assert main(["benchmark", "--config", str(other), "overwrite=true"]) == 0  # ... unless asked to


def test_restore_refuses_a_folder_of_another_config(tmp_path, tiny_model_dir, capsys):
    base = ["restore", "--config", "configs/restore/box.yaml", f"model={tiny_model_dir}", "data.num_images=2",
            "sampler.steps=2", f"output_dir={tmp_path / 'o'}", "metrics=[psnr]", "grid_images=2"]
    assert main(base) == 0
    assert main([*base, "sampler.steps=3"]) == 2
    assert "holds results of another config (differs in sampler.steps)" in capsys.readouterr().err
    assert main([*base, "sampler.steps=3", "overwrite=true"]) == 0


# -- output paths, checked before any work ----------------------------------------------------------------------------
@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_folder_is_refused_before_sampling(tmp_path, tiny_model_dir, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(stat.S_IRUSR | stat.S_IXUSR)
    assert main(["generate", f"model={tiny_model_dir}", f"output={ro / 'g.png'}"]) == 2
    assert "cannot be written" in capsys.readouterr().err


def test_output_under_a_file_is_refused(tmp_path, tiny_model_dir, capsys):
    (tmp_path / "afile").write_text("x")
    assert main(["generate", f"model={tiny_model_dir}", f"output={tmp_path / 'afile' / 'g.png'}"]) == 2
    assert f"the folder of output {str(tmp_path / 'afile')!r} is a file, not a folder" in capsys.readouterr().err


def test_output_paths_are_checked_before_work(tmp_path, tiny_model_dir, capsys, monkeypatch):
    import steerdiff.generate as generate_module

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the output path was checked")

    monkeypatch.setattr(generate_module, "load_generation_pipeline", no_loading)
    folder = tmp_path / "a_folder.png"
    folder.mkdir()
    assert main(["generate", f"model={tiny_model_dir}", f"output={folder}"]) == 2
    assert "is a folder; give a file path" in capsys.readouterr().err
    assert main(["generate", f"model={tiny_model_dir}", f"output={tmp_path / 'x.jpg'}"]) == 2
    assert "must end in one of .png" in capsys.readouterr().err
    target = tmp_path / "a_file"
    target.write_text("x")
    assert main(["optimize", "--config", "configs/adjoint/noise.yaml", f"output={target}"]) == 2
    assert f"output {str(target)!r} is a file, not a folder" in capsys.readouterr().err
    assert main(["benchmark", "--config", str(_benchmark_config(tmp_path / "b.yaml", tiny_model_dir, target))]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err


def test_too_many_steps_are_refused_before_sampling(tmp_path, tiny_model_dir, capsys):
    assert _generate(tmp_path, tiny_model_dir, "steps=2000") == 2
    assert "steps=2000: DPMSolverMultistepScheduler repeats timesteps at this many steps (the model has " \
           "num_train_timesteps=1000; use at most 1000)" in capsys.readouterr().err


# -- tracebacks where a clear error belongs ---------------------------------------------------------------------------
def test_yaml_syntax_error_names_the_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: 3\nscheduler: {name: ddim\n")
    assert main(["generate", "--config", str(bad)]) == 2
    assert f"config file {str(bad)!r} is not valid YAML at line" in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["empty", "truncated", "garbled"])
def test_damaged_safetensors_names_the_file(tmp_path, tiny_model_dir, capsys, damage):
    weights = next((tiny_model_dir / "unet").glob("*.safetensors"))
    data = weights.read_bytes()
    weights.write_bytes({"empty": b"", "truncated": data[: len(data) // 2], "garbled": b"\x05" * 64}[damage])
    assert _generate(tmp_path, tiny_model_dir) == 2
    assert f"weights file {str(weights)!r} is damaged" in capsys.readouterr().err


def test_damaged_run_folder_files_are_named(tmp_path, tiny_model_dir, capsys):
    from steerdiff.benchmark.storage import RunFolder

    config = _benchmark_config(tmp_path / "b.yaml", tiny_model_dir, tmp_path / "run", schedulers=["ddim"], nfe=[3],
                               num_samples=4, batch_size=4, guidance=[{"scale": 1}], keep_samples=True)
    assert main(["benchmark", "--config", str(config)]) == 0
    (record,) = (tmp_path / "run" / "cells").glob("*/record.json")
    record.write_text(record.read_text()[:20])
    assert main(["benchmark", "--config", str(config)]) == 2
    assert f"{str(record)!r} is damaged (not complete JSON" in capsys.readouterr().err
    record.unlink()
    chunk = RunFolder(tmp_path / "run").chunk_path(record.parent.name, 0)
    chunk.write_bytes(chunk.read_bytes()[:100])
    assert main(["benchmark", "--config", str(config)]) == 2
    assert f"chunk file {str(chunk)!r} cannot be read" in capsys.readouterr().err


@pytest.mark.parametrize("device,message", [
    ("cuda", "this machine has no CUDA device"), ("tpu9", "is not a torch device"), ("meta", "is not supported"),
])
def test_bad_devices(tmp_path, tiny_model_dir, capsys, device, message):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert _generate(tmp_path, tiny_model_dir, f"device={device}") == 2
    assert message in capsys.readouterr().err


def test_corrupt_image_in_restore_data_is_named(tmp_path, tiny_model_dir, capsys):
    from PIL import Image

    data = tmp_path / "data"
    data.mkdir()
    Image.new("L", (8, 8)).save(data / "a.png")
    (data / "b.png").write_bytes(b"not a png")
    assert main(["restore", "--config", "configs/restore/box.yaml", f"model={tiny_model_dir}", f"data.source={data}", "data.num_images=2",
                 "metrics=[psnr]", f"output_dir={tmp_path / 'o'}"]) == 2
    assert f"image {str(data / 'b.png')!r} cannot be read" in capsys.readouterr().err


def test_optimize_tasks_that_cannot_run(tmp_path, capsys, monkeypatch):
    assert main(["optimize", "--config", "configs/adjoint/embedding.yaml", "model=mixture",
                 f"output={tmp_path / 'o'}"]) == 2
    assert "task embedding optimises a class-conditional UNet2DModel" in capsys.readouterr().err
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "peft" else real(name, *a))
    assert main(["optimize", "--config", "configs/adjoint/finetune.yaml", f"output={tmp_path / 'o'}"]) == 2
    assert "needs the peft package: pip install 'steerdiff[lora]'" in capsys.readouterr().err


# -- what a user sees first -------------------------------------------------------------------------------------------
def test_help_is_fast_plain_and_print_config_shows_the_defaults():
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "steerdiff", "--help"], cwd=ROOT, env=ENV, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    assert done.returncode == 0 and "``" not in done.stdout and ":class:" not in done.stdout
    probe = subprocess.run([sys.executable, "-c", "import sys, steerdiff.cli; steerdiff.cli.build_parser(); "
                            "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))"],
                           cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert probe.stdout.strip() == "[]", probe.stdout  # building the parser imports none of them
    assert seconds < 10
    shown = subprocess.run([sys.executable, "-m", "steerdiff", "generate", "--print-config", "steps=7"], cwd=ROOT, env=ENV,
                           capture_output=True, text=True)
    printed = yaml.safe_load(shown.stdout)
    assert printed["steps"] == 7 and printed["scheduler"] == {"name": "dpmpp_2m", "kwargs": {}, "label": None}


def test_written_files_follow_the_umask(tmp_path):
    from steerdiff.atomic_io import atomic_write_text

    old = os.umask(0o022)
    try:
        path = atomic_write_text(tmp_path / "a.txt", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_a_leading_one_in_a_mask_broadcasts_and_wrong_sizes_are_named():
    from steerdiff.guidance.operators import Inpainting

    x = torch.randn(4, 1, 8, 8)
    mask = torch.zeros(1, 1, 8, 8, dtype=torch.bool)
    mask[..., :4] = True
    assert torch.equal(Inpainting(mask).forward(x), x * mask)
    with pytest.raises(ValueError, match=r"mask of shape \(1, 4, 4\) does not fit samples of shape \(4, 1, 8, 8\)"):
        Inpainting(torch.ones(1, 1, 4, 4)).forward(x)
    with pytest.raises(ValueError, match=r"1 or 1 channels"):
        Inpainting(torch.ones(3, 8, 8)).forward(x)


def test_rule_guider_is_reachable_without_importing_its_module_first():
    code = "import steerdiff.guidance as g; print(g.RuleGuider.__name__, g.modular.RuleGuider is g.RuleGuider)"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert done.stdout.split() == ["RuleGuider", "True"], done.stderr[-2000:]


def test_a_missing_linear_ag_file_says_how_to_create_it(tmp_path):
    from steerdiff.guidance import get_rule

    with pytest.raises(FileNotFoundError, match="python -m scripts.calibrate_linear_ag"):
        get_rule("linear_ag", rule={"name": "cfg", "scale": 3.0}, coefficients=str(tmp_path / "none.safetensors"))


def test_restore_with_nan_weights_names_the_step(tmp_path, tiny_model_dir, capsys):
    weights = next((tiny_model_dir / "unet").glob("*.safetensors"))
    tensors = load_file(str(weights))
    key = next(k for k in tensors if k.endswith("conv_out.bias"))
    tensors[key] = torch.full_like(tensors[key], float("nan"))
    save_file(tensors, str(weights))
    assert main(["restore", "--config", "configs/restore/box.yaml", f"model={tiny_model_dir}", "data.num_images=2",
                 "sampler.steps=3", "metrics=[psnr]", f"output_dir={tmp_path / 'o'}"]) == 1
    assert "the model output holds NaN/Inf at step 0 of 3 (timestep 999) in 2 of 2 samples" in capsys.readouterr().err


def test_generate_shows_progress(tmp_path, tiny_model_dir, capsys):
    assert _generate(tmp_path, tiny_model_dir) == 0
    assert "generate: 100%" in capsys.readouterr().err and (tmp_path / "g.png").is_file()
