"""Gradients of a loss on the generated x_0 through a deterministic diffusion sampler (AdjointDPM).

Pan et al., "AdjointDPM: Adjoint Sensitivity Method for Gradient Backpropagation of Diffusion Probabilistic
Models", ICLR 2024.  With y = x / alpha and rho = sigma / alpha = e^{-lambda} the probability-flow ODE is

    dy/drho = eps(alpha(rho) y, t(rho), c; theta)                                          (exponential reparam.)

and the sampler integrates it from rho_0 (x_T) down to rho_N (x_0) on the grid of :mod:`steerdiff.core`:
order 1 is DDIM (:func:`~steerdiff.core.steps.euler_step` on eps), order 2 is DPM-Solver-2M on eps
(:func:`~steerdiff.core.steps.dpm_solver_2m_eps`, Lu et al. 2022), the final step always first order.
:func:`sample_with_grad` returns dL/dx_T, dL/dc and dL/dtheta for L(x_0) in one of three modes:

``"adjoint"``  (continuous adjoint, optimise-then-discretise; memory independent of the number of steps)
    Integrates the augmented adjoint ODE backwards from rho_{N-1} to rho_0, reconstructing y backwards
    instead of storing it.  With a_x = dL/dx = a_y / alpha and d eps/dy = alpha d eps/dx it reads

        dy/drho       = eps
        d a_y / drho  = -alpha^2 (d eps/dx)^T a_x          a_y(rho_{N-1}) = alpha_{N-1} dL/dx_{N-1}
        d a_c / drho  = -alpha   (d eps/dc)^T a_x          a_c, a_theta start at the final step's gradient
        d a_th / drho = -alpha   (d eps/dtheta)^T a_x

    and dL/dx_T = a_y(rho_0) / alpha_0.  Every right-hand side is a known function of rho (1, alpha^2, alpha)
    times a network term that varies slowly (near pure noise eps ~ x, a_x ~ const).  As the forward
    exponential integrator takes the linear part of the ODE exactly and holds only eps constant, the adjoint
    step holds only the network terms constant (order 1; at order 2 it adds the DPM-Solver-2M correction of the
    last two values, :func:`~steerdiff.core.steps.dpm_solver_2m_eps`) and integrates the known factors
    exactly: each component takes an Euler step (:func:`~steerdiff.core.steps.euler_step`) in its own clock,
    rho for y, int alpha^2 d rho for a_y, int alpha d rho for a_c and a_theta (VP, alpha = (1 + rho^2)^(-1/2):
    atan(rho) and asinh(rho); flow matching, alpha = 1 / (1 + rho): s and -log(1 - s);
    :meth:`~steerdiff.core.process.NoiseProcess.alpha_integrals`).  Freezing alpha too (plain Euler in rho, as a generic solver on AdjointDPM's
    augmented ODE does) is a poor approximation where rho grows by large factors per step near x_T: there
    a_y ~ 1 / rho decays like a stiff mode.  Each backward step is one network call and one vector-Jacobian
    product at the reconstructed state, at the forward grid's points t_{N-1}, ..., t_1.  The final step, into
    the end of the grid (sigma = 0, lambda = inf, where the network is never evaluated), is differentiated
    exactly with one VJP at x_{N-1}, which the forward pass keeps.  The result approximates the exact gradient
    of the discrete sampler with an error that shrinks as the grid is refined (first / second order).

``"checkpoint"``  (discretise-then-optimise: the exact gradient of the discrete sampler)
    Stores the per-step states (x_i and, at order 2, eps_i) and recomputes each step's graph during the
    backward pass; one network call and one VJP per step, memory O(steps x latent) plus one step's graph.

``"autograd"``  (the reference)  Plain backpropagation through the whole loop.

Classifier-free guidance runs inside the loop (the guided eps is what is differentiated), any prediction type
is converted with :mod:`steerdiff.core.prediction`, and the state keeps x_T's dtype and device.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..core.denoiser import Denoiser, Prediction
from ..core.grid import Grid, make_grid
from ..core.prediction import check_prediction_type
from ..core.process import NoiseProcess, as_config, noise_process_from_config, prediction_type_from_config
from ..core.steps import dpm_solver_2m_eps, euler_step, step_ratio
from ..core.timesteps import TIMESTEP_SPACINGS, spaced_timesteps, with_final
from .conditioning import denoiser_for

MODES = ("adjoint", "checkpoint", "autograd")
ORDERS = (1, 2)


@dataclass
class AdjointResult:
    """What :func:`sample_with_grad` returns (all detached)."""

    x0: torch.Tensor
    """The generated sample x_0, shaped like x_T."""
    grad_x_T: torch.Tensor
    """dL/dx_T."""
    grad_conditioning: torch.Tensor | None
    """dL/dc, shaped like the conditioning given; None when it is not a float tensor (labels) or not given."""
    grad_params: dict[str, torch.Tensor]
    """dL/dtheta for each named parameter (zeros for parameters that do not affect x_0)."""
    loss: torch.Tensor | None = None
    """L(x_0) when ``loss_fn`` was given."""
    nfe: int = 0
    """Network calls, forward and backward passes together (a CFG pair is one batched call)."""
    state_bytes: int = 0
    """Peak bytes the mode keeps from one step to the next outside the autograd graph, besides the gradient
    accumulators every mode returns: the stored x_i (and eps_i at order 2) of ``checkpoint``; x, a_y and, at
    order 2, the previous augmented derivative of ``adjoint``; 0 for ``autograd`` (all of it is in the graph)."""
    timesteps: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    """The grid that was integrated (N + 1 entries)."""


# -- the grid and one step -------------------------------------------------------------------------------
def _clocks(process: NoiseProcess, grid: Grid) -> tuple[torch.Tensor, torch.Tensor]:
    """The clocks of the adjoint states on the grid, with rho = sigma_bar = sigma / alpha: int alpha^2 d rho for a_y
    and int alpha d rho for a_c and a_theta (VP: atan(rho), asinh(rho); flow: s, -log(1 - s))."""
    return process.alpha_integrals(grid.sigma_bar)


def _clock_step(v: torch.Tensor, direction: torch.Tensor, clock_s, clock_t) -> torch.Tensor:
    """v + (clock_t - clock_s) direction: an Euler step in the variable ``clock`` -- euler_step with alpha = 1
    and sigma = clock (in (x_bar, sigma_bar) euler_step is exactly this)."""
    return euler_step(v, direction, 1.0, clock_s, 1.0, clock_t)


def _second_order(grid: Grid, order: int, i: int) -> bool:
    """Forward step i takes the 2M combination unless the grid's rule makes it first order (the first step; the
    final one on grids ending at sigma = 0 or shorter than 15 steps), and the final step is first order on every
    grid (the adjoint differentiates it exactly, at x_{N-1})."""
    return order == 2 and not grid.first_order(i) and i < grid.num_steps - 1


def _direction(grid: Grid, order: int, i: int, eps: torch.Tensor, eps_prev: torch.Tensor | None) -> torch.Tensor:
    if not _second_order(grid, order, i):
        return eps
    return dpm_solver_2m_eps(eps, eps_prev, grid.ratio(i))


class _NonFiniteWatch:
    """The first step at which some tensor held NaN/Inf, tracked on the device: no host sync inside the loop."""

    def __init__(self, device):
        self.first = torch.full((), -1, dtype=torch.long, device=device)

    def update(self, step: int, tensors: Sequence[torch.Tensor]) -> None:
        finite = torch.stack([torch.isfinite(t).all() for t in tensors]).all()
        self.first = torch.where((self.first < 0) & ~finite, step, self.first)

    def check(self, message: Callable[[int], str]) -> None:
        step = int(self.first)
        if step >= 0:
            raise FloatingPointError(message(step))


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


# -- the problem: model, conditioning, parameters ------------------------------------------------------------
class _Problem:
    """Everything fixed during one call: the guided eps as a function of (x, grid index), and what to differentiate."""

    def __init__(self, denoiser: Denoiser, grid: Grid, params: dict[str, torch.Tensor]):
        self.denoiser, self.grid = denoiser, grid
        cond = denoiser.cond
        self.cond_differentiable = torch.is_tensor(cond) and cond.is_floating_point()
        if self.cond_differentiable:
            denoiser.cond = cond.detach().requires_grad_(True)
        self.cond = denoiser.cond
        self.clock_y, self.clock_c = _clocks(denoiser.process, grid)
        self.param_names = list(params)
        self.params = list(params.values())
        self.nfe = 0

    def predict(self, x: torch.Tensor, i: int) -> Prediction:
        """The guided prediction at grid point i (the rule sees evaluation index i, also in the backward pass)."""
        g = self.grid
        self.nfe += 1
        return self.denoiser.predict(x, g.t[i], *g.point(i), step=i)

    def eps(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """The guided noise prediction at grid point i."""
        return self.predict(x, i).eps

    def inputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x, then the conditioning (when differentiable), then the parameters: what each VJP is taken w.r.t."""
        return [x] + ([self.cond] if self.cond_differentiable else []) + self.params

    def vjp(self, outputs, inputs, cotangents, retain_graph: bool = False) -> list[torch.Tensor]:
        grads = torch.autograd.grad(outputs, inputs, cotangents, retain_graph=retain_graph, allow_unused=True)
        return [torch.zeros_like(v) if g is None else g for g, v in zip(grads, inputs)]

    def split(self, grads: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None, list[torch.Tensor]]:
        """(dx, dcond or None, [dparams]) from a list ordered like :meth:`inputs`."""
        k = 2 if self.cond_differentiable else 1
        return grads[0], (grads[1] if self.cond_differentiable else None), list(grads[k:])

    def forward(self, x: torch.Tensor, order: int, keep: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None):
        """Integrate from grid point 0 to N; ``keep(i, x_i, eps_i)`` sees each state and its eps."""
        g, n = self.grid, self.grid.num_steps
        watch = _NonFiniteWatch(x.device)
        eps_prev = None
        for i in range(n):
            pred = self.predict(x, i)
            eps = pred.eps
            watch.update(i, [eps])
            if keep is not None:
                keep(i, x, eps)
            x = g.euler(i, x, _direction(g, order, i, eps, eps_prev), pred)
            eps_prev = eps
        watch.check(lambda i: f"the model output (guided eps) has NaN/Inf at step {i} (timestep {float(g.t[i]):g})")
        return x


# -- the three modes ------------------------------------------------------------------------------------------
def _autograd(problem: _Problem, x_T: torch.Tensor, order: int, seed_grad):
    x = x_T.detach().requires_grad_(True)
    with torch.enable_grad():
        x0 = problem.forward(x, order)
        loss, g0 = seed_grad(x0, graph=True)
        out, cot = (loss, None) if loss is not None else (x0, g0)
        grads = problem.vjp(out, problem.inputs(x), cot)
    return x0.detach(), loss, grads, 0


def _checkpoint(problem: _Problem, x_T: torch.Tensor, order: int, seed_grad):
    g, n = problem.grid, problem.grid.num_steps
    xs: list[torch.Tensor] = []
    eps_store: list[torch.Tensor] = []

    def keep(i, x, eps):
        xs.append(x)
        if order == 2:
            eps_store.append(eps)

    with torch.no_grad():
        x0 = problem.forward(x_T.detach(), order, keep)
    state_bytes = _nbytes(xs) + _nbytes(eps_store)
    loss, cot_x = seed_grad(x0, graph=False)
    cot_eps = None  # dL/d eps_i from step i + 1's second-order combination
    acc_cond, acc_params = None, None
    watch = _NonFiniteWatch(x_T.device)
    for i in reversed(range(n)):
        with torch.enable_grad():
            x = xs[i].detach().requires_grad_(True)
            pred = problem.predict(x, i)
            eps = pred.eps
            eps_prev = None
            if _second_order(g, order, i):
                eps_prev = eps_store[i - 1].detach().requires_grad_(True)
            x_next = g.euler(i, x, _direction(g, order, i, eps, eps_prev), pred)
            outs, cots = [x_next], [cot_x]
            if cot_eps is not None:
                outs, cots = [x_next, eps], [cot_x, cot_eps]
            extra = [eps_prev] if eps_prev is not None else []
            grads = problem.vjp(outs, problem.inputs(x) + extra, cots)
        cot_eps = grads.pop() if eps_prev is not None else None
        cot_x, d_cond, d_params = problem.split(grads)
        acc_cond = d_cond if acc_cond is None else acc_cond + d_cond
        acc_params = d_params if acc_params is None else [a + d for a, d in zip(acc_params, d_params)]
        watch.update(i, [cot_x])
    watch.check(lambda i: f"the gradient dL/dx is NaN/Inf at step {i} (timestep {float(g.t[i]):g}) of the backward pass")
    return x0, loss, [cot_x] + ([acc_cond] if acc_cond is not None else []) + acc_params, state_bytes


def _adjoint(problem: _Problem, x_T: torch.Tensor, order: int, seed_grad):
    g, n = problem.grid, problem.grid.num_steps
    kept: dict[int, torch.Tensor] = {}

    def keep(i, x, eps):
        if i == n - 1:
            kept[i] = x

    with torch.no_grad():
        x0 = problem.forward(x_T.detach(), order, keep)
    loss, cot_x = seed_grad(x0, graph=False)

    # the final step, exactly: one VJP at x_{N-1}; its graph also gives the adjoint's first derivative
    with torch.enable_grad():
        x = kept.pop(n - 1).detach().requires_grad_(True)
        pred = problem.predict(x, n - 1)
        eps = pred.eps
        final = problem.vjp([g.euler(n - 1, x, eps, pred)], problem.inputs(x), [cot_x], retain_graph=n > 1)
        dx, a_cond, a_params = problem.split(final)
        a_y = g.alpha[n - 1].to(dx.dtype) * dx
        if n > 1:
            deriv = _adjoint_derivative(problem, x, eps, a_y, n - 1)
    state_bytes = 0
    watch = _NonFiniteWatch(x_T.device)
    watch.update(n - 1, [a_y, *([a_cond] if a_cond is not None else []), *a_params])
    x = x.detach()
    prev = None  # the augmented derivative at the previous (higher-lambda) backward point
    for k in range(n - 1, 0, -1):  # from grid point k to k - 1
        direction = deriv
        if order == 2 and prev is not None:
            r = step_ratio(g.lam[k + 1], g.lam[k], g.lam[k - 1])  # the backward grid's r0, at point k
            direction = [None if d is None else dpm_solver_2m_eps(d, p, r) for d, p in zip(deriv, prev)]
        d_eps, d_ay, d_cond, d_params = direction[0], direction[1], direction[2], direction[3:]
        x = euler_step(x, d_eps, g.alpha[k], g.sigma[k], g.alpha[k - 1], g.sigma[k - 1])
        clock_y, clock_c = problem.clock_y, problem.clock_c
        a_y = _clock_step(a_y, d_ay, clock_y[k], clock_y[k - 1])
        if a_cond is not None:
            a_cond = _clock_step(a_cond, d_cond, clock_c[k], clock_c[k - 1])
        a_params = [_clock_step(a, d, clock_c[k], clock_c[k - 1]) for a, d in zip(a_params, d_params)]
        watch.update(k, [a_y, *([a_cond] if a_cond is not None else []), *a_params])
        state_bytes = max(state_bytes, _nbytes([x, a_y, *(prev or [])]))
        if k > 1:
            prev = deriv if order == 2 else None
            del direction, d_eps, d_ay, d_cond, d_params, deriv  # at order 1 nothing outlives the step
            with torch.enable_grad():
                xk = x.requires_grad_(True)
                deriv = _adjoint_derivative(problem, xk, problem.eps(xk, k - 1), a_y, k - 1)
            x = x.detach()
    watch.check(
        lambda k: f"the adjoint state (a_y, a_c or a_theta) became NaN/Inf in the backward step from timestep {float(g.t[k]):g} "
        f"(grid point {k} of {n}, where the VJP was taken)"
    )
    grad_x_T = a_y / g.alpha[0].to(a_y.dtype)
    return x0, loss, [grad_x_T] + ([a_cond] if a_cond is not None else []) + a_params, state_bytes


def _adjoint_derivative(problem: _Problem, x: torch.Tensor, eps: torch.Tensor, a_y: torch.Tensor, i: int) -> list:
    """The smooth factors of the augmented derivative at grid point i (detached):
    [eps, -(d eps/dx)^T a_x, -(d eps/dc)^T a_x (or None), -(d eps/dtheta)^T a_x ...] with a_x = a_y / alpha."""
    a_x = a_y / problem.grid.alpha[i].to(a_y.dtype)
    dx, d_cond, d_params = problem.split(problem.vjp([eps], problem.inputs(x), [a_x]))
    return [eps.detach(), -dx, None if d_cond is None else -d_cond, *[-d for d in d_params]]


_MODE_FNS = {"adjoint": _adjoint, "checkpoint": _checkpoint, "autograd": _autograd}


# -- argument handling -------------------------------------------------------------------------------------
def _as_process(schedule) -> tuple[NoiseProcess, Mapping]:
    """The noise process, and the scheduler config it came from (empty for a NoiseProcess)."""
    if isinstance(schedule, NoiseProcess):
        return schedule, {}
    try:
        config = as_config(schedule)
    except TypeError:
        raise ValueError(
            f"schedule must be a steerdiff NoiseProcess (NoiseSchedule, FlowMatchSchedule), a diffusers scheduler or "
            f"its config, got {type(schedule).__name__}"
        ) from None
    return noise_process_from_config(schedule), config


def resolve_params(model: nn.Module, params) -> dict[str, torch.Tensor]:
    """The parameters to differentiate, by name: None (none), ``"all"`` (every parameter that requires grad), a
    sequence of names of ``model.named_parameters()``, or a mapping name -> tensor (e.g. LoRA adapters)."""
    if params is None:
        return {}
    named = dict(model.named_parameters())
    if isinstance(params, str):
        if params != "all":
            raise ValueError(f"params must be None, 'all', a list of parameter names or a dict name -> tensor, got {params!r}")
        chosen = {k: p for k, p in named.items() if p.requires_grad}
        if not chosen:
            raise ValueError("params='all' but no parameter of the model requires grad (call model.requires_grad_())")
        return chosen
    if isinstance(params, Mapping):
        chosen = dict(params)
        bad = [k for k, p in chosen.items() if not torch.is_tensor(p)]
        if bad:
            raise ValueError(f"params must map names to tensors; not tensors: {bad}")
    else:
        names = list(params)
        unknown = [k for k in names if k not in named]
        if unknown:
            hint = ", ".join(list(named)[:5])
            raise ValueError(f"unknown parameter names {unknown}; names come from model.named_parameters(), e.g. {hint}")
        chosen = {k: named[k] for k in names}
    frozen = [k for k, p in chosen.items() if not p.requires_grad]
    if frozen:
        raise ValueError(
            f"gradients were asked for parameters that do not require grad: {frozen}; call requires_grad_(True) on "
            "them (or on the model) first"
        )
    return chosen


def _resolve_grid(process: NoiseProcess, num_inference_steps, timesteps, timestep_spacing, device) -> Grid:
    """The grid of N + 1 points: the given ``timesteps``, or N steps spaced on the trained timesteps 0..T-1
    (``spaced_timesteps``, the same rule on VP and flow processes, so a flow grid starts at s = (T - 1) / T),
    then the clean end."""
    if (num_inference_steps is None) == (timesteps is None):
        raise ValueError("give exactly one of num_inference_steps (>= 1) and timesteps (a decreasing grid of N + 1 entries)")
    if timesteps is None:
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be an integer >= 1, got {num_inference_steps!r}")
        if timestep_spacing not in TIMESTEP_SPACINGS:
            raise ValueError(f"timestep_spacing must be one of {TIMESTEP_SPACINGS}, got {timestep_spacing!r}")
        timesteps = with_final(spaced_timesteps(process.num_train_timesteps, num_inference_steps, timestep_spacing))
    return make_grid(process, timesteps, device=device)


def _seed_grad(loss_fn, grad_x0):
    """(x0, graph) -> (loss or None, dL/dx0): the cotangent the backward pass starts from."""
    if (loss_fn is None) == (grad_x0 is None):
        raise ValueError("give exactly one of loss_fn (x0 -> scalar loss) and grad_x0 (dL/dx0, shaped like x0)")

    def seed(x0: torch.Tensor, graph: bool):
        if grad_x0 is not None:
            if tuple(grad_x0.shape) != tuple(x0.shape):
                raise ValueError(f"grad_x0 must have the shape of x0 {tuple(x0.shape)}, got {tuple(grad_x0.shape)}")
            cot = grad_x0.to(device=x0.device, dtype=x0.dtype)
            _check_finite_seed(cot)
            return None, cot
        leaf = x0 if graph else x0.detach().requires_grad_(True)
        with torch.enable_grad():
            loss = loss_fn(leaf)
        if not torch.is_tensor(loss) or loss.numel() != 1:
            shape = tuple(loss.shape) if torch.is_tensor(loss) else type(loss).__name__
            raise ValueError(f"loss_fn must return a scalar tensor (one element), got {shape}; reduce it, e.g. with .mean()")
        loss = loss.reshape(())
        if graph:
            return loss, None
        (cot,) = torch.autograd.grad(loss, leaf, allow_unused=True)
        cot = torch.zeros_like(x0) if cot is None else cot
        _check_finite_seed(cot)
        return loss.detach(), cot

    return seed


def _check_finite_seed(cot: torch.Tensor) -> None:
    if not bool(torch.isfinite(cot).all()):
        raise FloatingPointError("dL/dx0 (the gradient of the loss at the generated sample) has NaN/Inf values")


def _setup(model, x_T, schedule, num_inference_steps, timesteps, timestep_spacing, conditioning,
           uncond_conditioning, guidance, prediction_type, order, mode, params=None) -> _Problem:
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    if not torch.is_tensor(x_T) or not x_T.is_floating_point() or x_T.ndim < 2:
        raise ValueError("x_T must be a floating-point tensor (B, ...) of initial noise")
    process, config = _as_process(schedule)
    if prediction_type is None:
        prediction_type = getattr(model, "config", {}).get("prediction_type") or (
            prediction_type_from_config(config) if config else ("flow_prediction" if process.kind == "flow" else "epsilon")
        )
    check_prediction_type(prediction_type)
    if timestep_spacing is None:
        timestep_spacing = config.get("timestep_spacing", "linspace")
    grid = _resolve_grid(process, num_inference_steps, timesteps, timestep_spacing, x_T.device)
    if mode == "adjoint" and grid.starts_at_pure_noise:
        raise ValueError(
            "mode='adjoint' integrates y = x / alpha, which is infinite at pure noise (alpha = 0, the grid's first "
            "point): start the grid below s = 1 (num_inference_steps gives t = T - 1 first) or use mode='checkpoint'"
        )
    if getattr(guidance, "stateful", False) and mode != "autograd":
        raise ValueError(
            f"{guidance!r} keeps state from one evaluation to the next, but mode={mode!r} evaluates the network again "
            "in the backward pass: use a stateless rule (e.g. APG with momentum=0) or mode='autograd'"
        )
    denoiser = denoiser_for(model, process, prediction_type, guidance, conditioning, uncond_conditioning)
    denoiser.reset(grid.timesteps, num_steps=grid.num_steps)
    return _Problem(denoiser, grid, resolve_params(model, params))


def _guidance(guidance_scale, guidance_rule):
    if guidance_rule is None:
        return guidance_scale
    if guidance_scale != 1.0:
        raise ValueError("give guidance_scale or guidance_rule, not both (the rule sets the guidance)")
    return guidance_rule


@torch.no_grad()
def sample(
    model: nn.Module,
    x_T: torch.Tensor,
    schedule: Any,
    *,
    num_inference_steps: int | None = None,
    timesteps: torch.Tensor | None = None,
    timestep_spacing: str | None = None,
    conditioning: torch.Tensor | None = None,
    uncond_conditioning: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
    guidance_rule=None,
    order: int = 2,
    prediction_type: str | None = None,
) -> torch.Tensor:
    """x_0 from x_T with exactly the forward pass of :func:`sample_with_grad` (same arguments), without gradients."""
    problem = _setup(model, x_T, schedule, num_inference_steps, timesteps, timestep_spacing, conditioning,
                     uncond_conditioning, _guidance(guidance_scale, guidance_rule), prediction_type, order, "autograd")
    return problem.forward(x_T, order)


def sample_with_grad(
    model: nn.Module,
    x_T: torch.Tensor,
    schedule: Any,
    *,
    num_inference_steps: int | None = None,
    timesteps: torch.Tensor | None = None,
    timestep_spacing: str | None = None,
    conditioning: torch.Tensor | None = None,
    uncond_conditioning: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
    guidance_rule=None,
    loss_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    grad_x0: torch.Tensor | None = None,
    params: None | str | Sequence[str] | Mapping[str, torch.Tensor] = None,
    mode: str = "adjoint",
    order: int = 2,
    prediction_type: str | None = None,
) -> AdjointResult:
    """Generate x_0 from x_T with a deterministic sampler and return the gradients of L(x_0).

    Args:
        model: a class-conditional ``UNet2DModel``, a ``UNet2DConditionModel``, a ``GaussianMixtureDenoiser`` or
            an unconditional diffusers-style model (see :mod:`steerdiff.pipelines.conditioning`).
        x_T: the initial noise (B, C, H, W); its dtype and device are the sampler's.
        schedule: a noise process (:class:`~steerdiff.core.NoiseSchedule`, :class:`~steerdiff.core.FlowMatchSchedule`),
            a diffusers scheduler or its config (VP or flow matching: the flow ODE is integrated in the same
            (alpha, sigma) form; mode="adjoint" needs a grid that starts below s = 1, and its dL/dx_T there is
            divided by alpha_0 = 1 - s_0, which amplifies the error of its last step: on the digits flow model at 50
            steps the direction is right (cosine 0.994) but the size is not (docs/benchmarks/flow.md); use
            mode="checkpoint" for gradients with respect to x_T on flow models).
        num_inference_steps: N; the grid is ``with_final(spaced_timesteps(T, N, timestep_spacing))``, ending at
            the clean end, with the scheduler config's ``timestep_spacing`` unless given ("linspace" for a
            NoiseSchedule).  Or give ``timesteps`` (a decreasing grid of N + 1 timesteps, fractional allowed).
        conditioning: class labels (B,) long, class embeddings (B, E) / (1, E), or encoder_hidden_states
            (B, L, D) / (1, L, D).  A float tensor gets a gradient.
        uncond_conditioning: the unconditional branch's conditioning for CFG (default: the null class).
        guidance_scale: w of g = u + w (c - u); 1 = no guidance.
        guidance_rule: any :mod:`steerdiff.guidance` rule instead of ``guidance_scale`` (APG, schedules, interval,
            ...); the rule sees evaluation index i at grid point i, in the backward pass too, so rules that keep
            state between evaluations (APG with momentum, AdaptiveGuidance, LinearAG) need ``mode="autograd"``.
        loss_fn: x_0 -> scalar loss; or give ``grad_x0`` = dL/dx_0 directly.
        params: parameters to differentiate: None, ``"all"`` (those requiring grad), names, or a name -> tensor
            mapping (e.g. LoRA adapters).  Each must require grad.
        mode: ``"adjoint"``, ``"checkpoint"`` or ``"autograd"`` (see the module docstring).
        order: 1 (DDIM / DPM-Solver-1) or 2 (DPM-Solver-2M on eps, the default) for the forward and the adjoint
            solve.  AdjointDPM solves both with DPM-Solver; at 50 steps on the digits model order 2's adjoint
            gradient has cosine 0.9998 to the exact one, order 1's 0.987 (docs/benchmarks/adjoint.md).
        prediction_type: of the model's output; default: the model's or scheduler's config, else "epsilon".
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    problem = _setup(model, x_T, schedule, num_inference_steps, timesteps, timestep_spacing, conditioning,
                     uncond_conditioning, _guidance(guidance_scale, guidance_rule), prediction_type, order, mode, params)
    seed = _seed_grad(loss_fn, grad_x0)
    x0, loss, grads, state_bytes = _MODE_FNS[mode](problem, x_T, order, seed)
    grad_x_T, grad_cond, grad_params = problem.split([t.detach() for t in grads])
    return AdjointResult(
        x0=x0.detach(),
        grad_x_T=grad_x_T,
        grad_conditioning=grad_cond,
        grad_params=dict(zip(problem.param_names, grad_params)),
        loss=None if loss is None else loss.detach(),
        nfe=problem.nfe,
        state_bytes=int(state_bytes),
        timesteps=problem.grid.t,
    )


__all__ = ["MODES", "ORDERS", "AdjointResult", "resolve_params", "sample", "sample_with_grad"]
