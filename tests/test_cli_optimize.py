"""``steerdiff optimize``: config validation, and each task end to end on a tiny UNet folder with few steps."""

import json
from pathlib import Path

import pytest
import torch

from steerdiff.cli import main
from steerdiff.config import ConfigError
from steerdiff.cli.optimize import TASKS, load_task_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "adjoint"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("task", TASKS)
def test_shipped_configs_validate(task):
    cfg = load_task_config(CONFIGS / f"{task}.yaml")
    assert cfg.task == task and cfg.model == "digits" and cfg.sampler.mode == "adjoint"


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="task"):
        load_task_config(None, ["iterations=3"])
    with pytest.raises(ConfigError, match="task"):
        load_task_config(None, ["task=denoise"])
    with pytest.raises(ConfigError, match="unknown key 'lora_rank'"):
        load_task_config(CONFIGS / "noise.yaml", ["lora_rank=4"])
    with pytest.raises(ConfigError, match="sampler.mode"):
        load_task_config(CONFIGS / "noise.yaml", ["sampler.mode=backprop"])
    with pytest.raises(ConfigError, match="sampler.steps"):
        load_task_config(CONFIGS / "noise.yaml", ["sampler.steps=0"])
    assert main(["optimize", "--config", str(CONFIGS / "noise.yaml"), "iterations=0"]) == 2


def run_task(tmp_path, model_dir, task, *overrides):
    out = tmp_path / task
    args = ["optimize", "--config", str(CONFIGS / f"{task}.yaml"), f"model={model_dir}", f"output={out}",
            "iterations=2", "sampler.steps=3", *overrides]
    assert main(args) == 0
    report = json.loads((out / "metrics.json").read_text())
    assert report["task"] == task and len(report["history"]) == 2
    assert (out / "before.png").is_file() and (out / "after.png").is_file()
    assert not list(out.glob("*.tmp"))
    return report["metrics"], out


def test_noise_task_end_to_end(tmp_path, tiny_model_dir):
    metrics, _ = run_task(tmp_path, tiny_model_dir, "noise", "num_samples=4")
    assert 0 <= metrics["target_rate_after"] <= 1 and metrics["relative_noise_change_mean"] > 0


def test_embedding_task_end_to_end(tmp_path, tiny_model_dir):
    metrics, out = run_task(tmp_path, tiny_model_dir, "embedding", "num_samples=2", "eval_samples=2",
                            "target_class=2", "init_class=0")
    assert metrics["mse_before"] > 0 and metrics["embedding_relative_error_before"] > 0
    assert (out / "targets.png").is_file()


@pytest.mark.parametrize("train", ["lora", "all"])
def test_finetune_task_end_to_end(tmp_path, tiny_model_dir, train):
    metrics, _ = run_task(tmp_path, tiny_model_dir, "finetune", f"train={train}", "samples_per_class=1",
                          "eval_samples_per_class=1", "sampler.guidance_scale=1.0")
    assert metrics["train"] == train and metrics["trainable_parameters"] > 0
    assert 0 <= metrics["stroke_fraction_after"] <= 1
