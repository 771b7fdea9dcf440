"""The digits classifier and the feature space of the digits Frechet distance.

A small CNN (``DigitsClassifier``) trained on the 80% split of scikit-learn's digits (fixed stratified split,
seed 0; see ``steerdiff.testbeds.digits``) and shipped as safetensors in
``steerdiff/testbeds/assets/digits_classifier``.  It plays for the 8x8 digits the role Inception-v3 plays
for FID on natural images (Heusel et al. 2017): its penultimate layer is the feature space in which the
digits Frechet distance is computed, and its predictions give the class accuracy of conditional samples.

Architecture (input (N, 1, 8, 8) in [-1, 1])
    conv3x3(1 -> 32) ReLU, conv3x3(32 -> 64) ReLU, maxpool 2      -> (64, 4, 4)
    conv3x3(64 -> 128) ReLU, maxpool 2                             -> (128, 2, 2) -> flatten 512
    linear(512 -> 64) SiLU                                         -> features, d = 64 (penultimate layer)
    dropout, linear(64 -> 10)                                      -> logits

Feature dimension d = 64
    Large enough to carry within-class style (stroke width, slant, the shape variants of 1, 4, 7) beyond
    the 10 class directions, small enough that the d x d covariance (2,080 free entries) is well estimated
    from the ~900-1,800 images a digits FD compares: N / d >= 14 for each half of the data set, whereas
    d = 128 would put the halves at N / d ~ 7 and make the FD dominated by estimation noise.  The
    penultimate activation is SiLU rather than ReLU: with ReLU about 40% of the 64 units were exactly zero
    on every digit (dead units), which silently shrinks the feature space and makes the covariance singular.

Quantization (as the field does before computing features)
    Images x in [-1, 1] are first turned into 8-bit images, u8 = clip(round((x + 1) * 127.5), 0, 255)
    (``quantize``), and the network reads u8 / 127.5 - 1 (``dequantize``).  Data images go through the same
    path, so generated and real images are compared at the same precision.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..weights import PICKLE_SUFFIXES

CLASSIFIER_PATH = Path(__file__).resolve().parents[1] / "testbeds" / "assets" / "digits_classifier"
"""The shipped classifier folder: ``config.json`` and ``model.safetensors``."""

FEATURE_DIM = 64
"""Dimension of the penultimate-layer features."""


class DigitsClassifier(nn.Module):
    """CNN classifier of 8x8 digits; ``features(x)`` is the penultimate layer, ``forward(x)`` the logits.

    ``x``: float (N, 1, 8, 8) in [-1, 1].
    """

    def __init__(
        self,
        channels: tuple[int, int, int] = (32, 64, 128),
        feature_dim: int = FEATURE_DIM,
        num_classes: int = 10,
        dropout: float = 0.3,
        image_size: int = 8,
    ):
        super().__init__()
        if image_size % 4 != 0:
            raise ValueError(f"image_size must be a multiple of 4, got {image_size}")
        c1, c2, c3 = channels
        self.config = {
            "channels": list(channels),
            "feature_dim": feature_dim,
            "num_classes": num_classes,
            "dropout": dropout,
            "image_size": image_size,
        }
        self.body = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(c1, c2, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c2, c3, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(c3 * (image_size // 4) ** 2, feature_dim),
            nn.SiLU(),
        )
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(feature_dim, num_classes)

    def _check(self, x: torch.Tensor) -> None:
        s = self.config["image_size"]
        if x.ndim != 4 or tuple(x.shape[1:]) != (1, s, s):
            raise ValueError(f"x must have shape (N, 1, {s}, {s}), got {tuple(x.shape)}")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer activations, shape (N, feature_dim)."""
        self._check(x)
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits, shape (N, num_classes)."""
        return self.head(self.dropout(self.features(x)))


def _as_image_batch(images, name: str = "images") -> torch.Tensor:
    t = images if isinstance(images, torch.Tensor) else torch.as_tensor(np.asarray(images))
    if t.ndim == 3:
        t = t.unsqueeze(1)
    if t.ndim != 4 or t.shape[1] != 1:
        raise ValueError(f"{name} must have shape (N, 1, H, W) or (N, H, W), got {tuple(t.shape)}")
    return t


def quantize(images) -> torch.Tensor:
    """8-bit quantization u8 = clip(round((x + 1) * 127.5), 0, 255) of images x in [-1, 1] (uint8 tensor).

    Accepts a float numpy array or torch tensor of any shape; raises ``ValueError`` on nan/inf.
    """
    t = images if isinstance(images, torch.Tensor) else torch.as_tensor(np.asarray(images))
    if not torch.is_floating_point(t):
        raise TypeError(f"images must be floating point in [-1, 1], got dtype {t.dtype}")
    t = t.detach().to(dtype=torch.float32)
    if not torch.isfinite(t).all():
        raise ValueError("images contains non-finite values (nan or inf)")
    return torch.round((t + 1.0) * 127.5).clamp_(0, 255).to(torch.uint8)


def dequantize(u8) -> torch.Tensor:
    """u8 / 127.5 - 1: 8-bit images back to float32 in [-1, 1]."""
    t = u8 if isinstance(u8, torch.Tensor) else torch.as_tensor(np.asarray(u8))
    if t.dtype != torch.uint8:
        raise TypeError(f"u8 must be a uint8 array or tensor, got dtype {t.dtype}")
    return t.to(torch.float32) / 127.5 - 1.0


def _check_weights_file(folder: Path) -> Path:
    if not folder.is_dir():
        raise FileNotFoundError(f"classifier folder {str(folder)!r} does not exist")
    weights = folder / "model.safetensors"
    if not weights.is_file():
        found = sorted(p.name for p in folder.iterdir() if p.suffix in (*PICKLE_SUFFIXES, ".safetensors"))
        raise ValueError(
            f"{str(folder)!r} holds no model.safetensors (found: {', '.join(found) or 'no weights file'}); "
            "the classifier is loaded with safetensors only, never from pickled .bin/.pt files"
        )
    return weights


def load_digits_classifier(device=None, path: str | Path | None = None) -> DigitsClassifier:
    """Load the shipped digits classifier (eval mode, no gradients) from ``path`` (default ``CLASSIFIER_PATH``)."""
    from safetensors.torch import load_file

    folder = Path(path) if path is not None else CLASSIFIER_PATH
    weights = _check_weights_file(folder)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"classifier folder {str(folder)!r} has no config.json")
    config = json.loads(config_file.read_text())
    model = DigitsClassifier(
        channels=tuple(config["channels"]),
        feature_dim=config["feature_dim"],
        num_classes=config["num_classes"],
        dropout=config.get("dropout", 0.0),
        image_size=config.get("image_size", 8),
    )
    model.load_state_dict(load_file(str(weights)), strict=True)
    model.eval().requires_grad_(False)
    if device is not None:
        model.to(device)
    return model


@lru_cache(maxsize=4)
def _cached_classifier(device: str) -> DigitsClassifier:
    return load_digits_classifier(device=device)


def _prepare(images) -> torch.Tensor:
    """Quantize float images (or take uint8 ones as already quantized) and dequantize for the network."""
    t = _as_image_batch(images)
    u8 = t if t.dtype == torch.uint8 else quantize(t)
    return dequantize(u8)


def _in_batches(fn, images, batch_size: int, model: DigitsClassifier) -> list[torch.Tensor]:
    """``fn`` on the quantized ``images`` in batches of ``batch_size`` on the model's device; results on the CPU."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    dev = next(model.parameters()).device
    x = _prepare(images)
    return [fn(x[i : i + batch_size].to(dev)).cpu() for i in range(0, x.shape[0], batch_size)]


@torch.no_grad()
def digits_features(images, batch_size: int = 1000, classifier: DigitsClassifier | None = None, device=None) -> torch.Tensor:
    """Penultimate-layer features of the digits classifier, float64 (N, 64).

    ``images``: float (N, 1, 8, 8) or (N, 8, 8) in [-1, 1] (quantized to 8 bits first), or uint8 images
    already quantized.  ``classifier`` defaults to the shipped one.
    """
    model = classifier if classifier is not None else _cached_classifier(str(device or "cpu"))
    out = _in_batches(model.features, images, batch_size, model)
    return torch.cat(out).to(torch.float64) if out else torch.empty(0, model.config["feature_dim"], dtype=torch.float64)


@torch.no_grad()
def classify_digits(images, batch_size: int = 1000, classifier: DigitsClassifier | None = None, device=None) -> torch.Tensor:
    """Predicted class ids (int64, (N,)) of images, after the same 8-bit quantization as ``digits_features``."""
    model = classifier if classifier is not None else _cached_classifier(str(device or "cpu"))
    out = _in_batches(lambda x: model(x).argmax(dim=1), images, batch_size, model)
    return torch.cat(out) if out else torch.empty(0, dtype=torch.int64)


__all__ = [
    "CLASSIFIER_PATH",
    "FEATURE_DIM",
    "DigitsClassifier",
    "classify_digits",
    "dequantize",
    "digits_features",
    "load_digits_classifier",
    "quantize",
]
