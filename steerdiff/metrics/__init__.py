"""Sample-quality metrics: the digits feature network and the Frechet distance."""

from .classifier import (
    DigitsClassifier,
    classify_digits,
    dequantize,
    digits_features,
    load_digits_classifier,
    quantize,
)
from .frechet import feature_statistics, frechet_distance, frechet_distance_from_features, trace_sqrt_product

__all__ = [
    "DigitsClassifier",
    "classify_digits",
    "dequantize",
    "digits_features",
    "feature_statistics",
    "frechet_distance",
    "frechet_distance_from_features",
    "load_digits_classifier",
    "quantize",
    "trace_sqrt_product",
]
