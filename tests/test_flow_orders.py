"""Measured orders on flow-matching grids against the closed-form flow of a Gaussian (benchmarks/flow_orders.py):
Euler is first order, the two-step methods reach about 2, heavy ball with beta < 1 falls back to first order, the
paper's fixed weights keep PLMS-4 near 2 and variable weights with a Runge-Kutta start reach 4."""

import pytest

from benchmarks.flow_orders import SOLVERS, measured_order

STEPS = (20, 40, 80, 160)


@pytest.mark.parametrize(
    "name,shift,low,high",
    [
        ("Euler (GHVB 1)", 3.0, 0.9, 1.1),
        ("Euler (GHVB 1)", 1.0, 0.9, 1.1),
        ("DPM-Solver++ 2M (HB-DPM beta 1)", 1.0, 1.8, 2.3),
        ("DPM-Solver++ 2M (HB-DPM beta 1)", 3.0, 1.5, 2.3),  # pre-asymptotic: step 1 follows an infinite h
        ("PLMS-2 (GHVB 2), fixed weights", 3.0, 1.9, 2.3),
        ("PLMS-4 (HB-PLMS beta 1), fixed weights", 1.0, 1.8, 2.2),
        ("PLMS-4 (HB-PLMS beta 1), fixed weights", 3.0, 1.3, 1.8),
        ("PLMS-4 (HB-PLMS beta 1)", 3.0, 3.5, 4.5),
        ("PLMS-4, RK4 start", 1.0, 4.0, 5.5),
        ("HB-PLMS-4 beta 0.8", 3.0, 0.5, 1.2),
        ("GHVB 1.5", 3.0, 1.8, 2.4),
    ],
)
def test_measured_order(name, shift, low, high):
    order, errors = measured_order(SOLVERS[name], shift, STEPS)
    assert all(b < a for a, b in zip(errors, errors[1:])), errors
    assert low <= order <= high, (order, errors)
