"""The diffusers scheduler contract shared by steerdiff's momentum samplers.

:class:`MomentumScheduler` turns a deterministic one-network-call-per-step solver of the probability-flow ODE
into a diffusers ``SchedulerMixin`` / ``ConfigMixin``: config -> :class:`~steerdiff.core.NoiseSchedule`,
``set_timesteps`` (``timestep_spacing``, ``steps_offset``, custom timesteps), step bookkeeping with
``set_begin_index``, ``scale_model_input``, ``add_noise``, validation and the NaN/Inf watch.  A subclass
writes only its update ``_update(i, model_output, sample) -> prev_sample`` from core/ functions and keeps its
memory in a :class:`~steerdiff.core.momentum.MomentumState`.

Grid
    ``set_timesteps`` spaces N timesteps t_0 > ... > t_{N-1} with diffusers' DPMSolverMultistepScheduler rules
    and appends the end of sampling: sigma = 0 (``final_sigmas_type="zero"``) or timestep 0
    (``"sigma_min"``).  alpha, sigma and lambda of the N + 1 grid points are computed once, in float64, and
    kept on the device, so ``step()`` only indexes them.

No host synchronisation in ``step()``
    ``step()`` never reads a device tensor on the host: it counts steps instead of looking the timestep up
    (a pipeline that starts later in the grid calls ``set_begin_index``, as diffusers' img2img pipelines do),
    and checks a given timestep against the grid only when it is a Python number or a CPU tensor.
    NaN/Inf in the model output (``nonfinite_check``):

    - ``"eager"``: raise at the step that produced it (reads one flag per step: a sync on accelerators);
    - ``"deferred"``: accumulate "first bad step" in a device tensor and raise at the last step, naming the
      step where it first happened (one host read per run, at its end);
    - ``"auto"`` (default): ``"eager"`` for CPU tensors, where reading costs no sync, else ``"deferred"``;
    - ``"off"``: no check; ``step()`` then never touches the host, the last step included.
"""

from __future__ import annotations

import inspect
from numbers import Integral, Real

import torch
from diffusers import ConfigMixin, SchedulerMixin
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerOutput

from ..core.prediction import check_prediction_type, to_eps, to_x0
from ..core.schedule import NoiseSchedule
from ..core.steps import euler_step, exponential_step
from ..core.tensors import check_finite, expand_to
from ..core.timesteps import TIMESTEP_SPACINGS, spaced_timesteps

FINAL_SIGMAS_TYPES = ("zero", "sigma_min")
NONFINITE_CHECKS = ("auto", "eager", "deferred", "off")


def _check_choice(name: str, value, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def _custom_timesteps(timesteps, num_train_timesteps: int) -> torch.Tensor:
    """User timesteps as a decreasing 1-D tensor in [0, T - 1]: int64 when all are integers, else float64."""
    ts = torch.as_tensor(timesteps, dtype=torch.float64).detach().cpu()
    if ts.ndim != 1 or ts.numel() < 1:
        raise ValueError(f"timesteps must be a non-empty 1-D sequence, got shape {tuple(ts.shape)}")
    if not bool(torch.isfinite(ts).all()) or bool((ts < 0).any()) or bool((ts > num_train_timesteps - 1).any()):
        raise ValueError(f"timesteps must lie in [0, num_train_timesteps - 1 = {num_train_timesteps - 1}]")
    if bool((ts[1:] >= ts[:-1]).any()):
        raise ValueError("timesteps must be strictly decreasing (from noise to data)")
    return ts.long() if bool((ts == ts.round()).all()) else ts


def _host_timestep(timestep) -> float | None:
    """The value of ``timestep`` when reading it costs no device sync (a number or a CPU tensor), else None."""
    if isinstance(timestep, torch.Tensor):
        if timestep.numel() != 1:
            raise ValueError(f"timestep must be a scalar (one timestep for the whole batch), got shape {tuple(timestep.shape)}")
        return float(timestep) if timestep.device.type == "cpu" else None
    if isinstance(timestep, Real):
        return float(timestep)
    raise ValueError(f"timestep must be a number or a scalar tensor, got {type(timestep).__name__}")


class MomentumScheduler(SchedulerMixin, ConfigMixin):
    """Base of the momentum schedulers (see the module docstring); not a sampler by itself.

    Shared options (every subclass accepts them as keywords, keeps them in its config and reloads them):

    - ``num_train_timesteps``, ``beta_start``, ``beta_end``, ``beta_schedule`` (linear, scaled_linear,
      squaredcos_cap_v2), ``trained_betas``, ``rescale_betas_zero_snr``: the training noise schedule, read
      as diffusers reads it;
    - ``prediction_type``: epsilon, v_prediction or sample;
    - ``timestep_spacing`` (linspace, leading, trailing) and ``steps_offset``: diffusers' spacing rules;
    - ``final_sigmas_type``: end sampling at sigma = 0 ("zero") or at timestep 0 ("sigma_min");
    - ``nonfinite_check``: auto, eager, deferred or off (module docstring).

    ``order`` is diffusers' number of network calls per step (1); a sampler's multistep order is
    ``config.order``.
    """

    _compatibles = [e.name for e in KarrasDiffusionSchedulers]
    order = 1
    init_noise_sigma = 1.0

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas=None,
        prediction_type: str = "epsilon",
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        final_sigmas_type: str = "zero",
        rescale_betas_zero_snr: bool = False,
        nonfinite_check: str = "auto",
    ):
        check_prediction_type(prediction_type)
        _check_choice("timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS)
        _check_choice("final_sigmas_type", final_sigmas_type, FINAL_SIGMAS_TYPES)
        _check_choice("nonfinite_check", nonfinite_check, NONFINITE_CHECKS)
        if isinstance(steps_offset, bool) or not isinstance(steps_offset, Integral) or steps_offset < 0:
            raise ValueError(f"steps_offset must be an integer >= 0, got {steps_offset!r}")
        if trained_betas is not None and len(trained_betas) != num_train_timesteps:
            raise ValueError(
                f"trained_betas has {len(trained_betas)} entries but num_train_timesteps is {num_train_timesteps}"
            )
        self._schedule = NoiseSchedule.from_config(
            dict(
                num_train_timesteps=num_train_timesteps, beta_start=beta_start, beta_end=beta_end,
                beta_schedule=beta_schedule, trained_betas=trained_betas, rescale_betas_zero_snr=rescale_betas_zero_snr,
            )
        )
        self.alphas_cumprod = self._schedule.alphas_cumprod.float()
        self.timesteps: torch.Tensor | None = None
        self.num_inference_steps: int | None = None
        self._step_index: int | None = None
        self._begin_index: int | None = None
        self._first_nonfinite: torch.Tensor | None = None

    # -- the diffusers contract -----------------------------------------------------------------------
    def __len__(self) -> int:
        return self.config.num_train_timesteps

    @property
    def step_index(self) -> int | None:
        """The index in ``timesteps`` of the next step (None before the first step of a run)."""
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        """Where the next run starts in ``timesteps`` (``set_begin_index``); None = at the first timestep."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start the next run at ``timesteps[begin_index]`` (call after ``set_timesteps``, as img2img does)."""
        if isinstance(begin_index, bool) or not isinstance(begin_index, Integral) or begin_index < 0:
            raise ValueError(f"begin_index must be an integer >= 0, got {begin_index!r}")
        self._begin_index = int(begin_index)

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """The network sees x_t itself (variance-preserving schedule): returns ``sample``."""
        return sample

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, timesteps=None) -> None:
        """Lay out the grid of ``num_inference_steps`` steps (or the given decreasing ``timesteps``; integers
        or fractional values in [0, T - 1]) on ``device``, and reset the sampler's memory."""
        T = self.config.num_train_timesteps
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("pass exactly one of num_inference_steps or timesteps to set_timesteps()")
        if timesteps is None:
            ts = spaced_timesteps(T, num_inference_steps, self.config.timestep_spacing, self.config.steps_offset)
        else:
            ts = _custom_timesteps(timesteps, T)
        end = -1 if self.config.final_sigmas_type == "zero" else 0
        grid = torch.cat([ts, torch.full((1,), end, dtype=ts.dtype)])
        device = torch.device("cpu" if device is None else device)
        table = dict(device=device, dtype=torch.float32 if device.type == "mps" else torch.float64)
        alphas, sigmas = self._schedule.alpha_sigma(grid)
        self._alphas, self._sigmas = alphas.to(**table), sigmas.to(**table)
        self._lambdas = self._schedule.lambda_(grid).to(**table)
        self._grid_on_host = grid.tolist()
        self.timesteps = ts.to(device)
        self.num_inference_steps = ts.numel()
        self._momentum.reset()
        self._step_index = None
        self._begin_index = None
        self._first_nonfinite = None

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | float | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
        return_dict: bool = True,
    ) -> SchedulerOutput | tuple[torch.Tensor]:
        """One solver step from ``timestep`` to the next grid point.  ``generator`` is accepted for the
        diffusers contract and unused (the samplers are deterministic)."""
        i = self._next_step_index(timestep)
        if not torch.is_tensor(model_output) or not torch.is_tensor(sample) or model_output.shape != sample.shape:
            raise ValueError(
                "model_output and sample must be tensors of the same shape, got "
                f"{tuple(getattr(model_output, 'shape', ()))} and {tuple(getattr(sample, 'shape', ()))}"
            )
        model_output = model_output.to(sample.dtype)
        self._watch_nonfinite(model_output, i)
        prev_sample = self._update(i, model_output, sample)
        self._step_index = i + 1
        if i == self.num_inference_steps - 1:
            self._raise_deferred_nonfinite()
        return SchedulerOutput(prev_sample=prev_sample) if return_dict else (prev_sample,)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """x_t = alpha_t x_0 + sigma_t noise, per sample for (B,) ``timesteps``, on the samples' device and dtype."""
        t = torch.as_tensor(timesteps, device=original_samples.device)
        alpha, sigma = self._schedule.alpha_sigma(t)
        return expand_to(alpha, original_samples) * original_samples + expand_to(sigma, original_samples) * noise

    @property
    def first_nonfinite_step(self) -> torch.Tensor | None:
        """Device tensor: the first step of this run whose model output held NaN/Inf, -1 if none so far
        (deferred checking only; None otherwise)."""
        return self._first_nonfinite

    # -- shared pieces of the updates -----------------------------------------------------------------
    def _eps(self, i: int, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        return to_eps(model_output, sample, self._alphas[i], self._sigmas[i], self.config.prediction_type)

    def _data(self, i: int, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        return to_x0(model_output, sample, self._alphas[i], self._sigmas[i], self.config.prediction_type)

    def _euler(self, i: int, sample: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
        """x_bar_{i+1} = x_bar_i + (sigma_bar_{i+1} - sigma_bar_i) direction."""
        a, s = self._alphas, self._sigmas
        return euler_step(sample, direction, a[i], s[i], a[i + 1], s[i + 1])

    def _exponential(self, i: int, sample: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
        """x_{i+1} = (sigma_{i+1} / sigma_i) x_i + alpha_{i+1} (1 - e^{-h}) data."""
        a, s = self._alphas, self._sigmas
        return exponential_step(sample, data, a[i], s[i], a[i + 1], s[i + 1])

    # -- bookkeeping ----------------------------------------------------------------------------------
    def _next_step_index(self, timestep) -> int:
        if self.timesteps is None:
            raise ValueError(f"call set_timesteps(num_inference_steps) before step() on {type(self).__name__}")
        i = self._step_index if self._step_index is not None else (self._begin_index or 0)
        n = self.num_inference_steps
        if i >= n:
            raise ValueError(
                f"step() called after the last of num_inference_steps = {n} steps; call set_timesteps() for a new run"
            )
        given, expected = _host_timestep(timestep), self._grid_on_host[i]
        if given is not None and given != expected:
            raise ValueError(
                f"timestep {given:g} is not the next timestep of this run (step {i} of {n} is at {expected:g}); "
                "call set_timesteps() to start over, or set_begin_index() to start later in the grid"
            )
        return i

    def _watch_nonfinite(self, model_output: torch.Tensor, i: int) -> None:
        mode = self.config.nonfinite_check
        if mode == "off":
            return
        if mode == "eager" or (mode == "auto" and model_output.device.type == "cpu"):
            # a sum is NaN/Inf whenever an entry is (and, rarely, on overflow): one cheap pass, then the exact check
            if not bool(torch.isfinite(model_output.sum())):
                check_finite(model_output, f"model_output (timestep {self._grid_on_host[i]:g})", step=i)
            return
        bad = ~torch.isfinite(model_output).all()
        first = self._first_nonfinite
        if first is None:
            first = torch.full((), -1, dtype=torch.long, device=model_output.device)
        self._first_nonfinite = torch.where(bad & (first < 0), i, first)

    def _raise_deferred_nonfinite(self) -> None:
        if self._first_nonfinite is None:
            return
        k = int(self._first_nonfinite)  # the one host read of a deferred run, at its last step
        if k >= 0:
            raise FloatingPointError(
                f"model_output held NaN/Inf values, first at step {k} (timestep {self._grid_on_host[k]:g}) of "
                f"{self.num_inference_steps}; found at the last step because nonfinite_check checks on the device "
                "without synchronising (use nonfinite_check='eager' to stop at the bad step)"
            )


def schedule_options(init):
    """Decorate ``__init__(self, <own options>, **schedule_options)`` of a :class:`MomentumScheduler`.

    The signature becomes the class's own options followed by the shared options of
    :meth:`MomentumScheduler.__init__` (keyword-only), and diffusers' ``register_to_config`` records them all.
    diffusers reads a scheduler's options from that signature (``from_config``, ``save_pretrained``), so each
    class saves and reloads the full set while the shared options are written only once.
    """
    own = [p for p in inspect.signature(init).parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    shared = [
        p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
        for name, p in inspect.signature(MomentumScheduler.__init__).parameters.items()
        if name != "self"
    ]
    init.__signature__ = inspect.Signature(own + shared)
    return register_to_config(init)
