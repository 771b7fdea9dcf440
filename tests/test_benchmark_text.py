"""`steerdiff benchmark` on a text-to-image pipeline folder with a prompt set: FID against a folder of reference
images (random Inception weights in a safetensors file), CLIP score from a tiny random CLIP folder, saturation,
rules through guide(), steerdiff schedulers, errors before sampling, and resume after a kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from steerdiff.cli import main
from tests.tiny_pipelines import tiny_tokenizer
from tests.tiny_text_pipelines import save_tiny_pipeline

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from safetensors.torch import save_file
    from transformers import CLIPConfig, CLIPModel

    from steerdiff.metrics.inception import FIDInceptionV3

    root = tmp_path_factory.mktemp("t2i")
    torch.manual_seed(0)
    text = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, vocab_size=1000,
                max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    vision = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, image_size=30, patch_size=2)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(root / "clip")
    tiny_tokenizer().save_pretrained(root / "clip")
    torch.manual_seed(0)
    save_file({k: v.contiguous() for k, v in FIDInceptionV3().state_dict().items()}, str(root / "inception.safetensors"))
    (root / "ref").mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8)).save(root / "ref" / f"{i:03d}.png")
    (root / "prompts.jsonl").write_text('{"prompt": "a cat"}\n{"prompt": "a red dog", "negative_prompt": "blur"}\n')
    return {"root": root, "sd": save_tiny_pipeline("sd", root / "sd"), "sd3": save_tiny_pipeline("sd3", root / "sd3")}


def _config(assets, path: Path, output: Path, model: str = "sd", **extra) -> Path:
    root = assets["root"]
    cfg = {
        "name": "t2i", "output_dir": str(output), "cache_dir": str(root / "cache"), "progress": False, "device": "cpu",
        "models": [{"model": str(assets[model]), "prompts": str(root / "prompts.jsonl"), "metrics": [
            {"name": "fid", "kwargs": {"weights": str(root / "inception.safetensors"), "reference": str(root / "ref")}},
            {"name": "clip_score", "kwargs": {"model": str(root / "clip")}}, "saturation"]}],
        "schedulers": [{"name": "ghvb"}], "guidance": [{"name": "apg", "scale": 4}], "nfe": [3],
        "num_samples": 4, "batch_size": 2, **extra,
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("model", ["sd", "sd3"])
def test_text_to_image_cell_with_fid_clip_and_saturation(model, assets, tmp_path, one_thread):
    from steerdiff.benchmark.storage import RunFolder
    from steerdiff.metrics.clip_score import CLIPScore

    out = tmp_path / "run"
    assert main(["benchmark", "--config", str(_config(assets, tmp_path / "b.yaml", out, model))]) == 0
    (record,) = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert record["status"] == "ok" and record["classes"] == [0, 1] and record["nfe_measured"] == 3
    m = record["metrics"]
    assert set(m) == {"fid", "clip_score", "saturation", "clipped"}
    assert m["fid"] >= 0 and np.isfinite(m["fid"]) and 0 <= m["saturation"] <= 1
    # the CLIP score is the stored images' cosine with their prompts (sample i: prompt i mod 2), recomputed here
    folder = RunFolder(out)
    samples = torch.cat([folder.load_chunk(record["cell_id"], k).samples for k in range(2)])
    assert samples.shape == (4, 3, 32, 32) and samples.min() >= -1 and samples.max() <= 1
    cos = CLIPScore(model=str(assets["root"] / "clip")).cosines(samples, ["a cat", "a red dog"] * 2)
    assert m["clip_score"] == pytest.approx(float((100 * cos.clamp(min=0)).mean()), abs=1e-9)


def test_clip_cosines_match_transformers_own_similarity(assets):
    """An independent reference: CLIPModel's forward (its logits are logit_scale * cos) on the same pixels."""
    from transformers import AutoTokenizer, CLIPModel

    from steerdiff.metrics.clip_score import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, CLIPScore, clip_pixels

    folder = assets["root"] / "clip"
    images = torch.rand(3, 3, 40, 36) * 2 - 1
    prompts = ["a cat", "two dogs", "a red house"]
    ours = CLIPScore(model=str(folder)).cosines(images, prompts)
    model = CLIPModel.from_pretrained(folder).eval()
    tokens = AutoTokenizer.from_pretrained(folder)(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(pixel_values=clip_pixels(images, 30, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD), **tokens)
    theirs = out.logits_per_image.diagonal().double() / model.logit_scale.exp().double()
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert clip_pixels(images, 30, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD).shape == (3, 3, 30, 30)


@pytest.mark.parametrize("override,message", [
    ("models=[{model: digits, prompts: [a cat]}]", "prompts: the model is class-conditional"),
    ("classes=[1]", "classes: models[0]"),
    ("guidance=[{name: nosuch}]", "unknown guidance rule"),
])
def test_text_model_errors_before_sampling(assets, tmp_path, capsys, override, message):
    cfg = _config(assets, tmp_path / "b.yaml", tmp_path / "run")
    assert main(["benchmark", "--config", str(cfg), override]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run" / "cells").exists()


def test_text_model_needs_prompts_and_rgb_metrics(assets, tmp_path, capsys):
    cfg = yaml.safe_load(_config(assets, tmp_path / "b.yaml", tmp_path / "run").read_text())
    del cfg["models"][0]["prompts"]
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["benchmark", "--config", str(tmp_path / "c.yaml")]) == 2
    assert "prompts: StableDiffusionPipeline is a text-to-image pipeline; give prompts" in capsys.readouterr().err
    cfg["models"][0].update(prompts=["a cat"], metrics=["fd"])
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["benchmark", "--config", str(tmp_path / "c.yaml")]) == 2
    assert "metrics[0] ('fd')" in capsys.readouterr().err


def test_resume_after_an_interruption(assets, tmp_path, monkeypatch, capsys, one_thread):
    """Interrupt the run right after its first cell is recorded; the rerun reuses that cell and finishes the rest.
    In-process: what a SIGKILL adds (atomic writes, the lock of a dead process) is tests/test_benchmark_processes.py's
    kill-and-resume test; this one checks that text-to-image cells resume."""
    from steerdiff.benchmark.storage import RunFolder

    out = tmp_path / "run"
    cfg = _config(assets, tmp_path / "b.yaml", out, nfe=[2, 3], schedulers=[{"name": "dpmpp_2m"}],
                  guidance=[{"name": "cfg", "scale": 3}])
    config = yaml.safe_load(cfg.read_text())
    config["models"][0]["metrics"] = ["saturation"]  # resuming does not depend on the metrics (FID, CLIP: above)
    cfg.write_text(yaml.safe_dump(config))
    save = RunFolder.save_record

    def then_stop(self, cell_id, record):
        save(self, cell_id, record)
        raise KeyboardInterrupt("stopped after the first cell")

    monkeypatch.setattr(RunFolder, "save_record", then_stop)
    with pytest.raises(KeyboardInterrupt):
        main(["benchmark", "--config", str(cfg)])
    monkeypatch.undo()
    assert len(list(out.glob("cells/*/record.json"))) == 1
    capsys.readouterr()
    assert main(["benchmark", "--config", str(cfg)]) == 0
    assert "1 finished earlier and reused" in capsys.readouterr().out
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert sorted(r["nfe"] for r in records) == [2, 3] and all(r["status"] == "ok" for r in records)


def test_text_metrics_refuse_bad_input(assets, tmp_path):
    from steerdiff.metrics.features import reference_images
    from steerdiff.metrics.registry import make_metric

    with pytest.raises(ValueError, match="clip_score needs `model`: a local CLIP folder"):
        make_metric("clip_score")
    with pytest.raises(ValueError, match="holds a 't5' model, not a CLIP model"):
        folder = tmp_path / "not_clip"
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"model_type": "t5"}))
        from safetensors.torch import save_file

        save_file({"w": torch.zeros(1)}, str(folder / "model.safetensors"))
        make_metric("clip_score", model=str(folder))
    with pytest.raises(ValueError, match="clip_score needs RGB images"):
        make_metric("clip_score", model=str(assets["root"] / "clip")).check((1, 8, 8))
    with pytest.raises(ValueError, match="saturation needs RGB images"):
        make_metric("saturation").check((1, 8, 8))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        reference_images(str(tmp_path / "empty"))
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    Image.new("RGB", (8, 8)).save(mixed / "a.png")
    Image.new("RGB", (9, 8)).save(mixed / "b.png")
    with pytest.raises(ValueError, match="the images must share one size"):
        reference_images(str(mixed))


def test_cfg_under_one_is_applied_in_text_cells(assets, tmp_path, one_thread):
    """The benchmark's cfg 0.5 and cfg 1 cells sample differently (diffusers switches its CFG branch off at <= 1:
    steerdiff applies w < 1 through guide()), and each records the guidance it ran."""
    from steerdiff.benchmark.storage import RunFolder

    out = tmp_path / "run"
    cfg = _config(assets, tmp_path / "b.yaml", out, guidance=[{"name": "cfg", "scale": 0.5}, {"name": "cfg", "scale": 1}],
                  schedulers=[{"name": "ddim"}])
    data = yaml.safe_load(cfg.read_text())
    data["models"][0]["metrics"] = ["saturation"]
    cfg.write_text(yaml.safe_dump(data))
    assert main(["benchmark", "--config", str(cfg)]) == 0
    records = {r["guidance"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    assert set(records) == {"cfg 0.5", "cfg 1"} and all(r["status"] == "ok" for r in records.values())
    folder = RunFolder(out)
    half, one = (torch.cat([folder.load_chunk(records[g]["cell_id"], k).samples for k in range(2)]) for g in ("cfg 0.5", "cfg 1"))
    assert (half - one).abs().max() > 1e-3  # before: bit-identical
    assert records["cfg 0.5"]["network_calls"]["evaluations_per_sample"] == 2 * 3  # both branches ran, 3 steps
