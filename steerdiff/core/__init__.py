"""The numerical core shared by every sampler, guidance rule and the adjoint."""

from .denoiser import Denoiser, Prediction, as_denoiser
from .guidance_protocol import COND, UNCOND, GuidanceState, apply_rule
from .flow import FlowMatchSchedule
from .grid import Grid, make_grid, resolve_grid
from .momentum import MomentumState, ghvb_direction, heavy_ball, order_and_beta, plms_hb_direction
from .multistep import History, adams_bashforth, adams_bashforth_coefficients
from .prediction import PREDICTION_TYPES, check_prediction_type, convert_prediction, from_eps, from_x0, to_eps, to_x0
from .sampling import SAMPLERS, get_sampler, sample_ddim, sample_dpmpp_2m, sample_pcg, sample_plms
from .process import NoiseProcess, noise_process_family, noise_process_from_config, prediction_type_from_config
from .schedule import BETA_SCHEDULES, NoiseSchedule
from .sigma_process import FlowSigma, VarianceExplodingSigma
from .sde import ancestral_step, sample_noise
from .stability import real_axis_stability_edge
from .steps import dpm_solver_2m_eps
from .steps import dpmpp_2m_data, dpmpp_2m_first_order, euler_step, exp_neg_h, exponential_step, step_ratio
from .tensors import batch_dot, batch_norm, check_finite, expand_to
from .timesteps import TIMESTEP_SPACINGS, linspace_timesteps, spaced_timesteps, with_final

__all__ = [
    "COND", "UNCOND", "apply_rule", "Denoiser", "FlowMatchSchedule", "Grid", "GuidanceState", "NoiseProcess", "Prediction", "as_denoiser", "make_grid",
    "noise_process_family", "noise_process_from_config", "prediction_type_from_config", "resolve_grid",
    "BETA_SCHEDULES", "PREDICTION_TYPES", "SAMPLERS", "TIMESTEP_SPACINGS", "History", "MomentumState", "NoiseSchedule",
    "adams_bashforth", "adams_bashforth_coefficients", "ancestral_step", "batch_dot", "batch_norm",
    "check_finite", "check_prediction_type", "convert_prediction", "dpmpp_2m_data", "dpmpp_2m_first_order", "euler_step",
    "exp_neg_h", "expand_to", "exponential_step", "from_eps", "from_x0", "get_sampler", "ghvb_direction", "heavy_ball",
    "order_and_beta", "plms_hb_direction", "real_axis_stability_edge", "sample_ddim",
    "sample_dpmpp_2m", "sample_noise", "sample_plms", "spaced_timesteps", "step_ratio", "to_eps", "to_x0",
    "with_final", "dpm_solver_2m_eps", "linspace_timesteps", "FlowSigma", "VarianceExplodingSigma", "sample_pcg",
]
