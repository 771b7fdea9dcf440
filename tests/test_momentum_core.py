"""core.momentum: the heavy-ball velocity, the PLMS+HB and GHVB directions, and their stability intervals."""

import pytest
import torch

from steerdiff.core.momentum import (
    MomentumState,
    check_beta,
    check_order,
    ghvb_direction,
    heavy_ball,
    order_and_beta,
    plms_hb_direction,
)
from steerdiff.core.stability import real_axis_stability_edge


def test_heavy_ball_update():
    v0, x = torch.tensor([1.0, -2.0]), torch.tensor([3.0, 5.0])
    assert heavy_ball(None, x, 0.3) is x  # the first value is taken as is
    assert torch.allclose(heavy_ball(v0, x, 0.3), 0.7 * v0 + 0.3 * x)
    assert heavy_ball(v0, x, 1.0) is x  # beta = 1: no momentum, exactly


def test_momentum_state_starts_at_first_value_and_resets():
    state = MomentumState(0.25, history_length=2)
    values = [torch.full((2,), float(k)) for k in (4, 8, 0)]
    assert torch.equal(state.average(values[0]), values[0])
    assert torch.allclose(state.average(values[1]), torch.full((2,), 0.75 * 4 + 0.25 * 8))
    state.history.push(values[2])
    state.reset()
    assert state.velocity is None and len(state.history) == 0
    assert torch.equal(state.average(values[2]), values[2])


# The digest's beta-weighted Adams-Bashforth mixer AB_r(e, b) / b over the newest-first history e, spelled out.
DIGEST_AB = {
    1: lambda e, b: e[0],
    2: lambda e, b: ((2 + b) * e[0] - (2 - b) * e[1]) / (2 * b),
    3: lambda e, b: ((18 + 5 * b) * e[0] - (24 - 8 * b) * e[1] + (6 - b) * e[2]) / (12 * b),
    4: lambda e, b: ((46 + 9 * b) * e[0] - (78 - 19 * b) * e[1] + (42 - 5 * b) * e[2] - (10 - b) * e[3]) / (24 * b),
}


def digest_direction(kind, order, beta, history, velocity, eps):
    """One step of the digest's recurrences, written independently of steerdiff: returns (update, velocity).

    PLMS-r + HB ("hb"): prime = AB_r(eps history, 1); v = (1 - beta) v + beta prime; update = v.
    GHVB ("ghvb"): v = (1 - beta) v + beta eps; push v; update = AB_r(v history, beta).  v starts at the first value.
    ``history`` is a newest-first list, updated in place.
    """
    if kind == "hb":
        history.insert(0, eps)
        prime = DIGEST_AB[min(order, len(history))](history, 1.0)
        velocity = prime if velocity is None else (1 - beta) * velocity + beta * prime
        return velocity, velocity
    velocity = eps if velocity is None else (1 - beta) * velocity + beta * eps
    history.insert(0, velocity)
    return DIGEST_AB[min(order, len(history))](history, beta), velocity


@pytest.mark.parametrize("order", [1, 2, 3, 4])
@pytest.mark.parametrize("kind,direction", [("hb", plms_hb_direction), ("ghvb", ghvb_direction)])
def test_directions_follow_the_paper(kind, direction, order):
    eps_seq = [torch.randn(3, dtype=torch.float64, generator=torch.Generator().manual_seed(k)) for k in range(6)]
    state = MomentumState(0.7, history_length=order)
    got = [direction(state, e, order) for e in eps_seq]
    history, velocity = [], None
    for g, eps in zip(got, eps_seq):
        want, velocity = digest_direction(kind, order, 0.7, history, velocity, eps)
        assert torch.allclose(g, want, atol=1e-13)
    assert torch.equal(got[0], eps_seq[0])  # the first step is Euler (DDIM)


def test_order_and_beta_from_momentum_number():
    assert order_and_beta(3.8) == (4, 0.8)
    assert order_and_beta(0.5) == (1, 0.5)
    assert order_and_beta(2) == (2, 1.0)
    assert order_and_beta(1.5) == (2, 0.5)
    for bad in (0, -1.0, 4.5, float("nan"), "3.8", True):
        with pytest.raises(ValueError, match=r"momentum_number must be a number in \(0, 4\]"):
            order_and_beta(bad)


@pytest.mark.parametrize("bad", [0.0, -0.2, 1.5, float("nan"), None, "0.8"])
def test_beta_outside_unit_interval_is_rejected(bad):
    with pytest.raises(ValueError, match=r"beta must be a number in \(0, 1\]"):
        check_beta(bad)


@pytest.mark.parametrize("bad", [0, 5, 2.0, True])
def test_order_outside_1_to_4_is_rejected(bad):
    with pytest.raises(ValueError, match="order must be one of 1, 2, 3, 4"):
        check_order(bad)


# -- stability on the linear test equation y' = lambda y ------------------------------------------------
@pytest.mark.parametrize("beta", [1.0, 0.8, 0.5])
@pytest.mark.parametrize("order,edge_without_momentum", [(1, -2.0), (2, -1.0), (4, -0.3)])
def test_heavy_ball_stability_edge_matches_formula(order, edge_without_momentum, beta):
    """Wizadwongsa & Suwajanakorn (ICLR 2024): Euler -2 -> -2 (2 - beta) / beta, AB2 -1 -> -(2 - beta) / beta, AB4 -0.3 -> -0.3 (2 - beta) / beta,
    found by running PLMS-r + HB itself on y' = lambda y over a grid of z = h lambda (step 1e-3)."""
    expected = edge_without_momentum * (2 - beta) / beta
    measured = real_axis_stability_edge(plms_hb_direction, order, beta)
    assert measured == pytest.approx(expected, rel=0.01, abs=2e-3), (measured, expected)


def test_ghvb_stability_interval_grows_as_beta_falls():
    edges = [real_axis_stability_edge(ghvb_direction, 2, beta) for beta in (1.0, 0.8, 0.5)]
    assert edges[0] == pytest.approx(-1.0, abs=2e-3) and edges[0] > edges[1] > edges[2], edges
