"""What a named metric is and what it is given: the final samples of one benchmark cell and how they were made.

A metric is a callable object built from YAML (``{name: fd, kwargs: {...}}``, see
:mod:`steerdiff.metrics.registry`).  ``check(sample_shape, denoiser)`` runs before any sample is generated and
raises ``ValueError`` when the metric cannot score that model's samples; ``__call__(samples)`` returns a
dict of named floats (its ``keys``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch


@dataclass
class SampleSet:
    """The samples of one cell.

    ``samples``: (N, C, H, W) final samples in the model's space, before any clipping (float32, CPU);
    ``labels``: (N,) class ids (None for restorations of an unlabelled image folder); ``noise``: (N, C, H, W) the standard-normal initial noise they came from;
    ``denoiser``: the network (for metrics that need the model, e.g. the mixture's exact density);
    ``guidance``: the cell's guidance, whose ``model_fn(denoiser, labels, process, prediction_type)`` is the guided network
    ``(x, t) -> output`` of ``prediction_type`` (for reference solutions); ``process``: the model's
    :class:`~steerdiff.core.NoiseSchedule`;
    ``cache_dir``: where reference statistics are cached; ``work_dir``: a folder for this run's caches;
    ``prompts``: text-to-image models: the prompt of each sample (``labels`` then index the model's prompt list);
    ``reference_key``: identifies (model, guidance, noise, labels) so a reference solution can be shared by
    every cell that starts from the same noise; ``targets``: restorations only: (N, C, H, W) the original image
    each sample restores, in [-1, 1] (PSNR, SSIM).
    """

    samples: torch.Tensor
    labels: torch.Tensor | None
    noise: torch.Tensor | None = None
    denoiser: Any = None
    guidance: Any = None
    process: Any = None
    prediction_type: str = "epsilon"
    cache_dir: Path | None = None
    work_dir: Path | None = None
    reference_key: str | None = None
    prompts: list[str] | None = None  # text-to-image models: the prompt of each sample (CLIP score)
    targets: torch.Tensor | None = None  # restorations: the original of each sample (PSNR, SSIM)
    _features: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def features(self, space) -> torch.Tensor:
        """``space(samples)``, computed once per feature space and shared by the metrics that use it."""
        key = space.key()
        if key not in self._features:
            self._features[key] = space(self.samples)
        return self._features[key]


class Metric:
    """Base class of named metrics; subclasses set ``name`` and ``keys`` and implement ``__call__``."""

    name: ClassVar[str]
    keys: ClassVar[tuple[str, ...]]
    needs_targets: ClassVar[bool] = False  # compares each sample with its original: restorations only

    def fingerprint(self) -> str:
        """Identifies what the metric computes beyond its config (e.g. its feature network's weights), so that
        stored results are re-scored when that changes."""
        return self.name

    def check(self, sample_shape: tuple[int, ...], denoiser: Any = None) -> None:
        """Raise ``ValueError`` if this metric cannot score samples of this shape / from this denoiser."""

    def __call__(self, samples: SampleSet) -> dict[str, float]:
        raise NotImplementedError
