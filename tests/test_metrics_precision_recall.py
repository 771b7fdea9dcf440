"""Improved precision/recall (Kynkaanniemi et al. 2019) against a brute-force reference and hand-made cases."""

import numpy as np
import pytest
import torch
from sklearn.neighbors import NearestNeighbors

from steerdiff.metrics.precision_recall import kth_neighbour_radii, precision_recall


def _brute_force(real, fake, k):
    """Independent reference: scikit-learn's k-NN for the radii, explicit loops for membership."""
    def radii(x):
        dist, _ = NearestNeighbors(n_neighbors=k + 1).fit(x).kneighbors(x)
        return dist[:, k]

    def covered(queries, support, r):
        return np.mean([any(np.linalg.norm(q - s) <= rs for s, rs in zip(support, r)) for q in queries])

    return covered(fake, real, radii(real)), covered(real, fake, radii(fake))


@pytest.mark.parametrize("k", [1, 3])
def test_matches_brute_force(k):
    rng = np.random.default_rng(0)
    real = rng.normal(size=(60, 5))
    fake = rng.normal(loc=0.7, scale=1.4, size=(45, 5))
    p, r = precision_recall(real, fake, k=k)
    p_ref, r_ref = _brute_force(real, fake, k)
    assert (p, r) == pytest.approx((p_ref, r_ref), abs=1e-12)
    assert 0 < p < 1 and 0 < r < 1


def test_hand_example_in_one_dimension():
    # real points 0, 1, 2, 10: with k = 1 their radii are 1, 1, 1, 8 (10's nearest other point is 2)
    real = torch.tensor([[0.0], [1.0], [2.0], [10.0]])
    assert kth_neighbour_radii(real, 1).tolist() == [1.0, 1.0, 1.0, 8.0]
    # fake 2.9 (within 1 of 2), 5 (within 8 of 10), 20 (outside every ball), -3 (outside)
    fake = torch.tensor([[2.9], [5.0], [20.0], [-3.0]])
    p, r = precision_recall(real, fake, k=1)
    assert p == pytest.approx(0.5)
    # fake radii (k=1): 2.9->2.1, 5->2.1, 20->15, -3->5.9; real 0, 1, 2 lie within 5.9 of -3, 10 within 15 of 20
    assert r == pytest.approx(1.0)


def test_same_set_is_perfect_and_far_sets_score_zero():
    x = torch.randn(50, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert precision_recall(x, x) == (1.0, 1.0)
    assert precision_recall(x, x + 100.0) == (0.0, 0.0)


def test_bad_input_names_the_argument():
    x = torch.randn(10, 3)
    with pytest.raises(ValueError, match="k must lie in 1..9"):
        precision_recall(x, x, k=10)
    with pytest.raises(ValueError, match="same dimension"):
        precision_recall(x, torch.randn(10, 4))
    with pytest.raises(ValueError, match="fake_features contains NaN"):
        precision_recall(x, torch.full((10, 3), float("nan")))
    with pytest.raises(ValueError, match=r"real_features must be an \(N, d\) feature matrix"):
        precision_recall(torch.randn(10), x)
