"""How an 8-bit image becomes a feature network's input: the three preprocessing modes of the FID tools.

The same images give different FIDs in pytorch-fid, clean-fid and torch-fidelity because each resizes them to the
network's input size in its own way (Parmar et al. 2022, "On Aliased Resizing and Surprising Subtleties in GAN
Evaluation").  Each mode is written here from that tool's code, so a number a paper reports with a tool can be
reproduced:

- ``"pytorch-fid"`` (default; Seitzer's pytorch-fid): u8 / 255 in [0, 1], then ``F.interpolate(bilinear,
  align_corners=False)`` (antialias off) on the [0, 1] floats; Inception input 2x - 1.
- ``"clean"`` (clean-fid's mode "clean"): each channel of the u8 image as a float32 PIL image (mode "F"), resized
  with PIL's bicubic filter (which low-passes when it shrinks), clipped to [0, 255]; Inception input (x - 128) / 128.
- ``"torch-fidelity"``: u8 as float32, resized with TensorFlow 1.x's bilinear rule (source coordinate
  dst * in / out, no half-pixel offset, the upper neighbour clamped at the border); Inception input (x - 128) / 128.

:func:`resize_for_network` takes (N, 3, H, W) uint8 images and returns float32 (N, 3, size, size) on the mode's
scale (``MODES[mode].scale``: 1 for pytorch-fid, 255 for the other two); the network then normalises them
(:meth:`steerdiff.metrics.features.FeatureSpace.normalize`).  Images already at the network's size are not resized
(as in the three tools).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Mode:
    name: str
    scale: float  # the resized values lie in [0, scale]
    tool: str


MODES = {
    "pytorch-fid": Mode("pytorch-fid", 1.0, "pytorch-fid (bilinear resize of u8 / 255, align_corners=False)"),
    "clean": Mode("clean", 255.0, "clean-fid's clean mode (PIL bicubic resize of each channel as float32)"),
    "torch-fidelity": Mode("torch-fidelity", 255.0, "torch-fidelity (TensorFlow 1.x bilinear resize of u8 as float32)"),
}


def check_mode(mode: str) -> Mode:
    if mode not in MODES:
        raise ValueError(f"preprocessing mode {mode!r} is not one of {', '.join(MODES)}")
    return MODES[mode]


def tf1_bilinear(x: torch.Tensor, size: int) -> torch.Tensor:
    """TensorFlow 1.x's ``resize_bilinear(align_corners=False)`` of float (N, C, H, W): output pixel i samples the
    input at i * in / out (no half-pixel offset), between floor and floor + 1 (clamped to the last row / column)."""

    def axis(n_in: int):
        pos = torch.arange(size, dtype=torch.float32) * torch.tensor(n_in / size, dtype=torch.float32)
        lo = pos.long()
        return lo, (lo + 1).clamp_max(n_in - 1), pos - lo.float()

    y0, y1, dy = axis(x.shape[2])
    x0, x1, dx = axis(x.shape[3])
    dx, dy = dx.to(x.device, x.dtype), dy.to(x.device, x.dtype)
    top = x[:, :, y0.to(x.device)]
    bottom = x[:, :, y1.to(x.device)]
    top = top[..., x0.to(x.device)] + (top[..., x1.to(x.device)] - top[..., x0.to(x.device)]) * dx
    bottom = bottom[..., x0.to(x.device)] + (bottom[..., x1.to(x.device)] - bottom[..., x0.to(x.device)]) * dx
    return top + (bottom - top) * dy.view(-1, 1)


def pil_bicubic(image: np.ndarray, size: int) -> np.ndarray:
    """clean-fid's resize of one (H, W, 3) uint8 image: each channel as a float32 PIL image, bicubic, clipped."""
    from PIL import Image

    channels = [np.asarray(Image.fromarray(image[:, :, c].astype(np.float32), mode="F")
                           .resize((size, size), resample=Image.BICUBIC)).clip(0, 255) for c in range(image.shape[2])]
    return np.stack(channels, axis=0).astype(np.float32)


def resize_for_network(images: torch.Tensor, size: int, mode: str = "pytorch-fid") -> torch.Tensor:
    """(N, 3, H, W) uint8 -> float32 (N, 3, size, size) resized as ``mode`` does, on its scale (module docstring)."""
    spec = check_mode(mode)
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"images must be (N, C, H, W) uint8, got {tuple(images.shape)} {images.dtype}")
    x = images.to(torch.float32).contiguous()  # NCHW memory as the tools' ToTensor gives: the same convolution order
    if spec.name == "pytorch-fid":
        x = x / 255.0
    if tuple(x.shape[2:]) == (size, size):
        return x
    if spec.name == "pytorch-fid":
        return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    if spec.name == "torch-fidelity":
        return tf1_bilinear(x, size)
    out = [torch.from_numpy(pil_bicubic(img.permute(1, 2, 0).cpu().numpy(), size)) for img in images]
    return torch.stack(out).to(images.device)


__all__ = ["MODES", "check_mode", "pil_bicubic", "resize_for_network", "tf1_bilinear"]
