"""Measured orders of the Adams-Bashforth momentum samplers with fixed and with variable-step weights, and with
their start, against the closed-form probability-flow ODE of a Gaussian (exact model, float64).

For data N(mu, s0^2 I) the marginal at a noise level is N(alpha mu, (alpha^2 s0^2 + sigma^2) I) and the ODE maps
x_T to x = alpha mu + sqrt(alpha^2 s0^2 + sigma^2) z with z = (x_T - alpha_T mu) / sqrt(alpha_T^2 s0^2 + sigma_T^2),
so the sample at sigma = 0 is mu + s0 z exactly.  The network is the exact eps (VP, diffusers' DDPM linear betas) or
velocity (flow, FlowMatchEuler shift 1 / 3) of that Gaussian (:class:`~steerdiff.testbeds.mixture.GaussianMixtureDenoiser`
with one component).  Grids: VP ``trailing`` and ``linspace`` (integer timesteps from t = 999) and flow sigmas from
s = 1 as the Flux and SD3 pipelines pass them (``sigmas = linspace(1, 1 / N, N)``, shifted by the scheduler), all
ending at sigma = 0.  (``set_timesteps(N)`` alone on a flow scheduler ends with a jump from a fixed sigma_min,
0.0089 at shift 3, to 0 whatever N is: one step that does not shrink, which puts a floor under every solver's error.)  The error is the largest per-sample L2 error at the end; the order is the
least-squares slope of log error against log N over N = 40..320, printed with the local order between the last two
(log2 of the error ratio from N = 160 to 320): "LSQ / local".

``--start exact`` replaces the first r - 1 steps by the exact flow (the history then holds exact eps at the true
states), separating the error of the start from that of the weights; ``euler`` is the samplers' own start
(lower-order Adams-Bashforth steps while the history fills); ``rk4`` the schedulers' ``warmup="rk4"``
(N steps then cost N + 3 (r - 1) network calls; the error is still reported against N).

    python -m benchmarks.multistep_order                     # the table in docs/samplers.md (about a minute on one core)
    python -m benchmarks.multistep_order --sd-start          # PLMS-4's start on SD's scaled-linear betas

``--sd-start``: PLMS-4 (variable weights) with the Euler start and with ``warmup="rk4"`` on Stable Diffusion's
scaled-linear betas (0.00085 .. 0.012), N equal steps from t = 999 to t = 199, stopped there (the error of the
integration itself, without the last steps to sigma = 0), local orders log2(e_N / e_2N) for N = 40 .. 800.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

from steerdiff.samplers import GHVBScheduler, HeavyBallPLMSScheduler
from steerdiff.testbeds.mixture import GaussianMixtureDenoiser

F64 = torch.float64
GRIDS = {
    "VP trailing": ("vp", dict(timestep_spacing="trailing")),
    "VP linspace": ("vp", dict(timestep_spacing="linspace")),
    "flow shift 1": ("flow", dict(shift=1.0)),
    "flow shift 3": ("flow", dict(shift=3.0)),
}
METHODS = {
    "PLMS-2": lambda w: dict(cls=GHVBScheduler, order=2, beta=1.0, adams_weights=w),
    "PLMS-3": lambda w: dict(cls=GHVBScheduler, order=3, beta=1.0, adams_weights=w),
    "PLMS-4": lambda w: dict(cls=GHVBScheduler, order=4, beta=1.0, adams_weights=w),
    "GHVB 2.5": lambda w: dict(cls=GHVBScheduler, momentum_number=2.5, adams_weights=w),
    "GHVB 3.8": lambda w: dict(cls=GHVBScheduler, momentum_number=3.8, adams_weights=w),
    "PLMS-4 + HB 0.8": lambda w: dict(cls=HeavyBallPLMSScheduler, order=4, beta=0.8, adams_weights=w),
}
STEPS = (40, 80, 160, 320)


def gaussian(kind: str, s0: float = 0.5, dim: int = 16):
    config = (FlowMatchEulerDiscreteScheduler() if kind == "flow" else DDPMScheduler(clip_sample=False)).config
    mu = torch.linspace(-0.8, 0.8, dim, dtype=F64).reshape(1, 1, 4, 4)
    model = GaussianMixtureDenoiser.from_components(mu, torch.full((1, 1, 4, 4), s0**2, dtype=F64), scheduler_config=config)
    return config, model, mu, s0


def exact_state(sched, i: int, x_t: torch.Tensor, mu, s0) -> torch.Tensor:
    """The exact ODE state at grid point i from x_T at point 0."""
    g = sched.grid
    a0, s_0 = float(g.alpha[0]), float(g.sigma[0])
    z = (x_t - a0 * mu) / np.sqrt(a0**2 * s0**2 + s_0**2)
    a, s = float(g.alpha[i]), float(g.sigma[i])
    return a * mu + np.sqrt(a**2 * s0**2 + s**2) * z


def exact_timestep(sched, i: int, t: torch.Tensor) -> torch.Tensor:
    """T s at call i, from the scheduler's float64 noise level: flow timesteps are float32 (as diffusers'), and a
    network that reads s = t / T from them sees s rounded to float32, an error floor near 1e-6 that is not the
    solver's."""
    stages = getattr(sched, "_stages", None)
    n, stage = (i, 0) if stages is None else stages[i]
    n, stage = (n, 0) if stage is None else (n, stage)
    s = sched.grid.sigma[n] if stage == 0 else sched.grid.sigma[n + 1] if stage == 3 else sched._mids[n][1]
    return (s * sched.config.num_train_timesteps).to(F64)


def final_error(spec: dict, kind: str, grid_kwargs: dict, steps: int, start: str = "euler", batch: int = 4) -> float:
    config, model, mu, s0 = gaussian(kind)
    spec = dict(spec)
    cls = spec.pop("cls")
    if start == "rk4":
        spec["warmup"] = "rk4"
    sched = cls.from_config(config, **grid_kwargs, **spec)
    if kind == "flow":  # the sigmas Flux / SD3-style pipelines pass (shifted by the scheduler), ending at s = 0
        sched.set_timesteps(sigmas=np.linspace(1.0, 1.0 / steps, steps))
    else:
        sched.set_timesteps(steps)
    x_t = torch.randn(batch, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=F64)
    x = x_t.clone()
    exact_until = (sched.config.order - 1) if start == "exact" else 0
    for i, t in enumerate(sched.timesteps):
        out = model(x, exact_timestep(sched, i, t) if kind == "flow" else t.to(F64)).sample
        x = sched.step(out, t, x).prev_sample
        if i < exact_until:
            x = exact_state(sched, i + 1, x_t, mu, s0)  # the history keeps eps at exact states
    return float((x - (mu + s0 * (x_t - float(sched.grid.alpha[0]) * mu) /
                       np.sqrt(float(sched.grid.alpha[0]) ** 2 * s0**2 + float(sched.grid.sigma[0]) ** 2))).flatten(1).norm(dim=1).max())


SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
SD_START_STEPS = (40, 80, 160, 320, 640, 800)


def sd_start_error(start: str, steps: int, stop: int = 199, batch: int = 4) -> float:
    """PLMS-4's error at t = ``stop`` after ``steps`` equal steps from t = 999 on SD's betas, from the exact state."""
    config = DDPMScheduler(clip_sample=False, **SD_BETAS).config
    mu = torch.linspace(-0.8, 0.8, 16, dtype=F64).reshape(1, 1, 4, 4)
    s0 = 0.5
    model = GaussianMixtureDenoiser.from_components(mu, torch.full((1, 1, 4, 4), s0**2, dtype=F64), scheduler_config=config)
    sched = GHVBScheduler.from_config(config, order=4, beta=1.0, adams_weights="variable",
                                      **({"warmup": "rk4"} if start == "rk4" else {}))
    sched.set_timesteps(timesteps=np.linspace(999.0, stop, steps + 1))  # the run stops at point N (t = stop)
    x_t = torch.randn(batch, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=F64)
    x = x_t.clone()
    calls = len(sched.timesteps) - 1  # every call but the step from t = stop on
    for i, t in enumerate(sched.timesteps[:calls]):
        x = sched.step(model(x, t.to(F64)).sample, t, x).prev_sample
    return float((x - exact_state(sched, steps, x_t, mu, s0)).flatten(1).norm(dim=1).max())


def sd_start_table() -> None:
    print("| start | " + " | ".join(f"N = {n}" for n in SD_START_STEPS) + " | local orders |")
    print("|---|" + "---|" * (len(SD_START_STEPS) + 1))
    for start in ("euler", "rk4"):
        errors = [sd_start_error(start, n) for n in SD_START_STEPS]
        local = [float(np.log2(a / b) / np.log2(m / n)) for (a, n), (b, m) in
                 zip(zip(errors, SD_START_STEPS), zip(errors[1:], SD_START_STEPS[1:]))]
        print(f"| {start} | " + " | ".join(f"{e:.2e}" for e in errors) + " | " + " -> ".join(f"{o:.2f}" for o in local) + " |")


def order(errors, steps=STEPS) -> float:
    return -float(np.polyfit(np.log(steps), np.log(errors), 1)[0])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--start", choices=("euler", "exact", "rk4"), nargs="+", default=["euler", "exact", "rk4"])
    p.add_argument("--methods", nargs="+", default=list(METHODS))
    p.add_argument("--sd-start", action="store_true", help="PLMS-4's start on SD's betas (see the module docstring)")
    args = p.parse_args(argv)
    if args.sd_start:
        sd_start_table()
        return
    print("| method | weights | start | " + " | ".join(GRIDS) + f" | error N = {STEPS[-1]} ({list(GRIDS)[0]}) |")
    print("|---|---|---|" + "---|" * (len(GRIDS) + 1))
    for name in args.methods:
        for weights in ("fixed", "variable"):
            for start in args.start:
                cells, last = [], None
                for grid, (kind, kw) in GRIDS.items():
                    try:
                        errors = [final_error(METHODS[name](weights), kind, kw, n, start) for n in STEPS]
                    except ValueError:  # warmup="rk4" on flow grids integrates in s: variable weights only
                        cells.append("-")
                        continue
                    local = float(np.log2(errors[-2] / errors[-1]))
                    cells.append(f"{order(errors):.2f} / {local:.2f}")
                    last = errors[-1] if last is None else last
                print(f"| {name} | {weights} | {start} | " + " | ".join(cells) + f" | {last:.2e} |", flush=True)


if __name__ == "__main__":
    main()
