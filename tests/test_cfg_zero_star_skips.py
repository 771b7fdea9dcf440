"""CFG-Zero*'s zero-init evaluations need no prediction: the network is not called there (counted), in the Denoiser
and under guide() in both CFG patterns, and the samples are the ones a run that evaluates and discards gives."""

import pytest
import torch
from reference_rules import EvaluateAll
from test_guide_pipelines import FIRST_LAYERS, PIPELINES, output, pipeline

from steerdiff.core import Denoiser, FlowMatchSchedule, sample_ddim
from steerdiff.guidance import CFG, CFGZeroStar, GuidanceInterval
from steerdiff.pipelines import guide

pytestmark = pytest.mark.usefixtures("one_thread")


def rows_at_first_layer(network):
    first = next(getattr(network, n) for n in FIRST_LAYERS if hasattr(network, n))
    rows = []
    return rows, first.register_forward_hook(lambda m, a, o: rows.append(a[0].shape[0]))


@pytest.mark.parametrize("name", ["sd3", "flux", "sd", "sana"])
@pytest.mark.parametrize("zero_init_steps", [1, 2])
def test_zero_init_steps_do_not_call_the_network(name, zero_init_steps):
    pipe, call = pipeline(name), PIPELINES[name][1]
    network = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
    with guide(pipe, EvaluateAll(CFGZeroStar(3.0, zero_init_steps=zero_init_steps))) as reference_hook:
        reference = output(pipe, call(3.0))
    rows, handle = rows_at_first_layer(network)
    try:
        with guide(pipe, CFGZeroStar(3.0, zero_init_steps=zero_init_steps)) as hook:
            skipped = output(pipe, call(3.0))
    finally:
        handle.remove()
    calls_per_step = 2 if name == "flux" else 1  # Flux's true CFG: a conditional and an unconditional call
    assert hook.skipped_calls == zero_init_steps * calls_per_step
    assert hook.network_calls == reference_hook.network_calls - hook.skipped_calls == len(rows)
    assert torch.equal(skipped, reference)


def test_a_wrapper_that_guides_some_samples_keeps_the_call():
    """Inside an interval CFG-Zero* zero-inits, outside it the conditional prediction is needed: the call runs."""
    pipe, call = pipeline("sd3"), PIPELINES["sd3"][1]
    with guide(pipe, GuidanceInterval(CFGZeroStar(3.0), sigma_low=0.0, sigma_high=float("inf"))) as hook:
        output(pipe, call(3.0))
    assert hook.skipped_calls == 0


def test_the_denoiser_skips_and_counts():
    class Net:
        def __call__(self, x, t, cond):
            return 0.5 * x + 0.1 * cond.reshape(-1, 1, 1, 1)

        def null(self, batch, device):
            return torch.zeros(batch)

    x = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    process = FlowMatchSchedule()
    runs = {}
    for label, rule in {"skip": CFGZeroStar(3.0, zero_init_steps=2), "all": EvaluateAll(CFGZeroStar(3.0, zero_init_steps=2))}.items():
        denoiser = Denoiser(Net(), process, "flow_prediction", rule, cond=torch.ones(3))
        runs[label] = (sample_ddim(denoiser, x, process, torch.linspace(1000, 0, 6)), denoiser)
    (ours, skip), (reference, every) = runs["skip"], runs["all"]
    assert torch.equal(ours, reference)
    assert skip.skipped_calls == 2 and skip.network_calls == every.network_calls - 2 == 3
    assert CFG(3.0).predictions_needed(_state()).get("cond", True) is not False  # other rules always need c


def _state():
    from steerdiff.core import GuidanceState

    return GuidanceState(FlowMatchSchedule(), 500, torch.zeros(1, 1, 2, 2), "flow_prediction")


@pytest.mark.parametrize("name", ["flux", "sd3"])
def test_the_benchmark_probe_records_the_step_not_the_call(name):
    """A pipeline that calls its network twice per step (Flux's true CFG): NaN from the third step on is recorded at
    step 2, not at call 4 (issue 21, item 7); with one call per step (SD3) both are 2."""
    from steerdiff.benchmark.probe import NetworkProbe

    pipe, call = pipeline(name), PIPELINES[name][1]
    network = pipe.transformer
    seen = []

    def poison(module, args, kwargs, out):  # NaN out of every call from step 2 on
        seen.append(pipe.scheduler.step_index)
        if (pipe.scheduler.step_index or 0) >= 2:
            return (out[0] * float("nan"),) + tuple(out[1:]) if isinstance(out, tuple) else out
        return out

    handle = network.register_forward_hook(poison, with_kwargs=True)
    try:
        with NetworkProbe(network, pipe.scheduler) as probe:
            output(pipe, call(3.0))
    finally:
        handle.remove()
    calls_per_step = 2 if name == "flux" else 1
    assert probe.first_nonfinite_call() == 2 * calls_per_step and probe.first_nonfinite_step() == 2
