"""Error of a sampler's final samples against a high-accuracy solution of the same ODE from the same noise.

The reference integrates the (guided) probability-flow ODE of the cell's network from the same initial noise
x_T with 1,000 steps of DPM-Solver++ 2M (Lu et al. 2022; second order, :func:`steerdiff.core.sample_dpmpp_2m`)
over the full grid t = 999, 998, ..., 0 -> clean (every training timestep), in float64.  The metric is the mean over samples of

    e_i = || x_i - x_ref,i ||_2        (over all C x H x W values),

the quantity whose decay with NFE gives a solver's order of convergence.  The reference's own error is that of
its last step, t = 0 (sigma = 0.01 for DDPM's linear schedule) -> clean, about 1e-4 on a unit-scale Gaussian;
the solvers under test end with the same step.  On the analytic Gaussian mixture
(:class:`steerdiff.testbeds.mixture.GaussianMixtureDenoiser`) the network is exact, so this is the pure
discretisation error; on a trained network it is the error relative to that network's own ODE.  The
reference is computed once per (model, guidance, noise) and cached in the run folder.
"""

from __future__ import annotations

import copy

import torch

from ..atomic_io import atomic_save_safetensors
from ..core.sampling import sample_dpmpp_2m
from ..core.tensors import batch_norm
from ..core.timesteps import spaced_timesteps, with_final
from .base import Metric, SampleSet


def reference_solution(model_fn, noise: torch.Tensor, schedule, steps: int = 1000, prediction_type: str | None = None) -> torch.Tensor:
    """x_0 from ``noise`` = x_T by ``steps`` DPM-Solver++ 2M steps, in noise's dtype.

    ``model_fn``: the model boundary (:class:`steerdiff.core.Denoiser`) or a plain ``(x, t) -> output`` of
    ``prediction_type``; ``schedule``: the noise process (VP or flow).  The grid is diffusers' "trailing" spacing
    (it starts at t = T - 1 for any step count and has no repeated timesteps; with steps = T it is every training
    timestep), then the clean end; on a flow process, ``steps`` equal steps in s from 1 (pure noise, where the flow
    samplers start) to 0."""
    T = schedule.num_train_timesteps
    if schedule.kind == "flow":  # from pure noise (s = 1), where flow samplers start, to s = 0 in equal steps of s
        grid = torch.linspace(T, 0, steps + 1, dtype=torch.float64)
    else:
        grid = with_final(spaced_timesteps(T, steps, "trailing", device=noise.device))
    return sample_dpmpp_2m(model_fn, noise, schedule, grid, prediction_type)


def float64_network(denoiser):
    """The denoiser evaluated in float64: the mixture computes in its input's dtype; other networks are copied."""
    from ..testbeds.mixture import GaussianMixtureDenoiser

    if isinstance(denoiser, GaussianMixtureDenoiser):
        return denoiser
    return copy.deepcopy(denoiser).to(torch.float64)


class ReferenceL2(Metric):
    """``l2_error``: mean per-sample L2 distance to the 1,000-step second-order reference from the same noise."""

    name = "l2_to_reference"
    keys = ("l2_error",)

    def __init__(self, steps: int = 1000, batch_size: int = 1000):
        if int(steps) < 2 or int(batch_size) < 1:
            raise ValueError(f"l2_to_reference: steps must be >= 2 and batch_size >= 1, got steps={steps}, batch_size={batch_size}")
        self.steps, self.batch_size = int(steps), int(batch_size)

    def reference(self, samples: SampleSet) -> torch.Tensor:
        path = None
        if samples.work_dir is not None and samples.reference_key is not None:
            path = samples.work_dir / "references" / f"{samples.reference_key}-dpmpp2m{self.steps}.safetensors"
            if path.is_file():
                from safetensors.torch import load_file

                return load_file(str(path))["reference"]
        network = float64_network(samples.denoiser)
        device = next(network.buffers(), next(network.parameters(), torch.empty(0))).device
        parts = []
        for start in range(0, samples.noise.shape[0], self.batch_size):
            labels = samples.labels[start : start + self.batch_size].to(device)
            model_fn = samples.guidance.model_fn(network, labels, samples.schedule, samples.prediction_type)
            noise = samples.noise[start : start + self.batch_size].to(device, torch.float64)
            parts.append(reference_solution(model_fn, noise, samples.schedule, self.steps, samples.prediction_type).cpu())
        ref = torch.cat(parts)
        if path is not None:
            atomic_save_safetensors(path, {"reference": ref})
        return ref

    def __call__(self, samples: SampleSet) -> dict[str, float]:
        if samples.noise is None or samples.guidance is None or samples.schedule is None:
            raise ValueError("l2_to_reference needs the cell's noise, guidance and noise schedule")
        error = batch_norm(samples.samples.to(torch.float64) - self.reference(samples))
        return {"l2_error": float(error.mean())}
