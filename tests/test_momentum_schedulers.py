"""HeavyBallPLMSScheduler, HeavyBallDPMSolverScheduler and GHVBScheduler: the diffusers contract, the base solvers at
beta = 1, the paper's recurrences at beta < 1, per-sample state, bad input and the no-sync guarantee."""

import math

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler
from diffusers.utils import DummyObject
from test_core import GaussianData
from test_momentum_core import digest_direction

from steerdiff.core import NoiseSchedule, sample_plms, to_eps, with_final
from steerdiff.samplers import GHVBScheduler, HeavyBallDPMSolverScheduler, HeavyBallPLMSScheduler, HeavyBallUniPCScheduler, make_scheduler

SCHEDULERS = [HeavyBallPLMSScheduler, HeavyBallDPMSolverScheduler, GHVBScheduler, HeavyBallUniPCScheduler]
SD_BETAS = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)

# Scheduler configs of public models, as their repositories ship them (stable-diffusion-v1-5, stable-diffusion-2-1,
# stable-diffusion-xl-base-1.0), and SD 1.5's config as diffusers saves it for its DDIM, Euler and DPM-Solver
# schedulers; "a_future_option" stands for keys these classes have never heard of.
SD15_PNDM = {
    "_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "beta_start": 0.00085, "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True,
    "steps_offset": 1, "trained_betas": None, "clip_sample": False,
}
SD15_DDIM = {
    "_class_name": "DDIMScheduler", "_diffusers_version": "0.21.4", "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "beta_start": 0.00085, "clip_sample": False, "clip_sample_range": 1.0, "dynamic_thresholding_ratio": 0.995,
    "num_train_timesteps": 1000, "prediction_type": "epsilon", "rescale_betas_zero_snr": False,
    "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "thresholding": False, "timestep_spacing": "leading", "trained_betas": None,
}
SD15_EULER = {
    "_class_name": "EulerDiscreteScheduler", "_diffusers_version": "0.21.4", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False, "interpolation_type": "linear",
    "num_train_timesteps": 1000, "prediction_type": "epsilon", "sample_max_value": 1.0, "set_alpha_to_one": False,
    "skip_prk_steps": True, "steps_offset": 1, "timestep_spacing": "leading", "trained_betas": None,
    "use_karras_sigmas": False, "a_future_option": [1, 2],
}
SD15_DPM = {
    "_class_name": "DPMSolverMultistepScheduler", "_diffusers_version": "0.21.4", "algorithm_type": "dpmsolver++",
    "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
    "dynamic_thresholding_ratio": 0.995, "euler_at_final": False, "lower_order_final": True,
    "num_train_timesteps": 1000, "prediction_type": "epsilon", "sample_max_value": 1.0, "set_alpha_to_one": False,
    "skip_prk_steps": True, "solver_order": 2, "solver_type": "midpoint", "steps_offset": 1, "thresholding": False,
    "timestep_spacing": "linspace", "trained_betas": None, "use_karras_sigmas": False, "use_lu_lambdas": False,
    "variance_type": None, "a_future_option": "yes",
}
SD21_DDIM_V = {
    "_class_name": "DDIMScheduler", "_diffusers_version": "0.8.0", "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "beta_start": 0.00085, "clip_sample": False, "num_train_timesteps": 1000, "prediction_type": "v_prediction",
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
}
SDXL_EULER = {
    "_class_name": "EulerDiscreteScheduler", "_diffusers_version": "0.19.0.dev0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False, "interpolation_type": "linear",
    "num_train_timesteps": 1000, "prediction_type": "epsilon", "sample_max_value": 1.0, "set_alpha_to_one": False,
    "skip_prk_steps": True, "steps_offset": 1, "timestep_spacing": "leading", "trained_betas": None,
    "use_karras_sigmas": False,
}
PUBLIC_CONFIGS = [SD15_PNDM, SD15_DDIM, SD15_EULER, SD15_DPM, SD21_DDIM_V, SDXL_EULER]


def run(scheduler, model, x, num_inference_steps=None, timesteps=None):
    if timesteps is None:
        scheduler.set_timesteps(num_inference_steps)  # UniPC's set_timesteps takes no timesteps=
    else:
        scheduler.set_timesteps(num_inference_steps, timesteps=timesteps)
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, t.expand(x.shape[0])), t, x).prev_sample
    return x


def gaussian(prediction_type="epsilon", config=SD_BETAS):
    return GaussianData(NoiseSchedule.from_config(config), prediction_type)


def x_T(batch=4, dtype=torch.float64, seed=0):
    return torch.randn(batch, 1, 4, 4, dtype=dtype, generator=torch.Generator().manual_seed(seed))


# -- construction from model configs ------------------------------------------------------------------------
@pytest.mark.parametrize("config", PUBLIC_CONFIGS, ids=lambda c: f"{c['_class_name']}-{c['_diffusers_version']}")
@pytest.mark.parametrize("cls", SCHEDULERS)
def test_from_public_config_keeps_betas_and_prediction_type(cls, config):
    sched = cls.from_config(config)
    reference = DDPMScheduler(**SD_BETAS)
    assert torch.equal(sched.alphas_cumprod, reference.alphas_cumprod)
    assert sched.config.prediction_type == config.get("prediction_type", "epsilon")
    assert sched.config.steps_offset == 1
    model = gaussian(sched.config.prediction_type)
    assert run(sched, model, x_T(), 4).shape == (4, 1, 4, 4)


@pytest.mark.parametrize("cls", SCHEDULERS)
def test_save_and_load_round_trip(cls, tmp_path):
    sched = cls(beta=0.6, prediction_type="v_prediction", timestep_spacing="trailing", **SD_BETAS)
    sched.save_pretrained(tmp_path)
    loaded = cls.from_pretrained(tmp_path)
    public = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.config) == public(sched.config)
    model = gaussian("v_prediction")
    assert torch.equal(run(sched, model, x_T(), 6), run(loaded, model, x_T(), 6))


@pytest.mark.parametrize("cls", SCHEDULERS)
def test_trained_betas_survive_save_and_load(cls, tmp_path):
    betas = np.linspace(1e-4, 0.03, 500)
    sched = cls(num_train_timesteps=500, trained_betas=betas)
    assert torch.equal(sched.alphas_cumprod, DDPMScheduler(num_train_timesteps=500, trained_betas=betas).alphas_cumprod)
    sched.save_pretrained(tmp_path)
    assert torch.equal(cls.from_pretrained(tmp_path).alphas_cumprod, sched.alphas_cumprod)


def test_ghvb_momentum_number_survives_save_and_load(tmp_path):
    sched = GHVBScheduler(momentum_number=1.5)
    assert (sched.config.order, sched.config.beta) == (2, 0.5)
    sched.save_pretrained(tmp_path)
    loaded = GHVBScheduler.from_pretrained(tmp_path)
    assert (loaded.config.order, loaded.config.beta, loaded.config.momentum_number) == (2, 0.5, 1.5)
    explicit = GHVBScheduler(order=2, beta=0.5)
    model = gaussian("epsilon", {})
    assert torch.equal(run(loaded, model, x_T(), 7), run(explicit, model, x_T(), 7))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # numpy 2 deprecations inside diffusers' KDPM2 schedulers
@pytest.mark.parametrize("cls", SCHEDULERS)
def test_from_config_to_each_compatible_scheduler_and_back(cls):
    sched = cls(beta=0.7, prediction_type="v_prediction", **SD_BETAS)
    installed = [c for c in sched.compatibles if not isinstance(c, DummyObject)]  # torchsde may be missing
    assert len(installed) >= 14
    for other_cls in installed:
        other = other_cls.from_config(sched.config)
        assert other.config.prediction_type == "v_prediction"
        if hasattr(other, "alphas_cumprod"):  # all but EDMEulerScheduler, which has no VP betas
            assert torch.allclose(other.alphas_cumprod.double(), sched.alphas_cumprod.double(), rtol=1e-6)
        back = cls.from_config(other.config)
        for key in ("beta", "beta_schedule", "beta_start", "beta_end", "prediction_type", "num_train_timesteps"):
            assert back.config[key] == sched.config[key], (other_cls.__name__, key)


def test_registry_finds_the_momentum_schedulers():
    sched = make_scheduler("ghvb", SD15_PNDM, momentum_number=3.8)
    assert isinstance(sched, GHVBScheduler) and (sched.config.order, sched.config.beta) == (4, 0.8)
    assert isinstance(make_scheduler("HeavyBallPLMSScheduler", None, beta=0.9), HeavyBallPLMSScheduler)
    assert isinstance(make_scheduler("dpmpp_2m_hb", SD15_DPM), HeavyBallDPMSolverScheduler)
    with pytest.raises(ValueError, match="has no option"):
        make_scheduler("plms_hb", None, momentum=0.9)


# -- the contract -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", SCHEDULERS)
def test_step_shape_and_return_dict_equivalence(cls):
    a, b = cls(**SD_BETAS), cls(**SD_BETAS)
    a.set_timesteps(5)
    b.set_timesteps(5)
    x = torch.randn(2, 4, 6, 6)
    for t in a.timesteps[:3]:
        out = torch.randn(2, 4, 6, 6)
        got = a.step(out, t, x).prev_sample
        tup = b.step(out, t, x, return_dict=False)
        assert isinstance(tup, tuple) and len(tup) == 1
        assert got.shape == x.shape and got.dtype == x.dtype and torch.equal(got, tup[0])
        x = got
    assert a.order == 1 and a.init_noise_sigma == 1.0 and len(a) == 1000
    assert a.scale_model_input(x, a.timesteps[3]) is x


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_add_noise_matches_ddpm_on_the_samples_device(dtype):
    sched, ref = HeavyBallPLMSScheduler(**SD_BETAS), DDPMScheduler(**SD_BETAS)
    x0, noise = torch.randn(3, 4, 5, 5, dtype=dtype), torch.randn(3, 4, 5, 5, dtype=dtype)
    t = torch.tensor([10, 500, 999])
    got = sched.add_noise(x0, noise, t)
    assert got.dtype == dtype and got.device == x0.device
    assert torch.allclose(got, ref.add_noise(x0, noise, t).to(dtype), atol=1e-6)
    assert torch.allclose(sched.add_noise(x0, noise, 500), ref.add_noise(x0, noise, torch.tensor([500] * 3)).to(dtype), atol=1e-6)
    on_meta = sched.add_noise(x0.to("meta"), noise.to("meta"), t.to("meta"))  # stays on the samples' device
    assert on_meta.device.type == "meta" and on_meta.dtype == dtype


@pytest.mark.parametrize("spacing,offset", [("linspace", 0), ("leading", 1), ("trailing", 0)])
@pytest.mark.parametrize("cls", SCHEDULERS)
def test_timesteps_follow_diffusers_spacing(cls, spacing, offset):
    sched = cls(timestep_spacing=spacing, steps_offset=offset)
    ref = DPMSolverMultistepScheduler(timestep_spacing=spacing, steps_offset=offset)
    for n in (1, 7, 25):
        sched.set_timesteps(n)
        ref.set_timesteps(n)
        assert torch.equal(sched.timesteps, ref.timesteps) and sched.num_inference_steps == n


def test_custom_timesteps_integer_and_fractional():
    sched = GHVBScheduler()
    sched.set_timesteps(timesteps=[900, 500, 100])
    assert sched.timesteps.tolist() == [900, 500, 100] and sched.timesteps.dtype == torch.int64
    sched.set_timesteps(timesteps=[900.5, 450.25])
    assert sched.timesteps.dtype == torch.float64 and sched.num_inference_steps == 2
    x = run(sched, gaussian("epsilon", {}), x_T(), timesteps=[900.5, 450.25])
    assert torch.isfinite(x).all()


@pytest.mark.parametrize("cls", SCHEDULERS)
def test_begin_index_starts_a_run_later_in_the_grid(cls):
    """set_begin_index(k) then timesteps[k:] is the run over exactly those timesteps (fresh state)."""
    model, x = gaussian("epsilon"), x_T()
    sched = cls(beta=0.8, **SD_BETAS)
    sched.set_timesteps(10)
    tail = sched.timesteps[4:].clone()
    sched.set_begin_index(4)
    y = x
    for t in tail:
        y = sched.step(model(y, t.expand(4)), t, y).prev_sample
    assert sched.step_index == 10 and sched.begin_index == 4
    assert torch.equal(y, run(cls(beta=0.8, **SD_BETAS), model, x, timesteps=tail.tolist()))


@pytest.mark.parametrize("cls", SCHEDULERS)
def test_state_resets_on_set_timesteps(cls):
    sched, model, x = cls(**SD_BETAS), gaussian(), x_T()
    first = run(sched, model, x, 8)
    run(sched, model, x, 5)
    assert torch.equal(run(sched, model, x, 8), first)


# -- beta = 1: the base solvers --------------------------------------------------------------------------------
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("steps,final,lower_order_final", [(5, "zero", True), (10, "sigma_min", True), (20, "sigma_min", False), (20, "zero", True)])
def test_heavy_ball_dpm_solver_at_beta_1_is_diffusers_dpm_solver(prediction_type, spacing, steps, final, lower_order_final):
    options = dict(SD_BETAS, prediction_type=prediction_type, timestep_spacing=spacing, steps_offset=1,
                   final_sigmas_type=final, lower_order_final=lower_order_final)
    ref = DPMSolverMultistepScheduler(**options, algorithm_type="dpmsolver++", solver_type="midpoint", solver_order=2)
    model, x = gaussian(prediction_type), x_T()
    expected = run(ref, model, x, steps)
    got = run(HeavyBallDPMSolverScheduler(beta=1.0, **options), model, x, steps)
    assert (got - expected).abs().max() < 1e-6


def test_heavy_ball_dpm_solver_at_beta_1_matches_diffusers_with_zero_terminal_snr():
    """rescale_betas_zero_snr (v-prediction, trailing spacing): both clamp alpha_T^2 to 2**-24."""
    options = dict(SD_BETAS, prediction_type="v_prediction", timestep_spacing="trailing", rescale_betas_zero_snr=True)
    ref = DPMSolverMultistepScheduler(**options, algorithm_type="dpmsolver++", solver_type="midpoint")
    model, x = GaussianData(NoiseSchedule.from_config(ref.config), "v_prediction"), x_T()
    expected = run(ref, model, x, 8)
    assert (run(HeavyBallDPMSolverScheduler(beta=1.0, **options), model, x, 8) - expected).abs().max() < 1e-6


@pytest.mark.parametrize("order", [1, 2, 3, 4])
@pytest.mark.parametrize("make", [
    lambda r: HeavyBallPLMSScheduler(order=r, beta=1.0, adams_weights="fixed", **SD_BETAS),
    lambda r: GHVBScheduler(order=r, beta=1.0, adams_weights="fixed", **SD_BETAS),
    lambda r: GHVBScheduler(momentum_number=r, adams_weights="fixed", **SD_BETAS),
], ids=["plms_hb", "ghvb", "ghvb_momentum_number"])
def test_plms_momentum_at_beta_1_is_adams_bashforth(make, order):
    """beta = 1 with the paper's fixed weights: PLMS-r, i.e. classical Adams-Bashforth of order r in
    (x_bar, sigma_bar) (core.sample_plms) on the same grid."""
    sched, model, x = make(order), gaussian(), x_T()
    got = run(sched, model, x, 12)
    expected = sample_plms(model, x, NoiseSchedule.from_config(SD_BETAS), with_final(sched.timesteps), order=order)
    assert (got - expected).abs().max() < 1e-12


# -- beta < 1: the paper's recurrences ----------------------------------------------------------------------------
class PaperHeavyBallDPMSolver(DPMSolverMultistepScheduler):
    """The paper's construction, written against diffusers' own solver: DPM-Solver++ 2M whose second-order
    update uses v = (1 - beta) v + beta (D0 + (D0 - D1) / (2 r0)) (v = that combination the first time)."""

    momentum_beta = 0.8

    def set_timesteps(self, *args, **kwargs):
        super().set_timesteps(*args, **kwargs)
        self.velocity = None

    def multistep_dpm_solver_second_order_update(self, model_output_list, *args, sample=None, **kwargs):
        i, beta = self.step_index, self.momentum_beta
        (a_t, s_t), (a_0, s_0), (a_1, s_1) = (self._sigma_to_alpha_sigma_t(self.sigmas[j]) for j in (i + 1, i, i - 1))
        h = torch.log(a_t / s_t) - torch.log(a_0 / s_0)
        r0 = (torch.log(a_0 / s_0) - torch.log(a_1 / s_1)) / h
        d0, d1 = model_output_list[-1], model_output_list[-2]
        combined = d0 + (d0 - d1) / (2 * r0)
        self.velocity = combined if self.velocity is None else (1 - beta) * self.velocity + beta * combined
        return (s_t / s_0) * sample - a_t * (torch.exp(-h) - 1.0) * self.velocity


@pytest.mark.parametrize("steps", [6, 20])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_heavy_ball_dpm_solver_matches_the_papers_construction(prediction_type, steps):
    options = dict(SD_BETAS, prediction_type=prediction_type)
    ref = PaperHeavyBallDPMSolver(**options, algorithm_type="dpmsolver++", solver_type="midpoint")
    model, x = gaussian(prediction_type), x_T()
    expected = run(ref, model, x, steps)
    got = run(HeavyBallDPMSolverScheduler(beta=0.8, **options), model, x, steps)
    assert (got - expected).abs().max() < 1e-6
    plain = run(HeavyBallDPMSolverScheduler(beta=1.0, **options), model, x, steps)
    assert (got - plain).abs().max() > 1e-3  # momentum changed the trajectory


def _by_hand(kind, order, beta, model, x, timesteps, schedule):
    """PLMS+HB / GHVB in (x_bar, sigma_bar) written out from the digest (test_momentum_core.digest_direction)."""
    grid = with_final(timesteps)
    history, velocity = [], None
    for t, t_next in zip(grid[:-1], grid[1:]):
        a, s = schedule.alpha_sigma(t)
        a_next, s_next = schedule.alpha_sigma(t_next)
        eps = to_eps(model(x, t.expand(x.shape[0])), x, a, s, model.prediction_type)
        update, velocity = digest_direction(kind, order, beta, history, velocity, eps)
        x = a_next * (x / a + (s_next / a_next - s / a) * update)
    return x


@pytest.mark.parametrize("order", [2, 4])
@pytest.mark.parametrize("kind,cls", [("hb", HeavyBallPLMSScheduler), ("ghvb", GHVBScheduler)])
def test_plms_momentum_matches_the_digest_by_hand(kind, cls, order):
    sched = cls(order=order, beta=0.6, prediction_type="v_prediction", adams_weights="fixed", **SD_BETAS)
    model, x = gaussian("v_prediction"), x_T()
    got = run(sched, model, x, 9)
    expected = _by_hand(kind, order, 0.6, model, x, sched.timesteps, NoiseSchedule.from_config(SD_BETAS))
    assert (got - expected).abs().max() < 1e-10


# -- per-sample state ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("cls", SCHEDULERS)
def test_state_is_per_sample_and_on_the_samples_dtype(cls, dtype):
    model = gaussian()
    x = x_T(4, dtype)
    batch = run(cls(**SD_BETAS), model, x, 7)
    for i in range(4):
        assert torch.equal(run(cls(**SD_BETAS), model, x[i : i + 1], 7), batch[i : i + 1])
    sched = cls(**SD_BETAS)
    run(sched, model, x, 3)
    state = [sched._momentum.velocity, *sched._momentum.history]
    assert all(s.dtype == dtype and s.device == x.device for s in state if s is not None)
    assert batch.dtype == dtype


# -- bad input ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "cls,kwargs,match",
    [
        (HeavyBallPLMSScheduler, dict(beta=0.0), r"beta must be a number in \(0, 1\]"),
        (HeavyBallDPMSolverScheduler, dict(beta=1.5), r"beta must be a number in \(0, 1\]"),
        (GHVBScheduler, dict(beta=-0.1), r"beta must be a number in \(0, 1\]"),
        (HeavyBallPLMSScheduler, dict(order=5), "order must be one of 1, 2, 3, 4"),
        (GHVBScheduler, dict(order=0), "order must be one of 1, 2, 3, 4"),
        (GHVBScheduler, dict(order=2.5), "order must be one of 1, 2, 3, 4"),
        (GHVBScheduler, dict(momentum_number=0), r"momentum_number must be a number in \(0, 4\]"),
        (GHVBScheduler, dict(momentum_number=-1.5), r"momentum_number must be a number in \(0, 4\]"),
        (GHVBScheduler, dict(momentum_number=4.2), r"momentum_number must be a number in \(0, 4\]"),
        (HeavyBallDPMSolverScheduler, dict(solver_order=4), "solver_order must be 2 \\(DPM-Solver\\+\\+ 2M\\) or 3"),
        (HeavyBallPLMSScheduler, dict(prediction_type="flow"), "prediction_type must be one of"),
        (GHVBScheduler, dict(beta_schedule="cubic"), "beta_schedule must be one of"),
        (HeavyBallDPMSolverScheduler, dict(timestep_spacing="uniform"), "timestep_spacing must be one of"),
        (HeavyBallPLMSScheduler, dict(final_sigmas_type="one"), "final_sigmas_type must be one of"),
        (GHVBScheduler, dict(nonfinite_check="sometimes"), "nonfinite_check must be one of"),
        (GHVBScheduler, dict(steps_offset=-1), "steps_offset must be an integer >= 0"),
        (HeavyBallPLMSScheduler, dict(trained_betas=[0.01] * 10), "trained_betas has 10 entries"),
        (HeavyBallPLMSScheduler, dict(adams_weights="uniform"), "adams_weights must be one of"),
        (GHVBScheduler, dict(warmup="rk2"), "warmup must be one of"),
        (HeavyBallUniPCScheduler, dict(solver_type="bh3"), "solver_type must be 'bh1' or 'bh2'"),
        (HeavyBallUniPCScheduler, dict(solver_order=4), "solver_order must be 1, 2 or 3"),
        (HeavyBallUniPCScheduler, dict(beta=0.0), r"beta must be a number in \(0, 1\]"),
    ],
)
def test_bad_options_are_rejected(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


def test_bad_set_timesteps_calls_are_rejected():
    sched = HeavyBallPLMSScheduler()
    with pytest.raises(ValueError, match="num_inference_steps must be between 1"):
        sched.set_timesteps(0)
    with pytest.raises(ValueError, match="exactly one of num_inference_steps or timesteps"):
        sched.set_timesteps()
    with pytest.raises(ValueError, match="exactly one of num_inference_steps or timesteps"):
        sched.set_timesteps(3, timesteps=[900, 100])
    with pytest.raises(ValueError, match="strictly decreasing"):
        sched.set_timesteps(timesteps=[100, 900])
    with pytest.raises(ValueError, match=r"timesteps must lie in \[0, num_train_timesteps - 1 = 999\]"):
        sched.set_timesteps(timesteps=[1000, 10])
    with pytest.raises(ValueError, match="begin_index must be an integer >= 0"):
        sched.set_begin_index(-1)


@pytest.mark.parametrize("cls", SCHEDULERS)
def test_bad_step_calls_are_rejected(cls):
    sched, x = cls(), torch.zeros(1, 1, 2, 2)
    with pytest.raises(ValueError, match=r"call set_timesteps\(num_inference_steps\) before step\(\)"):
        sched.step(x, 999, x)
    sched.set_timesteps(2)
    with pytest.raises(ValueError, match="same shape"):
        sched.step(torch.zeros(1, 2, 2, 2), sched.timesteps[0], x)
    with pytest.raises(ValueError, match="timestep 500 is not the next timestep of this run"):
        sched.step(x, 500, x)
    with pytest.raises(ValueError, match="timestep must be a scalar"):
        sched.step(x, sched.timesteps, x)
    for t in sched.timesteps:
        sched.step(x, t, x)
    with pytest.raises(ValueError, match=r"after the last of the run's 2 network calls \(num_inference_steps = 2\)"):
        sched.step(x, 0, x)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("cls", SCHEDULERS)
def test_nonfinite_model_output_names_the_step(cls, bad):
    sched, model, x = cls(**SD_BETAS), gaussian(), x_T()
    sched.set_timesteps(6)
    for i, t in enumerate(sched.timesteps[:3]):
        out = model(x, t.expand(4))
        if i == 2:
            out[1, 0, 0, 0] = bad
            with pytest.raises(FloatingPointError, match=r"model_output holds NaN/Inf at step 2 of 6 \(timestep \d+\) in 1 of 4 samples"):
                sched.step(out, t, x)
        else:
            x = sched.step(out, t, x).prev_sample


def test_large_finite_model_output_is_not_mistaken_for_nan():
    """The eager check's fast path sums the output; a sum that overflows is re-checked entry by entry, so the model
    output is not blamed.  (The step itself, 3e38 times sigma_bar's fall from 157, does overflow float32: that is
    named as the scheduler's own update.)"""
    sched = GHVBScheduler()
    sched.set_timesteps(3)
    x = torch.zeros(2, 4, 4, 4)
    out = torch.full_like(x, 3e38)  # finite, but its float32 sum is inf
    assert torch.isinf(out.sum())
    with pytest.raises(FloatingPointError, match=r"^GHVBScheduler's own update \(prev_sample; the model output was finite\)"):
        sched.step(out, sched.timesteps[0], x)


@pytest.mark.parametrize("cls", SCHEDULERS)
def test_deferred_nonfinite_check_raises_at_the_last_step_naming_the_first_bad_one(cls):
    sched, model, x = cls(nonfinite_check="deferred", **SD_BETAS), gaussian(), x_T()
    sched.set_timesteps(5)
    for i, t in enumerate(sched.timesteps):
        out = model(x, t.expand(4))
        if i in (1, 3):
            out[0] = float("nan")
        if i < 4:
            x = sched.step(out, t, x).prev_sample  # no error yet: nothing is read on the host
            assert sched.first_nonfinite_step.dtype == torch.long and sched.first_nonfinite_step.ndim == 0
        else:
            with pytest.raises(FloatingPointError, match=r"at step 1 of 5 \(timestep \d+\) in 1 of 4 samples; found at the end of the run"):
                sched.step(out, t, x)
    clean = cls(nonfinite_check="deferred", **SD_BETAS)
    assert torch.isfinite(run(clean, model, x_T(), 5)).all()
    assert int(clean.first_nonfinite_step) == -1
    off = cls(nonfinite_check="off", **SD_BETAS)
    off.set_timesteps(2)
    y = off.step(torch.full_like(x, float("nan")), off.timesteps[0], x_T()).prev_sample
    assert torch.isnan(y).all() and off.first_nonfinite_step is None


# -- no host synchronisation in step() ----------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["off", "deferred", "auto"])
@pytest.mark.parametrize("cls", SCHEDULERS)
def test_step_never_reads_device_tensors(cls, mode):
    """On the meta device a tensor has no values: any .item(), bool(tensor), .tolist() or .cpu() inside step()
    raises.  So running every step there proves step() reads nothing on the host (what would be a device sync
    on an accelerator), except the one documented read of a deferred NaN/Inf check at the last step."""
    sched = cls(nonfinite_check=mode, prediction_type="v_prediction", **SD_BETAS)
    sched.set_timesteps(6, device="meta")
    x = torch.empty(2, 4, 8, 8, device="meta")
    for i, t in enumerate(sched.timesteps):
        assert t.device.type == "meta"
        if i == 5 and mode != "off":
            with pytest.raises((RuntimeError, NotImplementedError)):
                sched.step(torch.empty_like(x), t, x)
        else:
            x = sched.step(torch.empty_like(x), t, x).prev_sample
    assert x.device.type == "meta" and x.shape == (2, 4, 8, 8)


# -- order of convergence ----------------------------------------------------------------------------------------------
def _measured_order(make, grid_in, steps=(20, 40, 80, 160)):
    """Convergence order against the exact flow of Gaussian data with 16 different variances (0.25..1), from
    t = 500 to t = 0 (final_sigmas_type="sigma_min"), on grids uniform in ``grid_in`` ("lambda" for the
    exponential integrator and HB, "sigma_bar" for the Adams-Bashforth family: fixed AB weights are only
    consistent to high order on steps of equal length in the variable they integrate in).  The order is the
    least-squares slope of log(error) against log(steps) over the last three step counts."""
    ns = NoiseSchedule.from_config({})
    model = GaussianData(ns, "epsilon", s=torch.logspace(math.log10(0.5), 0, 16, dtype=torch.float64).reshape(1, 4, 4))
    x = x_T(8)
    ends = torch.tensor([500, 0])
    errors = []
    for n in steps:
        if grid_in == "lambda":
            grid = ns.timestep_from_lambda(torch.linspace(*ns.lambda_(ends).tolist(), n + 1, dtype=torch.float64))
        else:
            grid = ns.timestep_from_sigma_bar(torch.linspace(*ns.sigma_bar(ends).tolist(), n + 1, dtype=torch.float64))
        got = run(make(), model, x, timesteps=grid[:-1].tolist())
        sb0, sb1 = ns.sigma_bar(ends)
        exact = model.m + (x / ns.alpha(500) - model.m) * torch.sqrt((model.s**2 + sb1**2) / (model.s**2 + sb0**2))
        errors.append(float((got - ns.alpha(0) * exact).abs().max()))
    log_n, log_e = torch.log(torch.tensor(steps[1:], dtype=torch.float64)), torch.log(torch.tensor(errors[1:], dtype=torch.float64))
    slope = ((log_n - log_n.mean()) * (log_e - log_e.mean())).sum() / ((log_n - log_n.mean()) ** 2).sum()
    return -float(slope)


@pytest.mark.parametrize("make", [
    lambda: HeavyBallPLMSScheduler(order=4, beta=0.8, final_sigmas_type="sigma_min"),
    lambda: HeavyBallPLMSScheduler(order=2, beta=0.5, final_sigmas_type="sigma_min"),
    lambda: HeavyBallDPMSolverScheduler(beta=0.8, final_sigmas_type="sigma_min"),
], ids=["plms4_hb0.8", "plms2_hb0.5", "dpmpp_2m_hb0.8"])
def test_heavy_ball_with_beta_below_1_is_first_order(make):
    assert 0.8 < _measured_order(make, "lambda") < 1.2


def test_ghvb_order_grows_with_its_order():
    """GHVB 0.5 (order 1) ~ 1, GHVB 1.5 (order 2) ~ 2, GHVB 2.5 and 3.5 (orders 3, 4) clearly above 2; at these
    step counts the last two are still pre-asymptotic and are not ranked against each other."""
    measured = {m: _measured_order(lambda: GHVBScheduler(momentum_number=m, final_sigmas_type="sigma_min"), "sigma_bar")
                for m in (0.5, 1.5, 2.5, 3.5)}
    assert 0.8 < measured[0.5] < 1.2 and 1.7 < measured[1.5] < 2.3, measured
    assert min(measured[2.5], measured[3.5]) > 2.7, measured


# -- the paper's own setting: diffusers 0.18's DPM-Solver++ ------------------------------------------------------------
def _paper_dpm_solver(model, x, steps, beta):
    """The official code's sampler, written out in float64 from diffusers 0.18's DPMSolverMultistepScheduler
    (dpmsolver++, midpoint, order 2) with the paper's heavy ball: linspace timesteps round(linspace(0, 999, N + 1))
    reversed without the last; the step after the last timestep goes to t = 0 (alphas_cumprod[0], i.e. sigma_min,
    not sigma = 0); first order on the first step and, only when N < 15, on the last (lower_order_final); the
    second-order steps average D0 + (D0 - D1) / (2 r0) into v (v = that combination the first time)."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float32) ** 2
    ac = torch.cumprod(1.0 - betas, dim=0).to(torch.float64)  # float32 cumprod, as diffusers builds it
    ts = np.linspace(0, 999, steps + 1).round()[::-1][:-1].astype(np.int64)
    lam = lambda t: 0.5 * (torch.log(ac[t]) - torch.log(1 - ac[t]))  # noqa: E731
    prev_d, velocity = None, None
    for i, t in enumerate(ts):
        t_next = 0 if i == steps - 1 else int(ts[i + 1])
        a, s = ac[t].sqrt(), (1 - ac[t]).sqrt()
        a_n, s_n = ac[t_next].sqrt(), (1 - ac[t_next]).sqrt()
        d = (x - s * model(x, torch.full((x.shape[0],), int(t)))) / a
        h = lam(t_next) - lam(t)
        first = prev_d is None or (i == steps - 1 and steps < 15)
        if first:
            combined = d
        else:
            r0 = (lam(t) - lam(int(ts[i - 1]))) / h
            step = d + (d - prev_d) / (2 * r0)
            velocity = step if velocity is None else (1 - beta) * velocity + beta * step
            combined = velocity
        x = (s_n / s) * x - a_n * (torch.exp(-h) - 1.0) * combined
        prev_d = d
    return x


@pytest.mark.parametrize("steps", [10, 15, 20])
@pytest.mark.parametrize("beta", [1.0, 0.8])
def test_sigma_min_preset_reproduces_the_papers_dpm_solver_to_1e_12(steps, beta):
    """final_sigmas_type="sigma_min" (with lower_order_final, the default) is the paper's setting: its samples equal
    the official code's (diffusers 0.18's solver plus the paper's momentum), written out above, to 1e-12 in float64,
    below 15 steps (first-order last step) and from 15 on (second-order last step to sigma_min)."""
    model, x = gaussian(), x_T()
    sched = HeavyBallDPMSolverScheduler(beta=beta, final_sigmas_type="sigma_min", **SD_BETAS)
    got = run(sched, model, x, steps)
    assert (got - _paper_dpm_solver(model, x, steps, beta)).abs().max() < 1e-12


# -- heavy ball on DPM-Solver++ 3M ------------------------------------------------------------------------------------
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("spacing", ["linspace", "trailing"])
@pytest.mark.parametrize("steps,final,lower_order_final", [(5, "zero", True), (10, "sigma_min", True), (20, "sigma_min", False),
                                                           (20, "zero", True), (16, "sigma_min", True)])
def test_heavy_ball_dpm_solver_3m_at_beta_1_is_diffusers_3m(prediction_type, spacing, steps, final, lower_order_final):
    options = dict(SD_BETAS, prediction_type=prediction_type, timestep_spacing=spacing, final_sigmas_type=final,
                   lower_order_final=lower_order_final)
    ref = DPMSolverMultistepScheduler(**options, algorithm_type="dpmsolver++", solver_type="midpoint", solver_order=3)
    model, x = gaussian(prediction_type), x_T()
    expected = run(ref, model, x, steps)
    got = run(HeavyBallDPMSolverScheduler(beta=1.0, solver_order=3, **options), model, x, steps)
    # diffusers keeps its sigma table in float32; 3M's divided differences of lambda amplify that rounding to ~2e-6
    assert (got - expected).abs().max() < 5e-6
    # with the table upcast (same float32 alphas_cumprod, sigma_bar in float64 as steerdiff's grid) they agree to 1e-6;
    # what is left is diffusers' step casting the sample to float32
    ref.set_timesteps(steps)
    ac = ref.alphas_cumprod.double()
    table = torch.sqrt((1 - ac) / ac)[ref.timesteps.long()]
    last = torch.zeros(1, dtype=torch.float64) if final == "zero" else torch.sqrt((1 - ac[:1]) / ac[:1])
    ref.sigmas = torch.cat([table, last])
    y = x
    for t in ref.timesteps:
        y = ref.step(model(y, t.expand(y.shape[0])), t, y).prev_sample
    assert (got - y).abs().max() < 1e-6


@pytest.mark.parametrize("theirs,ours_name", [("dpmpp_3m", "dpmpp_3m_hb"), ("unipc", "unipc_hb")])
def test_heavy_ball_solvers_on_flow_at_beta_1_are_diffusers_flow_mode(theirs, ours_name):
    """Flow mode: diffusers' DPM-Solver++ 3M / UniPC with flow sigmas (shift 3) and ours on the same sigmas (passed as
    the pipeline would, to a shift-1 config), the exact Gaussian velocity evaluated at each scheduler's own sigma."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from benchmarks.multistep_order import gaussian as flow_gaussian

    _, model, _, _ = flow_gaussian("flow")
    ref = make_scheduler(theirs, FlowMatchEulerDiscreteScheduler(shift=3.0).config)
    ref.set_timesteps(12)
    ours = make_scheduler(ours_name, FlowMatchEulerDiscreteScheduler(shift=1.0).config, beta=1.0)
    ours.set_timesteps(sigmas=ref.sigmas[:-1].double().numpy())
    assert torch.allclose(ours.grid.sigma_host, ref.sigmas.double())
    outs = []
    for sched, sigmas in ((ref, ref.sigmas.double()), (ours, ours.grid.sigma_host)):
        x = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        for i, t in enumerate(sched.timesteps):
            x = sched.step(model(x, sigmas[i] * 1000).sample, t, x).prev_sample
        outs.append(x)
    assert (outs[0] - outs[1]).abs().max() < 1e-6


def test_heavy_ball_dpm_solver_3m_with_beta_below_1_is_first_order():
    make = lambda: HeavyBallDPMSolverScheduler(beta=0.8, solver_order=3, final_sigmas_type="sigma_min")  # noqa: E731
    assert 0.8 < _measured_order(make, "lambda") < 1.2
    make3 = lambda: HeavyBallDPMSolverScheduler(beta=1.0, solver_order=3, final_sigmas_type="sigma_min")  # noqa: E731
    # the base solver: between 2 and 3 here (its first-order first step, as in diffusers, caps the global order at 2)
    assert _measured_order(make3, "lambda") > 1.8


# -- heavy ball on UniPC -----------------------------------------------------------------------------------------------
from diffusers import UniPCMultistepScheduler  # noqa: E402


UNIPC_CASES = [(order, kind, steps, final, spacing) for order, kind in ((1, "bh2"), (2, "bh2"), (3, "bh2"), (2, "bh1"), (3, "bh1"))
               for steps, final, spacing in ((6, "zero", "linspace"), (12, "zero", "trailing"), (20, "sigma_min", "linspace"))
               if not (kind == "bh1" and final == "zero")]  # diffusers' bh1 ends in NaN there: see the next test


@pytest.mark.parametrize("order,solver_type,steps,final,spacing", UNIPC_CASES)
def test_heavy_ball_unipc_at_beta_1_is_diffusers_unipc(order, solver_type, steps, final, spacing):
    options = dict(SD_BETAS, timestep_spacing=spacing, final_sigmas_type=final, solver_order=order, solver_type=solver_type)
    ref = UniPCMultistepScheduler(**options)
    model, x = gaussian(), x_T()
    expected = run(ref, model, x, steps)
    got = run(HeavyBallUniPCScheduler(beta=1.0, **options), model, x, steps)
    assert (got - expected).abs().max() < 5e-6  # diffusers' float32 sigma table (see the 3M test)
    ref.set_timesteps(steps)  # with that table upcast, to 1e-6 (diffusers' step still rounds the sample to float32)
    ac = ref.alphas_cumprod.double()
    last = torch.zeros(1, dtype=torch.float64) if final == "zero" else torch.sqrt((1 - ac[:1]) / ac[:1])
    ref.sigmas = torch.cat([torch.sqrt((1 - ac) / ac)[ref.timesteps.long()], last])
    y = x
    for t in ref.timesteps:
        y = ref.step(model(y, t.expand(y.shape[0])), t, y).prev_sample
    assert (got - y).abs().max() < 1e-6


def test_unipc_bh1_ending_at_sigma_0_is_finite_where_diffusers_is_not():
    """diffusers' bh1 multiplies B(h) = -h = -inf by a zero correction on the last step (sigma = 0): NaN.  Our data
    form skips the empty correction, so the run ends finite, equal to diffusers' bh1 up to that last step."""
    options = dict(SD_BETAS, final_sigmas_type="zero", solver_order=2, solver_type="bh1")
    model, x = gaussian(), x_T()
    assert bool(torch.isnan(run(UniPCMultistepScheduler(**options), model, x, 6)).any())
    assert bool(torch.isfinite(run(HeavyBallUniPCScheduler(beta=1.0, **options), model, x, 6)).all())


def test_heavy_ball_unipc_corrector_keeps_its_own_velocity():
    """beta < 1 changes the run; with the corrector switched off after every step the run is predictor-only, and its
    predictor velocity is the same one (the corrector never writes into it)."""
    model, x = gaussian(), x_T()
    base = dict(SD_BETAS, solver_order=2)
    hb = run(HeavyBallUniPCScheduler(beta=0.8, **base), model, x, 10)
    plain = run(HeavyBallUniPCScheduler(beta=1.0, **base), model, x, 10)
    assert (hb - plain).abs().max() > 1e-3
    no_corr = HeavyBallUniPCScheduler(beta=0.8, disable_corrector=list(range(10)), **base)
    ref_no_corr = UniPCMultistepScheduler(disable_corrector=list(range(10)), **base)
    assert (run(HeavyBallUniPCScheduler(beta=1.0, disable_corrector=list(range(10)), **base), model, x, 10)
            - run(ref_no_corr, model, x, 10)).abs().max() < 5e-6
    sched = no_corr
    sched.set_timesteps(10)
    y = x
    for t in sched.timesteps:
        y = sched.step(model(y, t.expand(4)), t, y).prev_sample
    assert sched._corrector.velocity is None  # the corrector never ran, the predictor's u did all the averaging
    assert sched._momentum.velocity is not None


@pytest.mark.parametrize("beta", [0.9, 0.8, 0.5])
def test_heavy_ball_unipc_with_beta_below_1_is_first_order(beta):
    make = lambda: HeavyBallUniPCScheduler(beta=beta, solver_order=2, final_sigmas_type="sigma_min")  # noqa: E731
    assert 0.8 < _measured_order(make, "lambda") < 1.2
