"""Measurement operators: adjoints, pseudo-inverses and projections checked against dense linear algebra; masks."""

import math

import pytest
import torch

from steerdiff.guidance.operators import (
    Colorization, Denoising, GaussianBlur, Inpainting, InverseProblem, MatrixOperator, SuperResolution, box_mask,
    extreme_mask, random_mask,
)

F64 = torch.float64


def gen(seed):
    return torch.Generator().manual_seed(seed)


def operators():
    """(operator, sample shape) pairs covering every operator, odd shapes and per-sample masks."""
    g = gen(0)
    return [
        (Inpainting(box_mask((5, 7), size=(2, 3))), (2, 5, 7)),
        (Inpainting(random_mask((5, 7), 0.5, generator=[gen(1), gen(2), gen(3)])), (2, 5, 7)),
        (Inpainting(torch.rand(2, 5, 7, generator=g) > 0.5), (2, 5, 7)),
        (Inpainting(extreme_mask((8, 8))), (1, 8, 8)),
        (SuperResolution(2), (3, 6, 8)),
        (SuperResolution(3), (1, 6, 9)),
        (GaussianBlur(3, 1.0), (2, 5, 6)),
        (GaussianBlur(5, 0.7, padding="zeros"), (1, 7, 6)),
        (Colorization(), (3, 4, 5)),
        (Denoising(), (2, 3, 4)),
        (MatrixOperator(torch.randn(7, 24, generator=g, dtype=F64), (2, 3, 4)), (2, 3, 4)),
    ]


IDS = ["box", "random-per-sample", "channel-mask", "extreme", "sr2", "sr3", "blur-circular", "blur-zeros",
       "colorization", "denoising", "matrix"]


@pytest.mark.parametrize("op,shape", operators(), ids=IDS)
def test_transpose_is_the_adjoint(op, shape):
    x = torch.randn(3, *shape, generator=gen(4), dtype=F64)
    y = torch.randn(3, *op.output_shape(shape), generator=gen(5), dtype=F64)
    lhs = (op.forward(x) * y).flatten(1).sum(1)
    rhs = (x * op.transpose(y)).flatten(1).sum(1)
    assert torch.allclose(lhs, rhs, rtol=1e-12, atol=1e-12)
    assert op.forward(x).shape == (3, *op.output_shape(shape))


@pytest.mark.parametrize("op,shape", [p for p in operators() if p[0].has_projection], ids=[
    i for i, p in zip(IDS, operators()) if p[0].has_projection])
def test_pinv_and_projections(op, shape):
    x = torch.randn(3, *shape, generator=gen(6), dtype=F64)
    y = torch.randn(3, *op.output_shape(shape), generator=gen(7), dtype=F64)
    p = op.project(x, y)
    # the projection lands on {A x = y} (up to the part of y outside the range of A), and is idempotent
    assert torch.allclose(op.forward(p), op.range_part(y), atol=1e-12)
    assert torch.allclose(op.project(p, y), p, atol=1e-12)
    # it moves x only along the row space: the null-space part is untouched
    assert torch.allclose(op.null_part(p), op.null_part(x), atol=1e-12)
    n = op.null_part(x)
    assert torch.allclose(op.null_part(n), n, atol=1e-12) and torch.allclose(op.forward(n), torch.zeros_like(op.forward(n)), atol=1e-12)
    if not getattr(op, "per_sample", False):  # A^+ against the dense Moore-Penrose pseudo-inverse
        a = op.matrix(shape)
        got = op.pinv(y).reshape(3, -1)
        assert torch.allclose(got, y.reshape(3, -1) @ torch.linalg.pinv(a).T, atol=1e-10)


def test_inpainting_projection_is_one_minus_m_x_plus_m_y():
    mask = box_mask((8, 8))
    x, y = torch.full((1, 1, 8, 8), 5.0), torch.full((1, 1, 8, 8), -3.0)
    p = Inpainting(mask).project(x, y)
    assert torch.equal(p[0, 0, 2:6, 2:6], torch.full((4, 4), 5.0))  # missing box keeps x
    assert bool((p[0, 0][mask[0]] == -3.0).all())  # measured pixels take y


def test_blur_has_no_projection_and_says_dps():
    with pytest.raises(ValueError, match="use DPS"):
        GaussianBlur(3, 1.0).project(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 4))


def test_blur_kernel_sums_to_one_and_keeps_constants():
    op = GaussianBlur(5, 1.3)
    assert math.isclose(float(op.kernel.sum()), 1.0, rel_tol=1e-14)
    assert torch.allclose(op.forward(torch.full((1, 2, 6, 6), -1.0, dtype=F64)), torch.full((1, 2, 6, 6), -1.0, dtype=F64))


def test_mask_makers():
    box = box_mask((8, 8))
    assert box.shape == (1, 8, 8) and not bool(box[0, 2:6, 2:6].any()) and int(box.sum()) == 48
    assert torch.equal(extreme_mask((8, 8)), ~box)
    assert int(box_mask((8, 8), size=2, center=(1, 1)).logical_not().sum()) == 4
    m = random_mask((8, 8), 0.8, generator=[gen(0), gen(1)])
    assert m.shape == (2, 1, 8, 8) and m.flatten(1).logical_not().sum(1).tolist() == [51, 51]
    assert torch.equal(m[1], random_mask((8, 8), 0.8, generator=[gen(1)])[0])  # independent of the batch
    assert not torch.equal(m[0], m[1])
    assert random_mask((8, 8), 0.5, generator=gen(3)).shape == (1, 8, 8)


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda: Inpainting(torch.full((8, 8), 0.5)), "only 0 .missing. and 1"),
        (lambda: Inpainting(torch.ones(1, 1, 1, 8, 8)), r"mask must have shape \(H, W\)"),
        (lambda: box_mask((8, 8), size=9), "box size must lie between 1 and the image size"),
        (lambda: random_mask((8, 8), 1.5), r"missing must be a fraction in \[0, 1\]"),
        (lambda: SuperResolution(0), "factor must be an integer >= 1"),
        (lambda: GaussianBlur(4, 1.0), "kernel_size must be an odd integer"),
        (lambda: GaussianBlur(3, 0.0), "sigma must be a finite number > 0"),
        (lambda: GaussianBlur(3, 1.0, padding="reflect"), "padding must be one of"),
        (lambda: InverseProblem(Denoising(), -0.1), "sigma_y must be a finite number >= 0"),
        (lambda: InverseProblem("mask", 0.1), "operator must be a steerdiff LinearOperator"),
        (lambda: MatrixOperator(torch.ones(3, 5), (1, 2, 2)), r"matrix must have shape \(m, 4\)"),
    ],
)
def test_bad_operator_arguments(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize(
    "op,shape,message",
    [
        (Inpainting(box_mask((8, 8))), (1, 16, 16), r"mask of shape \(1, 8, 8\) does not match the model's sample shape \(1, 16, 16\)"),
        (Inpainting(torch.ones(2, 8, 8)), (3, 8, 8), "does not match the model's sample shape"),
        (SuperResolution(3), (1, 8, 8), "needs H and W divisible by 3"),
        (Colorization(), (1, 8, 8), "needs an RGB model"),
    ],
)
def test_operator_rejects_sample_shape(op, shape, message):
    with pytest.raises(ValueError, match=message):
        op.check_sample_shape(shape)


def test_measurement_noise_only_on_measured_pixels():
    mask = box_mask((8, 8))
    problem = InverseProblem(Inpainting(mask), sigma_y=0.05)
    x0 = torch.zeros(2000, 1, 8, 8, dtype=F64)
    y = problem.measure(x0, generator=gen(0))
    assert bool((y[:, :, 2:6, 2:6] == 0).all())
    std = float(y[:, mask].std())
    assert abs(std - 0.05) < 0.05 * 5 / math.sqrt(2 * 2000 * 48)  # 5 standard errors of a sample std
    single = problem.measure(x0[:2], generator=[gen(3), gen(4)])
    assert torch.equal(single[1:], problem.measure(x0[:1], generator=[gen(4)]))


def test_check_measurement_errors():
    problem = InverseProblem(SuperResolution(2), 0.0)
    good = torch.zeros(2, 1, 4, 4)
    problem.check_measurement(good, (1, 8, 8))
    with pytest.raises(ValueError, match=r"measurement must have shape \(B, 1, 4, 4\), got \(2, 1, 8, 8\)"):
        problem.check_measurement(torch.zeros(2, 1, 8, 8), (1, 8, 8))
    bad = good.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="measurement has 1 NaN/Inf values"):
        problem.check_measurement(bad, (1, 8, 8))
