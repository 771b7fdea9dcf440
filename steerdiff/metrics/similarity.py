"""Full-reference image similarity for restorations: PSNR and SSIM, per image, in float64.

Images are (N, C, H, W) in [-1, 1] and are compared on the [0, 1] scale (data range L = 1).

PSNR = 10 log10(L^2 / MSE), with the MSE floored at 1e-10 (100 dB) so that an exact restoration is finite.

SSIM (Wang, Bovik, Sheikh, Simoncelli 2004) with a small window for small images: local means, variances and
covariance over the ``window`` x ``window`` patch centred at every pixel (uniform weights; the image is
reflection-padded by window // 2 so that border pixels have patches too),

    SSIM = mean over pixels and channels of
           (2 mu_x mu_y + C1) (2 s_xy + C2) / ((mu_x^2 + mu_y^2 + C1) (s_x^2 + s_y^2 + C2)),
    C1 = (0.01 L)^2,  C2 = (0.03 L)^2,

with population local variances (clamped at 0 against round-off).  The paper's 11x11 Gaussian window does not
fit an 8x8 digit; the default 3x3 uniform window does.  This equals torchmetrics'
``structural_similarity_index_measure(..., gaussian_kernel=False, kernel_size=3, data_range=1)`` (tested).

As named metrics (``psnr``, ``ssim``) they score a set of restorations against their originals
(:attr:`~steerdiff.metrics.base.SampleSet.targets`): the mean over images, of the samples clipped to [-1, 1].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Metric, SampleSet

MAX_PSNR_DB = 100.0


def _unit(x: torch.Tensor, name: str) -> torch.Tensor:
    if not torch.is_tensor(x) or x.ndim != 4:
        raise ValueError(f"{name} must be a (N, C, H, W) tensor of images in [-1, 1]")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} has NaN/Inf values")
    return (x.to(torch.float64) + 1) / 2


def psnr(images: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """PSNR in dB per image, shape (N,)."""
    x, y = _unit(images, "images"), _unit(references, "references")
    if x.shape != y.shape:
        raise ValueError(f"images {tuple(x.shape)} and references {tuple(y.shape)} must have the same shape")
    mse = (x - y).square().flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(10 ** (-MAX_PSNR_DB / 10)))


def ssim(images: torch.Tensor, references: torch.Tensor, window: int = 3) -> torch.Tensor:
    """SSIM per image with a ``window`` x ``window`` uniform window (odd), shape (N,)."""
    x, y = _unit(images, "images"), _unit(references, "references")
    if x.shape != y.shape:
        raise ValueError(f"images {tuple(x.shape)} and references {tuple(y.shape)} must have the same shape")
    if window < 1 or window % 2 == 0 or window // 2 >= min(x.shape[-2:]):
        raise ValueError(f"window must be odd and smaller than twice the image size {tuple(x.shape[-2:])}, got {window}")
    c1, c2, p = 0.01**2, 0.03**2, window // 2
    pad = lambda t: F.pad(t, (p, p, p, p), mode="reflect") if p else t  # noqa: E731
    pool = lambda t: F.avg_pool2d(pad(t), window, stride=1)  # noqa: E731
    mx, my = pool(x), pool(y)
    vx, vy = (pool(x * x) - mx * mx).clamp_min(0), (pool(y * y) - my * my).clamp_min(0)
    cxy = pool(x * y) - mx * my
    s = (2 * mx * my + c1) * (2 * cxy + c2) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1)


class TargetSimilarity(Metric):
    """Mean similarity of each sample (clipped to [-1, 1]) to its target; subclasses set ``name`` and ``measure``."""

    needs_targets = True

    def measure(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, samples: SampleSet) -> dict[str, float]:
        if samples.targets is None:
            raise ValueError(f"{self.name} compares each sample with its original; only restorations have originals "
                             "(steerdiff restore)")
        x = samples.samples.to(torch.float64).clamp(-1, 1)
        return {self.name: float(self.measure(x, samples.targets.to(x.device, torch.float64)).mean())}


class PSNR(TargetSimilarity):
    """``psnr``: mean PSNR (dB) of the samples to their originals."""

    name = "psnr"
    keys = ("psnr",)

    def measure(self, images, targets):
        return psnr(images, targets)


class SSIM(TargetSimilarity):
    """``ssim``: mean SSIM of the samples to their originals (``window``: the odd side of the uniform window)."""

    name = "ssim"
    keys = ("ssim",)

    def __init__(self, window: int = 3):
        if isinstance(window, bool) or not isinstance(window, int) or window < 1 or window % 2 == 0:
            raise ValueError(f"ssim: window must be an odd integer >= 1, got {window!r}")
        self.window = window

    def fingerprint(self) -> str:
        return f"{self.name}:{self.window}"

    def measure(self, images, targets):
        return ssim(images, targets, self.window)


__all__ = ["MAX_PSNR_DB", "PSNR", "SSIM", "psnr", "ssim"]
