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

    On a flow-matching process these variables are singular at s = 1: a_y = (1 - s) a_x vanishes there, and
    dL/dx_T = a_y / alpha_0 amplifies the last backward step's error by 1 / (1 - s_0) (1000 on a grid from
    t = 999).  The flow ODE dx/ds = v(x, s) is regular on all of [0, 1], so on flow models the adjoint is solved
    in x and s with the velocity's Jacobians (:class:`_VelocityForm`): d a_x/ds = -(dv/dx)^T a_x and
    d a_c/ds, d a_theta/ds = -(dv/dc)^T a_x, -(dv/dtheta)^T a_x, all stepped in s (two-step Adams-Bashforth at
    order 2); at order 1, whose forward pass is Euler in s, each backward step is the transpose of the forward one
    (the VJP taken at the step's far end, where the forward step took its velocity, at the reconstructed state:
    :func:`_transposed_euler`).  dL/dx_T is then the state itself, and the grid may start at s = 1.

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
from ..core.nonfinite import NonFiniteWatch
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
    accumulators every mode returns: the stored x_i (and eps_i at order 2) of ``checkpoint``; x, a_y (a_x on flow
    models) and, at order 2, the previous augmented derivative of ``adjoint`` (on flow models at order 1, the last two
    velocities instead); 0 for ``autograd`` (all of it is in the graph)."""
    timesteps: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    """The grid that was integrated (N + 1 entries)."""


# -- the grid and one step -------------------------------------------------------------------------------
class _ExponentialForm:
    """The adjoint in AdjointDPM's variables (VP): y = x / alpha in rho = sigma / alpha, a_y = alpha a_x, network
    term eps; each adjoint component steps in its own clock (module docstring), x backwards by DDIM on eps."""

    network_space = "epsilon"
    state_name = "a_y"

    def __init__(self, process: NoiseProcess, grid: Grid):
        self.grid = grid
        # int alpha^2 d rho for a_y, int alpha d rho for a_c and a_theta (VP: atan(rho), asinh(rho))
        self.clock_y, self.clock_c = process.alpha_integrals(grid.sigma_bar)

    def state(self, dx: torch.Tensor, i: int) -> torch.Tensor:
        """The carried adjoint a_y at grid point i from dL/dx_i."""
        return self.grid.alpha[i].to(dx.dtype) * dx

    def grad_x(self, a: torch.Tensor, i: int) -> torch.Tensor:
        """dL/dx_i from the carried state."""
        return a / self.grid.alpha[i].to(a.dtype)

    def ratio(self, k: int):
        """r0 of the two-step combination at backward point k (the backward grid's own step ratio, in lambda)."""
        g = self.grid
        return step_ratio(g.lam[k + 1], g.lam[k], g.lam[k - 1])

    def step_x(self, x: torch.Tensor, direction: torch.Tensor, k: int) -> torch.Tensor:
        g = self.grid
        return euler_step(x, direction, g.alpha[k], g.sigma[k], g.alpha[k - 1], g.sigma[k - 1])


class _VelocityForm:
    """The adjoint of a flow model's ODE dx/ds = v(x, s) in its own variables, regular at both ends of [0, 1]:

        dx/ds = v,   d a_x/ds = -(dv/dx)^T a_x,   d a_c/ds = -(dv/dc)^T a_x,   d a_theta/ds = -(dv/dtheta)^T a_x,

    every component an Euler step in s (two-step Adams-Bashforth at order 2) with the network terms held constant.
    In y = x / alpha the state a_y = (1 - s) a_x vanishes at s = 1 and dL/dx_T = a_y / alpha_0 amplifies the error
    of the last backward step by 1 / (1 - s_0); here dL/dx_T is the state itself, and a grid may start at s = 1."""

    network_space = "flow_prediction"
    state_name = "a_x"

    def __init__(self, process: NoiseProcess, grid: Grid):
        self.grid = grid
        self.clock_y = self.clock_c = grid.sigma

    def state(self, dx: torch.Tensor, i: int) -> torch.Tensor:
        return dx

    def grad_x(self, a: torch.Tensor, i: int) -> torch.Tensor:
        return a

    def ratio(self, k: int):
        s = self.grid.sigma
        return step_ratio(s[k + 1], s[k], s[k - 1])

    def step_x(self, x: torch.Tensor, direction: torch.Tensor, k: int) -> torch.Tensor:
        return _clock_step(x, direction, self.clock_y[k], self.clock_y[k - 1])


def _adjoint_form(process: NoiseProcess, grid: Grid):
    return _VelocityForm(process, grid) if process.kind == "flow" else _ExponentialForm(process, grid)


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
        self.form = _adjoint_form(denoiser.process, grid)
        self.param_names = list(params)
        self.params = list(params.values())
        self.nfe = 0

    def predict(self, x: torch.Tensor, i: int) -> Prediction:
        """The guided prediction at grid point i (the rule sees evaluation index i, also in the backward pass)."""
        g = self.grid
        self.nfe += 1
        return self.denoiser.predict(x, g.t[i], *g.point(i), step=i)

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
        watch = NonFiniteWatch("deferred")
        eps_prev = None
        for i in range(n):
            pred = self.predict(x, i)
            eps = pred.eps
            watch.update(i, [eps])
            if keep is not None:
                keep(i, x, eps)
            x = g.euler(i, x, _direction(g, order, i, eps, eps_prev), pred)
            eps_prev = eps
        watch.finish(lambda i: f"the model output (guided eps) has NaN/Inf at step {i} (timestep {float(g.t[i]):g})")
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
    watch = NonFiniteWatch("deferred")
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
    watch.finish(lambda i: f"the gradient dL/dx is NaN/Inf at step {i} (timestep {float(g.t[i]):g}) of the backward pass")
    return x0, loss, [cot_x] + ([acc_cond] if acc_cond is not None else []) + acc_params, state_bytes


def _adjoint(problem: _Problem, x_T: torch.Tensor, order: int, seed_grad):
    g, n, form = problem.grid, problem.grid.num_steps, problem.form
    kept: dict[int, torch.Tensor] = {}

    def keep(i, x, eps):
        if i == n - 1:
            kept[i] = x

    with torch.no_grad():
        x0 = problem.forward(x_T.detach(), order, keep)
    loss, cot_x = seed_grad(x0, graph=False)

    # the final step, exactly: one VJP at x_{N-1}; its graph also gives the adjoint's first derivative
    transposed = order == 1 and isinstance(form, _VelocityForm)
    with torch.enable_grad():
        x = kept.pop(n - 1).detach().requires_grad_(True)
        pred = problem.predict(x, n - 1)
        final = problem.vjp([g.euler(n - 1, x, pred.eps, pred)], problem.inputs(x), [cot_x],
                            retain_graph=n > 1 and not transposed)
        dx, a_cond, a_params = problem.split(final)
        a = form.state(dx, n - 1)
        if n > 1:
            # the transposed Euler steps need only the velocity here; the continuous adjoint its whole derivative
            deriv = [pred.as_(form.network_space).detach()] if transposed else _adjoint_derivative(problem, x, pred, a, n - 1)
    state_bytes = 0
    watch = NonFiniteWatch("deferred")
    watch.update(n - 1, [a, *([a_cond] if a_cond is not None else []), *a_params])
    x = x.detach()
    prev = None  # the augmented derivative at the previous (higher-lambda) backward point
    if transposed:
        a, a_cond, a_params, state_bytes = _transposed_euler(problem, x, deriv[0] if n > 1 else None, a, a_cond, a_params, watch)
        watch.finish(lambda k: _adjoint_nonfinite(problem, k))
        return x0, loss, [a] + ([a_cond] if a_cond is not None else []) + a_params, state_bytes
    for k in range(n - 1, 0, -1):  # from grid point k to k - 1
        direction = deriv
        if order == 2 and prev is not None:
            r = form.ratio(k)
            direction = [None if d is None else dpm_solver_2m_eps(d, p, r) for d, p in zip(deriv, prev)]
        d_x, d_a, d_cond, d_params = direction[0], direction[1], direction[2], direction[3:]
        x = form.step_x(x, d_x, k)
        a, a_cond, a_params = _step_states(form, k, a, a_cond, a_params, d_a, d_cond, d_params)
        watch.update(k, [a, *([a_cond] if a_cond is not None else []), *a_params])
        state_bytes = max(state_bytes, _nbytes([x, a, *(prev or [])]))
        if k > 1:
            prev = deriv if order == 2 else None
            del direction, d_x, d_a, d_cond, d_params, deriv  # at order 1 nothing outlives the step
            with torch.enable_grad():
                xk = x.requires_grad_(True)
                deriv = _adjoint_derivative(problem, xk, problem.predict(xk, k - 1), a, k - 1)
            x = x.detach()
    watch.finish(lambda k: _adjoint_nonfinite(problem, k))
    return x0, loss, [form.grad_x(a, 0)] + ([a_cond] if a_cond is not None else []) + a_params, state_bytes


def _adjoint_nonfinite(problem: _Problem, k: int) -> str:
    g = problem.grid
    return (
        f"the adjoint state ({problem.form.state_name}, a_c or a_theta) became NaN/Inf in the backward step from "
        f"timestep {float(g.t[k]):g} (grid point {k} of {g.num_steps})"
    )


def _step_states(form, k: int, a, a_cond, a_params, d_a, d_cond, d_params):
    """Each adjoint state's Euler step from grid point k to k - 1 in its clock (a in ``clock_y``, a_c and a_theta
    in ``clock_c``), with the given derivatives."""
    cy, cc = form.clock_y, form.clock_c
    a = _clock_step(a, d_a, cy[k], cy[k - 1])
    if a_cond is not None:
        a_cond = _clock_step(a_cond, d_cond, cc[k], cc[k - 1])
    return a, a_cond, [_clock_step(p, d, cc[k], cc[k - 1]) for p, d in zip(a_params, d_params)]


def _transposed_euler(problem: _Problem, x: torch.Tensor, v: torch.Tensor | None, a, a_cond, a_params, watch):
    """Order 1 on a flow model: the transpose of each forward Euler step x_k = x_{k-1} + (s_k - s_{k-1}) v(x_{k-1}),

        a_{k-1} = a_k + (s_k - s_{k-1}) (dv/dx)^T a_k,   a_c, a_theta likewise with dv/dc, dv/dtheta,

    the network terms taken at x_{k-1}, where the forward step took them (the continuous adjoint's Euler step takes
    them at x_k: on digits-flow that is several times less accurate at 20-50 steps, docs/benchmarks/flow.md).
    x_{k-1} is reconstructed as x_k - (s_k - s_{k-1}) v~ with v~ the velocity extrapolated linearly in s from
    x_{k+1} and x_k to x_{k-1} (the velocity at x_k alone at the first backward step): the states of the Euler
    trajectory to O(h^3) per step, so the result is the discrete sampler's gradient up to that reconstruction.
    One network call and one VJP per step, at grid points N - 2, ..., 0."""
    n, s = problem.grid.num_steps, problem.form.clock_y  # the velocity form's clock: s itself
    v_next = None  # the velocity at the previous (lower-s) backward point
    state_bytes = 0
    for k in range(n - 1, 0, -1):  # from grid point k to k - 1
        direction = v if v_next is None else v + (v - v_next) * ((s[k - 1] - s[k]) / (s[k] - s[k + 1]))
        x = _clock_step(x, direction, s[k], s[k - 1])
        v_next = v
        del direction
        with torch.enable_grad():
            xk = x.requires_grad_(True)
            v, d_a, d_cond, *d_params = _adjoint_derivative(problem, xk, problem.predict(xk, k - 1), a, k - 1)
        x = x.detach()
        a, a_cond, a_params = _step_states(problem.form, k, a, a_cond, a_params, d_a, d_cond, d_params)
        watch.update(k, [a, *([a_cond] if a_cond is not None else []), *a_params])
        state_bytes = max(state_bytes, _nbytes([x, a, v, v_next]))
    return a, a_cond, a_params, state_bytes


def _adjoint_derivative(problem: _Problem, x: torch.Tensor, pred: Prediction, a: torch.Tensor, i: int) -> list:
    """The network terms of the augmented derivative at grid point i (detached), with f the adjoint form's network
    output (eps on VP, the velocity v on flow models) and a_x = dL/dx_i:
    [f, -(df/dx)^T a_x, -(df/dc)^T a_x (or None), -(df/dtheta)^T a_x ...]."""
    f = pred.as_(problem.form.network_space)
    dx, d_cond, d_params = problem.split(problem.vjp([f], problem.inputs(x), [problem.form.grad_x(a, i)]))
    return [f.detach(), -dx, None if d_cond is None else -d_cond, *[-d for d in d_params]]


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
            prediction_type_from_config(config) if config else None
        )
        if prediction_type is None:  # a NoiseProcess says nothing of what the network predicts: never guessed
            raise ValueError(
                "prediction_type: the model's config does not say what it predicts and schedule is a NoiseProcess "
                "without a scheduler config; pass prediction_type (epsilon, v_prediction, sample or flow_prediction) "
                "or the model's scheduler / its config as schedule"
            )
    check_prediction_type(prediction_type)
    if timestep_spacing is None:
        timestep_spacing = config.get("timestep_spacing", "linspace")
    grid = _resolve_grid(process, num_inference_steps, timesteps, timestep_spacing, x_T.device)
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
            a diffusers scheduler or its config (VP or flow matching: the forward pass integrates the flow ODE in
            the same (alpha, sigma) form; mode="adjoint" solves a flow model's adjoint in x and s, regular at both
            ends, so its grid may start at s = 1; module docstring).
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
