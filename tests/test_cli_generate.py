"""`steerdiff generate`: config validation, errors that name the field, and a real run on a local folder."""

import yaml
from PIL import Image

from steerdiff.cli import main
from steerdiff.config import load_config, parse_overrides
from steerdiff.generate import GenerateConfig

import pytest


def test_shipped_config_equals_defaults():
    assert load_config(GenerateConfig, "configs/generate/digits.yaml") == GenerateConfig()


def test_overrides_parse_nested_yaml_values():
    assert parse_overrides(["steps=20", "scheduler.name=ddim", "classes=[1, 2]"]) == {
        "steps": 20, "scheduler": {"name": "ddim"}, "classes": [1, 2]
    }


def test_generate_writes_grid_from_local_folder(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "grid.png"
    rc = main(["generate", f"model={tiny_model_dir}", "steps=3", "classes=[0, 2]", "samples_per_class=3",
               "scheduler.name=ddim", "upscale=2", f"output={out}"])
    assert rc == 0
    assert f"wrote {out}" in capsys.readouterr().out
    assert Image.open(out).size == (3 * 8 * 2 + 2, 2 * 8 * 2 + 1)  # cells and a one-pixel gap between them


@pytest.mark.parametrize(
    "args,message",
    [
        (["stepz=3"], "unknown key 'stepz'; allowed keys here: attention, batch_size, call_kwargs, classes,"),
        (["scheduler.kwarg={}"], "unknown key 'scheduler.kwarg'; allowed keys here: kwargs, label, name"),
        (["steps=0"], "steps: Input should be greater than or equal to 1"),
        (["dtype=int8"], "dtype: Input should be 'float32', 'float64', 'float16' or 'bfloat16'"),
        (["scheduler.name=dpm_fast"], "unknown scheduler 'dpm_fast'; available:"),
        (["scheduler.kwargs={etaa: 1}"], r"has no option(s) ['etaa']"),
        (["classes=[0, 7]"], "classes: [7] are not classes of model"),
        (["prompts=[a cat]"], "prompts: model"),
        (["image=x.png"], "image: model"),
        (["guidance.kwargs.scale=-1"], "guidance: Value error, scale must be a finite number >= 0, got -1"),
        (["guidance_scale=3"], "guidance_scale: the guidance weight is guidance.kwargs.scale"),
        (["model=/no/such/folder"], "neither a built-in model"),
        (["stepsabc"], "must look like key=value"),
    ],
)
def test_generate_errors_name_the_field(tmp_path, tiny_model_dir, capsys, args, message):
    base = [f"model={tiny_model_dir}", "steps=2", f"output={tmp_path / 'g.png'}"]
    assert main(["generate", *base, *args]) == 2
    assert message in capsys.readouterr().err


def test_generate_rejects_missing_config_file(capsys):
    assert main(["generate", "--config", "no/such.yaml"]) == 2
    assert "config file 'no/such.yaml' does not exist" in capsys.readouterr().err


def test_generate_rejects_pickled_weights(tmp_path, tiny_model_dir, capsys):
    weights = next((tiny_model_dir / "unet").glob("*.safetensors"))
    weights.rename(weights.with_suffix(".bin"))
    assert main(["generate", f"model={tiny_model_dir}", "steps=2", f"output={tmp_path / 'g.png'}"]) == 2
    assert "safetensors only" in capsys.readouterr().err
