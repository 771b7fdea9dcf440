"""Cost of one ``step()`` of the momentum schedulers relative to diffusers' DPMSolverMultistepScheduler.

Same tensors for every scheduler: a batch of 8 latents of 4x64x64 (Stable Diffusion at 512 px), fixed random
model outputs, a 20-step run (so the multistep histories are full for most steps).  A "step time" is the time
of a whole run divided by its number of steps; runs of the schedulers are interleaved and repeated, and the
median is kept, so that load from other processes on a shared machine hits all of them alike.  Printed: the
median microseconds per step and the ratio to DPMSolverMultistepScheduler (dpmsolver++, midpoint, order 2).
Target: <= 1.0x.

``set_timesteps`` (issue 21): the median time of laying out a 20- and a 1000-step grid, with the variable-step
Adams-Bashforth weights of HB-PLMS and GHVB, against diffusers' DPMSolverMultistepScheduler.set_timesteps (target
<= 3x), both as a first call (the remembered weights cleared before each) and as a repeated call on the same grid
(what a pipeline does at every call after the first: the weights are remembered per grid).

    python -m benchmarks.step_overhead                      # CPU, float32 (from the repository root)
    python -m benchmarks.step_overhead --device cuda --dtype float16

On CUDA it also runs every momentum scheduler under ``torch.cuda.set_sync_debug_mode("error")``: with
``nonfinite_check="off"`` every step, with the default (deferred on CUDA) every step but the last one, whose
single read of the NaN/Inf flag is the documented synchronisation of a run.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from diffusers import DPMSolverMultistepScheduler, PNDMScheduler

from steerdiff.samplers import GHVBScheduler, HeavyBallDPMSolverScheduler, HeavyBallPLMSScheduler

SD_CONFIG = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)


def schedulers(nonfinite_check: str) -> dict[str, object]:
    options = dict(SD_CONFIG, nonfinite_check=nonfinite_check)
    return {
        f"HB PLMS4 beta 0.8 (check {nonfinite_check})": HeavyBallPLMSScheduler(order=4, beta=0.8, **options),
        f"HB DPM-Solver++ 2M beta 0.8 (check {nonfinite_check})": HeavyBallDPMSolverScheduler(beta=0.8, **options),
        f"GHVB 3.8 (check {nonfinite_check})": GHVBScheduler(momentum_number=3.8, **options),
    }


def time_run(scheduler, outputs, x, device) -> float:
    """Seconds per step of one full run over precomputed model outputs (set_timesteps not timed)."""
    scheduler.set_timesteps(len(outputs), device=device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for t, out in zip(scheduler.timesteps, outputs):
        x = scheduler.step(out, t, x).prev_sample
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / len(outputs)


def sync_free_check(outputs, x, device) -> None:
    for mode in ("off", "auto"):
        for name, sched in schedulers(mode).items():
            sched.set_timesteps(len(outputs), device=device)
            last = len(outputs) - 1 if mode == "auto" else len(outputs)
            y = x
            torch.cuda.set_sync_debug_mode("error")
            try:
                for t, out in zip(sched.timesteps[:last], outputs[:last]):
                    y = sched.step(out, t, y).prev_sample
            finally:
                torch.cuda.set_sync_debug_mode("default")
            print(f"  no synchronisation in {last} of {len(outputs)} steps: {name}")


def time_set_timesteps(scheduler, n: int, first_call: bool) -> float:
    from steerdiff.core.multistep import _remembered_grid

    if first_call:
        _remembered_grid.cache_clear()
    start = time.perf_counter()
    scheduler.set_timesteps(n)
    return time.perf_counter() - start


def set_timesteps_report(repeats: int) -> None:
    options = dict(SD_CONFIG, timestep_spacing="trailing")  # 1000 steps: every training timestep
    contenders = {
        "diffusers DPMSolverMultistepScheduler": DPMSolverMultistepScheduler(**options),
        "HB PLMS4 beta 0.8": HeavyBallPLMSScheduler(order=4, beta=0.8, **options),
        "GHVB 3.8": GHVBScheduler(momentum_number=3.8, **options),
        "HB DPM-Solver++ 2M beta 0.8": HeavyBallDPMSolverScheduler(beta=0.8, **options),
    }
    print(f"set_timesteps(), median of {repeats} interleaved calls, ratio to DPMSolverMultistepScheduler's")
    for n in (20, 1000):
        for first in (True, False):
            times: dict[str, list[float]] = {name: [] for name in contenders}
            for _ in range(repeats):
                for name, sched in contenders.items():
                    times[name].append(time_set_timesteps(sched, n, first))
            base = statistics.median(times["diffusers DPMSolverMultistepScheduler"])
            kind = "first call" if first else "repeated call"
            for name, ts in times.items():
                med = statistics.median(ts)
                print(f"  {n:4d} steps, {kind:<13s} {name:<40s} {med * 1e6:8.1f} us   {med / base:5.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 4, 64, 64, generator=gen).to(device, dtype)
    outputs = [torch.randn(8, 4, 64, 64, generator=gen).to(device, dtype) for _ in range(args.steps)]
    baseline = "diffusers DPMSolverMultistepScheduler (dpmsolver++ 2M)"
    contenders = {
        baseline: DPMSolverMultistepScheduler(**SD_CONFIG, algorithm_type="dpmsolver++", solver_order=2),
        "diffusers PNDMScheduler (PLMS)": PNDMScheduler(**SD_CONFIG, skip_prk_steps=True),
        **schedulers("auto"),
        **schedulers("off"),
    }
    for sched in contenders.values():  # warm-up
        time_run(sched, outputs, x, device)
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(args.repeats):
        for name, sched in contenders.items():
            times[name].append(time_run(sched, outputs, x, device))

    print(f"step() cost, batch 8 x 4x64x64 {args.dtype} on {device} ({platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads), {args.steps}-step runs, median of {args.repeats}")
    base = statistics.median(times[baseline])
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"  {name:<58s} {med * 1e6:9.1f} us/step   {med / base:5.2f}x")
    if device.type == "cuda":
        sync_free_check(outputs, x, device)
    set_timesteps_report(max(args.repeats, 50))


if __name__ == "__main__":
    main()
