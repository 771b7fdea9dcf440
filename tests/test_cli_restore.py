"""`steerdiff restore`: a real run on an image folder with a local model, resume, the shipped configs, errors."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torchmetrics.functional.image import structural_similarity_index_measure

from steerdiff.cli import main
from steerdiff.config import ConfigError, load_config
from steerdiff.benchmark.restoration_config import RestoreConfig
from steerdiff.metrics.similarity import psnr, ssim

CONFIGS = sorted(Path("configs/restore").glob("*.yaml"))


@pytest.fixture
def image_folder(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8), mode="L").save(folder / f"{i}.png")
    return folder


def write_config(tmp_path, **extra):
    cfg = {
        "tasks": [
            {"name": "box", "operator": {"name": "box"}},
            {"name": "blur noisy", "operator": {"name": "blur", "kernel_size": 3, "sigma": 0.8}, "sigma_y": 0.05},
        ],
        "methods": [{"name": "mcg", "step_size": 0.5}, {"name": "dps", "step_size": 0.5}, {"name": "projection"},
                    {"name": "unconditional"}],
        "sampler": {"name": "ancestral", "steps": 3},
        "metrics": ["psnr", "ssim"],
        "batch_size": 2,
        "grid_images": 4,
        "upscale": 2,
        **extra,
    }
    path = tmp_path / "restore.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_restore_run_writes_results_and_resumes(tmp_path, tiny_model_dir, image_folder, capsys):
    out = tmp_path / "out"
    cfg = write_config(tmp_path, model=str(tiny_model_dir), data={"source": str(image_folder), "num_images": 5},
                       output_dir=str(out))
    assert main(["restore", "--config", str(cfg)]) == 0
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [(r["task"], r["method"]) for r in records] == [
        (t, m) for t in ("box", "blur noisy") for m in ("mcg 0.5", "dps 0.5", "projection", "unconditional")]
    skipped = [r for r in records if r.get("skipped")]
    assert [(r["task"], r["method"]) for r in skipped] == [("blur noisy", "mcg 0.5"), ("blur noisy", "projection")]
    mcg = records[0]
    assert mcg["network_calls"] == 3 * 3 and mcg["backward_calls"] == 3 * 3  # 3 batches (2 + 2 + 1) x 3 steps
    table = (out / "table.md").read_text()
    assert "| box | 0 | mcg 0.5 |" in table and "blur has no projection" in table
    assert Image.open(out / "box.png").size == (4 * 8 * 2 + 3, (2 + 4) * 8 * 2 + 5)  # one-pixel gaps
    # the stored restorations reproduce the recorded metrics; MCG keeps the measured pixels of the originals
    from safetensors.torch import load_file

    restored = load_file(str(out / "box" / "mcg_0.5.safetensors"))["restored"].double()
    originals = torch.stack([torch.from_numpy(np.asarray(Image.open(image_folder / f"{i}.png"), dtype=np.float64))
                             for i in range(5)]).unsqueeze(1) / 127.5 - 1
    assert np.isclose(float(psnr(restored.clamp(-1, 1), originals).mean()), mcg["psnr"])
    mask = torch.ones(8, 8, dtype=torch.bool)
    mask[2:6, 2:6] = False
    assert torch.allclose(restored[:, 0][:, mask], originals[:, 0][:, mask], atol=1e-5)
    # resume: nothing is recomputed, the records are the same
    mtime = (out / "box" / "mcg_0.5.safetensors").stat().st_mtime_ns
    assert main(["restore", "--config", str(cfg)]) == 0
    assert (out / "box" / "mcg_0.5.safetensors").stat().st_mtime_ns == mtime
    again = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert again == records
    assert "wrote" in capsys.readouterr().out


def test_per_task_methods_and_plain_sampling_run_once(tmp_path, tiny_model_dir, image_folder):
    out = tmp_path / "out"
    tasks = [{"name": "box", "operator": {"name": "box"}, "methods": [{"name": "dps", "step_size": 0.25}, {"name": "unconditional"}]},
             {"name": "sr", "operator": {"name": "super_resolution"}, "sigma_y": 0.05}]
    cfg = write_config(tmp_path, model=str(tiny_model_dir), data={"source": str(image_folder)}, output_dir=str(out),
                       tasks=tasks, methods=[{"name": "dps"}, {"name": "unconditional"}])
    assert main(["restore", "--config", str(cfg)]) == 0
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [(r["task"], r["method"]) for r in records] == [("box", "dps 0.25"), ("box", "unconditional"),
                                                          ("sr", "dps 1"), ("sr", "unconditional")]
    from safetensors.torch import load_file

    plain = [load_file(str(out / t / "unconditional.safetensors"))["restored"] for t in ("box", "sr")]
    assert torch.equal(plain[0], plain[1]) and records[1]["wall_s"] == records[3]["wall_s"]  # computed once


def test_results_do_not_depend_on_batch_size(tmp_path, tiny_model_dir, image_folder):
    runs = []
    for bs in (5, 2):
        out = tmp_path / f"out{bs}"
        cfg = write_config(tmp_path, model=str(tiny_model_dir), data={"source": str(image_folder)},
                           output_dir=str(out), batch_size=bs, tasks=[{"name": "random", "operator": {"name": "random", "missing": 0.5}, "sigma_y": 0.05}])
        assert main(["restore", "--config", str(cfg)]) == 0
        from safetensors.torch import load_file

        runs.append(load_file(str(out / "random" / "dps_0.5.safetensors"))["restored"])
    assert torch.allclose(runs[0], runs[1], rtol=1e-4, atol=1e-4)  # float32 network: batch-size reassociation only


def test_ssim_equals_torchmetrics():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, 8, 9, generator=g, dtype=torch.float64) * 2 - 1
    y = (x + 0.3 * torch.randn(x.shape, generator=g, dtype=torch.float64)).clamp(-1, 1)
    for window in (3, 5):
        ref = structural_similarity_index_measure((x + 1) / 2, (y + 1) / 2, gaussian_kernel=False,
                                                  kernel_size=window, data_range=1.0, reduction="none")
        assert torch.allclose(ssim(x, y, window), ref, atol=1e-12)
    assert torch.allclose(ssim(x, x), torch.ones(6, dtype=torch.float64))
    mse = ((x - y) / 2).square().flatten(1).mean(1)
    assert torch.allclose(psnr(x, y), -10 * torch.log10(mse)) and torch.equal(psnr(x, x), torch.full((6,), 100.0, dtype=torch.float64))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_configs_are_valid(path):
    cfg = load_config(RestoreConfig, path)
    assert cfg.model == "digits" and cfg.tasks and cfg.methods


@pytest.mark.parametrize(
    "extra,message",
    [
        ({"methodz": []}, "unknown key 'methodz'"),
        ({"tasks": [{"name": "a", "operator": {"name": "inpaint"}}]}, "tasks.0.operator.name: Input should be 'box', 'random'"),
        ({"tasks": [{"name": "a", "operator": {"name": "box"}, "sigma_y": -0.1}]}, "tasks.0.sigma_y: Input should be greater than or equal to 0"),
        ({"methods": [{"name": "dps"}, {"name": "dps"}]}, r"method names must be unique; repeated: \['dps 1'\]"),
        ({"sampler": {"steps": 0}}, "sampler.steps: Input should be greater than or equal to 1"),
        ({"guidance_scale": 2.0}, "guidance_scale != 1 needs use_labels"),
        ({"methods": [{"name": "dps", "label": "dps a"}, {"name": "dps", "label": "dps_a"}]},
         r"method names \['dps a', 'dps_a'\] make the file names \['dps_a', 'dps_a'\] \(empty or the same\)"),
        ({"tasks": [{"name": "***", "operator": {"name": "box"}}]}, r"task names \['\*\*\*'\] make the file names \[''\]"),
    ],
)
def test_config_errors(tmp_path, extra, message):
    with pytest.raises(ConfigError, match=message):
        load_config(RestoreConfig, write_config(tmp_path, **extra))


def test_run_errors(tmp_path, tiny_model_dir, image_folder, capsys):
    base = dict(model=str(tiny_model_dir), data={"source": str(image_folder)}, output_dir=str(tmp_path / "o"))
    cfg = write_config(tmp_path, **base, tasks=[{"name": "sr", "operator": {"name": "super_resolution", "factor": 3}}])
    assert main(["restore", "--config", str(cfg)]) == 2
    assert "needs H and W divisible by 3" in capsys.readouterr().err
    cfg = write_config(tmp_path, **base, metrics=["psnr", "fd"])
    assert main(["restore", "--config", str(cfg)]) == 2
    assert "metrics ['fd'] need the digits data set" in capsys.readouterr().err
    cfg = write_config(tmp_path, model=str(tiny_model_dir), data={"source": str(tmp_path / "nowhere")})
    assert main(["restore", "--config", str(cfg)]) == 2
    assert "neither 'digits' nor an existing folder" in capsys.readouterr().err


def test_markdown_table_reports_the_fd_of_the_originals():
    from steerdiff.benchmark.report import restoration_table as markdown_table

    cell = {"task": "box", "sigma_y": 0.05, "method": "dps 0.5", "psnr": 18.6, "network_calls": 100,
            "backward_calls": 100, "wall_s": 31.3, "num_images": 100}
    assert "original images" not in markdown_table([cell])  # no FD computed: no floor line
    table = markdown_table([{**cell, "fd": 65.7, "fd_originals": 50.583}])
    assert "| box | 0.05 | dps 0.5 | 18.60 | 65.70 | 100 / 100 | 31.3 |" in table
    assert table.endswith("FD of the 100 original images themselves: 50.58 (the floor for this number of images; "
                          "compare FDs with it, not with 0)\n")


def test_restore_scores_through_the_metrics_registry(tmp_path, tiny_model_dir):
    """FD (to the digits reference split) and accuracy recorded by a digits run equal the same quantities computed
    here from the stored restorations with the classifier's own functions; PSNR / SSIM with the similarity functions."""
    from safetensors.torch import load_file

    from steerdiff.metrics.classifier import classify_digits, digits_features
    from steerdiff.metrics.frechet import frechet_distance_from_features
    from steerdiff.testbeds.digits import load_digits_data

    out = tmp_path / "out"
    cfg = write_config(tmp_path, model=str(tiny_model_dir), data={"num_images": 12, "reference_split": "test"},
                       output_dir=str(out), tasks=[{"name": "box", "operator": {"name": "box"}}],
                       methods=[{"name": "projection"}], metrics=["psnr", "ssim", "fd", "accuracy"], batch_size=12)
    assert main(["restore", "--config", str(cfg)]) == 0
    (record,) = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    restored = load_file(str(out / "box" / "projection.safetensors"))["restored"].double().clamp(-1, 1)
    originals, labels = load_digits_data("test")
    reference = digits_features(originals)  # reference_split: test
    originals, labels = originals[:12].double(), labels[:12]
    assert np.isclose(record["fd"], frechet_distance_from_features(digits_features(restored), reference), rtol=1e-12)
    assert np.isclose(record["fd_originals"], frechet_distance_from_features(digits_features(originals), reference), rtol=1e-12)
    assert record["accuracy"] == float((classify_digits(restored) == labels).double().mean())
    assert np.isclose(record["psnr"], float(psnr(restored, originals).mean()), rtol=1e-12)
    assert np.isclose(record["ssim"], float(ssim(restored, originals).mean()), rtol=1e-12)


def test_similarity_metrics_need_originals():
    from steerdiff.metrics.base import SampleSet
    from steerdiff.metrics.registry import make_metric

    g = torch.Generator().manual_seed(0)
    x, y = (torch.rand(4, 1, 8, 8, generator=g) * 2 - 1 for _ in range(2))
    with_targets = SampleSet(samples=1.5 * x, labels=None, targets=y)  # the metrics clip samples to [-1, 1]
    clipped = (1.5 * x).double().clamp(-1, 1)
    assert make_metric("psnr")(with_targets) == {"psnr": float(psnr(clipped, y).mean())}
    assert make_metric("ssim", window=5)(with_targets) == {"ssim": float(ssim(clipped, y, 5).mean())}
    with pytest.raises(ValueError, match="psnr compares each sample with its original"):
        make_metric("psnr")(SampleSet(samples=x, labels=None))
    with pytest.raises(ValueError, match="window must be an odd integer >= 1, got 4"):
        make_metric("ssim", window=4)
    with pytest.raises(ValueError, match="class_accuracy compares the classifier's class with each sample's label"):
        make_metric("class_accuracy")(SampleSet(samples=x, labels=None))


def test_the_digits_splits_are_reference_data_sets():
    from steerdiff.metrics.features import check_reference, reference_id, reference_images
    from steerdiff.testbeds.digits import load_digits_data

    for name, split in (("digits", "all"), ("digits-train", "train"), ("digits-test", "test")):
        check_reference(name)
        images, key = reference_images(name)
        assert key == reference_id(name) == name and torch.equal(images, load_digits_data(split)[0])
    with pytest.raises(ValueError, match=r"must be a built-in data set \('digits', 'digits-train', 'digits-test'\)"):
        check_reference("digits-val")
