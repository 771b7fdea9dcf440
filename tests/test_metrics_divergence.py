"""Magnitude score (Wizadwongsa & Suwajanakorn, ICLR 2024) and the out-of-range fraction."""

import pytest
import torch

from steerdiff.metrics.base import SampleSet
from steerdiff.metrics.divergence import Divergence, channel_statistics, magnitude_score, out_of_range_fraction
from steerdiff.metrics.registry import make_metric


def test_magnitude_score_by_hand():
    # one 1x8x8 sample, unit statistics: a 5.0 in the top-left 4x4 window, 2.0 (below tau = 3) in another
    x = torch.zeros(1, 1, 8, 8)
    x[0, 0, 1, 2] = -5.0
    x[0, 0, 6, 6] = 2.0
    score = magnitude_score(x, mean=[0.0], std=[1.0])
    assert score.tolist() == [pytest.approx(5.0 / 4)]  # 2x2 pooled map [5, 0, 0, 0 (2 < 3)] -> mean 1.25


def test_magnitude_score_takes_the_max_over_channels_and_normalizes_per_channel():
    x = torch.zeros(2, 2, 4, 4)
    x[0, 1, 0, 0] = 8.0  # channel 1 has std 2: z = 4
    x[1, 0, 3, 3] = 2.5  # channel 0 has mean 1, std 0.5: z = |2.5 - 1| / 0.5 = 3, at the threshold
    score = magnitude_score(x, mean=[1.0, 0.0], std=[0.5, 2.0])
    # channel 0 elsewhere: z = |0 - 1| / 0.5 = 2 < 3 -> 0
    assert score.tolist() == [pytest.approx(4.0), pytest.approx(3.0)]


def test_out_of_range_fraction():
    x = torch.tensor([[[[-1.0, 1.0], [1.01, -3.0]]]])
    assert out_of_range_fraction(x).tolist() == [0.5]


def test_data_normalization_catches_a_uniformly_blown_up_batch():
    from steerdiff.testbeds.digits import load_digits_data

    data = load_digits_data("all")[0][:200]
    metric = Divergence()  # normalize by the digits data set's channel statistics
    assert metric(SampleSet(samples=data, labels=torch.zeros(200)))["magnitude_score"] == 0.0
    blown = metric(SampleSet(samples=6 * data, labels=torch.zeros(200)))
    assert blown["magnitude_score"] > 1.0 and blown["out_of_range"] > 0.3
    # normalizing by the samples' own statistics hides a uniform blow-up: the score is scale-free
    own = Divergence(normalize="samples")
    assert own(SampleSet(samples=6 * data, labels=torch.zeros(200)))["magnitude_score"] == pytest.approx(
        own(SampleSet(samples=data, labels=torch.zeros(200)))["magnitude_score"])


def test_channel_statistics_are_float64_per_channel():
    x = torch.stack([torch.full((3, 3), 2.0), torch.arange(9.0).reshape(3, 3)]).unsqueeze(0).repeat(4, 1, 1, 1)
    mean, std = channel_statistics(x)
    assert mean.dtype == torch.float64 and mean.tolist() == [2.0, 4.0]
    assert std[0] == 0 and std[1] == pytest.approx(torch.arange(9.0).repeat(4).std().item())


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="NaN or Inf"):
        magnitude_score(torch.full((1, 1, 4, 4), float("inf")), [0.0], [1.0])
    with pytest.raises(ValueError, match=r"samples must have shape \(N, C, H, W\)"):
        out_of_range_fraction(torch.zeros(4, 4))
    with pytest.raises(ValueError, match="one entry per channel"):
        magnitude_score(torch.zeros(1, 2, 4, 4), [0.0], [1.0])
    with pytest.raises(ValueError, match="std must be > 0"):
        magnitude_score(torch.zeros(1, 1, 4, 4), [0.0], [0.0])
    with pytest.raises(ValueError, match=r"normalize must be one of \('data', 'samples', 'unit'\)"):
        make_metric("divergence", normalize="latent")
    with pytest.raises(ValueError, match="use normalize: samples or unit"):
        Divergence().check((4, 16, 16))
