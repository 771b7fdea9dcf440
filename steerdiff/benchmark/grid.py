"""The cells of a benchmark grid, their identities, and what every cell shares: labels and initial noise.

A cell is (model, scheduler, guidance, NFE, seed).  Sample i of a cell has class ``classes[i mod len(classes)]``
and initial noise drawn from its own generator seeded ``seed + i`` (:func:`initial_noise`), so every cell of a
seed starts from the same noise and a sample never depends on the chunk or process that drew it.

A cell's folder is named by its labels and a hash of everything that determines its samples
(:attr:`Cell.generation_key`); changing any of it makes a new cell instead of reusing stale files.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from dataclasses import dataclass, field

import torch

from ..core.sde import sample_noise
from ..samplers.registry import lay_out
from .config import BenchmarkConfig, GuidanceSpec, MetricSpec, ModelSpec, SchedulerSpec


def stable_hash(obj, length: int = 12) -> str:
    """The first ``length`` hex digits of the SHA-256 of ``obj`` as sorted JSON."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:length]


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", text).strip("_")


def resolve_classes(classes: int | list[int] | None, num_classes: int, where: str) -> list[int]:
    """The class ids a config asks for, checked against the model's ``num_classes``."""
    if classes is None:
        return list(range(num_classes))
    if isinstance(classes, int):
        if classes > num_classes:
            raise ValueError(f"classes: {where} has {num_classes} classes (ids 0..{num_classes - 1}); the config asks for {classes}")
        return list(range(classes))
    bad = sorted(c for c in classes if not 0 <= c < num_classes)
    if bad:
        raise ValueError(f"classes: {where} has {num_classes} classes (ids 0..{num_classes - 1}); the config asks for {bad}")
    return list(classes)


def sample_labels(classes: list[int], start: int, stop: int) -> torch.Tensor:
    return torch.tensor([classes[i % len(classes)] for i in range(start, stop)], dtype=torch.long)


def sample_generators(seed: int, start: int, stop: int) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(seed + i) for i in range(start, stop)]


def initial_noise(seed: int, start: int, stop: int, shape: tuple[int, ...], generators=None) -> torch.Tensor:
    """Standard-normal x_T of samples start..stop-1 (float32, CPU), sample i from generator ``seed + i``
    (pass ``generators`` from :func:`sample_generators` to keep drawing from them afterwards)."""
    generators = generators if generators is not None else sample_generators(seed, start, stop)
    return sample_noise((stop - start, *shape), generators, "cpu", torch.float32)


def steps_for_nfe(scheduler, nfe: int) -> int | None:
    """The ``num_inference_steps`` whose timestep grid has exactly ``nfe`` entries (one network call each in the
    sampling loop), found by trying them; None when no step count gives ``nfe`` (e.g. Heun's 2N - 1)."""
    for steps in range(1, 2 * nfe + 2):
        trial = copy.deepcopy(scheduler)
        try:
            lay_out(trial, steps, device="cpu")
        except (ValueError, IndexError, RuntimeError):
            continue
        if len(trial.timesteps) == nfe:
            return steps
    return None


@dataclass(frozen=True)
class Cell:
    model: ModelSpec
    scheduler: SchedulerSpec
    guidance: GuidanceSpec
    nfe: int
    seed: int
    num_samples: int
    classes: tuple[int, ...]
    batch_size: int
    metrics: tuple[MetricSpec, ...] = field(default=())
    model_fingerprint: str = ""
    metric_fingerprints: tuple[str, ...] = field(default=())
    conditioning: str = ""  # text-to-image models: a hash of the prompts, negatives, size and call arguments

    def _guidance(self) -> dict:
        kwargs = {k: v for k, v in self.guidance.kwargs.items() if k != "scale"}
        return {"name": self.guidance.name, "scale": self.guidance.scale, "kwargs": kwargs}

    def _sampling(self) -> dict:
        return {
            "model": {"model": self.model.model, "dtype": self.model.dtype, "weights": self.model_fingerprint},
            "guidance": self._guidance(),
            "seed": self.seed,
            "num_samples": self.num_samples,
            "classes": list(self.classes),
            **({"conditioning": self.conditioning} if self.conditioning else {}),
        }

    @property
    def reference_key(self) -> str:
        """Identifies (model, guidance, noise, labels): cells that share it solve the same ODE from the same x_T."""
        return stable_hash(self._sampling())

    @property
    def generation_key(self) -> str:
        return stable_hash({
            **self._sampling(),
            "scheduler": {"name": self.scheduler.name, "kwargs": self.scheduler.kwargs},
            "nfe": self.nfe,
            "batch_size": self.batch_size,
        })

    @property
    def metrics_key(self) -> str:
        """Identifies how the samples are scored: the metric entries and their networks' weights."""
        return stable_hash([[m.model_dump(exclude={"label"}) for m in self.metrics], list(self.metric_fingerprints)])

    @property
    def cell_id(self) -> str:
        parts = (self.model.display, self.scheduler.display, self.guidance.display, f"nfe{self.nfe}", f"seed{self.seed}")
        return "__".join(slug(p) for p in parts) + f"__{self.generation_key}"

    def describe(self) -> dict:
        return {
            "model": self.model.display,
            "model_spec": {"model": self.model.model, "dtype": self.model.dtype},
            "scheduler": self.scheduler.display,
            "scheduler_spec": {"name": self.scheduler.name, "kwargs": self.scheduler.kwargs},
            "guidance": self.guidance.display,
            "guidance_spec": self._guidance(),
            "nfe": self.nfe,
            "seed": self.seed,
            "num_samples": self.num_samples,
            "classes": list(self.classes),
            "batch_size": self.batch_size,
            "metrics_spec": [m.model_dump(exclude={"label"}) for m in self.metrics],
        }


def model_fingerprint(module: torch.nn.Module) -> str:
    """A hash of a network's parameters and buffers: retrained or refitted weights make new cells."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:12]


def expand_grid(cfg: BenchmarkConfig, classes_per_model: list[list[int]], model_fingerprints: list[str],
                metric_fingerprints: list[tuple[str, ...]], conditioning: list[str] | None = None) -> list[Cell]:
    """Every cell, in the order model, guidance, scheduler, seed, NFE."""
    conditioning = conditioning or [""] * len(cfg.models)
    return [
        Cell(model, sched, guid, nfe, seed, cfg.num_samples, tuple(classes), cfg.batch_size, tuple(cfg.metrics_for(model)),
             weights, metric_keys, cond)
        for model, classes, weights, metric_keys, cond in zip(cfg.models, classes_per_model, model_fingerprints,
                                                              metric_fingerprints, conditioning)
        for guid in cfg.guidance
        for sched in cfg.schedulers
        for seed in cfg.seeds
        for nfe in cfg.nfe
    ]
