"""Pipeline folders without surprises (tiny random pipelines saved with save_pretrained): a CFG scale under 1 is
applied, the default scheduler runs on a static-shift Flux folder, bad inputs are errors naming the field before
any weights load, the benchmark checks its metric inputs before sampling and rescores on a metric change, reruns
never replace another run's images silently, and diffusers' flow DEIS / SA-Solver are refused."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
from PIL import Image

from steerdiff.cli import main
from steerdiff.config import ConfigError, Spec
from tests.tiny_text_pipelines import save_tiny_pipeline


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from tests.tiny_flow_pipelines import tiny_wan

    root = tmp_path_factory.mktemp("folders")
    out = {name: save_tiny_pipeline(name, root / name) for name in ("sd", "flux", "sd_img2img")}
    static = root / "flux_static"  # FLUX.1-schnell's scheduler config: a static shift, no dynamic shifting
    shutil.copytree(out["flux"], static)
    path = static / "scheduler" / "scheduler_config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "use_dynamic_shifting": False}))
    out["flux_static"] = static
    tiny_wan().save_pretrained(root / "wan", safe_serialization=True)
    out["wan"] = root / "wan"
    picture = root / "in.png"
    Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)).save(picture)
    out["picture"] = picture
    return out


def _pixels(path):
    return np.asarray(Image.open(path), dtype=np.int16)


# 1. a CFG scale under 1 ---------------------------------------------------------------------------------------------
def test_a_cfg_scale_under_one_is_applied_on_diffusers_pipelines(folders, tmp_path, one_thread):
    base = ["generate", f"model={folders['sd']}", "prompts=[a red dog]", "steps=3", "scheduler.name=ddim"]
    for w in ("0", "0.5", "1"):
        assert main([*base, f"guidance.kwargs.scale={w}", f"output={tmp_path / ('w' + w + '.png')}"]) == 0
    # scale 0 is the unconditional model: the negative prompt's prediction, whatever the prompt
    assert main([*base, "guidance.kwargs.scale=0", "negative_prompts=a cat", f"output={tmp_path / 'n0.png'}"]) == 0
    assert main([*base[:2], "prompts=[a cat]", *base[3:], "guidance.kwargs.scale=1", f"output={tmp_path / 'c1.png'}"]) == 0
    w0, w05, w1, n0, c1 = (_pixels(tmp_path / name / "00000.png") for name in ("w0", "w0.5", "w1", "n0", "c1"))
    assert np.abs(w05 - w1).max() > 0  # before: bit-identical to scale 1 (diffusers turned its CFG off)
    assert np.abs(w0 - w1).max() > 0 and np.abs(w05 - w0).max() > 0
    assert np.abs(n0 - c1).max() <= 1 and np.abs(n0 - w0).max() > 0


def test_a_scale_under_one_on_a_pipeline_guide_cannot_hook_is_refused():
    import diffusers

    from steerdiff.generate import pipeline_kind, plan_guidance

    sd = pipeline_kind(diffusers.StableDiffusionPipeline)
    plan = plan_guidance(Spec(name="cfg", scale=0.5), sd)
    assert plan.rule is not None and plan.kwargs == {"guidance_scale": 2.0}  # the branch on, the rule at 0.5
    assert plan_guidance(Spec(name="cfg", scale=3), sd).rule is None  # the pipeline's own CFG where it applies it
    with pytest.raises(ConfigError, match="cfg scale 0.5 < 1: StableDiffusionLDM3DPipeline turns its CFG off"):
        plan_guidance(Spec(name="cfg", scale=0.5), pipeline_kind(diffusers.StableDiffusionLDM3DPipeline))


# 2. the default scheduler on a static-shift Flux folder ---------------------------------------------------------------
def test_the_default_scheduler_runs_on_a_flux_folder_without_dynamic_shifting(folders, tmp_path, one_thread):
    assert main(["generate", f"model={folders['flux_static']}", "prompts=[a cat]", "steps=3", "height=16", "width=16",
                 "call_kwargs.max_sequence_length=16", f"output={tmp_path / 'f.png'}"]) == 0  # before: AssertionError


def test_static_shift_dpm_solver_ignores_mu_like_the_models_own_scheduler(folders):
    from diffusers import FlowMatchEulerDiscreteScheduler

    from steerdiff.samplers.registry import make_scheduler

    config = json.loads((folders["flux_static"] / "scheduler" / "scheduler_config.json").read_text())
    a, b = make_scheduler("dpmpp_2m", config), make_scheduler("dpmpp_2m", config)
    a.set_timesteps(6, mu=1.1)
    b.set_timesteps(6)
    assert np.array_equal(a.sigmas.numpy(), b.sigmas.numpy()) and a.sigmas[-1] == 0
    assert type(a).__name__ == "DPMSolverMultistepScheduler" and a.config.flow_shift == config["shift"]
    own = FlowMatchEulerDiscreteScheduler.from_config(config)
    own.set_timesteps(6, mu=1.1)
    own_plain = FlowMatchEulerDiscreteScheduler.from_config(config)
    own_plain.set_timesteps(6)
    assert np.array_equal(own.sigmas.numpy(), own_plain.sigmas.numpy())  # the rule it follows: mu unused
    dynamic = make_scheduler("dpmpp_2m", {**config, "use_dynamic_shifting": True})
    assert type(dynamic) is __import__("diffusers").DPMSolverMultistepScheduler  # dynamic shifting: diffusers' own


def test_the_default_scheduler_on_a_pipeline_that_passes_its_own_sigmas(tmp_path, capsys, monkeypatch, one_thread):
    """Qwen-Image always calls set_timesteps(sigmas=...), which diffusers' DPMSolverMultistepScheduler cannot take:
    the default becomes DPM-Solver++ 2M on steerdiff's core (said, and what is recorded); an explicit dpmpp_2m is an
    error before loading."""
    import steerdiff.generate as generate_module
    from steerdiff.generate import GenerateConfig, with_default_scheduler
    from steerdiff.samplers.registry import make_scheduler
    from tests.tiny_flow_pipelines import flow_pipeline_call, tiny_qwen_image

    pipe = tiny_qwen_image()
    pipe.save_pretrained(tmp_path / "qwen", safe_serialization=True)
    cfg = with_default_scheduler(GenerateConfig(model=str(tmp_path / "qwen"), prompts=["a"]))
    assert cfg.scheduler.name == "dpmpp_2m_hb" and cfg.scheduler.kwargs == {"beta": 1.0}
    assert "passes its own sigmas" in capsys.readouterr().out
    pipe.scheduler = make_scheduler(cfg.scheduler.name, pipe.scheduler.config, **cfg.scheduler.kwargs)
    assert pipe(**flow_pipeline_call("qwen_image", steps=3)).images.isfinite().all()  # it runs in the pipeline
    monkeypatch.setattr(generate_module, "load_generation_pipeline", lambda *a, **k: pytest.fail("loaded"))
    explicit = GenerateConfig(model=str(tmp_path / "qwen"), prompts=["a"], scheduler={"name": "dpmpp_2m"},
                              output=str(tmp_path / "g.png"))
    with pytest.raises(ConfigError, match="QwenImagePipeline passes its own sigmas to set_timesteps, which "
                                          "DPMSolverMultistepScheduler cannot take"):
        generate_module.generate(explicit, progress=False)


# 3 and 4. errors naming the field, before any weights load -------------------------------------------------------------
@pytest.mark.parametrize("case", [
    "zero_img2img_steps", "image_not_an_image", "component_missing", "eta_not_a_number", "latents_from_config",
    "num_images_per_prompt", "height_rule", "flux_width_rule", "unknown_scheduler", "flow_scheduler_on_vp",
    "too_many_steps", "video_pipeline", "deis_on_flow", "moved_guidance_scale", "unknown_prediction_type"])
def test_errors_name_the_field_before_any_weights_load(case, folders, tmp_path, capsys, monkeypatch):
    import steerdiff.generate as generate_module

    def no_loading(*args, **kwargs):
        raise AssertionError("the pipeline was loaded before the config was checked")

    monkeypatch.setattr(generate_module, "load_generation_pipeline", no_loading)
    sd, text = f"model={folders['sd']}", "prompts=[a]"
    if case == "component_missing":
        broken = tmp_path / "broken"
        shutil.copytree(folders["sd"], broken)
        shutil.rmtree(broken / "unet")
    if case == "unknown_prediction_type":
        odd = tmp_path / "odd"
        shutil.copytree(folders["sd"], odd)
        path = odd / "scheduler" / "scheduler_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "prediction_type": "score"}))
    not_image = tmp_path / "notes.png"
    not_image.write_text("not an image")
    args, message = {
        "zero_img2img_steps": ([f"model={folders['sd_img2img']}", text, f"image={folders['picture']}", "strength=0.1",
                                "steps=3"], "strength: StableDiffusionImg2ImgPipeline runs int(steps x strength) "
                                            "denoising steps, and steps=3 x strength=0.1 makes none; use steps >= 10"),
        "image_not_an_image": ([f"model={folders['sd_img2img']}", text, f"image={not_image}"],
                               f"image: {str(not_image)!r} is not an image PIL can read"),
        "component_missing": ([f"model={tmp_path / 'broken'}", text], "lacks its unet/ folder (model_index.json lists "
                                                                      "unet: diffusers UNet2DConditionModel)"),
        "eta_not_a_number": ([sd, text, "scheduler.name=ddim", "call_kwargs.eta=abc"],
                             "call_kwargs.eta: StableDiffusionPipeline takes float, got 'abc'"),
        "latents_from_config": ([sd, text, "call_kwargs.latents=1"], "call_kwargs.latents: StableDiffusionPipeline takes"),
        "num_images_per_prompt": ([sd, text, "call_kwargs.num_images_per_prompt=2"],
                                  "num_images_per_prompt is set by images_per_prompt"),
        "height_rule": ([sd, text, "height=36"], "height: StableDiffusionPipeline takes multiples of 8"),
        "flux_width_rule": ([f"model={folders['flux']}", text, "width=17"], "width: FluxPipeline takes multiples of 2"),
        "unknown_scheduler": ([sd, text, "scheduler.name=dpm_fastest"], "scheduler: unknown scheduler 'dpm_fastest'"),
        "flow_scheduler_on_vp": ([sd, text, "scheduler.name=flow_euler"], "is a flow-matching scheduler, but the model's"),
        "too_many_steps": ([sd, text, "steps=2000"], "steps=2000: DPMSolverMultistepScheduler repeats timesteps"),
        "video_pipeline": ([f"model={folders['wan']}", text], "model: WanPipeline makes videos"),
        "deis_on_flow": ([f"model={folders['flux']}", text, "scheduler.name=deis"],
                         "DEISMultistepScheduler cannot sample flow-matching models"),
        "moved_guidance_scale": ([sd, text, "guidance_scale=5"], "the guidance weight is guidance.kwargs.scale"),
        "unknown_prediction_type": ([f"model={tmp_path / 'odd'}", text],  # the pipeline's own CFG: no rule to catch it
                                    "scheduler_config.json': prediction_type must be one of"),
    }[case]
    assert main(["generate", *args, f"output={tmp_path / 'g.png'}"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_the_lock_is_taken_before_the_weights_load_and_names_output(folders, tmp_path, capsys, monkeypatch):
    import steerdiff.generate as generate_module
    from steerdiff.run_folder import RunFolderLock

    monkeypatch.setattr(generate_module, "load_generation_pipeline", lambda *a, **k: pytest.fail("loaded"))
    (tmp_path / "g").mkdir()
    held = RunFolderLock(tmp_path / "g")  # another run of the same output
    try:
        assert main(["generate", f"model={folders['sd']}", "prompts=[a]", f"output={tmp_path / 'g.png'}"]) == 2
    finally:
        held.release()
    assert "is in use by" in (err := capsys.readouterr().err) and "choose another output" in err
    assert "output_dir" not in err


def test_an_output_the_system_refuses_is_named(tmp_path, capsys):
    assert main(["generate", "output=/proc/steerdiff-test.png"]) == 2
    assert "output (its images folder) '/proc/steerdiff-test' cannot be created" in capsys.readouterr().err


def test_the_benchmark_refuses_a_size_the_pipeline_cannot_take_before_loading(folders, tmp_path, monkeypatch):
    import steerdiff.generate as generate_module
    from steerdiff.benchmark.config import BenchmarkConfig
    from steerdiff.benchmark.runner import run_benchmark

    monkeypatch.setattr(generate_module, "load_any_pipeline", lambda *a, **k: pytest.fail("loaded"))
    cfg = BenchmarkConfig.model_validate({
        "output_dir": str(tmp_path / "run"), "progress": False, "device": "cpu", "schedulers": ["ddim"], "nfe": [2],
        "models": [{"model": str(folders["sd"]), "prompts": ["a"], "height": 36, "metrics": ["saturation"]}]})
    with pytest.raises(ConfigError, match=r"models\[0\] .*: height: StableDiffusionPipeline takes multiples of 8 .*; got 36, use 32 or 40"):
        run_benchmark(cfg)


# 5. the benchmark's metric inputs, before sampling ----------------------------------------------------------------------
@pytest.mark.parametrize("case", ["missing", "empty", "mixed", "unreadable"])
def test_a_bad_fid_reference_is_found_before_sampling(case, tmp_path, tiny_model_dir, monkeypatch):
    import steerdiff.benchmark.runner as runner_module
    from steerdiff.benchmark.config import BenchmarkConfig

    monkeypatch.setattr(runner_module, "generate_chunk", lambda *a, **k: pytest.fail("sampled before the check"))
    ref = tmp_path / "ref"
    if case != "missing":
        ref.mkdir()
    if case in ("mixed", "unreadable"):
        Image.new("L", (8, 8)).save(ref / "a.png")
        if case == "mixed":
            Image.new("L", (9, 8)).save(ref / "b.png")
        else:
            (ref / "b.png").write_bytes(b"not a png")
    message = {"missing": "must be a built-in data set", "empty": "holds no images", "mixed": "a.png is 8x8 but b.png is 9x8",
               "unreadable": "b.png is not a readable image"}[case]
    cfg = BenchmarkConfig.model_validate({
        "output_dir": str(tmp_path / "run"), "progress": False, "device": "cpu", "schedulers": ["ddim"], "nfe": [2],
        "num_samples": 4, "models": [{"model": str(tiny_model_dir), "metrics": [{"name": "fd", "kwargs": {"reference": str(ref)}}]}]})
    with pytest.raises(ConfigError, match=message):
        runner_module.run_benchmark(cfg)


# 6. silent or confusing ------------------------------------------------------------------------------------------------
def test_one_image_per_prompt_makes_a_near_square_grid(folders, tmp_path, one_thread):
    out = tmp_path / "g.png"
    assert main(["generate", f"model={folders['sd']}", "prompts=[a, b, c, d, e]", "steps=2", f"output={out}"]) == 0
    assert Image.open(out).size == (3 * 32 + 2, 2 * 32 + 1)  # 2 rows x 3 columns, not 5 rows x 1


def test_the_torchvision_fallback_notice_is_dropped_and_other_notices_are_not(caplog):
    main(["generate", "--print-config"])
    logger = logging.getLogger("transformers.utils.import_utils")
    with caplog.at_level(logging.WARNING):
        logger.warning("`CLIPImageProcessor` requires torchvision (not installed); falling back to `CLIPImageProcessorPil`")
        logger.warning("some other notice")
    assert [r.getMessage() for r in caplog.records] == ["some other notice"]


def test_restore_refuses_more_images_than_the_data_has(tmp_path, capsys):
    assert main(["restore", "--config", "configs/restore/box.yaml", "data.num_images=100000",
                 f"output_dir={tmp_path / 'o'}"]) == 2
    assert "data.num_images: the digits' test split has 360 images, asked for 100000; use at most 360" in capsys.readouterr().err


# 7. diffusers' flow DEIS / SA-Solver ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["DEISMultistepScheduler", "SASolverScheduler"])
def test_flow_deis_and_sa_solver_are_refused_while_their_grids_miss_zero(name):
    import diffusers
    from diffusers import FlowMatchEulerDiscreteScheduler

    from steerdiff.samplers.registry import make_scheduler

    config = FlowMatchEulerDiscreteScheduler(shift=3.0).config
    # the defect in the pinned diffusers: the flow grid ends on its last nonzero level, repeated (if this fails,
    # diffusers fixed it: lift the refusal in steerdiff.samplers.registry.FLOW_MODE_BROKEN)
    raw = getattr(diffusers, name).from_config(config, use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction")
    raw.set_timesteps(4)
    assert raw.sigmas[-1] > 0 and raw.sigmas[-1] == raw.sigmas[-2]
    with pytest.raises(ValueError, match=f"{name} cannot sample flow-matching models .* use dpmpp_2m"):
        make_scheduler(name, config)
    make_scheduler(name, diffusers.DDPMScheduler().config)  # VP models keep them
