"""core.nonfinite.NonFiniteWatch, the one NaN/Inf watch: samples counted through CFG rows and row maps, several
tensors at once (the adjoint's states), the caller's wording, and the earliest of a run's deferred findings."""

import math

import pytest
import torch

from steerdiff.core.nonfinite import NonFiniteWatch, bad_samples, finish_earliest


def test_rows_fold_into_samples():
    out = torch.zeros(5, 3)
    out[0, 1] = math.nan  # an unconditional row of sample 2 (rows 0-1 are uncond rows of samples 2 and 0)
    out[4, 0] = math.inf  # the conditional row of sample 2
    rows = torch.tensor([2, 0, 0, 1, 2])
    assert bad_samples(out, 3, rows).tolist() == [False, False, True]
    with pytest.raises(FloatingPointError, match=r"the network output holds NaN/Inf at evaluation 4 \(timestep 7\) in 1 of 3 samples"):
        NonFiniteWatch("eager", "the network output", unit="evaluation").update(4, out, 7.0, batch=3, row_samples=rows)


def test_several_tensors_and_the_callers_wording():
    watch = NonFiniteWatch("deferred")
    state, params = torch.zeros(2, 4), torch.zeros(3)
    watch.update(0, [state, params])
    watch.finish()  # nothing found
    params[1] = math.nan
    watch.update(1, [state, params])
    watch.update(2, [state * math.nan, params])
    with pytest.raises(FloatingPointError, match="^the adjoint state went bad at grid point 1$"):
        watch.finish(lambda step: f"the adjoint state went bad at grid point {step}")


def test_the_earliest_finding_is_raised_and_a_tie_goes_to_the_first_watch():
    model, update = NonFiniteWatch("deferred", "model_output", 4), NonFiniteWatch("deferred", "the update", 4)
    for i in range(4):
        model.update(i, torch.full((2, 1), math.nan if i >= 2 else 0.0), i)
        update.update(i, torch.full((2, 1), math.nan if i >= 1 else 0.0), i)
    with pytest.raises(FloatingPointError, match="^the update holds NaN/Inf at step 1 of 4"):
        finish_earliest(model, update)
    model, update = NonFiniteWatch("deferred", "model_output"), NonFiniteWatch("deferred", "the update")
    model.update(3, torch.full((1, 1), math.nan), 3)
    update.update(3, torch.full((1, 1), math.nan), 3)
    with pytest.raises(FloatingPointError, match="^model_output holds NaN/Inf at step 3"):
        finish_earliest(model, update)
    finish_earliest(NonFiniteWatch("eager"), NonFiniteWatch("off"))  # nothing deferred: no error
