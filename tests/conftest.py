import os

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel


def pytest_configure(config):
    # One intra-op thread per pytest-xdist worker: with torch's default (one per core) the 2 workers of
    # `pytest -n 2` oversubscribe a 2-core machine and the tests' tiny networks mostly wait for threads
    # (measured: the guidance tests took 351 s with the default and 56 s with one thread, on a loaded 2-core box).
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)


def tiny_class_unet(num_classes: int = 3, seed: int = 0) -> UNet2DModel:
    """A small random class-conditional UNet on 1x8x8 images (null class id = num_classes)."""
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4, num_class_embeds=num_classes + 1,
    ).eval()


@pytest.fixture
def tiny_pipe():
    from steerdiff.pipelines.class_conditional import ClassConditionalPipeline

    pipe = ClassConditionalPipeline(unet=tiny_class_unet(), scheduler=DDPMScheduler(num_train_timesteps=1000))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def tiny_model_dir(tmp_path, tiny_pipe):
    folder = tmp_path / "tiny"
    tiny_pipe.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture
def one_thread():
    """One intra-op thread for tiny problems: two threads on a busy 2-core machine spin-wait on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
