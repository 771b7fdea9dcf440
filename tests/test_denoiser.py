"""The model boundary (core.Denoiser) and guidance on flow models: CFG and rules against formulas written here,
skipped unconditional rows really skipped, non-finite outputs named, and the exact flow mixture."""

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from steerdiff.core import Denoiser, FlowMatchSchedule, GuidanceState, NoiseSchedule, noise_process_from_config
from steerdiff.guidance import APG, CFG, CFGRescale, CFGZeroStar, GuidanceInterval
from steerdiff.guidance.modular import RuleGuider
from steerdiff.pipelines.conditioning import denoiser_for
from steerdiff.testbeds.mixture import GaussianMixtureDenoiser

F64 = torch.float64
FLOW = FlowMatchEulerDiscreteScheduler(shift=3.0)


class Net:
    """A conditional stand-in network: output = tanh(x) * (1 + cond) + t / 1000, cond a float per row (null = 0)."""

    def __init__(self):
        self.rows = []

    def null(self, batch, device):
        return torch.zeros(batch, dtype=F64, device=device)

    def __call__(self, x, t, cond):
        self.rows.append(x.shape[0])
        return torch.tanh(x) * (1 + cond.reshape(-1, 1, 1, 1)) + (t / 1000).reshape(-1, 1, 1, 1)


def batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(3, 2, 4, 4, generator=g, dtype=F64), torch.tensor([0.5, 1.0, -0.3], dtype=F64)


def test_cfg_weight_is_one_doubled_call():
    net, (x, c) = Net(), batch()
    d = Denoiser(net, FlowMatchSchedule(), "flow_prediction", 4.0, cond=c)
    t = torch.tensor(600.0)
    u, k = net(x, t.expand(3), net.null(3, None)), net(x, t.expand(3), c)
    net.rows.clear()
    assert torch.allclose(d(x, t), u + 4.0 * (k - u), atol=1e-14)
    assert net.rows == [6] and d.network_calls == 1 and d.network_evaluations == 6
    assert torch.equal(Denoiser(net, FlowMatchSchedule(), "flow_prediction", 1.0, cond=c)(x, t), k)  # w = 1: cond only


def test_apg_on_flow_acts_on_x0_equal_x_minus_s_v():
    """APG's reference written in the flow parametrization: D = x - s v for both branches, the paper's update on D
    (first step: no momentum history), back to v = (x - D) / s."""
    net, (x, c) = Net(), batch()
    process = FlowMatchSchedule()
    rule = APG(5.0, eta=0.0, norm_threshold=2.0, momentum=-0.5)
    d = Denoiser(net, process, "flow_prediction", rule, cond=c)
    t = torch.tensor(700.0)
    s = 0.7
    got = d(x, t)
    vu, vc = net(x, t.expand(3), net.null(3, None)), net(x, t.expand(3), c)
    du, dc = x - s * vu, x - s * vc
    delta = dc - du
    norm = delta.flatten(1).norm(dim=1).reshape(-1, 1, 1, 1)
    delta = delta * torch.clamp(2.0 / norm, max=1.0)
    unit = dc / dc.flatten(1).norm(dim=1).reshape(-1, 1, 1, 1)
    par = (delta * unit).flatten(1).sum(1).reshape(-1, 1, 1, 1) * unit
    d_guided = dc + 4.0 * (delta - par)
    assert torch.allclose(got, (x - d_guided) / s, atol=1e-12)


def test_cfg_zero_star_on_flow_is_the_velocity_rule():
    net, (x, c) = Net(), batch()
    d = Denoiser(net, FlowMatchSchedule(), "flow_prediction", CFGZeroStar(3.0, zero_init_steps=1), cond=c)
    d.reset()
    assert torch.equal(d(x, torch.tensor(1000.0)), torch.zeros_like(x))  # zero-init: zero velocity
    t = torch.tensor(500.0)
    got = d(x, t)
    vu, vc = net(x, t.expand(3), net.null(3, None)), net(x, t.expand(3), c)
    a = (vc * vu).flatten(1).sum(1) / (vu * vu).flatten(1).sum(1)
    su = a.reshape(-1, 1, 1, 1) * vu
    assert torch.allclose(got, su + 3.0 * (vc - su), atol=1e-12)


def test_guidance_state_on_flow():
    process = noise_process_from_config(FLOW)
    state = GuidanceState(process, torch.tensor([750.0, 250.0]), torch.zeros(2, 1, 2, 2))
    assert torch.allclose(state.sigma, torch.tensor([0.75, 0.25], dtype=F64))
    assert torch.allclose(state.alpha, torch.tensor([0.25, 0.75], dtype=F64))
    assert torch.allclose(state.sigma_bar, torch.tensor([3.0, 1 / 3], dtype=F64))
    assert torch.allclose(state.progress, torch.tensor([0.75, 0.25], dtype=F64))
    given = GuidanceState(process, 0.75, torch.zeros(2, 1, 2, 2), alpha=0.4, sigma=0.6)  # a grid's own level
    assert float(given.sigma[0]) == 0.6 and float(given.progress[0]) == 0.6


def test_cfg_rescale_takes_the_velocity_on_flow_and_v_prediction_is_refused():
    net, (x, c) = Net(), batch()
    d = Denoiser(net, FlowMatchSchedule(), "flow_prediction", CFGRescale(4.0, phi=0.7), cond=c)
    t = torch.tensor(400.0)
    vu, vc = net(x, t.expand(3), net.null(3, None)), net(x, t.expand(3), c)
    g = vu + 4.0 * (vc - vu)
    ratio = vc.flatten(1).std(1) / g.flatten(1).std(1)
    assert torch.allclose(d(x, t), g * (0.7 * ratio + 0.3).reshape(-1, 1, 1, 1), atol=1e-12)
    with pytest.raises(ValueError, match="v_prediction"):
        Denoiser(net, FlowMatchSchedule(), "v_prediction")


def test_skipped_unconditional_rows_are_not_run():
    net, (x, c) = Net(), batch()
    process = NoiseSchedule.from_config({})
    # interval on sigma_bar: at t = 999 sigma_bar ~ 157 > 10 is outside, every sample unguided -> conditional rows only
    d = Denoiser(net, process, "epsilon", GuidanceInterval(CFG(3.0), sigma_high=10.0), cond=c)
    out = d(x, torch.tensor(999))
    assert net.rows == [3] and d.network_evaluations == 3
    assert torch.equal(out, net(x, torch.tensor(999).expand(3), c))
    net.rows.clear()
    d(x, torch.tensor(100))  # inside: both halves
    assert net.rows == [6]
    net.rows.clear()
    per_sample = Denoiser(net, process, "epsilon", GuidanceInterval(CFG(3.0), sigma_high=10.0), cond=c)
    per_sample(x, torch.tensor([999, 100, 100]))  # one sample outside: 3 conditional + 2 unconditional rows
    assert net.rows == [5] and per_sample.network_evaluations == 5


def test_non_finite_output_names_the_evaluation_and_counts_samples():
    class Bad(Net):
        def __call__(self, x, t, cond):
            out = super().__call__(x, t, cond)
            out[0] = float("nan")  # the first row: sample 0's unconditional prediction
            return out

    _, (x, c) = Net(), batch()
    d = Denoiser(Bad(), FlowMatchSchedule(), "flow_prediction", 3.0, cond=c, check_finite=True)
    d.reset()
    with pytest.raises(FloatingPointError, match=r"evaluation 0 \(timestep 800\) in 1 of 3 samples"):
        d(x, torch.tensor(800.0))


def test_guidance_needs_a_conditional_network_and_bad_weights_are_refused():
    with pytest.raises(ValueError, match="conditional network"):
        Denoiser(lambda x, t, c: x, FlowMatchSchedule(), "flow_prediction", 3.0)
    with pytest.raises(ValueError, match="finite number"):
        Denoiser(Net(), FlowMatchSchedule(), "flow_prediction", float("inf"))
    with pytest.raises(TypeError, match="guidance rule"):
        Denoiser(Net(), FlowMatchSchedule(), "flow_prediction", "apg")


def test_rule_guider_reads_the_flow_process():
    guider = RuleGuider(APG(5.0), scheduler=FLOW)
    assert guider.process.kind == "flow" and guider.prediction_type == "flow_prediction"
    assert guider.new().process.kind == "flow"
    sana = {"_class_name": "DPMSolverMultistepScheduler", "use_flow_sigmas": True, "flow_shift": 3.0,
            "prediction_type": "flow_prediction"}
    assert RuleGuider(CFG(2.0), scheduler=sana).process.kind == "flow"


# -- the analytic mixture as a flow model ----------------------------------------------------------------------------
def flow_mixture(prediction_type="flow_prediction"):
    g = torch.Generator().manual_seed(3)
    means = torch.randn(3, 1, 2, 2, generator=g, dtype=F64)
    return GaussianMixtureDenoiser.from_components(
        means, torch.tensor([0.2, 0.5, 0.1], dtype=F64).reshape(3, 1), torch.tensor([0.5, 0.3, 0.2], dtype=F64),
        scheduler_config=FLOW, component_classes=torch.tensor([0, 1, 1]), prediction_type=prediction_type,
    )


def test_mixture_velocity_is_the_exact_flow():
    """u = eps - x0 with eps = -sigma score and x0 = (x + sigma^2 score) / alpha (Tweedie), score by autograd."""
    mix = flow_mixture()
    assert mix.config.noise_process == "flow" and mix.schedule.kind == "flow"
    x = torch.randn(4, 1, 2, 2, generator=torch.Generator().manual_seed(4), dtype=F64).requires_grad_(True)
    t = torch.tensor([900.0, 600.0, 300.0, 50.0], dtype=F64)
    labels = torch.tensor([0, 1, 2, 1])
    (score,) = torch.autograd.grad(mix.log_prob(x, t, labels).sum(), x)
    s = (t / 1000).reshape(-1, 1, 1, 1)
    eps, x0 = -s * score, (x + s**2 * score) / (1 - s)
    u = mix(x, t, class_labels=labels).sample
    assert torch.allclose(u, (eps - x0).detach(), atol=1e-10)
    preds = mix.predictions(x.detach(), t, labels)
    assert torch.allclose(preds["flow_prediction"], u.detach()) and torch.allclose(preds["sample"], x0.detach(), atol=1e-10)
    at_noise = mix(x.detach(), torch.tensor(1000.0), labels).sample  # s = 1: x0 = the prior mean, v = x - E[x0]
    assert torch.isfinite(at_noise).all()


def test_mixture_refuses_v_prediction_on_flow():
    with pytest.raises(ValueError, match="v_prediction"):
        flow_mixture("v_prediction")


def test_denoiser_for_a_class_conditional_flow_mixture():
    mix = flow_mixture()
    labels = torch.tensor([0, 1])
    x = torch.randn(2, 1, 2, 2, dtype=F64)
    d = denoiser_for(mix, mix.schedule, "flow_prediction", 2.5, cond=labels)
    u = mix(x, 500.0, class_labels=torch.full((2,), 2)).sample
    c = mix(x, 500.0, class_labels=labels).sample
    assert torch.allclose(d(x, torch.tensor(500.0)), u + 2.5 * (c - u), atol=1e-12)


@pytest.mark.parametrize("family", ["vp", "flow"])
@pytest.mark.parametrize("guidance", [1.0, 3.0, CFG(3.0), APG(3.0), CFGZeroStar(3.0, zero_init_steps=0)], ids=repr)
def test_the_boundary_never_reads_device_tensors(family, guidance):
    """On the meta device every read of a tensor's value on the host fails: the boundary takes none (a 0-d index
    tensor into the VP table did, seen on CUDA with set_sync_debug_mode)."""
    process = FlowMatchSchedule() if family == "flow" else NoiseSchedule.from_config({})
    ptype = "flow_prediction" if family == "flow" else "epsilon"
    meta = torch.device("meta")
    d = Denoiser(Net(), process, ptype, guidance, cond=torch.ones(2, dtype=F64, device=meta))
    out = d(torch.empty(2, 1, 4, 4, dtype=F64, device=meta), torch.tensor(500.0, device=meta))
    assert out.shape == (2, 1, 4, 4) and out.device.type == "meta"


def test_schedules_interval_adaptive_and_linear_ag_run_on_a_flow_model():
    from steerdiff.core import resolve_grid, sample_ddim
    from steerdiff.guidance import AdaptiveGuidance, Cosine, LinearAG

    mix = flow_mixture()
    process = mix.schedule
    grid = resolve_grid(process, 6)
    x = torch.randn(3, 1, 2, 2, generator=torch.Generator().manual_seed(5), dtype=F64)
    labels = torch.tensor([0, 1, 1])

    def run(guidance):
        d = denoiser_for(mix, process, "flow_prediction", guidance, cond=labels)
        return sample_ddim(d, x, process, grid), d.network_evaluations

    cfg, rows = run(3.0)
    assert rows == 6 * 6
    same, _ = run(AdaptiveGuidance(CFG(3.0), threshold=1.0))  # never switches off: CFG
    assert torch.allclose(same, cfg, atol=1e-12)
    out, rows = run(GuidanceInterval(CFG(3.0), sigma_low=0.5, sigma_high=4.0))  # sigma_bar = s / (1 - s)
    inside = ((grid.sigma_bar[:-1] > 0.5) & (grid.sigma_bar[:-1] <= 4.0)).sum().item()
    assert rows == 6 * 3 + inside * 3 and torch.isfinite(out).all()
    out, _ = run(CFG(Cosine(3.0)))  # a weight schedule of the flow noise level s
    assert torch.isfinite(out).all() and not torch.allclose(out, cfg)
    coefficients = torch.zeros(6, 4, dtype=F64)
    coefficients[:, 2] = 1.0  # u_i estimated as u_{i-1}
    skip = torch.tensor([False, True, False, True, False, True])
    out, rows = run(LinearAG(CFG(3.0), coefficients, grid.timesteps, skip))
    assert rows == 6 * 3 + 3 * 3 and torch.isfinite(out).all()
