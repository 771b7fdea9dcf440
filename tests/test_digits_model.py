"""The embedded digits diffusion model: data, shipped folder, loading, null class, and a short sampling run."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from steerdiff.testbeds.digits import (
    DIGITS_MODEL_PATH,
    NULL_CLASS,
    NUM_CLASSES,
    load_digits_data,
    load_digits_model,
)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny calls: one intra-op thread (tests/conftest.py)


@pytest.fixture(scope="module")
def model():
    return load_digits_model()


def test_data_scaling_and_shapes():
    from sklearn.datasets import load_digits

    x, y = load_digits_data()
    assert x.shape == (1797, 1, 8, 8) and x.dtype == torch.float32
    assert y.shape == (1797,) and y.dtype == torch.int64 and set(y.tolist()) == set(range(NUM_CLASSES))
    assert x.min() == -1.0 and x.max() == 1.0
    v = torch.as_tensor(load_digits().images, dtype=torch.float32)
    assert torch.equal(x[:, 0], v / 8 - 1)  # grey level v in 0..16 -> v / 8 - 1


def test_shipped_folder_layout_and_size():
    index = json.loads((DIGITS_MODEL_PATH / "model_index.json").read_text())
    assert index == {
        "_class_name": "ClassConditionalPipeline",
        "_diffusers_version": "0.42.1",
        "unet": ["diffusers", "UNet2DModel"],
        "scheduler": ["diffusers", "DDPMScheduler"],
    }
    for rel in ("unet/config.json", "unet/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json"):
        assert (DIGITS_MODEL_PATH / rel).is_file(), rel
    assert not list(DIGITS_MODEL_PATH.rglob("*.bin"))
    size = sum(p.stat().st_size for p in DIGITS_MODEL_PATH.rglob("*") if p.is_file())
    assert size <= 20 * 1024 * 1024


def test_load_digits_model(model):
    from diffusers import DDPMScheduler, UNet2DModel

    unet, scheduler = model
    assert isinstance(unet, UNet2DModel) and isinstance(scheduler, DDPMScheduler)
    assert not unet.training and unet.dtype == torch.float32
    assert unet.config.sample_size == 8 and unet.config.in_channels == 1 and unet.config.out_channels == 1
    assert unet.config.num_class_embeds == NUM_CLASSES + 1 == NULL_CLASS + 1
    cfg = scheduler.config
    assert (cfg.num_train_timesteps, cfg.beta_schedule, cfg.beta_start, cfg.beta_end) == (1000, "linear", 1e-4, 0.02)
    assert cfg.prediction_type == "epsilon" and cfg.clip_sample is False


def test_forward_shapes_and_null_class(model):
    unet, _ = model
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 1, 8, 8, generator=g)
    labels = torch.tensor([0, 3, 9, NULL_CLASS])
    with torch.no_grad():
        out = unet(x, torch.tensor(500), class_labels=labels).sample
        per_sample_t = unet(x, torch.tensor([10, 200, 500, 999]), class_labels=labels).sample
        uncond = unet(x, torch.tensor(500), class_labels=torch.full((4,), NULL_CLASS)).sample
    assert out.shape == (4, 1, 8, 8) and out.dtype == torch.float32
    assert torch.isfinite(out).all() and torch.isfinite(per_sample_t).all()
    # the null class is a distinct embedding: conditional and unconditional predictions differ
    assert (out[:3] - uncond[:3]).abs().max() > 1e-3
    torch.testing.assert_close(out[3], uncond[3])


def test_dtype_argument():
    unet, _ = load_digits_model(dtype=torch.float64)
    assert unet.dtype == torch.float64
    with torch.no_grad():
        out = unet(torch.zeros(1, 1, 8, 8, dtype=torch.float64), torch.tensor(10), class_labels=torch.tensor([1])).sample
    assert out.dtype == torch.float64
    with pytest.raises(TypeError, match="dtype must be a floating-point torch.dtype"):
        load_digits_model(dtype="float16")


def test_model_predicts_the_noise(model):
    """eps-prediction MSE on noised data is far below the trivial predictor's (which is 1)."""
    unet, scheduler = model
    x0, y = load_digits_data("test")
    x0, y = x0[:128], y[:128]
    g = torch.Generator().manual_seed(0)
    eps = torch.randn(x0.shape, generator=g)
    t = torch.full((x0.shape[0],), 300)
    xt = scheduler.add_noise(x0, eps, t)
    with torch.no_grad():
        cond = unet(xt, t, class_labels=y).sample
        uncond = unet(xt, t, class_labels=torch.full_like(y, NULL_CLASS)).sample
    mse_cond = float((cond - eps).pow(2).mean())
    mse_uncond = float((uncond - eps).pow(2).mean())
    assert mse_cond < 0.2 and mse_uncond < 0.3
    assert mse_cond <= mse_uncond  # knowing the class helps


def test_from_pretrained_on_the_folder(model):
    from diffusers import DDPMScheduler, UNet2DModel

    unet, _ = model
    direct = UNet2DModel.from_pretrained(DIGITS_MODEL_PATH, subfolder="unet", use_safetensors=True)
    for (k, a), (_, b) in zip(unet.state_dict().items(), direct.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    DDPMScheduler.from_pretrained(DIGITS_MODEL_PATH, subfolder="scheduler")

    from steerdiff.pipelines.class_conditional import ClassConditionalPipeline

    pipe = ClassConditionalPipeline.from_pretrained(DIGITS_MODEL_PATH, use_safetensors=True)
    assert isinstance(pipe.unet, UNet2DModel) and isinstance(pipe.scheduler, DDPMScheduler)


def test_loading_refuses_non_safetensors_weights(tmp_path):
    folder = tmp_path / "digits"
    shutil.copytree(DIGITS_MODEL_PATH / "scheduler", folder / "scheduler")
    (folder / "unet").mkdir()
    shutil.copy(DIGITS_MODEL_PATH / "unet" / "config.json", folder / "unet" / "config.json")
    (folder / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"never unpickled")
    with pytest.raises(ValueError, match="safetensors only"):
        load_digits_model(path=folder)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_digits_model(path=tmp_path / "missing")


def test_guided_samples_are_recognised():
    """20 guided DDIM samples in 10 steps: the classifier recognises nearly all as their class."""
    from diffusers import DDIMScheduler

    from steerdiff.metrics.classifier import classify_digits

    unet, ddpm = load_digits_model()
    scheduler = DDIMScheduler.from_config(ddpm.config)
    scheduler.set_timesteps(10)
    labels = torch.arange(NUM_CLASSES).repeat(2)
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(labels.shape[0], 1, 8, 8, generator=g)
    both = torch.cat([torch.full_like(labels, NULL_CLASS), labels])
    with torch.no_grad():
        for t in scheduler.timesteps:
            u, c = unet(torch.cat([x, x]), t, class_labels=both).sample.chunk(2)
            x = scheduler.step(u + 3.0 * (c - u), t, x).prev_sample
    acc = float((classify_digits(x) == labels).double().mean())
    assert acc >= 0.85
