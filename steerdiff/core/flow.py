"""The flow-matching (rectified flow) noise process and its inference grids, as diffusers builds them.

Rectified flow (Liu et al. 2023) / flow matching with the optimal-transport path (Lipman et al. 2023), as SD3
(Esser et al. 2024), Flux, Wan, Qwen-Image and Sana train it:

    x_s = (1 - s) x0 + s eps,   s in [0, 1] (1 = pure noise),   timestep t = s T (T = num_train_timesteps),

so alpha = 1 - s, sigma = s (alpha + sigma = 1, not alpha^2 + sigma^2 = 1), lambda = log((1 - s) / s),
sigma_bar = s / (1 - s), and the network predicts the velocity v = dx/ds = eps - x0 (diffusers'
``prediction_type="flow_prediction"``).

The inference grid of ``FlowMatchEulerDiscreteScheduler`` (diffusers 0.42), reproduced by
:meth:`FlowMatchSchedule.inference_sigmas`:

1. training sigmas s_k = k / T, k = T..1, statically shifted (when ``use_dynamic_shifting`` is off) give
   sigma_max and sigma_min;
2. N timesteps linspace(T sigma_max, T sigma_min, N), s = t / T (or the pipeline's ``sigmas=``, or ``timesteps=``);
3. the shift: static s' = shift s / (1 + (shift - 1) s), or dynamic with the pipeline's ``mu``:
   exponential s' = e^mu / (e^mu + (1/s - 1)), linear s' = mu / (mu + (1/s - 1)) (``time_shift_type``);
4. ``shift_terminal``: s'' = 1 - (1 - s') (1 - shift_terminal) / (1 - s'_last), so the last sigma is shift_terminal;
5. optional re-spacing between the first and last sigma: Karras (rho = 7), exponential (log-linear) or beta
   (Beta(0.6, 0.6) quantiles);
6. timesteps = s T (unless given), then a final s = 0.

The shift of step 1 is applied again in step 3, so with a static shift the grid ends at shift(shift(1 / T)):
diffusers does this, and the grid here does the same.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from numbers import Real
from typing import Any

import numpy as np
import torch

from .process import FLOW_KEYS, NoiseProcess, as_config, noise_process_family

TIME_SHIFT_TYPES = ("exponential", "linear")
SIGMA_SPACINGS = ("karras", "exponential", "beta")


def _number(config: Mapping[str, Any], key: str, default):
    value = config.get(key, default)
    return default if value is None else value


class FlowMatchSchedule(NoiseProcess):
    """x_s = (1 - s) x0 + s eps with s = t / T; t < 0 (or t = 0) is the clean end.

    Holds the options that shape the inference grid (see the module docstring): ``shift``,
    ``use_dynamic_shifting`` (then ``mu`` is required by :meth:`inference_sigmas`), ``base_shift`` /
    ``max_shift`` / ``base_image_seq_len`` / ``max_image_seq_len`` (for :meth:`dynamic_mu`),
    ``shift_terminal``, ``time_shift_type`` and ``sigma_spacing`` (None, "karras", "exponential", "beta").
    """

    kind = "flow"

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        shift: float = FLOW_KEYS["shift"],
        use_dynamic_shifting: bool = FLOW_KEYS["use_dynamic_shifting"],
        base_shift: float = FLOW_KEYS["base_shift"],
        max_shift: float = FLOW_KEYS["max_shift"],
        base_image_seq_len: int = FLOW_KEYS["base_image_seq_len"],
        max_image_seq_len: int = FLOW_KEYS["max_image_seq_len"],
        shift_terminal: float | None = FLOW_KEYS["shift_terminal"],
        time_shift_type: str = FLOW_KEYS["time_shift_type"],
        sigma_spacing: str | None = None,
    ):
        if isinstance(num_train_timesteps, bool) or int(num_train_timesteps) != num_train_timesteps or num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be an integer >= 2, got {num_train_timesteps!r}")
        if isinstance(shift, bool) or not isinstance(shift, Real) or not math.isfinite(shift) or shift <= 0:
            raise ValueError(f"shift must be a finite number > 0, got {shift!r}")
        if time_shift_type not in TIME_SHIFT_TYPES:
            raise ValueError(f"time_shift_type must be one of {TIME_SHIFT_TYPES}, got {time_shift_type!r}")
        if sigma_spacing is not None and sigma_spacing not in SIGMA_SPACINGS:
            raise ValueError(f"sigma_spacing must be None or one of {SIGMA_SPACINGS}, got {sigma_spacing!r}")
        if shift_terminal is not None and not 0.0 < float(shift_terminal) < 1.0:
            raise ValueError(f"shift_terminal must lie in (0, 1) (or be None), got {shift_terminal!r}")
        self.num_train_timesteps = int(num_train_timesteps)
        self.shift = float(shift)
        self.use_dynamic_shifting = bool(use_dynamic_shifting)
        self.base_shift, self.max_shift = float(base_shift), float(max_shift)
        self.base_image_seq_len, self.max_image_seq_len = int(base_image_seq_len), int(max_image_seq_len)
        self.shift_terminal = None if not shift_terminal else float(shift_terminal)
        self.time_shift_type = time_shift_type
        self.sigma_spacing = sigma_spacing
        # the training sigmas' ends, in float32 as diffusers keeps them (step 1 of the module docstring)
        train = torch.from_numpy(np.linspace(1, self.num_train_timesteps, self.num_train_timesteps, dtype=np.float32)[::-1].copy())
        train = train / self.num_train_timesteps
        if not self.use_dynamic_shifting:
            train = self.shift * train / (1 + (self.shift - 1) * train)
        self.sigma_max, self.sigma_min = train[0].item(), train[-1].item()

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | Any) -> "FlowMatchSchedule":
        """From a flow-matching scheduler config: FlowMatchEulerDiscreteScheduler's keys, steerdiff's schedulers'
        (the same keys), or a DPM-Solver / UniPC config with ``use_flow_sigmas=True`` (its ``flow_shift`` is the
        shift).  A VP config is a ValueError."""
        config = as_config(config)
        if noise_process_family(config) != "flow":
            raise ValueError("this scheduler config describes a VP schedule, not a flow-matching process")
        get = config.get
        spacings = [name for name in SIGMA_SPACINGS if get(f"use_{name}_sigmas", False)]
        if len(spacings) > 1:
            raise ValueError(f"only one of use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas may be set, got {spacings}")
        shift = _number(config, "shift", FLOW_KEYS["shift"])
        if get("use_flow_sigmas") and "flow_shift" in config:
            if "shift" in config and config["shift"] not in (None, 1.0, config["flow_shift"]):
                raise ValueError(f"the config sets both shift={config['shift']!r} and flow_shift={config['flow_shift']!r}")
            shift = float(config["flow_shift"])
        return cls(
            num_train_timesteps=int(get("num_train_timesteps", 1000)),
            shift=shift,
            use_dynamic_shifting=bool(get("use_dynamic_shifting", False)),
            base_shift=_number(config, "base_shift", FLOW_KEYS["base_shift"]),
            max_shift=_number(config, "max_shift", FLOW_KEYS["max_shift"]),
            base_image_seq_len=_number(config, "base_image_seq_len", FLOW_KEYS["base_image_seq_len"]),
            max_image_seq_len=_number(config, "max_image_seq_len", FLOW_KEYS["max_image_seq_len"]),
            shift_terminal=get("shift_terminal"),
            time_shift_type=_number(config, "time_shift_type", "exponential"),
            sigma_spacing=spacings[0] if spacings else None,
        )

    # -- the process ------------------------------------------------------------------------------------
    def noise_level(self, t) -> torch.Tensor:
        """s = t / T in [0, 1] (float64); t < 0 is the clean end, s = 0."""
        t = torch.as_tensor(t).to(torch.float64)
        return (t / self.num_train_timesteps).clamp(0.0, 1.0)

    def log_alpha_sigma(self, t) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.noise_level(t)
        return torch.log1p(-s), torch.log(s)

    def alpha_sigma(self, t, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.noise_level(t)
        return (1.0 - s).to(dtype), s.to(dtype)

    def alpha_integrals(self, sigma_bar: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Flow: alpha = 1 / (1 + rho), so the integrals are rho / (1 + rho) = s and log(1 + rho) = -log(1 - s)."""
        return sigma_bar / (1 + sigma_bar), torch.log1p(sigma_bar)

    def progress(self, t) -> torch.Tensor:
        """s = t / T: the noise level itself (1 = pure noise, 0 = clean)."""
        return self.noise_level(t)

    def timestep_from_lambda(self, lam, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """t = T s with s = 1 / (1 + e^lambda)."""
        lam = torch.as_tensor(lam, dtype=torch.float64)
        return (torch.sigmoid(-lam) * self.num_train_timesteps).to(dtype)

    # -- the grid ---------------------------------------------------------------------------------------
    def dynamic_mu(self, image_seq_len: int) -> float:
        """mu for an image of ``image_seq_len`` latent tokens, linear between (base_image_seq_len, base_shift) and
        (max_image_seq_len, max_shift), as the Flux / SD3 / Qwen-Image pipelines compute it."""
        m = (self.max_shift - self.base_shift) / (self.max_image_seq_len - self.base_image_seq_len)
        return float(image_seq_len * m + (self.base_shift - m * self.base_image_seq_len))

    def _shifted(self, s: np.ndarray, mu: float | None) -> np.ndarray:
        if self.use_dynamic_shifting:
            if self.time_shift_type == "exponential":
                return math.exp(mu) / (math.exp(mu) + (1 / s - 1))
            return mu / (mu + (1 / s - 1))
        return self.shift * s / (1 + (self.shift - 1) * s)

    def _respaced(self, s: np.ndarray, n: int) -> np.ndarray:
        hi, lo = s[0].item(), s[-1].item()
        if self.sigma_spacing == "karras":
            rho = 7.0
            ramp = np.linspace(0, 1, n)
            return (hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
        if self.sigma_spacing == "exponential":
            return np.exp(np.linspace(math.log(hi), math.log(lo), n))
        import scipy.stats

        ppf = scipy.stats.beta.ppf(1 - np.linspace(0, 1, n), 0.6, 0.6)
        return np.array([lo + q * (hi - lo) for q in ppf])

    def inference_sigmas(
        self,
        num_inference_steps: int | None = None,
        sigmas: Sequence[float] | None = None,
        mu: float | None = None,
        timesteps: Sequence[float] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(timesteps (N,), sigmas (N + 1,) ending at 0), float32 on the CPU, exactly as
        ``FlowMatchEulerDiscreteScheduler.set_timesteps`` builds them (module docstring)."""
        if self.use_dynamic_shifting and mu is None:
            raise ValueError("mu must be given: this flow-matching config uses dynamic shifting (use_dynamic_shifting=True)")
        if mu is not None and (isinstance(mu, bool) or not isinstance(mu, Real) or not math.isfinite(mu)):
            raise ValueError(f"mu must be a finite number, got {mu!r}")
        if sigmas is not None and timesteps is not None and len(sigmas) != len(timesteps):
            raise ValueError(f"sigmas ({len(sigmas)}) and timesteps ({len(timesteps)}) must have the same length")
        if num_inference_steps is None:
            if sigmas is None and timesteps is None:
                raise ValueError("give num_inference_steps, sigmas or timesteps")
            num_inference_steps = len(sigmas) if sigmas is not None else len(timesteps)
        elif any(v is not None and len(v) != num_inference_steps for v in (sigmas, timesteps)):
            raise ValueError("sigmas and timesteps must have num_inference_steps entries when both are given")
        n = int(num_inference_steps)
        given_t = None if timesteps is None else np.array(timesteps).astype(np.float32)
        T = self.num_train_timesteps
        if sigmas is None:
            t = given_t if given_t is not None else np.linspace(self.sigma_max * T, self.sigma_min * T, n)
            s = t / T
        else:
            s = np.array(sigmas).astype(np.float32)
            n = len(s)
        s = self._shifted(s, mu)
        if self.shift_terminal:
            one_minus = 1 - s
            s = 1 - one_minus / (one_minus[-1] / (1 - self.shift_terminal))
        if self.sigma_spacing is not None:
            s = self._respaced(s, n)
        s = torch.from_numpy(np.asarray(s)).to(torch.float32)
        t = torch.from_numpy(given_t) if given_t is not None else s * T
        return t, torch.cat([s, torch.zeros(1)])

    def __repr__(self) -> str:
        shift = f"mu (dynamic, {self.time_shift_type})" if self.use_dynamic_shifting else f"{self.shift:g}"
        return f"FlowMatchSchedule(num_train_timesteps={self.num_train_timesteps}, shift={shift})"


__all__ = ["FlowMatchSchedule", "SIGMA_SPACINGS", "TIME_SHIFT_TYPES"]
