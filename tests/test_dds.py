"""The Decomposed Diffusion Sampler (Chung, Lee, Ye 2024): its conjugate gradients against a direct solve of the same
normal equations (per sample), its step against the official code's update written out, and DDS in the restoration
pipeline and ``steerdiff restore`` by name."""

from __future__ import annotations

import math

import pytest
import torch

from steerdiff.guidance.dds import DDS, conjugate_gradient, normal_equations
from steerdiff.guidance.operators import MatrixOperator


def _problem(seed=0, m=5, shape=(1, 3, 4), batch=3):
    g = torch.Generator().manual_seed(seed)
    d = math.prod(shape)
    a = torch.randn(m, d, generator=g, dtype=torch.float64)
    op = MatrixOperator(a, shape)
    x0 = torch.randn(batch, *shape, generator=g, dtype=torch.float64)
    y = torch.randn(batch, m, generator=g, dtype=torch.float64)
    return a, op, x0, y


def test_cg_solves_the_noisy_normal_equations_like_a_direct_solve():
    a, op, x0, y = _problem()
    gamma = 0.7
    apply, b = normal_equations(op, y, x0, sigma_y=0.05, gamma=gamma)
    x = conjugate_gradient(apply, b, x0, steps=12)  # d = 12 iterations: exact in exact arithmetic
    lhs = torch.eye(12, dtype=torch.float64) + gamma * a.T @ a
    direct = torch.linalg.solve(lhs, (x0.flatten(1) + gamma * y @ a).T).T
    assert torch.allclose(x.flatten(1), direct, atol=1e-10, rtol=0)


def test_cg_on_the_singular_normal_equations_stays_in_the_krylov_space_of_the_start():
    """sigma_y = 0: A^T A x = A^T y has many solutions; CG from x0_hat reaches the one nearest x0_hat,
    x0_hat + A^+ (y - A x0_hat) (its correction lies in the range of A^T, the Krylov subspace)."""
    a, op, x0, y = _problem(seed=1)
    apply, b = normal_equations(op, y, x0, sigma_y=0.0, gamma=1.0)
    x = conjugate_gradient(apply, b, x0, steps=5)  # rank 5: converged after 5 steps
    nearest = x0.flatten(1) + (y - x0.flatten(1) @ a.T) @ torch.linalg.pinv(a).T
    assert torch.allclose(x.flatten(1), nearest, atol=1e-9, rtol=0)
    alone = [conjugate_gradient(apply_i, b_i, x0[i : i + 1], steps=5) for i, (apply_i, b_i) in
             enumerate(normal_equations(op, y[i : i + 1], x0[i : i + 1], 0.0, 1.0) for i in range(3))]
    assert torch.allclose(torch.cat(alone), x, atol=1e-12, rtol=0)  # per sample: the batch does not couple them
    few = conjugate_gradient(apply, b, x0, steps=2)
    assert (few - x).abs().max() > 1e-3  # two steps are not the solution: the step count matters


def test_the_step_is_the_official_ddim_update_with_eta():
    """solver_2d.py: xt_next = sqrt(at_next) x0_t_hat + c1 z + c2 et, c1 = sqrt(1 - at_next) eta,
    c2 = sqrt(1 - at_next) sqrt(1 - eta^2), with et the network's noise and x0_t_hat the CG refinement."""
    a, op, x0_hat, y = _problem(seed=2)
    g = torch.Generator().manual_seed(3)
    at, at_next = torch.tensor(0.3, dtype=torch.float64), torch.tensor(0.6, dtype=torch.float64)
    et = torch.randn(x0_hat.shape, generator=g, dtype=torch.float64)
    xt = at.sqrt() * x0_hat + (1 - at).sqrt() * et
    z = torch.randn(x0_hat.shape, generator=g, dtype=torch.float64)
    method = DDS(cg_steps=3, eta=0.85, gamma=1.0)
    ours = method.step(xt, x0_hat, at.sqrt(), (1 - at).sqrt(), at_next.sqrt(), (1 - at_next).sqrt(), z, y, op, 0.0)
    apply, b = normal_equations(op, y, x0_hat, 0.0, 1.0)
    refined = conjugate_gradient(apply, b, x0_hat, 3)
    c1, c2 = (1 - at_next).sqrt() * 0.85, (1 - at_next).sqrt() * math.sqrt(1 - 0.85**2)
    assert torch.allclose(ours, at_next.sqrt() * refined + c1 * z + c2 * et, atol=1e-12, rtol=0)
    last = method.step(xt, x0_hat, at.sqrt(), (1 - at).sqrt(), torch.tensor(1.0), torch.tensor(0.0), z, y, op, 0.0)
    assert torch.allclose(last, refined, atol=1e-12, rtol=0)  # the final step returns x0'


def test_options_are_checked():
    for bad, message in ((dict(cg_steps=-1), "cg_steps"), (dict(eta=1.5), "eta must be in"), (dict(gamma=0), "gamma")):
        with pytest.raises(ValueError, match=message):
            DDS(**bad)


def test_dds_restores_box_inpainting_in_the_pipeline_without_gradients(one_thread):
    from steerdiff.guidance.operators import Inpainting, box_mask
    from steerdiff.pipelines.restoration import RestorationPipeline
    from steerdiff.testbeds.digits import load_digits_data, load_digits_model

    unet, scheduler = load_digits_model()
    images = load_digits_data("test")[0][:16]
    op = Inpainting(box_mask((8, 8)))
    y = op.forward(images)
    gens = lambda: [torch.Generator().manual_seed(i) for i in range(16)]  # noqa: E731
    errors = {}
    for name, method in (("dds", DDS()), ("plain", None)):
        pipe = RestorationPipeline(unet, scheduler, method=method)
        out = pipe(y, operator=op, num_inference_steps=20, generator=gens(), output_type="latent")
        errors[name] = float(((out.images - images) ** 2).mean())
        assert out.backward_calls == 0
    assert errors["dds"] < 0.5 * errors["plain"]
    with pytest.raises(ValueError, match="DDS takes its own DDIM step; use sampler='ancestral'"):
        RestorationPipeline(unet, scheduler, method=DDS())(y, operator=op, num_inference_steps=2, sampler="scheduler")


def test_restore_runs_dds_by_name(tmp_path, capsys):
    from steerdiff.cli import main

    out = tmp_path / "o"
    assert main(["restore", "--config", "configs/restore/box.yaml", "data.num_images=8", "sampler.steps=5",
                 "methods=[{name: dds, cg_steps: 3}, {name: unconditional}]", "metrics=[psnr]", f"output_dir={out}"]) == 0
    assert "| dds |" in (out / "table.md").read_text()
    assert main(["restore", "--config", "configs/restore/box.yaml", "sampler.name=ddim", "methods=[{name: dds}]",
                 f"output_dir={tmp_path / 'p'}"]) == 2
    assert "take their own DDIM step on the ancestral sampler" in capsys.readouterr().err
    assert main(["restore", "--config", "configs/restore/box.yaml", "methods=[{name: dps, eta: 0.5}]",
                 f"output_dir={tmp_path / 'q'}"]) == 2
    assert "eta: options of dds, not of dps" in capsys.readouterr().err


@pytest.mark.parametrize("variant", ["vp", "flow"])
def test_dds_with_every_restoration_operator_on_vp_and_flow(variant, one_thread):
    """Super-resolution, blur, denoising and random inpainting (noisy and noiseless) on the digits model and its
    flow twin: DDS moves the restoration toward the measurement (smaller residual than plain sampling)."""
    from steerdiff.guidance.operators import Denoising, GaussianBlur, Inpainting, SuperResolution, random_mask
    from steerdiff.pipelines.restoration import RestorationPipeline
    from steerdiff.testbeds.digits import load_digits_data, load_digits_model

    unet, scheduler = load_digits_model(variant=variant)
    images = load_digits_data("test")[0][:8]
    g = torch.Generator().manual_seed(5)
    operators = [SuperResolution(2), GaussianBlur(3, 1.0), Denoising(),
                 Inpainting(random_mask((8, 8), 0.5, generator=[torch.Generator().manual_seed(i) for i in range(8)]))]
    for op, sigma_y in zip(operators, (0.0, 0.05, 0.05, 0.0)):
        y = op.forward(images) + sigma_y * torch.randn(op.forward(images).shape, generator=g)
        residual = {}
        for name, method in (("dds", DDS()), ("plain", None)):
            out = RestorationPipeline(unet, scheduler, method=method)(
                y, operator=op, sigma_y=sigma_y, num_inference_steps=10, output_type="latent",
                generator=[torch.Generator().manual_seed(i) for i in range(8)])
            residual[name] = float(((op.forward(out.images) - y) ** 2).mean())
        assert residual["dds"] < 0.5 * residual["plain"], (type(op).__name__, residual)
