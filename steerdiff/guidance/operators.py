"""Linear measurement operators y = A x for inverse problems, and the masks of inpainting.

Every operator acts on a batch x of shape (B, C, H, W) (any C, H, W the operator allows) and provides

    forward(x)     A x
    transpose(y)   A^T y, the adjoint:  <A x, y> = <x, A^T y>
    range_part(y)  A A^+ y, the orthogonal projection of a measurement-space vector onto the range of A
                   (the identity unless measurements hold structurally unmeasured entries, as inpainting's do)

and, where it has a cheap closed form (``has_projection``), the Moore-Penrose pseudo-inverse and the two
projections the manifold-constrained samplers use (Chung et al. 2022, MCG, eq. 14):

    pinv(y)          A^+ y
    project(x, y)    x + A^+ (y - A x)   the point of {x : A x = y} closest to x ("data consistency")
    null_part(v)     v - A^+ A v         the component of v in the null space of A (the unmeasured part)

For inpainting with mask M (1 = measured), these read A x = M x, A^+ = A^T = M, project(x, y) = (1 - M) x + M y
and null_part(v) = (1 - M) v.  A common bug in reference code writes the projection as (1 - M) y - M x.

The measurement noise sigma_y is a property of the problem, not of the operator: see :class:`InverseProblem`.
Operators hold no state that depends on the batch except per-sample inpainting masks, and allocate nothing
on the host; every method is batched and keeps the sample's device and dtype.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..core.sde import sample_noise
from ..core.tensors import check_finite


def _shape3(sample_shape: Sequence[int]) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in sample_shape)
    if len(shape) != 3 or any(s < 1 for s in shape):
        raise ValueError(f"sample_shape must be (C, H, W) with positive sizes, got {shape}")
    return shape


class LinearOperator:
    """Base class: a linear map from samples (B, *input) to measurements (B, *output)."""

    has_projection = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def transpose(self, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def output_shape(self, sample_shape: Sequence[int]) -> tuple[int, ...]:
        """Shape of one measurement for a sample of shape (C, H, W); raises if the operator cannot act on it."""
        raise NotImplementedError

    def check_sample_shape(self, sample_shape: Sequence[int]) -> tuple[int, ...]:
        """Validate that the operator acts on samples of ``sample_shape``; returns the measurement shape."""
        return self.output_shape(sample_shape)

    def range_part(self, y: torch.Tensor) -> torch.Tensor:
        return y

    def pinv(self, y: torch.Tensor) -> torch.Tensor:
        raise ValueError(
            f"{type(self).__name__} has no closed-form pseudo-inverse, so no projection onto its measurements; "
            "methods that project (MCG, projection-only) cannot use it: use DPS, which does not project"
        )

    def project(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x + self.pinv(y - self.forward(x))

    def null_part(self, v: torch.Tensor) -> torch.Tensor:
        return v - self.pinv(self.forward(v))

    def matrix(self, sample_shape: Sequence[int], dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The dense matrix of A on flattened samples, shape (prod(output_shape), C*H*W) (for small problems)."""
        shape = _shape3(sample_shape)
        d = math.prod(shape)
        basis = torch.eye(d, dtype=dtype).reshape(d, *shape)
        return self.forward(basis).reshape(d, -1).T.contiguous()

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


# -- inpainting ---------------------------------------------------------------------------------------------------


class Inpainting(LinearOperator):
    """A x = M * x with a binary mask M (1 = measured pixel, 0 = missing).

    ``mask``: (H, W), (1 or C, H, W) or (1, 1 or C, H, W) shared by the batch (a leading 1 broadcasts, as torch
    users expect and diffusers' mask processor returns), or (B, 1 or C, H, W) one per sample.  Measurements
    keep the sample's shape, with zeros where the mask is 0.  A is an orthogonal projection, so
    A^T = A^+ = A and every method is a multiplication by M.
    """

    has_projection = True

    def __init__(self, mask: torch.Tensor):
        mask = torch.as_tensor(mask)
        if mask.ndim == 2:
            mask = mask[None]
        if mask.ndim == 4 and mask.shape[0] == 1:  # one mask for the whole batch
            mask = mask[0]
        if mask.ndim not in (3, 4):
            raise ValueError(f"mask must have shape (H, W), (C, H, W) or (B, C, H, W), got {tuple(mask.shape)}")
        if mask.dtype != torch.bool:
            if not bool(((mask == 0) | (mask == 1)).all()):
                raise ValueError("mask must hold only 0 (missing) and 1 (measured)")
        self.mask = mask.to(torch.bool)

    @property
    def per_sample(self) -> bool:
        return self.mask.ndim == 4

    def output_shape(self, sample_shape):
        c, h, w = _shape3(sample_shape)
        mc, mh, mw = self.mask.shape[-3:]
        if (mh, mw) != (h, w) or mc not in (1, c):
            raise ValueError(
                f"mask of shape {tuple(self.mask.shape)} does not match the model's sample shape {(c, h, w)}: "
                f"expected ({h}, {w}), (1 or {c}, {h}, {w}) or (B, 1 or {c}, {h}, {w})"
            )
        return (c, h, w)

    def _m(self, x: torch.Tensor) -> torch.Tensor:
        mc, mh, mw = self.mask.shape[-3:]
        if x.ndim != 4 or (mh, mw) != tuple(x.shape[-2:]) or mc not in (1, x.shape[1]):
            raise ValueError(
                f"mask of shape {tuple(self.mask.shape)} does not fit samples of shape {tuple(x.shape)}: expected "
                f"(H, W) = {tuple(x.shape[-2:])} and 1 or {x.shape[1] if x.ndim == 4 else '?'} channels"
            )
        if self.per_sample and self.mask.shape[0] != x.shape[0]:
            raise ValueError(f"mask holds {self.mask.shape[0]} per-sample masks for a batch of {x.shape[0]}")
        return self.mask.to(device=x.device, dtype=x.dtype)

    def forward(self, x):
        return self._m(x) * x

    transpose = forward
    range_part = forward
    pinv = forward

    def project(self, x, y):
        m = self._m(x)
        return (1 - m) * x + m * y

    def null_part(self, v):
        return (1 - self._m(v)) * v

    def matrix(self, sample_shape, dtype=torch.float64):
        if self.per_sample:
            raise ValueError("matrix() needs a mask shared by the batch, not per-sample masks")
        return super().matrix(sample_shape, dtype)

    def __repr__(self):
        return f"Inpainting(mask={tuple(self.mask.shape)}, measured={float(self.mask.float().mean()):.3f})"


def _box(h: int, w: int, size, center) -> tuple[slice, slice]:
    bh, bw = (size, size) if isinstance(size, int) else tuple(size)
    if not (1 <= bh <= h and 1 <= bw <= w):
        raise ValueError(f"box size must lie between 1 and the image size ({h}, {w}), got {(bh, bw)}")
    ch, cw = (h / 2, w / 2) if center is None else center
    top, left = int(round(ch - bh / 2)), int(round(cw - bw / 2))
    if not (0 <= top <= h - bh and 0 <= left <= w - bw):
        raise ValueError(f"a {(bh, bw)} box centred at {(ch, cw)} does not fit in a {(h, w)} image")
    return slice(top, top + bh), slice(left, left + bw)


def box_mask(image_size: Sequence[int], size: int | Sequence[int] | None = None, center=None) -> torch.Tensor:
    """A (1, H, W) mask with a missing box (0) of ``size`` (default: half of each side) centred at ``center``
    (default: the image centre); for 8x8 images the default hides the central 4x4 block."""
    h, w = (int(s) for s in image_size[-2:])
    rows, cols = _box(h, w, size if size is not None else (h // 2, w // 2), center)
    mask = torch.ones(1, h, w, dtype=torch.bool)
    mask[:, rows, cols] = False
    return mask


def extreme_mask(image_size: Sequence[int], size: int | Sequence[int] | None = None, center=None) -> torch.Tensor:
    """The inverse box: only a central box of ``size`` (default: half of each side) is measured."""
    return ~box_mask(image_size, size, center)


def random_mask(
    image_size: Sequence[int],
    missing: float,
    generator: torch.Generator | list[torch.Generator] | None = None,
    batch_size: int | None = None,
) -> torch.Tensor:
    """Random-pixel masks with exactly round(missing * H * W) missing pixels each.

    With a list of generators (one per sample) returns (B, 1, H, W), mask i drawn from generator i alone;
    otherwise one (1, H, W) mask, or (batch_size, 1, H, W) when ``batch_size`` is given.
    """
    if not 0.0 <= float(missing) <= 1.0:
        raise ValueError(f"missing must be a fraction in [0, 1], got {missing}")
    h, w = (int(s) for s in image_size[-2:])
    n_missing = int(round(float(missing) * h * w))
    gens = generator if isinstance(generator, list) else None
    count = len(gens) if gens is not None else (batch_size or 1)
    if gens is None:
        scores = torch.rand(count, h * w, generator=generator)
    else:
        scores = torch.stack([torch.rand(h * w, generator=g, device=g.device).cpu() for g in gens])
    order = scores.argsort(dim=1)
    mask = torch.ones(count, h * w, dtype=torch.bool)
    mask.scatter_(1, order[:, :n_missing], False)
    mask = mask.reshape(count, 1, h, w)
    return mask if (gens is not None or batch_size is not None) else mask[0]


# -- resolution, blur, colour, noise -------------------------------------------------------------------------------


class SuperResolution(LinearOperator):
    """Block averaging by ``factor``: (B, C, H, W) -> (B, C, H/f, W/f).

    A A^T = I / f^2, so A^+ = f^2 A^T is nearest-neighbour upsampling and the projection is exact.
    (DPS's reference code downsamples bicubically; block averaging keeps A^+ in closed form.)
    """

    has_projection = True

    def __init__(self, factor: int = 2):
        if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
            raise ValueError(f"factor must be an integer >= 1, got {factor!r}")
        self.factor = factor

    def output_shape(self, sample_shape):
        c, h, w = _shape3(sample_shape)
        f = self.factor
        if h % f or w % f:
            raise ValueError(f"SuperResolution(factor={f}) needs H and W divisible by {f}, got sample shape {(c, h, w)}")
        return (c, h // f, w // f)

    def forward(self, x):
        return F.avg_pool2d(x, self.factor)

    def pinv(self, y):
        return y.repeat_interleave(self.factor, dim=-2).repeat_interleave(self.factor, dim=-1)

    def transpose(self, y):
        return self.pinv(y) / self.factor**2

    def __repr__(self):
        return f"SuperResolution(factor={self.factor})"


BLUR_PADDINGS = ("circular", "zeros")


class GaussianBlur(LinearOperator):
    """Convolution of every channel with a normalised Gaussian kernel of odd ``kernel_size`` and std ``sigma``.

    ``padding``: "circular" (default; exact adjoint, no dark or grey frame) or "zeros".  A is (nearly)
    invertible but badly conditioned, so it offers no projection: MCG refuses it, DPS handles it.
    """

    def __init__(self, kernel_size: int = 3, sigma: float = 1.0, padding: str = "circular"):
        if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be an odd integer >= 1, got {kernel_size!r}")
        if not float(sigma) > 0 or not math.isfinite(float(sigma)):
            raise ValueError(f"sigma must be a finite number > 0, got {sigma}")
        if padding not in BLUR_PADDINGS:
            raise ValueError(f"padding must be one of {BLUR_PADDINGS}, got {padding!r}")
        self.kernel_size, self.sigma, self.padding = kernel_size, float(sigma), padding
        r = torch.arange(kernel_size, dtype=torch.float64) - kernel_size // 2
        g = torch.exp(-0.5 * (r / self.sigma) ** 2)
        k2 = torch.outer(g, g)
        self.kernel = k2 / k2.sum()

    def output_shape(self, sample_shape):
        c, h, w = _shape3(sample_shape)
        if self.padding == "circular" and self.kernel_size // 2 > min(h, w):
            raise ValueError(f"kernel_size {self.kernel_size} is too large for circular padding of {(h, w)} images")
        return (c, h, w)

    def _conv(self, x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
        c, p = x.shape[-3], self.kernel_size // 2
        weight = kernel.to(device=x.device, dtype=x.dtype).expand(c, 1, -1, -1)
        if self.padding == "circular":
            return F.conv2d(F.pad(x, (p, p, p, p), mode="circular"), weight, groups=c)
        return F.conv2d(x, weight, padding=p, groups=c)

    def forward(self, x):
        return self._conv(x, self.kernel)

    def transpose(self, y):
        # the adjoint of a (circular or zero-padded) convolution is the correlation with the flipped kernel
        return self._conv(y, self.kernel.flip(0, 1))

    def __repr__(self):
        return f"GaussianBlur(kernel_size={self.kernel_size}, sigma={self.sigma}, padding={self.padding!r})"


class Colorization(LinearOperator):
    """Grey level = mean of the three RGB channels: (B, 3, H, W) -> (B, 1, H, W).

    A A^T = I / 3, so A^+ = 3 A^T copies the grey level to every channel.
    """

    has_projection = True

    def output_shape(self, sample_shape):
        c, h, w = _shape3(sample_shape)
        if c != 3:
            raise ValueError(f"Colorization needs an RGB model (3 channels), got sample shape {(c, h, w)}")
        return (1, h, w)

    def forward(self, x):
        return x.mean(dim=-3, keepdim=True)

    def pinv(self, y):
        return y.expand(*y.shape[:-3], 3, *y.shape[-2:]).clone()

    def transpose(self, y):
        return self.pinv(y) / 3


class Denoising(LinearOperator):
    """A = I: the measurement is the image itself (plus the problem's noise)."""

    has_projection = True

    def output_shape(self, sample_shape):
        return _shape3(sample_shape)

    def forward(self, x):
        return x

    transpose = forward
    pinv = forward

    def project(self, x, y):
        return y

    def null_part(self, v):
        return torch.zeros_like(v)


class MatrixOperator(LinearOperator):
    """A dense matrix A of shape (m, C*H*W) acting on flattened samples: (B, C, H, W) -> (B, m).

    The pseudo-inverse is computed once in float64 (``torch.linalg.pinv``), so the projection exists for any A.
    """

    has_projection = True

    def __init__(self, matrix: torch.Tensor, sample_shape: Sequence[int]):
        matrix = torch.as_tensor(matrix)
        self.sample_shape = _shape3(sample_shape)
        if matrix.ndim != 2 or matrix.shape[1] != math.prod(self.sample_shape):
            raise ValueError(
                f"matrix must have shape (m, {math.prod(self.sample_shape)}) for samples of shape {self.sample_shape}, "
                f"got {tuple(matrix.shape)}"
            )
        check_finite(matrix, "matrix")
        self.A = matrix.to(torch.float64)
        self.A_pinv = torch.linalg.pinv(self.A)

    def output_shape(self, sample_shape):
        if _shape3(sample_shape) != self.sample_shape:
            raise ValueError(f"this MatrixOperator acts on samples of shape {self.sample_shape}, got {tuple(sample_shape)}")
        return (self.A.shape[0],)

    def _apply(self, m: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return v.flatten(1) @ m.to(device=v.device, dtype=v.dtype).T

    def forward(self, x):
        return self._apply(self.A, x)

    def transpose(self, y):
        return self._apply(self.A.T, y).reshape(y.shape[0], *self.sample_shape)

    def pinv(self, y):
        return self._apply(self.A_pinv, y).reshape(y.shape[0], *self.sample_shape)

    def range_part(self, y):
        return self._apply(self.A @ self.A_pinv, y)

    def __repr__(self):
        return f"MatrixOperator({self.A.shape[0]}x{self.A.shape[1]})"


# -- the measurement model -----------------------------------------------------------------------------------------


class InverseProblem:
    """y = A x + sigma_y n,  n ~ N(0, I) on the range of A (measured entries only, for inpainting).

    ``sigma_y`` is in the units of the samples (data in [-1, 1]: sigma_y = 0.05 is DPS's setting).
    """

    def __init__(self, operator: LinearOperator, sigma_y: float = 0.0):
        if not isinstance(operator, LinearOperator):
            raise ValueError(f"operator must be a steerdiff LinearOperator, got {type(operator).__name__}")
        sigma_y = float(sigma_y)
        if not math.isfinite(sigma_y) or sigma_y < 0:
            raise ValueError(f"sigma_y must be a finite number >= 0 (the std of the measurement noise), got {sigma_y}")
        self.operator, self.sigma_y = operator, sigma_y

    def measure(self, x0: torch.Tensor, generator=None) -> torch.Tensor:
        """A noisy measurement of ``x0``; one generator per sample makes each measurement batch-independent."""
        y = self.operator.forward(x0)
        if self.sigma_y == 0:
            return y
        noise = sample_noise(y.shape, generator, y.device, y.dtype)
        return y + self.sigma_y * self.operator.range_part(noise)

    def check_measurement(self, y: torch.Tensor, sample_shape: Sequence[int], batch_size: int | None = None) -> None:
        """Raise a ValueError unless ``y`` is a finite (B, *output_shape) measurement for samples of that shape."""
        expected = self.operator.check_sample_shape(sample_shape)
        if not torch.is_tensor(y) or not y.is_floating_point():
            raise ValueError(f"measurement must be a floating-point tensor of shape (B, {', '.join(map(str, expected))})")
        if tuple(y.shape[1:]) != expected or (batch_size is not None and y.shape[0] != batch_size):
            b = batch_size if batch_size is not None else "B"
            raise ValueError(f"measurement must have shape ({b}, {', '.join(map(str, expected))}), got {tuple(y.shape)}")
        if not bool(torch.isfinite(y).all()):
            raise ValueError(f"measurement has {int((~torch.isfinite(y)).sum())} NaN/Inf values")

    def __repr__(self):
        return f"InverseProblem({self.operator!r}, sigma_y={self.sigma_y})"


__all__ = [
    "BLUR_PADDINGS", "Colorization", "Denoising", "GaussianBlur", "Inpainting", "InverseProblem", "LinearOperator",
    "MatrixOperator", "SuperResolution", "box_mask", "extreme_mask", "random_mask",
]
