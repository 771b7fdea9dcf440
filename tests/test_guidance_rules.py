"""Guidance rules against their formulas (CFG: Ho & Salimans 2022; APG: Sadat et al., ICLR 2025; rescale: Lin et al. 2024;
CFG-Zero*: Fan et al. 2025) on random float64 tensors, in every
parametrization; masks, per-run state, bad input and the registry."""

import math

import pytest
import torch
from diffusers import DDPMScheduler

from steerdiff.core import NoiseSchedule, convert_prediction
from steerdiff.guidance import (
    APG,
    CFG,
    AdaptiveGuidance,
    CFGRescale,
    CFGZeroStar,
    GuidanceInterval,
    GuidanceRule,
    GuidanceState,
    Linear,
    WeightSchedule,
    get_rule,
    get_schedule,
)

SCHEDULE = NoiseSchedule.from_config(DDPMScheduler().config)
B, SHAPE = 3, (2, 4, 4)


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def make_state(prediction_type="epsilon", t=500, step=0, **kwargs):
    return GuidanceState(SCHEDULE, torch.tensor(t), randn(B, *SHAPE, seed=99), prediction_type, step, **kwargs)


def as_type(eps, state, prediction_type):
    """An eps prediction re-expressed as ``prediction_type`` for the sample and noise level of ``state``."""
    return convert_prediction(eps, state.sample, state.alpha, state.sigma, "epsilon", prediction_type)


def flat_dot(a, b):
    return (a.flatten(1) * b.flatten(1)).sum(1)


# -- formulas ----------------------------------------------------------------------------------------------
def test_cfg_formula_and_schedule_scale():
    c, u, state = randn(B, *SHAPE, seed=1), randn(B, *SHAPE, seed=2), make_state(t=250)
    assert torch.equal(CFG(4.0)(c, u, state), u + 4.0 * (c - u))
    w = 1 + 2 * (5.0 - 1) * (1 - 250 / 999)  # Linear(5) at s = t / (T - 1)
    assert torch.allclose(CFG(Linear(5.0))(c, u, state), u + w * (c - u), atol=1e-12)


def test_cfg_rescale_formula_in_model_and_v_space():
    c, u, state = randn(B, *SHAPE, seed=1), randn(B, *SHAPE, seed=2), make_state()
    g = u + 6.0 * (c - u)
    std = lambda x: x.flatten(1).std(1).reshape(-1, 1, 1, 1)
    expected = 0.7 * g * std(c) / std(g) + 0.3 * g
    assert torch.allclose(CFGRescale(6.0, 0.7, space="model")(c, u, state), expected, atol=1e-12)
    # default: the std is taken of the v-predictions, whatever the model predicts
    cv, uv = as_type(c, state, "v_prediction"), as_type(u, state, "v_prediction")
    gv = uv + 6.0 * (cv - uv)
    expected_v = 0.7 * gv * std(cv) / std(gv) + 0.3 * gv
    got = CFGRescale(6.0, 0.7)(c, u, state)
    assert torch.allclose(as_type(got, state, "v_prediction"), expected_v, atol=1e-10)
    assert not torch.allclose(got, expected, atol=1e-6)  # the space matters
    assert torch.allclose(CFGRescale(6.0, 0.0)(c, u, state), CFG(6.0)(c, u, state), atol=1e-12)


def test_cfg_zero_star_formula_and_zero_init():
    c, u = randn(B, *SHAPE, seed=1), randn(B, *SHAPE, seed=2)
    rule = CFGZeroStar(5.0, zero_init_steps=2)
    for step in (0, 1):
        state = make_state(step=step)
        kept = state.sample / (state.alpha + state.sigma).reshape(-1, 1, 1, 1)  # keeps x / (alpha + sigma) fixed
        assert torch.allclose(rule(c, u, state), kept, atol=1e-12)
        assert torch.equal(CFGZeroStar(5.0, 2, zero_init="zero")(c, u, state), torch.zeros_like(c))
    a = (flat_dot(c, u) / flat_dot(u, u)).reshape(-1, 1, 1, 1)
    assert torch.allclose(rule(c, u, make_state(step=2)), a * u + 5.0 * (c - a * u), atol=1e-12)


def test_cfg_zero_star_flow_zero_init_keeps_the_rectified_flow_sample():
    """A DDIM step with the zero-init prediction leaves x / (alpha + sigma) unchanged (zero flow velocity)."""
    from steerdiff.core.steps import euler_step

    c, u = randn(B, *SHAPE, seed=1), randn(B, *SHAPE, seed=2)
    state = make_state(t=999)
    eps = CFGZeroStar(5.0)(c, u, state)
    alpha, sigma = (v.reshape(-1, 1, 1, 1) for v in (state.alpha, state.sigma))
    a2, s2 = (v.reshape(-1, 1, 1, 1) for v in SCHEDULE.alpha_sigma(torch.full((B,), 949.0, dtype=torch.float64)))
    x_next = euler_step(state.sample, eps, alpha, sigma, a2, s2)
    assert torch.allclose(x_next / (a2 + s2), state.sample / (alpha + sigma), atol=1e-12)
    x_zero = euler_step(state.sample, torch.zeros_like(eps), alpha, sigma, a2, s2)  # zero eps does not keep it
    assert not torch.allclose(x_zero / (a2 + s2), state.sample / (alpha + sigma), atol=1e-3)


def apg_reference(cs, us, w, eta, r, beta):
    """APG of Sadat et al. written out per sample over a run of data predictions."""
    outs, avg = [], None
    for c, u in zip(cs, us):
        delta = c - u
        avg = delta if avg is None else delta + beta * avg
        out = []
        for i in range(c.shape[0]):
            d = avg[i].flatten()
            d = d * min(1.0, r / d.norm().item())
            unit = c[i].flatten() / c[i].flatten().norm()
            par = torch.dot(d, unit) * unit
            out.append(c[i] + (w - 1) * ((d - par) + eta * par).reshape(c[i].shape))
        outs.append(torch.stack(out))
    return outs


@pytest.mark.parametrize("eta,r,beta", [(0.0, 2.0, -0.5), (0.3, math.inf, 0.0), (1.0, 0.5, -0.75)])
def test_apg_projection_rescale_and_negative_momentum_on_data_prediction(eta, r, beta):
    rule = APG(7.0, eta=eta, norm_threshold=r, momentum=beta)
    rule.reset()
    states = [make_state("sample", t=t, step=i) for i, t in enumerate((900, 600, 300))]
    cs = [randn(B, *SHAPE, seed=10 + i) for i in range(3)]
    us = [c + 0.4 * randn(B, *SHAPE, seed=20 + i) for i, c in enumerate(cs)]
    expected = apg_reference(cs, us, 7.0, eta, r, beta)
    for c, u, state, e in zip(cs, us, states, expected):
        assert torch.allclose(rule(c, u, state), e, atol=1e-10)


def test_apg_works_on_x0_for_every_parametrization_and_reduces_to_cfg():
    eps_c, eps_u = randn(B, *SHAPE, seed=1), randn(B, *SHAPE, seed=2)
    x0_outputs = {}
    for pt in ("epsilon", "v_prediction", "sample"):
        state = make_state(pt, t=700)
        rule = APG(9.0, eta=0.0, norm_threshold=3.0, momentum=-0.5)
        got = rule(as_type(eps_c, state, pt), as_type(eps_u, state, pt), state)
        x0_outputs[pt] = convert_prediction(got, state.sample, state.alpha, state.sigma, pt, "sample")
    state = make_state("epsilon", t=700)
    d_c, d_u = as_type(eps_c, state, "sample"), as_type(eps_u, state, "sample")
    (expected,) = apg_reference([d_c], [d_u], 9.0, 0.0, 3.0, -0.5)
    for out in x0_outputs.values():
        assert torch.allclose(out, expected, atol=1e-9)
    plain = APG(9.0, eta=1.0, norm_threshold=None, momentum=0.0)(eps_c, eps_u, state)
    assert torch.allclose(plain, CFG(9.0)(eps_c, eps_u, state), atol=1e-9)


def test_apg_projection_is_float64_for_float32_inputs():
    # an update almost parallel to D_c and 1e4 times larger: its orthogonal part (1e-3) survives in float64 only
    c = randn(B, *SHAPE, seed=1)
    delta = 1e4 * c / c.flatten(1).norm(dim=1).reshape(-1, 1, 1, 1) + 1e-3 * randn(B, *SHAPE, seed=2)
    c32, u32 = c.float(), (c.float().double() - delta).float()
    got = APG(5.0, eta=0.0, norm_threshold=None, momentum=0.0)(c32, u32, make_state("sample"))
    (expected,) = apg_reference([c32.double()], [u32.double()], 5.0, 0.0, math.inf, 0.0)
    assert got.dtype == torch.float32
    assert torch.allclose(got.double(), expected, atol=1e-5)
    d0, unit = c32[0] - u32[0], c32[0] / c32[0].norm()
    float32_result = c32[0] + 4 * (d0 - (d0 * unit).sum() * unit)
    assert not torch.allclose(float32_result.double(), expected[0], atol=1e-5)  # float32 math would fail the check


@pytest.mark.parametrize(
    "rule",
    [CFG(5.0), CFGRescale(5.0, 0.7), CFGZeroStar(5.0, zero_init_steps=0), APG(5.0, norm_threshold=2.0)],
    ids=["cfg", "rescale", "zero_star", "apg"],
)
def test_every_rule_gives_the_same_data_prediction_in_every_parametrization(rule):
    eps_c, eps_u = randn(B, *SHAPE, seed=3), randn(B, *SHAPE, seed=4)
    results = []
    for pt in ("epsilon", "v_prediction", "sample"):
        state = make_state(pt, t=400)
        rule.reset()
        out = rule(as_type(eps_c, state, pt), as_type(eps_u, state, pt), state)
        results.append(convert_prediction(out, state.sample, state.alpha, state.sigma, pt, "sample"))
    for other in results[1:]:
        assert torch.allclose(results[0], other, atol=1e-9)


# -- masks and wrappers ------------------------------------------------------------------------------------
def test_active_mask_keeps_the_conditional_prediction_and_freezes_apg_momentum():
    c, u = randn(B, *SHAPE, seed=1), randn(B, *SHAPE, seed=2)
    active = torch.tensor([True, False, True])
    rule = APG(4.0, momentum=-0.5)
    out = rule(c, u, make_state(active=active))
    assert torch.equal(out[1], c[1]) and not torch.allclose(out[0], c[0])
    assert torch.equal(rule._average[1], torch.zeros_like(c[1]))


def test_interval_guides_only_inside_and_asks_for_uncond_only_there():
    c, u = randn(B, *SHAPE, seed=1), randn(B, *SHAPE, seed=2)
    rule = GuidanceInterval(CFG(3.0), sigma_low=0.5, sigma_high=2.0)
    for t, inside in ((100, False), (300, True), (800, False)):
        state = make_state(t=t)
        sigma = math.sqrt((1 - SCHEDULE.alphas_cumprod[t]) / SCHEDULE.alphas_cumprod[t])
        assert (0.5 < sigma <= 2.0) == inside
        assert bool(rule.uncond_needed(state).all()) == inside
        expected = u + 3.0 * (c - u) if inside else c
        assert torch.equal(rule(c, u, state), expected)


def test_adaptive_guidance_stops_per_sample_after_the_cosine_passes_the_threshold():
    c = randn(B, *SHAPE, seed=1)
    u = c.clone()
    u[0] = -c[0]  # cos -1
    u[1] = c[1] + 1e-3 * randn(*SHAPE, seed=5)  # cos ~ 1
    u[2] = randn(*SHAPE, seed=6)  # cos ~ 0
    rule = AdaptiveGuidance(CFG(2.0), threshold=0.9)
    rule.reset()
    assert rule.uncond_needed(make_state()) is None
    out = rule(c, u, make_state())
    assert torch.equal(out, u + 2.0 * (c - u))  # the crossing evaluation is still guided
    assert rule.guiding.tolist() == [True, False, True]
    assert rule.uncond_needed(make_state(step=1)).tolist() == [True, False, True]
    out = rule(c, u, make_state(step=1, evaluated=torch.tensor([True, False, True])))
    assert torch.equal(out[1], c[1]) and torch.equal(out[0], (u + 2.0 * (c - u))[0])
    rule.reset()
    assert rule.guiding is None
    never = AdaptiveGuidance(CFG(2.0), threshold=1.0)
    never(c, c, make_state())
    assert bool(never.guiding.all())  # cos(c, c) = 1 does not exceed 1


def test_adaptive_guidance_compares_the_predictions_in_the_chosen_space():
    """At high noise eps_c and eps_u share x_t / sigma_t: their cosine is ~1 while the x0 predictions differ."""
    state = make_state(t=999)
    alpha, sigma = (v.reshape(-1, 1, 1, 1) for v in (state.alpha, state.sigma))
    x0_c, x0_u = randn(B, *SHAPE, seed=1), randn(B, *SHAPE, seed=2)  # unrelated data predictions: cos ~ 0
    c, u = ((state.sample - alpha * x0) / sigma for x0 in (x0_c, x0_u))  # the same as eps predictions
    eps_rule = AdaptiveGuidance(CFG(2.0), threshold=0.99)
    eps_rule(c, u, state)
    assert not bool(eps_rule.guiding.any())  # eps cosine passes 0.99 at the first evaluation
    x0_rule = AdaptiveGuidance(CFG(2.0), threshold=0.99, similarity_space="sample")
    x0_rule(c, u, state)
    assert bool(x0_rule.guiding.all())


# -- bad input ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "build,match",
    [
        (lambda: CFG(-1.0), r"scale must lie in \[0, inf\]"),
        (lambda: CFG(float("nan")), "scale must be a finite number"),
        (lambda: CFG("7"), "scale must be a number >= 0 or a WeightSchedule"),
        (lambda: APG(-2.0), r"scale must lie in \[0, inf\]"),
        (lambda: APG(5.0, momentum=1.0), r"momentum must lie in \(-1, 1\)"),
        (lambda: APG(5.0, momentum=-1.0), r"momentum must lie in \(-1, 1\]"),
        (lambda: APG(5.0, norm_threshold=0.0), r"norm_threshold must lie in \(0, inf\]"),
        (lambda: CFGRescale(5.0, phi=1.5), r"phi must lie in \[0, 1\]"),
        (lambda: CFGRescale(5.0, space="x0"), "space must be one of"),
        (lambda: CFGZeroStar(5.0, zero_init_steps=-1), "zero_init_steps must be an integer >= 0"),
        (lambda: CFGZeroStar(5.0, zero_init="none"), "zero_init must be one of"),
        (lambda: AdaptiveGuidance(CFG(3.0), threshold=1.5), r"threshold must lie in \[-1, 1\]"),
        (lambda: AdaptiveGuidance(CFG(3.0), threshold=-1.01), r"threshold must lie in \[-1, 1\]"),
        (lambda: AdaptiveGuidance(CFG(3.0), similarity_space="x0"), "similarity_space must be one of"),
        (lambda: AdaptiveGuidance(CFG(3.0), threshold=float("nan")), "threshold must be a finite number"),
        (lambda: GuidanceInterval(CFG(3.0), 2.0, 1.0), "sigma_high must exceed sigma_low"),
        (lambda: GuidanceInterval(CFG(3.0), -1.0, 1.0), r"sigma_low must lie in \[0, inf\]"),
        (lambda: Linear(-1.0), r"Linear w0 must lie in \[0, inf\]"),
        (lambda: Linear(0.2), r"Linear\(w0=0.2\) yields negative weights"),
    ],
)
def test_bad_rule_parameters_are_named(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_a_schedule_that_yields_nan_is_refused():
    class LogSchedule(WeightSchedule):
        def shape(self, s):
            return torch.log(s - 0.5)  # NaN below s = 1/2

    with pytest.raises(ValueError, match=r"LogSchedule\(w0=3\) yields NaN/Inf weights \(first at s = 0\)"):
        CFG(LogSchedule(3.0))
    with pytest.raises(ValueError, match="yields NaN/Inf weights"):
        APG(LogSchedule(3.0))


def test_rules_reject_mismatched_inputs():
    state = make_state()
    with pytest.raises(ValueError, match="cond and uncond must have the same shape"):
        CFG(3.0)(randn(B, *SHAPE), randn(B, 1, 4, 4), state)
    with pytest.raises(ValueError, match=r"cond must have shape \(B, \.\.\.\) with B = 3"):
        CFG(3.0)(randn(2, *SHAPE), randn(2, *SHAPE), state)
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        make_state("x0")
    with pytest.raises(TypeError, match="rule must be a GuidanceRule"):
        AdaptiveGuidance("cfg")
    with pytest.raises(NotImplementedError):
        GuidanceRule()(randn(B, *SHAPE), randn(B, *SHAPE), state)


# -- registry ----------------------------------------------------------------------------------------------
def test_registry_builds_rules_and_schedules_from_config_values():
    rule = get_rule("apg", scale={"schedule": "cosine", "w0": 9.0}, momentum=-0.25)
    assert isinstance(rule, APG) and rule.momentum == -0.25 and repr(rule.scale) == "Cosine(w0=9)"
    wrapped = get_rule("adaptive", rule={"name": "interval", "rule": {"name": "cfg", "scale": 4}, "sigma_high": 3.0})
    assert isinstance(wrapped.rule, GuidanceInterval) and isinstance(wrapped.rule.rule, CFG)
    assert repr(get_schedule("clamp_linear", w0=7.5, c=3.0)) == "ClampLinear(w0=7.5, c=3)"
    with pytest.raises(ValueError, match="unknown guidance rule 'cfg_pp'; available: cfg, apg"):
        get_rule("cfg_pp")  # (this test used "pag" until PAG was built)
    with pytest.raises(ValueError, match=r"rule 'cfg' has no option\(s\) \['scael'\]; allowed: \['scale'\]"):
        get_rule("cfg", scael=3)
    with pytest.raises(ValueError, match="unknown weight schedule 'ramp'"):
        get_rule("cfg", scale={"schedule": "ramp", "w0": 3})
    with pytest.raises(ValueError, match="wraps another rule"):
        get_rule("interval", sigma_high=3.0)
    with pytest.raises(ValueError, match="needs 'rule' .* and 'coefficients'"):
        get_rule("linear_ag", rule={"name": "cfg"})
