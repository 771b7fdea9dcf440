"""steerdiff.k_diffusion's functions against k-diffusion's own samplers, on the exact digits mixture, equal NFE.

    pip download k-diffusion==0.1.1 --no-deps -d /tmp/kd && unzip -o -q /tmp/kd/k_diffusion-0.1.1-*.whl -d /tmp/kd
    pip install torchsde torchdiffeq        # what k_diffusion/sampling.py imports (not its package's other deps)
    python -m benchmarks.k_diffusion --k-diffusion /tmp/kd/k_diffusion/sampling.py [--samples 32]

The model is the class-conditional Gaussian mixture fitted to the digits (``fit_digits_mixture``, float64), whose
posterior mean is exact at every noise level, with classifier-free guidance D_w = D_u + w (D_c - D_u) on the data
prediction.  Two conventions, as ComfyUI passes them to the same functions:

- VE (SD-style models): x = x0 + sigma eps, sigmas from k-diffusion's ``get_sigmas_karras`` /
  ``get_sigmas_exponential`` between SD 1.5's sigma_min = 0.0292 and sigma_max = 14.6146, then 0;
- flow (CONST, SD3-style): x = (1 - s) x0 + s eps, the SD3 pipeline's sigmas (FlowMatchEulerDiscreteScheduler,
  shift 3, from s = 1), then 0; k-diffusion's samplers run on them as ComfyUI runs them (their VE formulas on s),
  steerdiff's with ``process="flow"``.

Error: mean over samples of the per-sample L2 distance to the exact ODE solution at sigma = 0, which is solved once
per (convention, w) in the flow variable s (both conventions share x_bar, so the end points agree) with scipy's
DOP853 at rtol 1e-10 down to s = 1e-8 (one Euler step to 0 from there).  Equal NFE: heun and dpm_2 take 2 calls per
step but 1 on the step to 0, so NFE n gets (n + 1) // 2 of their steps.  k-diffusion's ancestral and SDE samplers
are left out: their samples do not converge to the ODE solution.  dpmpp_3m is ``sample_dpmpp_3m_sde`` at eta = 0
(its ODE).  Also prints how far each steerdiff function at beta = 1 is from k-diffusion's own solver.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch
from scipy.integrate import solve_ivp

from steerdiff.core import FlowMatchSchedule
from steerdiff.k_diffusion import sample_dpmpp_2m_hb, sample_dpmpp_3m_hb, sample_ghvb, sample_plms_hb, sample_unipc_hb
from steerdiff.testbeds.mixture import fit_digits_mixture

F64 = torch.float64
NFES = (4, 6, 8, 10, 15, 20)
SCALES = (1.0, 5.0, 9.0)
SD_SIGMA_MIN, SD_SIGMA_MAX = 0.029167532920837402, 14.614641189575195  # SD 1.5's training sigma_bar range

OURS = {
    "plms4 + HB 0.8": lambda p: (lambda m, x, s: sample_plms_hb(m, x, s, order=4, beta=0.8, disable=True, process=p)),
    "GHVB 3.8": lambda p: (lambda m, x, s: sample_ghvb(m, x, s, momentum_number=3.8, disable=True, process=p)),
    "GHVB 2.8": lambda p: (lambda m, x, s: sample_ghvb(m, x, s, momentum_number=2.8, disable=True, process=p)),
    "dpm++ 2M + HB 0.8": lambda p: (lambda m, x, s: sample_dpmpp_2m_hb(m, x, s, beta=0.8, disable=True, process=p)),
    "dpm++ 3M + HB 0.8": lambda p: (lambda m, x, s: sample_dpmpp_3m_hb(m, x, s, beta=0.8, disable=True, process=p)),
    "UniPC + HB 0.8": lambda p: (lambda m, x, s: sample_unipc_hb(m, x, s, beta=0.8, disable=True, process=p)),
}
TWO_CALLS = ("heun", "dpm_2")


def load_k_diffusion_sampling(path: Path):
    """k-diffusion's sampling.py as a module, without its package __init__ (which imports torchvision, wandb, ...):
    its one package import, ``utils.append_dims``, is given by a small stand-in."""
    package = types.ModuleType("kd_only")
    package.__path__ = []
    utils = types.ModuleType("kd_only.utils")

    def append_dims(x, target_dims):
        return x[(...,) + (None,) * (target_dims - x.ndim)]

    utils.append_dims = append_dims
    package.utils = utils
    sys.modules.update({"kd_only": package, "kd_only.utils": utils})
    spec = importlib.util.spec_from_file_location("kd_only.sampling", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["kd_only.sampling"] = module
    spec.loader.exec_module(module)
    return module


def theirs(kd):
    return {
        "euler": kd.sample_euler, "heun": kd.sample_heun, "lms": kd.sample_lms, "dpm_2": kd.sample_dpm_2,
        "dpmpp_2m": kd.sample_dpmpp_2m,
        "dpmpp_3m": lambda m, x, s, disable=True: kd.sample_dpmpp_3m_sde(m, x, s, disable=disable, eta=0.0),
    }


class Problem:
    """The guided mixture denoiser in one convention, its start and its exact end point."""

    def __init__(self, model, labels, w: float, flow: bool):
        self.model, self.labels, self.w, self.flow = model, labels, w, flow
        self.null = torch.full_like(labels, model.null_class)
        self.T = model.config.num_train_timesteps

    def flow_denoiser(self, x, s):
        s = torch.as_tensor(s, dtype=F64).reshape(-1)
        s = s.expand(x.shape[0]) if s.numel() == 1 else s
        d_c = self.model.posterior_mean(x, s * self.T, self.labels)
        if self.w == 1.0:
            return d_c
        d_u = self.model.posterior_mean(x, s * self.T, self.null)
        return d_u + self.w * (d_c - d_u)

    def __call__(self, x, sigma, **_):
        """k-diffusion's denoiser: sigma = s on flow, else x_flow = x / (1 + sigma) at s = sigma / (1 + sigma)."""
        if self.flow:
            return self.flow_denoiser(x, sigma)
        sigma = sigma.to(F64)
        s = sigma / (1 + sigma)
        return self.flow_denoiser(x / (1 + sigma).reshape(-1, 1, 1, 1), s)

    def exact(self, x_start, sigma_start: float, s_end: float = 1e-8) -> torch.Tensor:
        s0 = sigma_start if self.flow else sigma_start / (1 + sigma_start)
        x0 = x_start if self.flow else x_start / (1 + sigma_start)
        shape = x0.shape

        def velocity(s, y):
            x = torch.from_numpy(y).reshape(shape)
            return ((x - self.flow_denoiser(x, s)) / s).reshape(-1).numpy()

        sol = solve_ivp(velocity, (s0, s_end), x0.reshape(-1).numpy(), method="DOP853", rtol=1e-10, atol=1e-12)
        y = sol.y[:, -1]
        y = y - s_end * velocity(s_end, y)  # the last 1e-8 in s
        return torch.from_numpy(y).reshape(shape)


def l2(a, b) -> float:
    return float((a - b).flatten(1).norm(dim=1).mean())


def schedules(flow: bool, nfe: int, kd) -> dict[str, torch.Tensor]:
    if flow:
        return {"SD3 shift 3": FlowMatchSchedule(shift=3.0).inference_sigmas(nfe)[1].to(F64)}
    return {
        "Karras": kd.get_sigmas_karras(nfe, SD_SIGMA_MIN, SD_SIGMA_MAX).to(F64),
        "exponential": kd.get_sigmas_exponential(nfe, SD_SIGMA_MIN, SD_SIGMA_MAX).to(F64),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--k-diffusion", required=True, type=Path, help="k-diffusion 0.1.1's k_diffusion/sampling.py")
    p.add_argument("--samples", type=int, default=32)
    args = p.parse_args(argv)
    if not args.k_diffusion.is_file():
        p.error(f"--k-diffusion: {args.k_diffusion} is not a file")
    torch.set_num_threads(2)
    kd = load_k_diffusion_sampling(args.k_diffusion)
    model = fit_digits_mixture(dtype=F64, scheduler_config={"_class_name": "FlowMatchEulerDiscreteScheduler"})
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 10, (args.samples,), generator=gen)
    noise = torch.randn(args.samples, *model.sample_shape, generator=gen, dtype=F64)
    started = time.perf_counter()

    # beta = 1 against k-diffusion's own solvers
    problem = Problem(model, labels, 5.0, flow=False)
    sig = kd.get_sigmas_karras(10, SD_SIGMA_MIN, SD_SIGMA_MAX).to(F64)
    x = noise * sig[0]
    print("beta = 1 against k-diffusion 0.1.1 (VE, Karras, 10 steps, w = 5, float64): max |difference|")
    for name, ours_fn, ref in [
        ("GHVB 1 vs sample_euler", lambda: sample_ghvb(problem, x, sig, momentum_number=1, disable=True), lambda: kd.sample_euler(problem, x, sig, disable=True)),
        ("dpm++ 2M + HB 1 vs sample_dpmpp_2m", lambda: sample_dpmpp_2m_hb(problem, x, sig, beta=1, disable=True), lambda: kd.sample_dpmpp_2m(problem, x, sig, disable=True)),
        ("plms4 + HB 1 vs sample_lms (order 4)", lambda: sample_plms_hb(problem, x, sig, order=4, beta=1, disable=True), lambda: kd.sample_lms(problem, x, sig, disable=True)),
    ]:
        print(f"- {name}: {float((ours_fn() - ref()).abs().max()):.1e}")
    print()

    kd_samplers = theirs(kd)
    counts = {}
    for flow in (False, True):
        convention = "flow (CONST)" if flow else "VE"
        rows = []
        for w in SCALES:
            problem = Problem(model, labels, w, flow)
            sigma_max = 1.0 if flow else SD_SIGMA_MAX
            x_start = noise * (1.0 if flow else sigma_max)
            exact = problem.exact(x_start, sigma_max)
            for nfe in NFES:
                for sched, sigmas in schedules(flow, nfe, kd).items():
                    errors = {}
                    for name, make in OURS.items():
                        errors[name] = l2(make("flow" if flow else "ve")(problem, x_start, sigmas), exact)
                    for name, fn in kd_samplers.items():
                        s = sigmas
                        if name in TWO_CALLS:
                            s = schedules(flow, (nfe + 1) // 2, kd)[sched]
                        with torch.no_grad():
                            out = fn(problem, x_start, s, disable=True)
                        errors[name] = l2(out, exact) if torch.isfinite(out).all() else float("inf")
                    best_ours = min(OURS, key=errors.get)
                    best_theirs = min(kd_samplers, key=errors.get)
                    win = errors[best_ours] < errors[best_theirs]
                    key = (convention, nfe <= 10)
                    won, total = counts.get(key, (0, 0))
                    counts[key] = (won + win, total + 1)
                    rows.append((sched, w, nfe, errors, best_ours, best_theirs, win))
        names = list(OURS) + list(kd_samplers)
        print(f"### {convention}\n")
        print("| sigmas | w | NFE | " + " | ".join(names) + " | best steerdiff / best k-diffusion |")
        print("|---|---|---|" + "---|" * len(names) + "---|")
        for sched, w, nfe, errors, bo, bt, win in rows:
            cells = [f"**{errors[n]:.2e}**" if n in (bo, bt) else f"{errors[n]:.2e}" for n in names]
            ratio = errors[bo] / errors[bt] if errors[bt] > 0 else float("nan")
            print(f"| {sched} | {w:g} | {nfe} | " + " | ".join(cells) + f" | {ratio:.2f} {'(ours)' if win else '(k-diffusion)'} |")
        print()
    print("Cells where the best steerdiff function has the lowest error:")
    for (convention, low), (won, total) in sorted(counts.items()):
        print(f"- {convention}, NFE {'<= 10' if low else '> 10'}: {won} of {total}")
    print(f"\n{time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
