"""How close do MCG, DPS and projection-only come to the exact posterior of a Gaussian-mixture prior?

For each problem (box inpainting with sigma_y = 0 and 0.05, extreme inpainting, a random Gaussian matrix with
sigma_y = 0.05) and each of
``--measurements`` measurements y_j = A x0_j + n (x0_j drawn from the prior), every method restores
``--samples`` samples with the exact mixture denoiser and the ancestral DDPM sampler, and we compare with the
closed-form posterior (:class:`steerdiff.testbeds.posterior.GaussianMixturePosterior`):

- mean error   e = sqrt( mean_j ||mean_hat_j - m_j||^2 / tr C_j ): the posterior-mean error in units of the
               posterior spread; an exact sampler gives e ~ sqrt(1 / N) (Monte Carlo error only);
- bias         b = sqrt( max(0, mean_j (||mean_hat_j - m_j||^2 - tr(C_hat_j) / N) / tr C_j) ): the same with the
               Monte Carlo part subtracted (||mean_hat - m||^2 - tr(C_hat)/N is unbiased for ||bias||^2);
- weight error TV = mean_j 1/2 sum_k |mean_n r_k(x_n) - w'_jk|, with r_k the prior responsibilities (their
               posterior expectation is exactly w'_k); Monte Carlo level: mean_j 1/2 sum_k sqrt(w'(1-w')/N).

Run:  python benchmarks/restoration_posterior.py [--prior digits|random] [--steps 200] [--samples 500]
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from diffusers import DDPMScheduler

from steerdiff.guidance.manifold import DPS, MCG, ProjectionOnly, Unconditional
from steerdiff.guidance.operators import Inpainting, InverseProblem, MatrixOperator, box_mask, extreme_mask
from steerdiff.pipelines.restoration import RestorationPipeline
from steerdiff.testbeds.mixture import GaussianMixtureDenoiser
from steerdiff.testbeds.posterior import GaussianMixturePosterior, compare_to_posterior


def random_prior(shape=(1, 4, 4), components=4, seed=0) -> GaussianMixtureDenoiser:
    """K diagonal Gaussians with means uniform in [-0.7, 0.7]^D and stds 0.17..0.32 (a digits-like spread)."""
    g = torch.Generator().manual_seed(seed)
    d = math.prod(shape)
    means = 0.7 * (2 * torch.rand(components, d, generator=g, dtype=torch.float64) - 1)
    variances = 0.03 + 0.07 * torch.rand(components, d, generator=g, dtype=torch.float64)
    weights = 0.5 + torch.rand(components, generator=g, dtype=torch.float64)
    return GaussianMixtureDenoiser.from_components(
        means.reshape(components, *shape), variances.reshape(components, *shape), weights,
        scheduler_config=DDPMScheduler(clip_sample=False).config, dtype=torch.float64,
    )


def problems(prior, seed=0):
    shape = tuple(prior.sample_shape)
    d = math.prod(shape)
    g = torch.Generator().manual_seed(seed + 1)
    m = d // 4
    matrix = torch.randn(m, d, generator=g, dtype=torch.float64) / math.sqrt(m)
    return {
        "box inpainting, sigma_y=0": InverseProblem(Inpainting(box_mask(shape[1:])), 0.0),
        "box inpainting, sigma_y=0.05": InverseProblem(Inpainting(box_mask(shape[1:])), 0.05),
        "extreme inpainting, sigma_y=0": InverseProblem(Inpainting(extreme_mask(shape[1:])), 0.0),
        "random 1/4-rank matrix, sigma_y=0.05": InverseProblem(MatrixOperator(matrix, shape), 0.05),
    }


def posterior_errors(pipe, problem, x0s, samples, steps, seed):
    """(mean error, bias, weight TV, its Monte Carlo level), averaged over the measurements of x0s."""
    prior, op = pipe.unet, problem.operator
    ys = problem.measure(x0s, generator=torch.Generator().manual_seed(seed))
    m = x0s.shape[0]
    x = pipe(ys.repeat_interleave(samples, dim=0), op, problem.sigma_y, steps,
             generator=torch.Generator().manual_seed(seed + 1), output_type="latent").images
    stats = [
        compare_to_posterior(x[j * samples : (j + 1) * samples], GaussianMixturePosterior.from_problem(
            prior, op, ys[j : j + 1], problem.sigma_y), prior)
        for j in range(m)
    ]
    err = math.sqrt(sum(c.mean_sq_error / c.spread for c in stats) / m)
    bias = math.sqrt(max(0.0, sum((c.mean_sq_error - c.mc_sq_error) / c.spread for c in stats) / m))
    return err, bias, sum(c.weight_tv for c in stats) / m, sum(c.weight_mc for c in stats) / m


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prior", choices=["random", "digits"], default="random")
    parser.add_argument("--measurements", type=int, default=8)
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--step-sizes", type=float, nargs="+", default=[0.0625, 0.125, 0.25, 0.5, 1.0])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    if args.prior == "digits":
        from steerdiff.testbeds.mixture import fit_digits_mixture

        prior = fit_digits_mixture(dtype=torch.float64)
    else:
        prior = random_prior(seed=args.seed)
    pipe = RestorationPipeline(prior, DDPMScheduler(clip_sample=False))
    pipe.set_progress_bar_config(disable=True)
    x0s = prior.sample(args.measurements, generator=torch.Generator().manual_seed(args.seed + 2))
    print(f"prior: {args.prior} (D = {prior.num_features}, K = {prior.config.num_components}); "
          f"{args.measurements} measurements x {args.samples} samples, ancestral DDPM {args.steps} steps; "
          f"exact-sampler Monte Carlo level of the mean error: {1 / math.sqrt(args.samples):.3f}")
    methods = [Unconditional(), ProjectionOnly()] + [cls(s) for cls in (MCG, DPS) for s in args.step_sizes]
    for name, problem in problems(prior, args.seed).items():
        print(f"\n{name}\n  {'method':<16}{'mean err':>9}{'bias':>8}{'weight TV':>11}{'(MC)':>7}{'time s':>8}")
        for method in methods:
            pipe.method = method
            start = time.perf_counter()
            err, bias, tv, tv_mc = posterior_errors(pipe, problem, x0s, args.samples, args.steps, args.seed + 3)
            label = method.name + (f" {method.step_size:g}" if hasattr(method, "step_size") else "")
            print(f"  {label:<16}{err:9.3f}{bias:8.3f}{tv:11.3f}{tv_mc:7.3f}{time.perf_counter() - start:8.1f}", flush=True)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
