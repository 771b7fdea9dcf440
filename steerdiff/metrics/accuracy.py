"""Class accuracy of class-conditional digits samples: the fraction the digits classifier assigns to the class
they were generated for (the classifier and its 8-bit quantization are those of
:mod:`steerdiff.metrics.classifier`)."""

from __future__ import annotations

from .base import Metric, SampleSet
from .classifier import classify_digits
from .features import DigitsFeatures


class ClassAccuracy(Metric):
    name = "class_accuracy"
    keys = ("class_accuracy",)

    def fingerprint(self) -> str:
        return f"{self.name}:{DigitsFeatures().key()}"

    def check(self, sample_shape, denoiser=None) -> None:
        if tuple(sample_shape) != (1, 8, 8):
            raise ValueError(f"class_accuracy uses the digits classifier (1x8x8 images); this model makes {tuple(sample_shape)} samples")

    def __call__(self, samples: SampleSet) -> dict[str, float]:
        if samples.labels is None:
            raise ValueError("class_accuracy compares the classifier's class with each sample's label; these samples have none")
        predicted = classify_digits(samples.samples)
        return {"class_accuracy": float((predicted == samples.labels.cpu()).double().mean())}
