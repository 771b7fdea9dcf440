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

diffusers' VP solvers lay out a flow grid of their own when ``use_flow_sigmas=True`` (Sana ships a DPM-Solver
config, Wan a UniPC one), and a config keeps its grid (``flow_grid``, chosen by :func:`flow_grid_of_config`):

- ``"dpm_solver"`` (DPMSolverMultistep / Singlestep, DEIS, SA-Solver): a = linspace(1, 1/T, N + 1),
  s = reversed shift(1 - a) without its last (zero) entry, so the grid starts below 1 at shift(1 - 1/T); shift =
  ``flow_shift``, or e^mu when the pipeline passes mu (exponential dynamic shifting only); timesteps = int(s T)
  (truncated).  No ``sigmas=`` / ``timesteps=`` (diffusers' solvers take none in this mode).
- ``"unipc"`` (UniPCMultistep): s = the pipeline's ``sigmas`` or linspace(1, 1/T, N + 1) without its last entry,
  shifted statically by ``flow_shift`` or dynamically with mu (exponential or linear), then ``shift_terminal``;
  timesteps = int(s T).  diffusers moves a first s = 1 to 1 - 1e-6 (its UniPC step is singular there): the network
  is given the same timestep (999 of 1000), but the grid keeps s = 1, whose step steerdiff takes exactly.

Every grid here ends at s = 0.  (diffusers' DEIS and SA-Solver end their flow grids at the last nonzero sigma
repeated, so their last step does not move the sample; steerdiff's samplers end at the clean sample.)
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
FLOW_GRIDS = ("flow_match", "dpm_solver", "unipc")
# diffusers' schedulers whose use_flow_sigmas mode lays out each grid (module docstring)
FLOW_GRID_OF_CLASS = {
    "DPMSolverMultistepScheduler": "dpm_solver",
    "DPMSolverSinglestepScheduler": "dpm_solver",
    "DEISMultistepScheduler": "dpm_solver",
    "SASolverScheduler": "dpm_solver",
    "UniPCMultistepScheduler": "unipc",
}
_UNIPC_START = 1e-6  # diffusers' UniPC moves a first s = 1 to 1 - 1e-6; its timestep is what the network is given


def flow_grid_of_config(config: Mapping[str, Any] | Any) -> str:
    """Whose grid a flow-matching config lays out (:data:`FLOW_GRIDS`): its own ``flow_grid`` key (steerdiff's
    schedulers), else ``"flow_match"`` unless it sets ``use_flow_sigmas``; then the grid of its diffusers class
    (:data:`FLOW_GRID_OF_CLASS`), named by ``_class_name`` (a config loaded from a folder), by the scheduler
    given, or, for the config of a scheduler built in Python (which has no class name), by the keys only that
    family has: UniPC's ``disable_corrector`` / DPM-Solver's, DEIS's and SA-Solver's ``algorithm_type`` or
    ``tau_func``.  A ``use_flow_sigmas`` config of any other class is a ValueError."""
    name = None if isinstance(config, Mapping) else type(config).__name__  # a scheduler (as_config checks it)
    config = as_config(config)
    given = config.get("flow_grid")
    if given is not None:
        if given not in FLOW_GRIDS:
            raise ValueError(f"flow_grid must be one of {FLOW_GRIDS}, got {given!r}")
        return given
    if not config.get("use_flow_sigmas"):
        return "flow_match"
    name = config.get("_class_name", name)
    if name is None:
        unipc = "disable_corrector" in config
        dpm = "algorithm_type" in config or "tau_func" in config
        if unipc != dpm:
            return "unipc" if unipc else "dpm_solver"
    if name not in FLOW_GRID_OF_CLASS:
        raise ValueError(
            f"the config sets use_flow_sigmas=True but its class is {name!r}: steerdiff lays out the flow grids of "
            f"{sorted(FLOW_GRID_OF_CLASS)}; set flow_grid to one of {FLOW_GRIDS} to say which"
        )
    return FLOW_GRID_OF_CLASS[name]


def _static_shift(s, shift: float):
    """s' = shift s / (1 + (shift - 1) s)."""
    return shift * s / (1 + (shift - 1) * s)


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
        flow_grid: str = FLOW_KEYS["flow_grid"],
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
        if flow_grid not in FLOW_GRIDS:
            raise ValueError(f"flow_grid must be one of {FLOW_GRIDS}, got {flow_grid!r}")
        if flow_grid != "flow_match" and sigma_spacing is not None:
            raise ValueError(
                f"use_{sigma_spacing}_sigmas=True re-spaces FlowMatchEulerDiscreteScheduler's grid (flow_grid='flow_match'); "
                f"diffusers' {flow_grid!r} flow grid does not combine with it"
            )
        if flow_grid == "dpm_solver" and shift_terminal:
            raise ValueError("shift_terminal applies to the 'flow_match' and 'unipc' flow grids, not to 'dpm_solver'")
        self.num_train_timesteps = int(num_train_timesteps)
        self.shift = float(shift)
        self.use_dynamic_shifting = bool(use_dynamic_shifting)
        self.base_shift, self.max_shift = float(base_shift), float(max_shift)
        self.base_image_seq_len, self.max_image_seq_len = int(base_image_seq_len), int(max_image_seq_len)
        self.shift_terminal = None if not shift_terminal else float(shift_terminal)
        self.time_shift_type = time_shift_type
        self.sigma_spacing = sigma_spacing
        self.flow_grid = flow_grid
        # the training sigmas' ends, in float32 as diffusers keeps them (step 1 of the module docstring)
        train = torch.from_numpy(np.linspace(1, self.num_train_timesteps, self.num_train_timesteps, dtype=np.float32)[::-1].copy())
        train = train / self.num_train_timesteps
        if not self.use_dynamic_shifting:
            train = self.shift * train / (1 + (self.shift - 1) * train)
        self.sigma_max, self.sigma_min = train[0].item(), train[-1].item()

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | Any) -> "FlowMatchSchedule":
        """From a flow-matching scheduler config: FlowMatchEulerDiscreteScheduler's keys, steerdiff's schedulers'
        (the same keys, and ``flow_grid``), or a DPM-Solver / UniPC / DEIS / SA-Solver config with
        ``use_flow_sigmas=True`` (its ``flow_shift`` is the shift, and its class says whose grid it lays out:
        :func:`flow_grid_of_config`).  A VP config is a ValueError."""
        source, config = config, as_config(config)  # the family check reads the scheduler's class too
        if noise_process_family(source) != "flow":
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
            flow_grid=flow_grid_of_config(config),
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
        return _static_shift(s, self.shift)

    def _stretched(self, s: np.ndarray) -> np.ndarray:
        """``shift_terminal``: s'' = 1 - (1 - s') (1 - shift_terminal) / (1 - s'_last) (s itself without it)."""
        if not self.shift_terminal:
            return s
        one_minus = 1 - s
        return 1 - one_minus / (one_minus[-1] / (1 - self.shift_terminal))

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
        ``FlowMatchEulerDiscreteScheduler.set_timesteps`` builds them, or the ``use_flow_sigmas`` mode of the
        diffusers solver named by ``flow_grid`` (module docstring; its timesteps are int64, as there)."""
        if mu is not None and (isinstance(mu, bool) or not isinstance(mu, Real) or not math.isfinite(mu)):
            raise ValueError(f"mu must be a finite number, got {mu!r}")
        if self.flow_grid == "dpm_solver":
            return self._dpm_solver_sigmas(num_inference_steps, sigmas, mu, timesteps)
        if self.flow_grid == "unipc" and timesteps is not None:
            raise ValueError("timesteps= is not part of UniPC's flow grid (flow_grid='unipc'); pass num_inference_steps or sigmas")
        if self.use_dynamic_shifting and mu is None:
            raise ValueError("mu must be given: this flow-matching config uses dynamic shifting (use_dynamic_shifting=True)")
        if sigmas is not None and timesteps is not None and len(sigmas) != len(timesteps):
            raise ValueError(f"sigmas ({len(sigmas)}) and timesteps ({len(timesteps)}) must have the same length")
        if num_inference_steps is None:
            if sigmas is None and timesteps is None:
                raise ValueError("give num_inference_steps, sigmas or timesteps")
            num_inference_steps = len(sigmas) if sigmas is not None else len(timesteps)
        elif any(v is not None and len(v) != num_inference_steps for v in (sigmas, timesteps)):
            raise ValueError("sigmas and timesteps must have num_inference_steps entries when both are given")
        n = int(num_inference_steps)
        T = self.num_train_timesteps
        if self.flow_grid == "unipc":
            return self._unipc_sigmas(n, sigmas, mu)
        given_t = None if timesteps is None else np.array(timesteps).astype(np.float32)
        if sigmas is None:
            t = given_t if given_t is not None else np.linspace(self.sigma_max * T, self.sigma_min * T, n)
            s = t / T
        else:
            s = np.array(sigmas).astype(np.float32)
            n = len(s)
        s = self._stretched(self._shifted(s, mu))
        if self.sigma_spacing is not None:
            s = self._respaced(s, n)
        s = torch.from_numpy(np.asarray(s)).to(torch.float32)
        t = torch.from_numpy(given_t) if given_t is not None else s * T
        return t, torch.cat([s, torch.zeros(1)])

    def _unipc_sigmas(self, n: int, sigmas, mu) -> tuple[torch.Tensor, torch.Tensor]:
        """UniPCMultistepScheduler's flow grid (module docstring), in float64 as diffusers computes it."""
        T = self.num_train_timesteps
        s = np.linspace(1, 1 / T, n + 1)[:-1] if sigmas is None else np.array(sigmas, dtype=np.float64)
        s = self._stretched(np.asarray(self._shifted(s, mu), dtype=np.float64))
        called = s.copy()
        if abs(called[0] - 1) < _UNIPC_START:
            called[0] -= _UNIPC_START
        t = torch.from_numpy(called * T).to(torch.int64)
        return t, torch.cat([torch.from_numpy(s.astype(np.float32)), torch.zeros(1)])

    def _dpm_solver_sigmas(self, n, sigmas, mu, timesteps) -> tuple[torch.Tensor, torch.Tensor]:
        """DPMSolverMultistepScheduler's flow grid, also DPMSolverSinglestep's, DEIS's and SA-Solver's (module
        docstring), in float64 as diffusers computes it."""
        if sigmas is not None or timesteps is not None:
            raise ValueError(
                "sigmas= and timesteps= are not part of DPM-Solver's flow grid (flow_grid='dpm_solver'): diffusers' "
                "solvers take only num_inference_steps (and mu) in their use_flow_sigmas mode"
            )
        if n is None:
            raise ValueError("give num_inference_steps")
        shift = self.shift
        if mu is not None:
            if not (self.use_dynamic_shifting and self.time_shift_type == "exponential"):
                raise ValueError(
                    "mu= needs use_dynamic_shifting=True with time_shift_type='exponential' on DPM-Solver's flow grid "
                    "(it sets the shift to e^mu)"
                )
            shift = math.exp(mu)
        T = self.num_train_timesteps
        s = np.flip(_static_shift(1.0 - np.linspace(1, 1 / T, int(n) + 1), shift))[:-1].copy()
        t = torch.from_numpy(s * T).to(torch.int64)
        return t, torch.cat([torch.from_numpy(s.astype(np.float32)), torch.zeros(1)])

    def __repr__(self) -> str:
        shift = f"mu (dynamic, {self.time_shift_type})" if self.use_dynamic_shifting else f"{self.shift:g}"
        grid = "" if self.flow_grid == "flow_match" else f", flow_grid={self.flow_grid!r}"
        return f"FlowMatchSchedule(num_train_timesteps={self.num_train_timesteps}, shift={shift}{grid})"


__all__ = ["FLOW_GRIDS", "FLOW_GRID_OF_CLASS", "FlowMatchSchedule", "SIGMA_SPACINGS", "TIME_SHIFT_TYPES", "flow_grid_of_config"]
