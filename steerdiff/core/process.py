"""The noise process of a diffusion model, for both families steerdiff serves, read from a scheduler config.

Every model steerdiff runs noises data as

    x_t = alpha_t x0 + sigma_t eps,

and every step, conversion and guidance rule is written once in (alpha, sigma):

- **variance preserving** (:class:`~steerdiff.core.schedule.NoiseSchedule`; DDPM, Stable Diffusion, SDXL, DiT):
  alpha_t^2 + sigma_t^2 = 1 with alpha_t^2 = ``alphas_cumprod[t]`` (betas, beta_schedule, trained_betas,
  rescale_betas_zero_snr);
- **flow matching** (:class:`~steerdiff.core.flow.FlowMatchSchedule`; rectified flow, Liu et al. 2023, Lipman et
  al. 2023; SD3, Flux, Wan, Qwen-Image, Sana): alpha = 1 - s, sigma = s with s = t / T, the network predicting the
  velocity v = eps - x0.

Derived quantities (shared by both, computed here from ``alpha_sigma``): lambda = log(alpha / sigma) (half log-SNR),
sigma_bar = sigma / alpha = e^{-lambda} (the noise level of the x / alpha ODE, EDM's sigma).

:func:`noise_process_from_config` decides the family from a diffusers scheduler config (or a scheduler), and
:func:`prediction_type_from_config` what the network predicts.  A config that is neither family, or whose keys
contradict each other, is a ``ValueError`` naming the key: nothing falls back to a VP schedule silently.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import torch

from .prediction import check_prediction_type

NOISE_PROCESSES = ("vp", "flow")

# Keys only a flow-matching scheduler config has (FlowMatchEulerDiscreteScheduler and its relatives), and their
# diffusers defaults; keys only a VP config has, likewise.  A config that sets a key of one family away from its
# default while being of the other family contradicts itself.
FLOW_KEYS: dict[str, Any] = {
    "shift": 1.0,
    "use_dynamic_shifting": False,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
    "invert_sigmas": False,
    "shift_terminal": None,
    "time_shift_type": "exponential",
    "flow_grid": "flow_match",  # steerdiff's: whose grid a flow config lays out (core.flow.FLOW_GRIDS)
}
VP_KEYS: dict[str, Any] = {
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "rescale_betas_zero_snr": False,
}
# noise levels of variance-exploding / EDM schedulers (KarrasVe, EDMEuler, consistency models): in a config without
# betas they mark a process that is neither VP nor flow matching
_VE_KEYS = ("sigma_data", "rho", "s_churn", "s_noise", "sigma_min", "sigma_max")
_FLOW_CLASS_PREFIX = "FlowMatch"
# keys that only flow-matching schedulers have (VP schedulers such as DPM-Solver / UniPC also carry
# use_dynamic_shifting, time_shift_type or shift_terminal, for their use_flow_sigmas mode)
_FLOW_ONLY_KEYS = ("shift", "base_shift", "max_shift", "base_image_seq_len", "max_image_seq_len", "invert_sigmas")


def as_config(config: Mapping[str, Any] | Any) -> Mapping[str, Any]:
    """The config mapping of a scheduler, or the mapping itself."""
    if hasattr(config, "config") and not isinstance(config, Mapping):
        config = config.config
    if not isinstance(config, Mapping):
        raise TypeError(f"expected a diffusers scheduler or its config (a mapping), got {type(config).__name__}")
    return config


def _differs(config: Mapping[str, Any], defaults: Mapping[str, Any]) -> list[str]:
    return [k for k, d in defaults.items() if k in config and config[k] is not None and config[k] != d]


def noise_process_family(config: Mapping[str, Any] | Any) -> str:
    """"vp" or "flow" for a scheduler config, by these rules (each contradiction is a ValueError naming the key):

    - ``noise_process`` (steerdiff's schedulers record it) says it outright;
    - a ``FlowMatch*`` class (``_class_name``, or the scheduler given), ``use_flow_sigmas=True`` (diffusers'
      DPM-Solver / UniPC / DEIS in flow mode), ``prediction_type="flow_prediction"``, or a flow-only key
      (``shift``, ``base_shift``, ...) in a config without betas means flow;
    - otherwise VP, where the config has a VP key (betas, ...) or names no scheduler class (a hand-written dict:
      DDPM's defaults); a scheduler class with neither, or a config of variance-exploding noise levels (sigma_max,
      sigma_data, ...: KarrasVeScheduler, EDMEulerScheduler, ...) without betas, is an error.

    Flow configs must not set VP keys (betas) away from their defaults, VP configs must not set flow keys
    (shift, dynamic shifting, ...), ``prediction_type="flow_prediction"`` needs a flow process, and
    ``v_prediction`` is refused on a flow process (its diffusers meaning there differs between schedulers).
    """
    scheduler_class = "" if isinstance(config, Mapping) else type(config).__name__
    config = as_config(config)
    declared = config.get("noise_process")
    if declared is not None and declared not in NOISE_PROCESSES:
        raise ValueError(f"noise_process must be one of {NOISE_PROCESSES}, got {declared!r}")
    class_name = str(config.get("_class_name") or scheduler_class)
    flow_signals = []
    if class_name.startswith(_FLOW_CLASS_PREFIX):
        flow_signals.append(f"_class_name={class_name!r}")
    only_flow = [k for k in _FLOW_ONLY_KEYS if k in config]
    if only_flow and "beta_start" not in config and declared is None:
        flow_signals.append(f"the flow-matching key {only_flow[0]!r} without betas")
    if config.get("use_flow_sigmas"):
        flow_signals.append("use_flow_sigmas=True")
    if config.get("prediction_type") == "flow_prediction":
        flow_signals.append("prediction_type='flow_prediction'")
    family = declared or ("flow" if flow_signals else "vp")
    if declared == "vp" and flow_signals:
        raise ValueError(f"the scheduler config says noise_process='vp' but also {flow_signals[0]} (a flow-matching key)")
    if family == "flow":
        bad = _differs(config, VP_KEYS)
        if bad:
            raise ValueError(
                f"the scheduler config is flow matching ({(flow_signals or ['noise_process=flow'])[0]}) but sets the VP "
                f"key {bad[0]}={config[bad[0]]!r}; a flow-matching process has no betas"
            )
        if config.get("prediction_type") == "v_prediction":
            raise ValueError(
                "prediction_type='v_prediction' is not supported on a flow-matching process (allowed there: "
                "'flow_prediction', 'epsilon', 'sample')"
            )
        if config.get("invert_sigmas"):
            raise ValueError(
                "invert_sigmas=True (noise level 1 - t / T, as Mochi runs it) is not supported by steerdiff; "
                "use FlowMatchEulerDiscreteScheduler for that model"
            )
    else:
        ve_keys = [k for k in _VE_KEYS if k in config]
        if declared is None and (class_name or ve_keys) and not any(k in config for k in VP_KEYS):  # neither family
            raise ValueError(
                f"the scheduler config ({class_name or 'with ' + ', '.join(ve_keys)}) is neither variance preserving (no "
                f"{', '.join(VP_KEYS)}) nor flow matching (no FlowMatch class, use_flow_sigmas, flow_prediction or "
                "shift key): steerdiff cannot tell how it noises data; use a DDPM-family or a FlowMatch scheduler config, "
                "or set noise_process"
            )
        bad = _differs(config, FLOW_KEYS)
        if bad:
            raise ValueError(
                f"the scheduler config is variance preserving (no FlowMatch class, use_flow_sigmas or "
                f"flow_prediction) but sets the flow-matching key {bad[0]}={config[bad[0]]!r}; set noise_process='flow' "
                "or use a flow-matching scheduler config"
            )
        if config.get("use_flow_sigmas") is False and config.get("prediction_type") == "flow_prediction":
            raise ValueError("prediction_type='flow_prediction' needs use_flow_sigmas=True (a flow-matching process)")
    return family


def noise_process_from_config(config: Mapping[str, Any] | Any) -> "NoiseProcess":
    """The :class:`NoiseProcess` of a diffusers scheduler config (or scheduler): a VP
    :class:`~steerdiff.core.schedule.NoiseSchedule` or a :class:`~steerdiff.core.flow.FlowMatchSchedule`."""
    source, config = config, as_config(config)  # the family check reads the scheduler's class too
    if noise_process_family(source) == "flow":  # flow.py and schedule.py build on this module: imported here
        from .flow import FlowMatchSchedule

        return FlowMatchSchedule.from_config(config)
    from .schedule import NoiseSchedule

    return NoiseSchedule.from_config(config)


def prediction_type_from_config(config: Mapping[str, Any] | Any) -> str:
    """What the network predicts under this config: its ``prediction_type``, else "flow_prediction" for a flow
    process (FlowMatchEulerDiscreteScheduler has no such key: its models predict the velocity) and "epsilon"
    for a VP one (diffusers' default)."""
    source, config = config, as_config(config)
    family = noise_process_family(source)
    given = config.get("prediction_type")
    if given is None:
        return "flow_prediction" if family == "flow" else "epsilon"
    check_prediction_type(given)
    if family == "vp" and given == "flow_prediction":
        raise ValueError("prediction_type='flow_prediction' needs a flow-matching process")
    return given


class ModelProcess(NamedTuple):
    """What a model's scheduler config says about it: its noise process and what its network predicts."""

    process: "NoiseProcess"
    prediction_type: str


def model_process(config: Mapping[str, Any] | Any) -> ModelProcess:
    """The (noise process, prediction type) of a model, from its scheduler or scheduler config, resolved together
    and once (every place that meets a diffusers model calls this); a config of neither family, contradicting keys
    or an unknown prediction type is a ValueError naming the key."""
    return ModelProcess(noise_process_from_config(config), prediction_type_from_config(config))


class NoiseProcess:
    """x_t = alpha_t x0 + sigma_t eps at (possibly fractional) timesteps t; t < 0 means the clean end.

    Subclasses implement :meth:`log_alpha_sigma` (float64) and set ``kind`` and ``num_train_timesteps``; every
    other query derives from it.  Queries take a tensor (any shape, any device) or a number and return tensors
    of the same shape on that device, float64 unless ``dtype`` is given, with no host synchronisation.
    """

    kind: str = ""
    num_train_timesteps: int = 0

    def log_alpha_sigma(self, t) -> tuple[torch.Tensor, torch.Tensor]:
        """(log alpha_t, log sigma_t) in float64 (log 0 = -inf at the ends)."""
        raise NotImplementedError

    def alpha_sigma(self, t, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
        log_a, log_s = self.log_alpha_sigma(t)
        return torch.exp(log_a).to(dtype), torch.exp(log_s).to(dtype)

    def alpha(self, t, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        return self.alpha_sigma(t, dtype)[0]

    def sigma(self, t, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        return self.alpha_sigma(t, dtype)[1]

    def lambda_(self, t, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """lambda_t = log(alpha_t / sigma_t); +inf where sigma_t = 0, -inf where alpha_t = 0."""
        log_a, log_s = self.log_alpha_sigma(t)
        return (log_a - log_s).to(dtype)

    def sigma_bar(self, t, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """sigma_bar_t = sigma_t / alpha_t = exp(-lambda_t)."""
        log_a, log_s = self.log_alpha_sigma(t)
        return torch.exp(log_s - log_a).to(dtype)

    def alpha_integrals(self, sigma_bar: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(int_0^rho alpha^2 d rho', int_0^rho alpha d rho') at rho = ``sigma_bar``, with alpha as a function of
        rho = sigma / alpha: the clocks in which the adjoint of the x / alpha ODE takes exact steps
        (:mod:`steerdiff.pipelines.adjoint`)."""
        raise NotImplementedError

    def progress(self, t) -> torch.Tensor:
        """Noise-level progress in [0, 1] (1 = pure noise, 0 = clean), the variable of guidance weight schedules."""
        raise NotImplementedError

    def timestep_from_lambda(self, lam, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The (continuous) timestep at which lambda_t = ``lam``, clamped to the trained range."""
        raise NotImplementedError

    def timestep_from_sigma_bar(self, sigma_bar, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        return self.timestep_from_lambda(-torch.log(torch.as_tensor(sigma_bar, dtype=torch.float64)), dtype)

    def alpha_sigma_of_sigmas(self, sigmas) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha, sigma) in float64 at the noise levels a scheduler or a k-diffusion caller calls ``sigmas``: on VP
        processes sigma_bar = sigma / alpha (diffusers' Euler / DPM-Solver ``sigmas``, k-diffusion's sigma), so
        alpha = 1 / sqrt(1 + sigma_bar^2); on flow processes s itself (alpha = 1 - s)."""
        level = torch.as_tensor(sigmas).to(torch.float64)
        if self.kind == "flow":
            return 1.0 - level, level
        alpha = torch.rsqrt(1.0 + level * level)
        return alpha, level * alpha

    def timestep_of_sigmas(self, sigmas) -> torch.Tensor:
        """The timestep (float64) at those same noise levels: t = s T on flow processes, t(sigma_bar) on VP ones."""
        level = torch.as_tensor(sigmas).to(torch.float64)
        if self.kind == "flow":
            return level * self.num_train_timesteps
        return self.timestep_from_sigma_bar(level)


__all__ = [
    "FLOW_KEYS", "NOISE_PROCESSES", "ModelProcess", "NoiseProcess", "VP_KEYS", "as_config", "model_process", "noise_process_family",
    "noise_process_from_config", "prediction_type_from_config",
]
