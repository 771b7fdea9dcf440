"""The diffusers scheduler contract shared by steerdiff's momentum samplers.

:class:`MomentumScheduler` turns a deterministic one-network-call-per-step solver of the probability-flow ODE
into a diffusers ``SchedulerMixin`` / ``ConfigMixin``: config -> noise process (VP
:class:`~steerdiff.core.NoiseSchedule` or flow-matching :class:`~steerdiff.core.FlowMatchSchedule`,
:func:`~steerdiff.core.noise_process_from_config`), ``set_timesteps`` through the one grid resolver
(:func:`~steerdiff.core.grid.resolve_grid`), step bookkeeping with ``set_begin_index``, ``scale_model_input``,
``add_noise`` / ``scale_noise``, validation and the NaN/Inf watch.  A subclass writes only its update
``_update(i, model_output, sample) -> prev_sample`` from core/ functions and keeps its memory in a
:class:`~steerdiff.core.momentum.MomentumState`.

Both families
    ``X.from_config(config)`` reads the family from the config it is given (a ``FlowMatch*`` class,
    ``use_flow_sigmas``, ``prediction_type="flow_prediction"`` or steerdiff's own ``noise_process`` key) and
    records it as ``noise_process`` ("vp" or "flow"), with the flow model's velocity prediction
    (``prediction_type="flow_prediction"``) unless the config names another.  Every step is written once in
    (alpha, sigma), so the same solver integrates the VP probability-flow ODE and the flow ODE; order-1 steps
    are exactly DDIM on VP grids and ``FlowMatchEulerDiscreteScheduler`` on flow grids.

Grid
    VP: ``set_timesteps`` spaces N timesteps t_0 > ... > t_{N-1} with diffusers' DPMSolverMultistepScheduler
    rules and appends the end of sampling: sigma = 0 (``final_sigmas_type="zero"``) or timestep 0
    (``"sigma_min"``).  Flow: the sigmas of ``FlowMatchEulerDiscreteScheduler`` (shift, dynamic shifting with
    the pipeline's ``mu``, ``shift_terminal``, Karras / exponential / beta spacing), or the pipeline's
    ``sigmas=`` / ``timesteps=``, then sigma = 0.  alpha, sigma and lambda of the N + 1 grid points are computed
    once, in float64, and kept on the device, so ``step()`` only indexes them.

No host synchronisation in ``step()``
    ``step()`` never reads a device tensor on the host: it counts steps instead of looking the timestep up
    (a pipeline that starts later in the grid calls ``set_begin_index``, as diffusers' img2img pipelines do),
    and checks a given timestep against the grid only when it is a Python number or a CPU tensor.
    NaN/Inf in the model output, and in the scheduler's own update (``prev_sample``: an error in the solver's
    arithmetic is named as such, not blamed on the next model output), with ``nonfinite_check``:

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

from ..core.denoiser import Prediction
from ..core.grid import FINAL_SIGMAS_TYPES, Grid, check_choice, resolve_grid
from ..core.prediction import convert_prediction, to_eps, to_x0
from ..core.flow import flow_grid_of_config
from ..core.process import FLOW_KEYS, NOISE_PROCESSES, VP_KEYS, as_config, noise_process_family, noise_process_from_config, prediction_type_from_config
from ..core.multistep import variable_adams_bashforth_grid
from ..core.nonfinite import NonFiniteWatch, finish_earliest
from ..core.steps import euler_step
from ..core.tensors import expand_to
from ..core.timesteps import TIMESTEP_SPACINGS



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

    - ``noise_process``: "vp" or "flow" (``from_config`` sets it from the config it reads);
    - VP: ``num_train_timesteps``, ``beta_start``, ``beta_end``, ``beta_schedule`` (linear, scaled_linear,
      squaredcos_cap_v2), ``trained_betas``, ``rescale_betas_zero_snr``: the training noise schedule, read
      as diffusers reads it; ``timestep_spacing`` (linspace, leading, trailing) and ``steps_offset``;
      ``final_sigmas_type``: end sampling at sigma = 0 ("zero") or at timestep 0 ("sigma_min");
    - flow: ``FlowMatchEulerDiscreteScheduler``'s ``shift``, ``use_dynamic_shifting``, ``base_shift``,
      ``max_shift``, ``base_image_seq_len``, ``max_image_seq_len``, ``shift_terminal``, ``time_shift_type``,
      ``use_karras_sigmas`` / ``use_exponential_sigmas`` / ``use_beta_sigmas``, ``invert_sigmas`` (refused);
      ``flow_grid``: whose grid to lay out, "flow_match" (FlowMatchEulerDiscreteScheduler's), "dpm_solver" or
      "unipc" (those solvers' ``use_flow_sigmas`` grids; ``from_config`` reads it from such a config's class);
    - ``prediction_type``: epsilon, v_prediction, sample or flow_prediction (None: flow_prediction on a flow
      process, else epsilon);
    - ``nonfinite_check``: auto, eager, deferred or off (module docstring).

    Setting a key of the other family away from its default is a ValueError naming it.  ``order`` is diffusers'
    number of network calls per step (1); a sampler's multistep order is ``config.order``.
    """

    _compatibles = [e.name for e in KarrasDiffusionSchedulers] + ["FlowMatchEulerDiscreteScheduler"]
    order = 1
    init_noise_sigma = 1.0

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = VP_KEYS["beta_start"],
        beta_end: float = VP_KEYS["beta_end"],
        beta_schedule: str = VP_KEYS["beta_schedule"],
        trained_betas=VP_KEYS["trained_betas"],
        prediction_type: str | None = None,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        final_sigmas_type: str = "zero",
        rescale_betas_zero_snr: bool = VP_KEYS["rescale_betas_zero_snr"],
        nonfinite_check: str = "auto",
        noise_process: str = "vp",
        shift: float = FLOW_KEYS["shift"],
        use_dynamic_shifting: bool = FLOW_KEYS["use_dynamic_shifting"],
        base_shift: float = FLOW_KEYS["base_shift"],
        max_shift: float = FLOW_KEYS["max_shift"],
        base_image_seq_len: int = FLOW_KEYS["base_image_seq_len"],
        max_image_seq_len: int = FLOW_KEYS["max_image_seq_len"],
        shift_terminal: float | None = FLOW_KEYS["shift_terminal"],
        time_shift_type: str = FLOW_KEYS["time_shift_type"],
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        invert_sigmas: bool = FLOW_KEYS["invert_sigmas"],
        flow_grid: str = FLOW_KEYS["flow_grid"],
    ):
        check_choice("noise_process", noise_process, NOISE_PROCESSES)
        check_choice("timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS)
        check_choice("final_sigmas_type", final_sigmas_type, FINAL_SIGMAS_TYPES)
        if isinstance(steps_offset, bool) or not isinstance(steps_offset, Integral) or steps_offset < 0:
            raise ValueError(f"steps_offset must be an integer >= 0, got {steps_offset!r}")
        if trained_betas is not None and len(trained_betas) != num_train_timesteps:
            raise ValueError(
                f"trained_betas has {len(trained_betas)} entries but num_train_timesteps is {num_train_timesteps}"
            )
        config = dict(self.config)
        config["prediction_type"] = prediction_type
        if noise_process == "vp":
            spacing = [k for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas") if config[k]]
            if spacing:
                raise ValueError(f"{spacing[0]}=True is supported on flow-matching grids only; this scheduler's noise process is VP")
        self._process = noise_process_from_config(config)  # checks the keys of both families against each other
        resolved = prediction_type_from_config(config)
        if prediction_type is None:
            self.register_to_config(prediction_type=resolved)
        if noise_process == "vp":
            self.alphas_cumprod = self._process.alphas_cumprod.float()
            self.betas = self._process.betas  # what diffusers' code and tests read
            self.alphas = 1.0 - self.betas
        self.timesteps: torch.Tensor | None = None
        self.sigmas: torch.Tensor | None = None
        self.num_inference_steps: int | None = None
        self._grid: Grid | None = None
        self._step_index: int | None = None
        self._begin_index: int | None = None
        self._nonfinite = NonFiniteWatch(nonfinite_check, "model_output")  # checks nonfinite_check
    @classmethod
    def from_config(cls, config=None, return_unused_kwargs: bool = False, **kwargs):
        """diffusers' ``from_config``, reading the noise process of ``config`` first: a flow-matching config
        (FlowMatchEulerDiscreteScheduler's, or a DPM-Solver / UniPC one with ``use_flow_sigmas``) gives
        ``noise_process="flow"``, its shift (``flow_shift`` for the latter), its grid (``flow_grid``: the
        latter's class lays out its own) and the velocity prediction.  Contradicting keys are a ValueError."""
        source = dict(as_config(config)) if config is not None else {}
        if "noise_process" not in kwargs:
            probe = {**source, **{k: v for k, v in kwargs.items() if k in ("prediction_type", "use_flow_sigmas")}}
            family = noise_process_family(probe)
            kwargs["noise_process"] = family
            if family == "flow":
                kwargs.setdefault("prediction_type", prediction_type_from_config(probe))
                if source.get("use_flow_sigmas"):
                    if "flow_shift" in source and "shift" not in source:
                        kwargs.setdefault("shift", float(source["flow_shift"]))
                    kwargs.setdefault("flow_grid", flow_grid_of_config(source))
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    # -- the diffusers contract -----------------------------------------------------------------------
    def __len__(self) -> int:
        return self.config.num_train_timesteps

    @property
    def noise_process(self):
        """The :class:`~steerdiff.core.process.NoiseProcess` this scheduler integrates."""
        return self._process

    @property
    def grid(self) -> Grid | None:
        """The current run's :class:`~steerdiff.core.grid.Grid` (None before ``set_timesteps``)."""
        return self._grid

    @property
    def network_calls(self) -> list[tuple[float, int]]:
        """(timestep, grid step) of each network call of the current run, in order: one per step, several for a
        warm-up step (``warmup="rk4"``)."""
        stages = getattr(self, "_stages", None)
        steps = [n for n, _ in stages] if stages is not None else range(len(self._call_t))
        return list(zip(self._call_t, steps))

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
        """The network sees x_t itself: returns ``sample``."""
        return sample

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device=None,
        timesteps=None,
        sigmas=None,
        mu: float | None = None,
    ) -> None:
        """Lay out the grid on ``device`` and reset the sampler's memory.

        VP: ``num_inference_steps`` steps or the given decreasing ``timesteps`` (integers or fractional values
        in [0, T - 1]).  Flow: ``num_inference_steps`` and/or the pipeline's ``sigmas`` / ``timesteps``, with
        ``mu`` for dynamic shifting, exactly as ``FlowMatchEulerDiscreteScheduler.set_timesteps``."""
        c = self.config
        if c.noise_process == "vp" and (num_inference_steps is None) == (timesteps is None):
            raise ValueError("pass exactly one of num_inference_steps or timesteps to set_timesteps()")
        self.start_run(resolve_grid(
            self._process, num_inference_steps, timesteps=timesteps, sigmas=sigmas, mu=mu,
            timestep_spacing=c.timestep_spacing, steps_offset=c.steps_offset, final_sigmas_type=c.final_sigmas_type,
            device=device,
        ))

    def start_run(self, grid: Grid) -> None:
        """Start a run on a grid laid out elsewhere (``set_timesteps`` lays out its own and calls this): reset the
        sampler's memory and its step count.  :mod:`steerdiff.k_diffusion` runs the samplers this way on the sigmas
        a k-diffusion caller gives, on :mod:`~steerdiff.core.sigma_process`'s processes, whose timestep is the
        noise level.  The grid's process must be of this scheduler's family (flow, or VP / variance exploding)."""
        c = self.config
        if (grid.process is not None and grid.process.kind == "flow") != (c.noise_process == "flow"):
            raise ValueError(f"this scheduler's noise_process is {c.noise_process!r}; the grid's process is {grid.process!r}")
        self._grid = grid
        self.timesteps = grid.timesteps
        # diffusers' ``sigmas`` (on the CPU): the flow noise level s, or the VP sigma_bar of DPM-Solver / Euler
        self.sigmas = (grid.sigma_host if c.noise_process == "flow" else grid.sigma_bar_host).to(torch.float32)
        self.num_inference_steps = grid.num_steps
        self._call_t = grid.t_host[:-1]  # the timestep of each network call (a warm-up adds calls between points)
        self._momentum.reset()
        self._step_index = None
        self._begin_index = None
        self._nonfinite = NonFiniteWatch(c.nonfinite_check, "model_output", grid.num_steps)
        self._update_watch = NonFiniteWatch(
            c.nonfinite_check, f"{type(self).__name__}'s own update (prev_sample; the model output was finite)",
            grid.num_steps,
        )

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
        self._update_watch.update(i, prev_sample, self._call_t[i])
        self._step_index = i + 1
        if i == len(self._call_t) - 1:
            self._raise_deferred_nonfinite()
        return SchedulerOutput(prev_sample=prev_sample) if return_dict else (prev_sample,)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """x_t = alpha_t x_0 + sigma_t noise, per sample for (B,) ``timesteps``, on the samples' device and dtype."""
        t = torch.as_tensor(timesteps, device=original_samples.device)
        alpha, sigma = self._process.alpha_sigma(t)
        return expand_to(alpha, original_samples) * original_samples + expand_to(sigma, original_samples) * noise

    def scale_noise(self, sample: torch.Tensor, timestep, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Flow matching's forward process for img2img, as ``FlowMatchEulerDiscreteScheduler.scale_noise``:
        (1 - s) sample + s noise, with s the grid sigma at the run's begin index (``set_begin_index``) or, without
        one, at the grid point of each given timestep."""
        if self._process.kind != "flow":
            raise ValueError("scale_noise is the flow-matching forward process; a VP scheduler noises with add_noise")
        if self._grid is None:
            raise ValueError(f"call set_timesteps() before scale_noise() on {type(self).__name__}")
        if noise is None:
            raise ValueError("scale_noise needs the noise tensor")
        t = torch.as_tensor(timestep).reshape(-1).to(torch.float64).cpu()
        if self._begin_index is not None or self._step_index is not None:
            index = self._step_index if self._step_index is not None else self._begin_index
            indices = [index] * t.numel()
        else:
            grid_t = torch.tensor(self._grid.t_host[:-1], dtype=torch.float64)
            indices = []
            for value in t.tolist():
                hits = torch.nonzero(grid_t == value).flatten()
                if hits.numel() == 0:
                    raise ValueError(f"timestep {value:g} is not on this run's grid; call set_begin_index() for img2img")
                indices.append(int(hits[1 if hits.numel() > 1 else 0]))
        s = self._grid.sigma[indices].to(device=sample.device, dtype=sample.dtype)
        s = expand_to(s.reshape(-1) if s.numel() > 1 else s.reshape(()), sample)
        return s * noise + (1.0 - s) * sample

    @property
    def first_nonfinite_step(self) -> torch.Tensor | None:
        """Device tensor: the first step of this run whose model output held NaN/Inf, -1 if none so far
        (deferred checking only; None otherwise)."""
        return self._nonfinite.first_step

    # -- shared pieces of the updates -----------------------------------------------------------------
    def _eps(self, i: int, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        a, s = self._grid.point(i)
        return to_eps(model_output, sample, a, s, self.config.prediction_type)

    def _data(self, i: int, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        a, s = self._grid.point(i)
        return to_x0(model_output, sample, a, s, self.config.prediction_type)

    def _euler(self, i: int, sample: torch.Tensor, direction: torch.Tensor, model_output: torch.Tensor) -> torch.Tensor:
        """x_bar_{i+1} = x_bar_i + (sigma_bar_{i+1} - sigma_bar_i) direction (:meth:`Grid.euler`; from pure noise
        the step uses the data prediction of ``model_output``)."""
        grid = self._grid
        return grid.euler(i, sample, direction, Prediction(model_output, sample, *grid.point(i), self.config.prediction_type))

    # -- bookkeeping ----------------------------------------------------------------------------------
    def _next_step_index(self, timestep) -> int:
        if self._grid is None:
            raise ValueError(f"call set_timesteps(num_inference_steps) before step() on {type(self).__name__}")
        i = self._step_index if self._step_index is not None else (self._begin_index or 0)
        n = len(self._call_t)
        if i >= n:
            raise ValueError(
                f"step() called after the last of the run's {n} network calls (num_inference_steps = "
                f"{self.num_inference_steps}); call set_timesteps() for a new run"
            )
        given, expected = _host_timestep(timestep), self._call_t[i]
        if given is not None and given != expected:
            raise ValueError(
                f"timestep {given:g} is not the next timestep of this run (step {i} of {n} is at {expected:g}); "
                "call set_timesteps() to start over, or set_begin_index() to start later in the grid"
            )
        return i

    def _watch_nonfinite(self, model_output: torch.Tensor, i: int) -> None:
        self._nonfinite.update(i, model_output, self._call_t[i])

    def _raise_deferred_nonfinite(self) -> None:
        """The earlier of the two deferred findings: bad model output at step i also spoils the update at i, so the
        model output is named unless the update went bad at an earlier step (one host read of two numbers)."""
        finish_earliest(self._nonfinite, self._update_watch)


class AdamsBashforthScheduler(MomentumScheduler):
    """Base of the Adams-Bashforth momentum samplers (PLMS + HB, GHVB): the ``adams_weights`` and ``warmup`` options.

    ``adams_weights``: "fixed" uses the classical equal-step weights in (x_bar, sigma_bar) with eps, as PLMS and
    the paper's code.  "variable" uses the weights of the actual steps
    (:func:`~steerdiff.core.multistep.variable_adams_bashforth_coefficients`) in the ODE's own variable:
    d x_bar / d sigma_bar = eps on VP grids, d x / d s = v (the velocity eps - x0) on flow grids, where
    sigma_bar = s / (1 - s) is infinite at the first point and its steps are far from polynomial-friendly near
    s = 1.  Both variables give the same first-order (Euler / DDIM) step.  The weights depend on the grid only and
    are computed on the host once per ``set_timesteps``.

    ``warmup``: "none" starts with lower-order Adams-Bashforth steps while the history fills (an Euler first step,
    as the paper's code); "rk4" takes the first r - 1 steps with the classical Runge-Kutta method in the same
    variable y (sigma_bar or s) and derivative f (eps or v),

        k1 = f(x_n, y_n),  k2 = f(x_n + h/2 k1, y_n + h/2),  k3 = f(x_n + h/2 k2, y_n + h/2),
        k4 = f(x_n + h k3, y_{n+1}),   x_{n+1} = x_n + h (k1 + 2 k2 + 2 k3 + k4) / 6,

    as PNDM's pseudo Runge-Kutta start (Liu et al. 2022), whose local error O(h^5) keeps the start from capping the
    global order at 2.  Each warm-up step is four network calls, listed in ``timesteps`` (the midpoint twice):
    N steps cost N + 3 (r - 1) calls.  k1 of each warm-up step enters the history as a multistep value would.
    """

    def start_run(self, grid: Grid) -> None:
        """:meth:`MomentumScheduler.start_run`, then the variable weights and the warm-up calls of this grid."""
        super().start_run(grid)
        self._weights = self._variable_weights() if self.config.adams_weights == "variable" else None
        self._stages = None
        if self.config.warmup == "rk4" and self.config.order > 1:
            self._lay_out_warmup()

    def set_begin_index(self, begin_index: int = 0) -> None:
        if getattr(self, "_stages", None) is not None and begin_index:
            raise ValueError("warmup='rk4' starts at the first timestep; a pipeline that starts later in the grid "
                             "(img2img, set_begin_index) needs warmup='none'")
        super().set_begin_index(begin_index)
        if getattr(self, "_weights", None) is not None:  # the history starts at the begin index
            self._weights = self._variable_weights(start=self._begin_index)

    @property
    def _in_s(self) -> bool:
        return self._weights is not None and self._grid.process.kind == "flow"

    def _variable_weights(self, start: int = 0):
        """Per step i >= ``start`` (the run's first step), the weights on the nodes start..i (at most r of them)."""
        grid = self._grid
        flow = grid.process.kind == "flow"
        nodes = (grid.sigma_host if flow else grid.sigma_bar_host).numpy()
        skip = 1 if grid.starts_at_pure_noise and not flow and start == 0 else 0  # sigma_bar is infinite there
        beta = self._momentum.beta if self._beta_weighted else 1.0
        return variable_adams_bashforth_grid(nodes, self.config.order, beta, start=start, history_start=start + skip)

    def _lay_out_warmup(self) -> None:
        grid = self._grid
        process = grid.process
        if process.kind == "flow" and not self._in_s:
            raise ValueError("warmup='rk4' on a flow-matching grid integrates in s: it needs adams_weights='variable'")
        warm = min(self.config.order - 1, grid.num_steps)
        calls, stages, mids = [], [], []
        for n in range(grid.num_steps):
            if n >= warm:
                calls.append(grid.t_host[n])
                stages.append((n, None))
                continue
            if process.kind == "flow":
                s_mid = 0.5 * (float(grid.sigma_host[n]) + float(grid.sigma_host[n + 1]))
                t_mid = s_mid * process.num_train_timesteps
                a_mid, s_mid_t = torch.tensor(1.0 - s_mid, dtype=torch.float64), torch.tensor(s_mid, dtype=torch.float64)
            else:
                bar = 0.5 * (float(grid.sigma_bar_host[n]) + float(grid.sigma_bar_host[n + 1]))
                t_mid = float(process.timestep_from_sigma_bar(torch.tensor(bar, dtype=torch.float64)))
                a_mid, s_mid_t = process.alpha_sigma(torch.tensor(t_mid, dtype=torch.float64))
            mids.append(tuple(v.to(device=grid.alpha.device, dtype=grid.alpha.dtype).reshape(()) for v in (a_mid, s_mid_t)))
            calls += [grid.t_host[n], t_mid, t_mid, grid.t_host[n + 1]]
            stages += [(n, 0), (n, 1), (n, 2), (n, 3)]
        self._stages, self._mids, self._call_t = stages, mids, calls
        self._rk: dict = {}
        # fractional midpoint timesteps, in the grid's own precision (float64; float32 on MPS), so that the network
        # sees exactly the noise level the stage is computed at
        self.timesteps = torch.tensor(calls, dtype=grid.alpha.dtype, device=grid.t.device)
        self._call_t = [float(v) for v in self.timesteps.cpu().tolist()]
        self._nonfinite = NonFiniteWatch(self.config.nonfinite_check, "model_output", len(calls))

    def _update(self, i: int, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        if self._stages is None:
            return self._multistep(i, model_output, sample)
        n, stage = self._stages[i]
        if stage is None:
            return self._multistep(n, model_output, sample)
        return self._runge_kutta(n, stage, model_output, sample)

    def _runge_kutta(self, n: int, stage: int, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        grid, rk = self._grid, self._rk
        here = grid.point(n) if stage == 0 else grid.point(n + 1) if stage == 3 else self._mids[n]
        k = self._derivative_at(here, model_output, sample)
        if stage == 0:
            rk.clear()
            rk["x"] = sample
            self._feed(k)
        rk[stage] = k
        x = rk["x"]
        if stage < 2:  # x_n + h/2 k1, x_n + h/2 k2: the midpoint stages
            return self._move(x, k, grid.point(n), self._mids[n])
        if stage == 2:
            return self._move(x, k, grid.point(n), grid.point(n + 1))
        combined = (rk[0] + 2 * rk[1] + 2 * rk[2] + k) / 6
        return self._move(x, combined, grid.point(n), grid.point(n + 1))

    def _derivative_at(self, point, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        a, s = point
        target = "flow_prediction" if self._in_s else "epsilon"
        return convert_prediction(model_output, sample, a, s, self.config.prediction_type, target)

    def _move(self, x: torch.Tensor, direction: torch.Tensor, start, end) -> torch.Tensor:
        """x + (y_end - y_start) direction in the variable y (s, or sigma_bar: :func:`~steerdiff.core.steps.euler_step`)."""
        if self._in_s:
            return x + expand_to(end[1] - start[1], x).to(x.dtype) * direction
        return euler_step(x, direction, start[0], start[1], end[0], end[1])

    def _derivative(self, i: int, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """What the Adams-Bashforth rule combines: eps (in sigma_bar), or the velocity v (in s, flow, variable)."""
        if not self._in_s:
            return self._eps(i, model_output, sample)
        return self._derivative_at(self._grid.point(i), model_output, sample)

    def _advance(self, i: int, sample: torch.Tensor, direction: torch.Tensor, model_output: torch.Tensor) -> torch.Tensor:
        """x_{i+1} = x_i + (s_{i+1} - s_i) direction in s, else the Euler step in (x_bar, sigma_bar)."""
        if not self._in_s:
            return self._euler(i, sample, direction, model_output)
        return self._move(sample, direction, self._grid.point(i), self._grid.point(i + 1))

    def _coefficients(self, i: int):
        return None if self._weights is None else self._weights[i]


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
