"""The new rules by name, where users reach them: `steerdiff generate`, `steerdiff restore` and the restoration and
class-conditional pipelines (the embedded digits model, whose 4 x 4 attention layers PAG and SEG perturb; the
shipped weak digits models for AutoGuidance), with errors that name the field."""

import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from steerdiff.cli import main
from steerdiff.config import ConfigError, load_config
from steerdiff.benchmark.restoration_config import RestoreConfig
from steerdiff.guidance import PAG, AutoGuidance
from steerdiff.guidance.operators import Inpainting, box_mask
from steerdiff.pipelines import RestorationPipeline, load_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")
BASE = ["model=digits", "steps=3", "classes=[0, 1]", "samples_per_class=1", "upscale=1"]


def images_of(folder):
    return np.stack([np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))])


def test_generate_with_pag_and_autoguidance_by_name(tmp_path, capsys):
    runs = {
        "cfg": ["guidance.name=cfg", "guidance.kwargs.scale=3"],
        "pag": ["guidance.name=pag", "guidance.kwargs.scale=3", "guidance.kwargs.pag_scale=3",
                "guidance.kwargs.layers=[down_blocks.1, up_blocks.1]"],
        "autoguidance": ["guidance.name=autoguidance", "guidance.kwargs.scale=2", "guidance.kwargs.weak_model=digits-weak"],
    }
    written = {}
    for name, args in runs.items():
        out = tmp_path / f"{name}.png"
        assert main(["generate", *BASE, *args, f"output={out}"]) == 0, capsys.readouterr().err
        written[name] = images_of(tmp_path / name)
        manifest = [json.loads(line) for line in (tmp_path / name / "manifest.jsonl").read_text().splitlines()]
        assert manifest[0]["guidance"]["name"] == name
    assert written["pag"].shape == written["cfg"].shape == (2, 8, 8)
    assert not np.array_equal(written["pag"], written["cfg"]) and not np.array_equal(written["autoguidance"], written["cfg"])


@pytest.mark.parametrize("args,message", [
    (["guidance.name=pag", "guidance.kwargs.layers=[nope]"],
     "guidance: layer 'nope' matches no self-attention layer of UNet2DModel; its self-attention layers are: "
     "down_blocks.1.attentions.0, down_blocks.1.attentions.1, up_blocks.1.attentions.0"),
    (["guidance.name=slg", "guidance.kwargs.layers=[0]"], "guidance: UNet2DModel has no top-level transformer block stack"),
    (["guidance.name=autoguidance", "guidance.kwargs.weak_model=/no/such/folder"],
     "guidance: weak_model '/no/such/folder' is not a folder"),
    (["guidance.name=pag", "guidance.kwargs.pag_scael=2"], "guidance: rule 'pag' has no option(s) ['pag_scael']"),
])
def test_generate_perturbation_errors_name_the_field(tmp_path, capsys, args, message):
    assert main(["generate", *BASE, *args, f"output={tmp_path / 'g.png'}"]) == 2
    assert message in capsys.readouterr().err


def test_autoguidance_weak_model_from_a_damaged_folder_is_a_clear_error(tmp_path, capsys):
    from steerdiff.testbeds.digits import DIGITS_WEAK_MODEL_PATH
    import shutil

    weak = tmp_path / "weak"
    shutil.copytree(DIGITS_WEAK_MODEL_PATH, weak)
    (weak / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"0123456789")
    assert main(["generate", *BASE, "guidance.name=autoguidance", f"guidance.kwargs.weak_model={weak}",
                 f"output={tmp_path / 'g.png'}"]) == 2
    err = capsys.readouterr().err
    assert "guidance: weights file" in err and "is damaged" in err


def test_the_restoration_pipeline_takes_perturbation_rules():
    base = load_pipeline("digits")
    pipe = RestorationPipeline(base.unet, base.scheduler)
    pipe.set_progress_bar_config(disable=True)
    from steerdiff.testbeds.digits import load_digits_data

    images, labels = load_digits_data("test")
    x, labels = images[:2], labels[:2]
    operator = Inpainting(box_mask((8, 8), size=4))
    y = operator.forward(x)
    outs = {}
    for name, rule in {"pag": PAG(2.0, 2.0, layers=["down_blocks.1", "up_blocks.1"]),
                       "autoguidance": AutoGuidance(2.0, "digits-weak")}.items():
        out = pipe(y, operator, 0.0, 4, class_labels=labels, guidance_rule=rule, output_type="latent",
                   generator=[torch.Generator().manual_seed(i) for i in range(2)])
        outs[name] = out.images
        assert out.network_calls == 4 and torch.isfinite(out.images).all()
    assert not torch.allclose(outs["pag"], outs["autoguidance"])


def write_restore_config(tmp_path, **extra):
    cfg = {"model": "digits", "data": {"num_images": 2}, "tasks": [{"name": "box", "operator": {"name": "box"}}],
           "methods": [{"name": "projection"}], "sampler": {"name": "ancestral", "steps": 3}, "metrics": ["psnr"],
           "use_labels": True, "batch_size": 2, "grid_images": 2, "upscale": 1, "output_dir": str(tmp_path / "o"), **extra}
    path = tmp_path / "restore.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_restore_takes_a_rule_by_name(tmp_path):
    cfg = write_restore_config(tmp_path, guidance={"name": "autoguidance", "scale": 2.0, "kwargs": {"weak_model": "digits-weak"}})
    assert main(["restore", "--config", str(cfg)]) == 0
    with pytest.raises(ConfigError, match="give guidance_scale or guidance, not both"):
        load_config(RestoreConfig, write_restore_config(tmp_path, guidance={"name": "pag"}, guidance_scale=2.0))
    with pytest.raises(ConfigError, match="guidance needs use_labels"):
        load_config(RestoreConfig, write_restore_config(tmp_path, guidance={"name": "pag"}, use_labels=False))
    with pytest.raises(ConfigError, match="guidance: unknown guidance rule 'pga'"):
        load_config(RestoreConfig, write_restore_config(tmp_path, guidance={"name": "pga"}))


@pytest.mark.parametrize("weak,full", [("digits_weak", "digits"), ("digits_flow_weak", "digits_flow")])
def test_the_shipped_weak_models_are_the_digits_networks_trained_for_an_eighth_of_the_budget(weak, full):
    from steerdiff.testbeds.digits import ASSETS_DIR

    logs = {name: json.loads((ASSETS_DIR / name / "training_log.json").read_text()) for name in (weak, full)}
    configs = {name: json.loads((ASSETS_DIR / name / "unet" / "config.json").read_text()) for name in (weak, full)}
    assert configs[weak] == configs[full]  # the same network
    assert logs[weak]["steps_done"] == round(logs[full]["steps_done"] / 8) and not logs[weak]["stopped_early"]
    recipe = lambda log: {"objective": "epsilon", **{k: v for k, v in log["args"].items()  # noqa: E731
                                                    if k not in ("out", "steps", "warmup", "minutes", "threads")}}
    assert recipe(logs[weak]) == recipe(logs[full])  # the same recipe (the older log predates --objective)
