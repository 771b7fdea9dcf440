"""Wall time of a pipeline call under ``guide(pipe, CFG(w))`` against the pipeline's own CFG, and of PAG under
``guide(pipe, PAG(w, s))`` against diffusers' own ``StableDiffusionPAGPipeline`` built from the same components.

Targets: ratio <= 1.03 for CFG; for PAG, a step under guide() costs no more than the PAG pipeline's own step.  The pipelines are tiny random ones of the test suite (tests/tiny_pipelines.py,
tests/tiny_flow_pipelines.py, built offline), where the denoiser is cheap, so the hook's fixed per-step cost weighs
as much as it ever will: Stable Diffusion 1.5-shaped (one call on a doubled batch, VP), StableDiffusion3 (doubled
batch, flow matching) and Flux with ``true_cfg_scale`` (two calls per step, flow matching).  In one run, for each
pipeline, the two kinds of call alternate (own, guided, own, guided, ...) so that drifts in machine load hit both
alike; the hook is installed and removed outside the timed region.  Besides wall time it reports the process's CPU
time per call, which other processes on a shared machine disturb less.  The guided and own outputs are compared.

    python benchmarks/hook_overhead.py                       # CPU: sd, sd3, flux, sd_pag
    python benchmarks/hook_overhead.py --device cuda --steps 50 --pipelines sd3 flux sd_pag
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from tiny_flow_pipelines import flow_pipeline_call, tiny_flux, tiny_sd3  # noqa: E402
from tiny_pipelines import tiny_sd_pipeline  # noqa: E402

from steerdiff.guidance import CFG, PAG  # noqa: E402
from steerdiff.pipelines import guide  # noqa: E402


def timed_call(pipe, kwargs, device: torch.device) -> tuple[float, float, object]:
    """(wall seconds, process CPU seconds, images) of one pipeline call."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start, start_cpu = time.perf_counter(), time.process_time()
    images = pipe(**kwargs, generator=torch.Generator(device="cpu").manual_seed(0)).images
    images = torch.as_tensor(images)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, time.process_time() - start_cpu, images


def hook_cost_per_step(pipe, rule, check_finite: bool, batch: int, device: torch.device, repeats: int = 2000) -> float:
    """Seconds per network call that the hook adds by itself: its forward wrapper with the network replaced by
    a precomputed output (the doubled batch of an SD step)."""
    unet = pipe.unet
    sample = torch.randn(2 * batch, unet.config.in_channels, 16, 16, device=device)
    hidden = torch.randn(2 * batch, 16, unet.config.cross_attention_dim, device=device)
    output = (torch.randn_like(sample),)
    t = pipe.scheduler.timesteps[0] if pipe.scheduler.timesteps is not None else torch.tensor(999)
    unet.forward = lambda *args, **kwargs: output  # the network stubbed out; the hook wraps the stub
    hook = guide(pipe, rule, check_finite=check_finite)
    try:
        pipe._guidance_scale, pipe._guidance_rescale = 7.5, 0.0
        for _ in range(50):
            unet(sample, t, encoder_hidden_states=hidden, return_dict=False)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(repeats):
            unet(sample, t, encoder_hidden_states=hidden, return_dict=False)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return (time.perf_counter() - start) / repeats
    finally:
        hook.remove()
        del unet.forward


def hook_cost_per_step_flux(pipe, rule, check_finite: bool, device: torch.device, repeats: int = 2000) -> float:
    """Seconds per step that the hook adds by itself in the two-call pattern: a conditional and an unconditional
    call of Flux's transformer, stubbed out, with the pipeline's own u + w (c - u) after them, hooked minus bare."""
    transformer = pipe.transformer
    x = torch.randn(1, 64, transformer.config.in_channels, device=device)
    output = (torch.randn_like(x),)
    kwargs = dict(timestep=torch.full((1,), 0.5, device=device), guidance=None, return_dict=False,
                  pooled_projections=torch.randn(1, transformer.config.pooled_projection_dim, device=device),
                  encoder_hidden_states=torch.randn(1, 8, transformer.config.joint_attention_dim, device=device),
                  txt_ids=torch.zeros(8, 3, device=device), img_ids=torch.zeros(64, 3, device=device))
    pipe.scheduler.set_timesteps(20)
    pipe.scheduler._step_index = 3  # both calls of a step see the same step index, as in the pipeline's loop

    def steps(n: int) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(n):
            c = transformer(hidden_states=x, **kwargs)[0]
            u = transformer(hidden_states=x, **kwargs)[0]
            u + 7.5 * (c - u)  # the pipeline's own combination, done in both cases
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return (time.perf_counter() - start) / n

    transformer.forward = lambda *args, **kw: output  # the network stubbed out; the hook wraps the stub
    try:
        steps(50)
        bare = min(steps(repeats) for _ in range(3))
        with guide(pipe, rule, check_finite=check_finite):
            steps(50)
            hooked = min(steps(repeats) for _ in range(3))
        return hooked - bare
    finally:
        del transformer.forward


def build(name: str, device: torch.device, batch: int, steps: int, scale: float):
    """The pipeline and the keyword arguments of its call with its own CFG on at ``scale``."""
    if name == "sd":
        pipe = tiny_sd_pipeline().to(device)
        return pipe, dict(prompt=[f"a photo of thing {i}" for i in range(batch)], num_inference_steps=steps,
                          guidance_scale=scale, output_type="latent")
    pipe = {"sd3": tiny_sd3, "flux": tiny_flux}[name]().to(device)
    pipe.set_progress_bar_config(disable=True)
    kwargs = flow_pipeline_call(name, steps=steps)
    kwargs.pop("generator")
    kwargs["true_cfg_scale" if name == "flux" else "guidance_scale"] = scale
    return pipe, {k: v.to(device) if torch.is_tensor(v) else v for k, v in kwargs.items()}


def interleaved(own, guided, args) -> dict:
    """Warm-up, then ``args.repeats`` alternating calls of ``own()`` and ``guided()`` (each returning wall, CPU and
    images); the wall and CPU times of each kind and the last outputs' largest difference."""
    for _ in range(args.warmup):
        own()
        guided()
    runs = {"own": [], "guided": []}
    for _ in range(args.repeats):
        runs["own"].append(own())
        runs["guided"].append(guided())
    wall = {kind: [r[0] for r in rs] for kind, rs in runs.items()}
    cpu = {kind: [r[1] for r in rs] for kind, rs in runs.items()}
    difference = float((runs["own"][-1][2] - runs["guided"][-1][2]).abs().max())
    return {"wall": wall, "cpu": cpu, "difference": difference}


def report(title: str, own_label: str, guided_label: str, result: dict) -> float:
    """Print the medians and ratios of an interleaved measurement; returns the ratio of the median wall times."""
    own_times, guided_times = result["wall"]["own"], result["wall"]["guided"]
    pair_ratios = sorted(g / o for g, o in zip(guided_times, own_times))
    q = statistics.quantiles(pair_ratios, n=4)
    own_median, guided_median = statistics.median(own_times), statistics.median(guided_times)
    ratio = guided_median / own_median
    print(f"\n{title}")
    print(f"{own_label:<28} median {own_median * 1e3:8.2f} ms  (min {min(own_times) * 1e3:.2f})")
    print(f"{guided_label:<28} median {guided_median * 1e3:8.2f} ms  (min {min(guided_times) * 1e3:.2f})")
    print(f"ratio of medians:            {ratio:.4f}   (per-pair ratios: median {statistics.median(pair_ratios):.4f}, "
          f"quartiles {q[0]:.4f} .. {q[2]:.4f}); ratio of minima {min(guided_times) / min(own_times):.4f}")
    cpu_own, cpu_guided = statistics.median(result["cpu"]["own"]), statistics.median(result["cpu"]["guided"])
    print(f"process CPU time:            own median {cpu_own * 1e3:.2f} ms, guided median {cpu_guided * 1e3:.2f} ms, "
          f"ratio {cpu_guided / cpu_own:.4f}")
    print(f"outputs:                     max |own - guided| = {result['difference']:.2e}")
    return ratio


def measure_pag(args, device: torch.device) -> bool:
    """guide(SD, PAG(w, s)) against StableDiffusionPAGPipeline(**SD's components) at the same w, s and layers."""
    from diffusers import StableDiffusionPAGPipeline

    pipe, kwargs = build("sd", device, args.batch, args.steps, args.scale)
    layers = ["mid", "up_blocks.0"]
    pag = StableDiffusionPAGPipeline(**pipe.components, pag_applied_layers=layers)
    pag.set_progress_bar_config(disable=True)
    rule = PAG(args.scale, 3.0, layers=layers)

    def guided():
        with guide(pipe, rule, check_finite=not args.no_check_finite):
            return timed_call(pipe, kwargs, device)

    result = interleaved(lambda: timed_call(pag, dict(kwargs, pag_scale=3.0), device), guided, args)
    ratio = report(f"sd_pag (PAG on {layers}, w = {args.scale}, pag_scale 3): {args.steps} steps, {args.repeats} timed "
                   "calls each", "StableDiffusionPAGPipeline:", "guide(SD, PAG):", result)
    print(f"target: a PAG step under guide() costs no more than the PAG pipeline's: {'met' if ratio <= 1.0 else 'NOT met'}"
          f" (within 1%: {'yes' if ratio <= 1.01 else 'no'})")
    return result["difference"] <= 1e-5


def measure(name: str, args, device: torch.device) -> bool:
    if name == "sd_pag":
        return measure_pag(args, device)
    pipe, kwargs = build(name, device, args.batch, args.steps, args.scale)
    rule = CFG(args.scale)

    def guided():
        with guide(pipe, rule, check_finite=not args.no_check_finite):
            return timed_call(pipe, kwargs, device)

    result = interleaved(lambda: timed_call(pipe, kwargs, device), guided, args)
    pattern = {"sd": "doubled batch, VP", "sd3": "doubled batch, flow", "flux": "two calls per step, flow"}[name]
    ratio = report(f"{name} ({pattern}): {args.steps} steps, w = {args.scale}, {args.repeats} timed calls each "
                   f"(after {args.warmup} warm-up)", "own CFG:", "guide(pipe, CFG):", result)
    own_median = statistics.median(result["wall"]["own"])
    if name == "sd":
        fixed = hook_cost_per_step(pipe, rule, not args.no_check_finite, args.batch, device)
        print(f"hook's fixed cost:           {fixed * 1e6:.0f} us per network call (network stubbed out; the median own "
              f"step took {own_median / args.steps * 1e3:.2f} ms wall), i.e. {fixed * args.steps / own_median:.2%} of the call")
    if name == "flux":
        fixed = hook_cost_per_step_flux(pipe, rule, not args.no_check_finite, device)
        print(f"hook's added cost:           {fixed * 1e6:.0f} us per step of two calls (transformer stubbed out, hooked minus "
              f"bare; the median own step took {own_median / args.steps * 1e3:.2f} ms wall), i.e. "
              f"{fixed * args.steps / own_median:.2%} of the step")
    print(f"target <= 1.03:              {'met' if ratio <= 1.03 else 'NOT met'}")
    return result["difference"] <= 1e-5


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=2, help="prompts per call (SD; the flow pipelines take one)")
    parser.add_argument("--repeats", type=int, default=30, help="timed calls of each kind")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: leave torch's default)")
    parser.add_argument("--scale", type=float, default=7.5)
    parser.add_argument("--no-check-finite", action="store_true", help="run the hook without its NaN/Inf check")
    parser.add_argument("--pipelines", nargs="+", default=["sd", "sd3", "flux", "sd_pag"],
                        choices=["sd", "sd3", "flux", "sd_pag"])
    args = parser.parse_args(argv)

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} thread(s)"
    print(f"device: {name}")
    ok = [measure(p, args, device) for p in args.pipelines]
    return 0 if all(ok) else 1


if __name__ == "__main__":
    raise SystemExit(main())
