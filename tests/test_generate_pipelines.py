"""`steerdiff generate` on local text-to-image folders (tiny random SD, SD3, Flux, SD img2img saved with
save_pretrained): prompts, rules, steerdiff schedulers, per-image PNG metadata, the manifest, batch independence,
and the errors raised before any weights are read."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from steerdiff.cli import main
from steerdiff.config import ConfigError, Spec
from tests.tiny_text_pipelines import save_tiny_pipeline


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipelines")
    return {name: save_tiny_pipeline(name, root / name) for name in ("sd", "sd3", "flux", "sd_img2img")}


def _pixels(path):
    return np.asarray(Image.open(path), dtype=np.int16)


def test_text_to_image_with_a_rule_and_a_steerdiff_scheduler(folders, tmp_path, capsys, one_thread):
    out = tmp_path / "run" / "grid.png"
    rc = main(["generate", f"model={folders['sd']}", "prompts=[a cat, a red dog]", "images_per_prompt=2", "steps=3",
               "scheduler.name=ghvb", "guidance.name=apg", "guidance.kwargs.scale=5", f"output={out}", "seed=10"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and str(tmp_path / "run" / "grid") in printed
    files = sorted(p.name for p in (tmp_path / "run" / "grid").iterdir() if p.name != ".lock")
    assert files == ["00000.png", "00001.png", "00002.png", "00003.png", "manifest.jsonl"]
    assert Image.open(out).size == (2 * 32 + 1, 2 * 32 + 1)  # rows = prompts, columns = images per prompt
    manifest = [json.loads(line) for line in (tmp_path / "run" / "grid" / "manifest.jsonl").read_text().splitlines()]
    assert [m["seed"] for m in manifest] == [10, 11, 12, 13]
    assert [m["prompt"] for m in manifest] == ["a cat", "a cat", "a red dog", "a red dog"]
    text = Image.open(tmp_path / "run" / "grid" / "00002.png").text
    assert text["prompt"] == "a red dog" and text["seed"] == "12" and text["steps"] == "3"
    assert json.loads(text["scheduler"]) == {"name": "ghvb", "kwargs": {}}
    assert json.loads(text["guidance"]) == {"name": "apg", "kwargs": {"scale": 5}}
    assert json.loads(text["steerdiff"]) == {k: v for k, v in manifest[2].items() if k != "file"}
    assert text["model"] == str(folders["sd"])


def test_an_image_does_not_depend_on_its_batch(folders, tmp_path, one_thread):
    common = [f"model={folders['sd3']}", "prompts=[a cat]", "images_per_prompt=3", "steps=3", "scheduler.name=ghvb",
              "guidance.name=cfg_zero_star", "guidance.kwargs.scale=4"]
    assert main(["generate", *common, "batch_size=3", f"output={tmp_path / 'a.png'}"]) == 0
    assert main(["generate", *common, "batch_size=1", f"output={tmp_path / 'b.png'}"]) == 0
    for i in range(3):
        a, b = _pixels(tmp_path / "a" / f"{i:05d}.png"), _pixels(tmp_path / "b" / f"{i:05d}.png")
        assert np.abs(a - b).max() <= 1  # 8-bit rounding of float noise between batch shapes at most
    assert np.abs(_pixels(tmp_path / "a" / "00000.png") - _pixels(tmp_path / "a" / "00001.png")).max() > 10  # seeds differ


def test_flux_with_a_rule_and_true_cfg(folders, tmp_path, one_thread):
    out = tmp_path / "flux.png"
    args = ["generate", f"model={folders['flux']}", "prompts=[a cat]", "steps=3", "height=16", "width=16",
            "call_kwargs.max_sequence_length=16", f"output={out}"]
    assert main([*args, "scheduler.name=dpmpp_2m", "guidance.name=apg", "guidance.kwargs.scale=4"]) == 0
    assert main([*args, "scheduler=null", "guidance=null", f"output={tmp_path / 'plain.png'}"]) == 0
    assert Image.open(tmp_path / "flux" / "00000.png").size == (16, 16)
    assert Image.open(out).size == (64, 64)  # the grid upscales images under 32 px 4 times
    assert np.abs(_pixels(out) - _pixels(tmp_path / "plain.png")).max() > 0  # the rule changed the image


def test_img2img_takes_an_image_and_strength(folders, tmp_path, one_thread):
    picture = tmp_path / "in.png"
    Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)).save(picture)
    out = tmp_path / "i2i.png"
    assert main(["generate", f"model={folders['sd_img2img']}", "prompts=[a cat]", f"image={picture}", "strength=0.5",
                 "steps=4", "scheduler.name=ddim", f"output={out}"]) == 0
    meta = json.loads(Image.open(tmp_path / "i2i" / "00000.png").text["steerdiff"])
    assert meta["image"] == str(picture) and meta["strength"] == 0.5


def _write_index(folder):
    (folder / "unknown").mkdir(exist_ok=True)
    (folder / "unknown" / "model_index.json").write_text(json.dumps({"_class_name": "NoSuchPipeline"}))
    return folder / "unknown"


def _write(path, text):
    path.write_text(text)
    return path


@pytest.mark.parametrize("case", ["not_a_pipeline", "empty_prompts", "malformed_jsonl", "classes_for_text",
                                  "prompt_for_class", "image_for_text", "no_image_for_img2img", "unknown_call_kwarg",
                                  "negatives_mismatch", "xformers_on_cpu", "guidance_in_call_kwargs", "unknown_pipeline_class"])
def test_errors_name_the_field_before_any_weights_are_read(case, folders, tmp_path, capsys, monkeypatch):
    import steerdiff.generate as generate_module

    def no_loading(*args, **kwargs):
        raise AssertionError("the pipeline was loaded before the config was checked")

    monkeypatch.setattr(generate_module, "load_generation_pipeline", no_loading)
    sd, out = folders["sd"], f"output={tmp_path / 'g.png'}"
    bad_line = json.dumps({"prompt": 1}) + "\n"
    args, message = {
        "not_a_pipeline": ([f"model={tmp_path}", "prompts=[a]"], "is not a diffusers pipeline (no model_index.json)"),
        "empty_prompts": ([f"model={sd}", f"prompts={_write(tmp_path / 'p.txt', chr(10))}"], "holds no prompts"),
        "malformed_jsonl": ([f"model={sd}", f"prompts={_write(tmp_path / 'p.jsonl', bad_line)}"],
                            "line 1 must be an object with a non-empty string \"prompt\""),
        "classes_for_text": ([f"model={sd}", "classes=[1]"], "classes: model"),
        "prompt_for_class": (["model=digits", "prompts=[a cat]"], "prompts: model 'digits' (ClassConditionalPipeline is class-conditional)"),
        "image_for_text": ([f"model={sd}", "prompts=[a]", f"image={tmp_path}"], "takes no image"),
        "no_image_for_img2img": ([f"model={folders['sd_img2img']}", "prompts=[a]"], "image: model"),
        "unknown_call_kwarg": ([f"model={sd}", "prompts=[a]", "call_kwargs.max_sequence_length=8"],
                               "call_kwargs: StableDiffusionPipeline takes no ['max_sequence_length']"),
        "negatives_mismatch": ([f"model={sd}", "prompts=[a, b, c]", "negative_prompts=[x, y]"],
                               "negative_prompts: give one, or one per prompt (3); got 2"),
        "xformers_on_cpu": ([f"model={sd}", "prompts=[a]", "attention=xformers"], "attention: xformers"),
        "unknown_pipeline_class": ([f"model={_write_index(tmp_path)}", "prompts=[a]"],
                                   "names pipeline class 'NoSuchPipeline', which diffusers"),
        "guidance_in_call_kwargs": ([f"model={sd}", "prompts=[a]", "call_kwargs.guidance_scale=1"],
                                    "call_kwargs: ['guidance_scale'] are set by guidance (cfg 3)"),
    }[case]
    assert main(["generate", *args, out]) == 2
    assert message in capsys.readouterr().err


def test_a_rule_on_a_pipeline_guide_cannot_hook_is_refused():
    import diffusers

    from steerdiff.generate import pipeline_kind, plan_guidance

    cls = diffusers.StableDiffusionLDM3DPipeline  # text-to-image, but not a pipeline guide() knows
    kind = pipeline_kind(cls)
    assert kind.kind == "text"
    with pytest.raises(ConfigError, match="guide\\(\\) cannot hook StableDiffusionLDM3DPipeline"):
        plan_guidance(Spec(name="apg", scale=5), kind)
    assert plan_guidance(Spec(name="cfg", scale=5), kind).kwargs == {"guidance_scale": 5.0}  # its own CFG still works
    with pytest.raises(ConfigError, match="DDPMPipeline is unconditional and takes no guidance"):
        plan_guidance(Spec(name="cfg", scale=5), pipeline_kind(diffusers.DDPMPipeline))


@pytest.mark.parametrize("name,model,extra", [
    ("text_to_image_apg", "sd", ["device=cpu", "dtype=float32", "negative_prompts=null"]),
    ("flow_ghvb", "sd3", ["device=cpu", "dtype=float32", "prompts=[a cat]"]),
    ("img2img", "sd_img2img", ["device=cpu", "dtype=float32"]),
])
def test_shipped_example_configs_run(name, model, extra, folders, tmp_path, one_thread):
    """Each example config is valid as shipped and runs once its CHANGE lines point at a real folder."""
    from steerdiff.config import load_config
    from steerdiff.generate import GenerateConfig

    cfg = load_config(GenerateConfig, f"configs/generate/{name}.yaml")
    assert cfg.guidance is not None and cfg.scheduler is not None
    more = []
    if cfg.image is not None:
        picture = tmp_path / "in.png"
        Image.new("RGB", (32, 32), (120, 40, 200)).save(picture)
        more.append(f"image={picture}")
    assert main(["generate", "--config", f"configs/generate/{name}.yaml", f"model={folders[model]}", "steps=4",
                 "images_per_prompt=1", f"output={tmp_path / 'out.png'}", *extra, *more]) == 0


def test_a_rerun_reuses_the_batches_an_earlier_run_finished(folders, tmp_path, capsys, one_thread):
    args = ["generate", f"model={folders['sd']}", "prompts=[a, b]", "images_per_prompt=2", "batch_size=2", "steps=3",
            f"output={tmp_path / 'g.png'}"]
    assert main(args) == 0
    first = {i: _pixels(tmp_path / "g" / f"{i:05d}.png") for i in range(4)}
    (tmp_path / "g" / "00003.png").unlink()  # as if killed while writing the second batch
    capsys.readouterr()
    assert main(args) == 0
    assert "reused 2 images" in capsys.readouterr().out
    assert all(np.array_equal(first[i], _pixels(tmp_path / "g" / f"{i:05d}.png")) for i in range(4))
    capsys.readouterr()
    assert main([*args[:-2], "steps=4", args[-1]]) == 2  # other settings into the same output: refused, kept
    assert "holds another run's images (00000.png was made with other settings (differs in steps))" in capsys.readouterr().err
    assert all(np.array_equal(first[i], _pixels(tmp_path / "g" / f"{i:05d}.png")) for i in range(4))
    assert main([*args[:-2], "steps=4", args[-1], "overwrite=true"]) == 0  # replaced on request: nothing is reused
    assert "reused" not in capsys.readouterr().out
    assert json.loads(Image.open(tmp_path / "g" / "00003.png").text["steerdiff"])["steps"] == 4


def test_a_diffusers_class_conditional_pipeline_takes_classes_and_a_rule(tmp_path, capsys, one_thread):
    """DiT (diffusers' own class-conditional pipeline, 1,000 classes): classes must be given; APG goes in by guide()."""
    from tests.tiny_pipelines import tiny_dit_pipeline

    tiny_dit_pipeline().save_pretrained(tmp_path / "dit", safe_serialization=True)
    base = ["generate", f"model={tmp_path / 'dit'}", "steps=3", f"output={tmp_path / 'g.png'}"]
    assert main(base) == 2
    assert "has 1000 classes; give the class ids to draw" in capsys.readouterr().err
    assert main([*base, "classes=[1, 2]", "samples_per_class=2", "guidance.name=apg", "guidance.kwargs.scale=3"]) == 0
    labels = [json.loads(line)["class_label"] for line in (tmp_path / "g" / "manifest.jsonl").read_text().splitlines()]
    assert labels == [1, 1, 2, 2]
