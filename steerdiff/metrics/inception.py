"""The FID Inception-v3 in pure torch (torchvision is not needed), loading a user-supplied weights file.

FID (Heusel et al. 2017) is defined with the TensorFlow Inception-v3 graph of 2015-12-05; pytorch-fid ships
those weights as ``pt_inception-2015-12-05-6726825d.pth`` for torchvision's ``Inception3`` layout
(``num_classes=1008``, no auxiliary head) with four patches that reproduce the TensorFlow graph:

- the 3x3 average pools in the InceptionA (Mixed_5b-d), InceptionC (Mixed_6b-e) and first InceptionE
  (Mixed_7b) blocks ignore the zero padding (``count_include_pad=False``);
- the last InceptionE block (Mixed_7c) pools its pool branch with a 3x3 *max* pool.

This module builds that network with the same parameter names (``Conv2d_1a_3x3.conv.weight``,
``Mixed_7c.branch3x3dbl_3b.bn.running_var``, ``fc.weight``, ...), so the state dict of that file loads as is.
Features are the 2048-d output of the final average pool ("pool3").  Input pipeline, as pytorch-fid:
8-bit images / 255 in [0, 1], bilinear resize to 299x299 (``align_corners=False``), then 2x - 1.

Weights: a ``.safetensors`` file is loaded directly; a pickled ``.pth``/``.pt`` file only with an explicit
``allow_pickle=True`` and then through ``torch.load(weights_only=True)`` (tensors only, no code).  Nothing is
downloaded; ``scripts/convert_inception_weights.py`` converts the ``.pth`` to safetensors once.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..weights import PICKLE_SUFFIXES
from .classifier import quantize

FEATURE_DIM = 2048
NUM_CLASSES = 1008  # the 2015-12-05 graph's classifier (1000 ImageNet classes + 8 unused)
INPUT_SIZE = 299


class BasicConv2d(nn.Module):
    """conv (no bias) -> batch norm (eps 1e-3) -> ReLU."""

    def __init__(self, cin: int, cout: int, kernel, stride: int = 1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _pool3x3(x, kind: str):
    if kind == "max":
        return F.max_pool2d(x, 3, stride=1, padding=1)
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """Mixed_5b-d: 1x1 | 1x1 -> 5x5 | 1x1 -> 3x3 -> 3x3 | avgpool -> 1x1 (pool_features)."""

    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def forward(self, x):
        return torch.cat([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(_pool3x3(x, "avg")),
        ], 1)


class InceptionB(nn.Module):
    """Mixed_6a (grid reduction 35 -> 17): 3x3/2 | 1x1 -> 3x3 -> 3x3/2 | maxpool 3x3/2."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, 3, stride=2),
        ], 1)


class InceptionC(nn.Module):
    """Mixed_6b-e: factorized 7x7 convolutions with c7 channels inside."""

    def __init__(self, cin: int, c7: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, 1)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
        dbl = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            dbl = layer(dbl)
        return torch.cat([
            self.branch1x1(x),
            self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
            dbl,
            self.branch_pool(_pool3x3(x, "avg")),
        ], 1)


class InceptionD(nn.Module):
    """Mixed_7a (grid reduction 17 -> 8)."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x):
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):
    """Mixed_7b (``pool="avg"``) and Mixed_7c (``pool="max"``, the FID graph's quirk): expanded filter banks."""

    def __init__(self, cin: int, pool: str):
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        return torch.cat([
            self.branch1x1(x),
            self.branch3x3_2a(b3), self.branch3x3_2b(b3),
            self.branch3x3dbl_3a(dbl), self.branch3x3dbl_3b(dbl),
            self.branch_pool(_pool3x3(x, self.pool)),
        ], 1)


class FIDInceptionV3(nn.Module):
    """Inception-v3 of the FID graph; ``forward(x)`` maps (N, 3, 299, 299) inputs in [-1, 1] to pool3 (N, 2048)."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, 32)
        self.Mixed_5c = InceptionA(256, 64)
        self.Mixed_5d = InceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, 128)
        self.Mixed_6c = InceptionC(768, 160)
        self.Mixed_6d = InceptionC(768, 160)
        self.Mixed_6e = InceptionC(768, 192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")
        self.fc = nn.Linear(FEATURE_DIM, NUM_CLASSES)  # unused for features; part of the weights file

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)


def check_weights_file(path: str | Path, allow_pickle: bool = False) -> Path:
    """The weights path, after checking that it exists and that a pickle file was explicitly allowed."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"Inception weights file {str(path)!r} does not exist; steerdiff never downloads it. Get "
            "pt_inception-2015-12-05-6726825d.pth (pytorch-fid's FID weights), convert it once with "
            "scripts/convert_inception_weights.py, and point `weights` at the .safetensors file"
        )
    if path.suffix in PICKLE_SUFFIXES and not allow_pickle:
        raise ValueError(
            f"Inception weights file {str(path)!r} is a pickle; set allow_pickle: true to load it with "
            "torch.load(weights_only=True), or convert it to .safetensors with scripts/convert_inception_weights.py"
        )
    if path.suffix != ".safetensors" and path.suffix not in PICKLE_SUFFIXES:
        raise ValueError(f"Inception weights file {str(path)!r} must be .safetensors (or .pth with allow_pickle: true)")
    return path


def read_state_dict(path: str | Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    path = check_weights_file(path, allow_pickle)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{str(path)!r} does not hold a state dict of tensors")
    return state


def load_fid_inception(path: str | Path, allow_pickle: bool = False, device=None) -> FIDInceptionV3:
    """The FID Inception-v3 with the weights of ``path`` (eval mode, no gradients).

    Keys must match exactly (BatchNorm's ``num_batches_tracked`` counters may be absent or present)."""
    state = read_state_dict(path, allow_pickle)
    model = FIDInceptionV3()
    expected = {k for k in model.state_dict() if not k.endswith("num_batches_tracked")}
    found = {k for k in state if not k.endswith("num_batches_tracked")}
    if expected != found:
        missing, unexpected = sorted(expected - found), sorted(found - expected)
        raise ValueError(
            f"{str(path)!r} is not an FID Inception-v3 state dict (pytorch-fid / torchvision Inception3 key names): "
            f"{len(missing)} missing keys {missing[:3]}, {len(unexpected)} unexpected keys {unexpected[:3]}"
        )
    bad = [k for k in expected if tuple(state[k].shape) != tuple(model.state_dict()[k].shape)]
    if bad:
        raise ValueError(f"{str(path)!r}: wrong shapes for {bad[:3]}")
    model.load_state_dict({k: state[k] for k in expected}, strict=False)
    model.eval().requires_grad_(False)
    return model.to(device) if device is not None else model


@torch.no_grad()
def inception_features(images: torch.Tensor, model: FIDInceptionV3, batch_size: int = 50) -> torch.Tensor:
    """pool3 features (float64 (N, 2048)) of images in [-1, 1] of shape (N, 1 or 3, H, W), quantized to 8 bits
    first; grey images are repeated to 3 channels."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must have shape (N, 1 or 3, H, W), got {tuple(images.shape)}")
    device = next(model.parameters()).device
    out = []
    for start in range(0, images.shape[0], batch_size):
        x = quantize(images[start : start + batch_size]).to(device, torch.float32) / 255.0
        x = x.expand(-1, 3, -1, -1)
        x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
        out.append(model(2 * x - 1).to("cpu", torch.float64))
    return torch.cat(out) if out else torch.empty(0, FEATURE_DIM, dtype=torch.float64)
