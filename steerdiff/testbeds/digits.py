"""The embedded default testbed: scikit-learn's handwritten digits and a class-conditional diffusion model on them.

Data
    ``sklearn.datasets.load_digits`` ships inside scikit-learn (no download): 1,797 greyscale images of the
    digits 0-9, 8x8 pixels, each pixel an integer grey level v in {0, ..., 16}.  We scale them to

        x = v / 8 - 1  in [-1, 1],   float32, shape (N, 1, 8, 8),

    the range diffusion models are trained on.  ``load_digits_data(split)`` returns the full set
    (``"all"``, used to train the diffusion model and as the reference set of the Frechet distance) or one
    side of a fixed stratified 80/20 split with seed 0 (``"train"`` / ``"test"``, used for the classifier
    whose penultimate layer is the feature space of the digits Frechet distance).

Resolution
    The model works at the digits' native 8x8, one channel.  The images are 8x8 with 17 grey levels:
    upsampling them (to 16x16 or 32x32) adds no information, while it multiplies the cost of every network
    call by 4-16x on a 2-core CPU, where every benchmark cell generates thousands of samples.

Model
    A class-conditional diffusers ``UNet2DModel`` (``num_class_embeds=11``: the digits 0-9 plus the null
    class ``NULL_CLASS = 10`` used for classifier-free guidance; it was trained with label dropout to the
    null id), called diffusers-style ``unet(sample, timestep, class_labels=labels).sample``, predicting the
    noise epsilon under a ``DDPMScheduler`` (1000 steps, linear betas 1e-4..0.02, ``clip_sample=False``,
    ``timestep_spacing="trailing"`` so that an N-step sampler built from this config starts at t = 999, the
    noise level the model was trained to start from; Lin et al. 2024).
    It is shipped in diffusers' pipeline-folder format at ``DIGITS_MODEL_PATH``
    (``model_index.json``, ``unet/``, ``scheduler/``), so ``UNet2DModel.from_pretrained(DIGITS_MODEL_PATH,
    subfolder="unet")`` works as well as :func:`load_digits_model`.  ``scripts/train_digits.py``
    reproduces it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..weights import check_safetensors_folder

NUM_CLASSES = 10
"""Number of digit classes (0-9)."""

NULL_CLASS = 10
"""Class id of the unconditional ("null") label used by classifier-free guidance."""

IMAGE_SIZE = 8
"""Height and width of the digits images (their native resolution)."""

MAX_GREY_LEVEL = 16
"""The digits' grey levels are the integers 0..16."""

SPLIT_SEED = 0
"""Seed of the fixed stratified train/test split."""

TEST_FRACTION = 0.2
"""Fraction of the data held out as the test split."""

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
DIGITS_MODEL_PATH = ASSETS_DIR / "digits"
"""The shipped diffusers pipeline folder of the digits model."""
DIGITS_FLOW_MODEL_PATH = ASSETS_DIR / "digits_flow"
"""Its rectified-flow twin (``scripts/train_digits.py --objective flow``): same UNet and label dropout, velocity."""
DIGITS_WEAK_MODEL_PATH = ASSETS_DIR / "digits_weak"
"""A weak version of the digits model for AutoGuidance: the same network and recipe trained for 1/8 of the budget."""
DIGITS_FLOW_WEAK_MODEL_PATH = ASSETS_DIR / "digits_flow_weak"
"""The same for the rectified-flow model."""

_SPLITS = ("all", "train", "test")


def scale_grey_levels(values: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Map grey levels v in [0, 16] to x = v / 8 - 1 in [-1, 1] as float32 of shape (N, 1, 8, 8)."""
    v = torch.as_tensor(np.asarray(values), dtype=torch.float32)
    if v.ndim == 2 and v.shape[-1] == IMAGE_SIZE * IMAGE_SIZE:
        v = v.reshape(-1, IMAGE_SIZE, IMAGE_SIZE)
    if v.ndim == 3:
        v = v.unsqueeze(1)
    if v.ndim != 4 or tuple(v.shape[1:]) != (1, IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"values must have shape (N, 64), (N, 8, 8) or (N, 1, 8, 8), got {tuple(v.shape)}")
    return v / (MAX_GREY_LEVEL / 2) - 1.0


def split_indices(labels: np.ndarray, seed: int = SPLIT_SEED, test_fraction: float = TEST_FRACTION):
    """The fixed stratified split: (train_idx, test_idx), sorted, via scikit-learn's ``train_test_split``."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    train_idx, test_idx = train_test_split(idx, test_size=test_fraction, random_state=seed, stratify=labels)
    return np.sort(train_idx), np.sort(test_idx)


def load_digits_data(split: str = "all") -> tuple[torch.Tensor, torch.Tensor]:
    """Load scikit-learn's digits as (images float32 (N, 1, 8, 8) in [-1, 1], labels int64 (N,)).

    ``split``: ``"all"`` (1,797 images), ``"train"`` (80%, 1,437) or ``"test"`` (20%, 360) of the fixed
    stratified split with seed 0.
    """
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = scale_grey_levels(digits.images)
    labels = torch.as_tensor(digits.target, dtype=torch.int64)
    if split == "all":
        return images, labels
    train_idx, test_idx = split_indices(digits.target)
    idx = torch.as_tensor(train_idx if split == "train" else test_idx)
    return images[idx].contiguous(), labels[idx].contiguous()


DIGITS_VARIANTS = ("vp", "flow")


def load_digits_model(device=None, dtype: torch.dtype = torch.float32, path: str | Path | None = None, variant: str = "vp"):
    """Load a shipped class-conditional digits model: returns ``(unet, scheduler)``.

    ``variant``: "vp" (epsilon prediction, DDPM schedule, :data:`DIGITS_MODEL_PATH`) or "flow" (its rectified-flow
    twin, velocity prediction, :data:`DIGITS_FLOW_MODEL_PATH`).  ``unet`` is a ``diffusers.UNet2DModel`` in eval mode
    on ``device`` with ``dtype``; ``scheduler`` is the diffusers scheduler its folder names (``DDPMScheduler``,
    ``FlowMatchEulerDiscreteScheduler``).  ``path`` overrides the folder; the weights are read with
    ``use_safetensors=True`` only.
    """
    import diffusers
    from diffusers import UNet2DModel

    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point torch.dtype (e.g. torch.float32), got {dtype!r}")
    if variant not in DIGITS_VARIANTS:
        raise ValueError(f"variant must be one of {DIGITS_VARIANTS}, got {variant!r}")
    folder = Path(path) if path is not None else (DIGITS_MODEL_PATH if variant == "vp" else DIGITS_FLOW_MODEL_PATH)
    check_safetensors_folder(folder / "unet")
    unet = UNet2DModel.from_pretrained(folder, subfolder="unet", use_safetensors=True, torch_dtype=dtype)
    unet.eval().requires_grad_(False)
    if device is not None:
        unet.to(device)
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    name = config.get("_class_name", "DDPMScheduler")
    if name not in ("DDPMScheduler", "FlowMatchEulerDiscreteScheduler"):
        raise ValueError(f"{str(folder)!r} names the scheduler {name!r}; expected DDPMScheduler or FlowMatchEulerDiscreteScheduler")
    scheduler = getattr(diffusers, name).from_pretrained(folder, subfolder="scheduler")
    return unet, scheduler


__all__ = [
    "DIGITS_FLOW_WEAK_MODEL_PATH",
    "DIGITS_WEAK_MODEL_PATH",
    "DIGITS_FLOW_MODEL_PATH",
    "DIGITS_MODEL_PATH",
    "DIGITS_VARIANTS",
    "IMAGE_SIZE",
    "MAX_GREY_LEVEL",
    "NULL_CLASS",
    "NUM_CLASSES",
    "load_digits_data",
    "load_digits_model",
    "scale_grey_levels",
    "split_indices",
]
