"""The shipped digits classifier, the 8-bit quantization, and the digits feature extractor."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from steerdiff.metrics.classifier import (
    CLASSIFIER_PATH,
    FEATURE_DIM,
    DigitsClassifier,
    classify_digits,
    dequantize,
    digits_features,
    load_digits_classifier,
    quantize,
)
from steerdiff.testbeds.digits import load_digits_data


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny calls: one intra-op thread (tests/conftest.py)


@pytest.fixture(scope="module")
def classifier():
    return load_digits_classifier()


def test_split_is_fixed_stratified_and_disjoint():
    x_all, y_all = load_digits_data("all")
    x_tr, y_tr = load_digits_data("train")
    x_te, y_te = load_digits_data("test")
    assert x_all.shape == (1797, 1, 8, 8) and x_all.dtype == torch.float32 and y_all.dtype == torch.int64
    assert x_tr.shape[0] == 1437 and x_te.shape[0] == 360
    # stratified: every class has 20% +- 1 image in the test split
    counts_all = torch.bincount(y_all, minlength=10)
    counts_te = torch.bincount(y_te, minlength=10)
    assert torch.all((counts_te - 0.2 * counts_all).abs() <= 1)
    # disjoint and covering: the rows of train and test together are the data set (as multisets)
    rows = lambda x: sorted(map(tuple, x.reshape(x.shape[0], -1).tolist()))  # noqa: E731
    assert rows(torch.cat([x_tr, x_te])) == rows(x_all)
    with pytest.raises(ValueError, match="split must be one of"):
        load_digits_data("val")


def test_held_out_accuracy_at_least_97_percent(classifier):
    x, y = load_digits_data("test")
    acc = float((classify_digits(x, classifier=classifier) == y).double().mean())
    assert acc >= 0.97
    config = json.loads((CLASSIFIER_PATH / "config.json").read_text())
    assert config["test_accuracy"] == pytest.approx(acc, abs=1e-6)


def test_features_shape_dtype_and_quantization(classifier):
    x, _ = load_digits_data("test")
    feats = digits_features(x[:100], classifier=classifier)
    assert feats.shape == (100, FEATURE_DIM) and feats.dtype == torch.float64
    assert 32 <= FEATURE_DIM <= 128
    assert torch.isfinite(feats).all()
    # uint8 input is taken as already quantized; sub-quantum perturbations do not change the features
    assert torch.equal(digits_features(quantize(x[:100]), classifier=classifier), feats)
    assert torch.equal(digits_features(x[:100] + 1e-4, classifier=classifier), feats)
    # batching does not change the result beyond float round-off
    torch.testing.assert_close(digits_features(x[:100], batch_size=7, classifier=classifier), feats, rtol=1e-5, atol=1e-5)
    # the default (cached) classifier is the shipped one
    torch.testing.assert_close(digits_features(x[:10]), feats[:10], rtol=1e-5, atol=1e-5)


def test_quantize_dequantize():
    u = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(quantize(dequantize(u)), u)
    x = torch.tensor([-2.0, -1.0, -0.999, 0.0, 1.0, 3.0])
    assert quantize(x).tolist() == [0, 0, 0, 128, 255, 255]  # round(127.5) = 128 (half to even)
    assert quantize(np.array([0.5], dtype=np.float32)).dtype == torch.uint8
    d = dequantize(quantize(torch.linspace(-1, 1, 101)))
    assert d.dtype == torch.float32 and d.min() >= -1 and d.max() <= 1
    assert (d - torch.linspace(-1, 1, 101)).abs().max() <= 1 / 255 + 1e-6
    with pytest.raises(ValueError, match="non-finite"):
        quantize(torch.tensor([0.0, float("nan")]))
    with pytest.raises(TypeError, match="images must be floating point"):
        quantize(torch.tensor([1, 2]))
    with pytest.raises(TypeError, match="u8 must be a uint8"):
        dequantize(torch.tensor([0.5]))


def test_classifier_shapes_and_errors(classifier):
    x = torch.zeros(3, 1, 8, 8)
    assert classifier(x).shape == (3, 10)
    assert classifier.features(x).shape == (3, FEATURE_DIM)
    with pytest.raises(ValueError, match=r"x must have shape \(N, 1, 8, 8\)"):
        classifier(torch.zeros(3, 8, 8))
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        digits_features(x, batch_size=0, classifier=classifier)
    with pytest.raises(ValueError, match="images must have shape"):
        digits_features(torch.zeros(2, 3, 8, 8), classifier=classifier)


def test_loading_refuses_non_safetensors_weights(tmp_path):
    (tmp_path / "config.json").write_text((CLASSIFIER_PATH / "config.json").read_text())
    (tmp_path / "model.bin").write_bytes(b"not loaded")
    with pytest.raises(ValueError, match="safetensors only"):
        load_digits_classifier(path=tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_digits_classifier(path=tmp_path / "missing")


def test_shipped_weights_are_safetensors_and_load_strictly():
    from safetensors.torch import load_file

    state = load_file(str(CLASSIFIER_PATH / "model.safetensors"))
    config = json.loads((CLASSIFIER_PATH / "config.json").read_text())
    keys = ("channels", "feature_dim", "num_classes", "dropout", "image_size")
    model = DigitsClassifier(**{k: (tuple(config[k]) if k == "channels" else config[k]) for k in keys})
    model.load_state_dict(state, strict=True)
