"""One device check: precision, host synchronisation, step time and adjoint memory, printed as Markdown tables.

    python -m benchmarks.device_check                  # CUDA when available, else the CPU parts
    python -m benchmarks.device_check --device cpu

1. Precision: every momentum scheduler (HB-PLMS 4 beta 0.8, HB-DPM beta 0.8, GHVB 3.8) on a VP config (SD's betas)
   and a flow config (shift 3) runs 20 steps on the same inputs and the same smooth stand-in model outputs in
   float16 / bfloat16 / float32 and in float64 on the device; the table gives ||x - x_64|| / ||x_64|| at the end,
   next to diffusers' own solver of that family (DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler).
2. Host synchronisation (CUDA only): each scheduler's step() loop (``nonfinite_check="off"``), the model boundary
   with CFG / APG / CFG-Zero* (core.Denoiser), and the ``guide()`` hook's denoiser call on a tiny SD pipeline run
   under ``torch.cuda.set_sync_debug_mode("error")``; "ok" or the error.
3. Step time at an SDXL-sized latent (4 x 4 x 128 x 128; float16 on CUDA, float32 and 4 x 4 x 64 x 64 on the CPU):
   median time of one step() over a 20-step run, CUDA events, against diffusers' solver of the family
   (DPM-Solver++ on VP; FlowMatchEuler, whose step is one multiply-add, and DPM-Solver with flow sigmas on flow), and the time
   of one forward pass of a randomly initialised SDXL UNet (CUDA only) for scale.
4. Adjoint memory (CUDA only): ``torch.cuda.max_memory_allocated`` above the model's own weights for
   ``sample_with_grad`` on the embedded digits model (batch 64, order 2) at 10 / 50 / 200 steps, per mode.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

from steerdiff.samplers import GHVBScheduler, HeavyBallDPMSolverScheduler, HeavyBallPLMSScheduler

SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
CONFIGS = {"vp": DPMSolverMultistepScheduler(**SD_BETAS).config, "flow": FlowMatchEulerDiscreteScheduler(shift=3.0).config}
REFERENCE = {"vp": lambda c: DPMSolverMultistepScheduler.from_config(c), "flow": lambda c: FlowMatchEulerDiscreteScheduler.from_config(c)}
OURS = {
    "HB-PLMS 4, beta 0.8": lambda c, **kw: HeavyBallPLMSScheduler.from_config(c, order=4, beta=0.8, **kw),
    "HB-DPM, beta 0.8": lambda c, **kw: HeavyBallDPMSolverScheduler.from_config(c, beta=0.8, **kw),
    "GHVB 3.8": lambda c, **kw: GHVBScheduler.from_config(c, momentum_number=3.8, **kw),
}
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def model_output(x: torch.Tensor, t) -> torch.Tensor:
    """A smooth stand-in for a network: bounded, depends on x and on the timestep."""
    s = torch.as_tensor(t, device=x.device, dtype=torch.float32) / 1000
    return (0.5 * torch.tanh(x.float()) + 0.3 * s * x.float() - 0.1).to(x.dtype)


def run(sched, x: torch.Tensor, steps: int) -> torch.Tensor:
    sched.set_timesteps(steps, device=x.device)
    for t in sched.timesteps:
        x = sched.step(model_output(x, t), t, x).prev_sample
    return x


def precision(device: torch.device, shape) -> list[str]:
    rows = ["| scheduler | process | " + " | ".join(DTYPES) + " |", "|---|---|" + "---|" * len(DTYPES)]
    x0 = torch.randn(*shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(device)
    for family, config in CONFIGS.items():
        makers = dict(OURS, **{f"diffusers {REFERENCE[family](config).__class__.__name__}": lambda c, **kw: REFERENCE[family](c)})
        for name, make in makers.items():
            exact = run(make(config), x0.clone(), 20)
            cells = []
            for dtype in DTYPES.values():
                got = run(make(config), x0.to(dtype), 20).double()
                cells.append(f"{float((got - exact).norm() / exact.norm()):.1e}")
            rows.append(f"| {name} | {family} | " + " | ".join(cells) + " |")
    return rows


class _Net:
    """A conditional stand-in network for the model boundary."""

    def null(self, batch, device):
        return torch.zeros(batch, device=device)

    def __call__(self, x, t, cond):
        return torch.tanh(x) * (1 + cond.reshape(-1, *[1] * (x.ndim - 1)).to(x.dtype))


def no_sync(device: torch.device) -> list[str]:
    from steerdiff.core import Denoiser, noise_process_from_config
    from steerdiff.guidance import APG, CFG, CFGZeroStar

    rows = ["| what | process | result |", "|---|---|---|"]
    x0 = torch.randn(2, 4, 32, 32, device=device, dtype=torch.float16)

    def check(what, family, fn):
        try:
            fn()  # warm-up: first-call work (caches, grid copies) is set-up, not the loop
            torch.cuda.set_sync_debug_mode("error")
            try:
                fn()
            finally:
                torch.cuda.set_sync_debug_mode("default")
            rows.append(f"| {what} | {family} | ok |")
        except Exception as err:  # noqa: BLE001 - reported in the table
            rows.append(f"| {what} | {family} | {type(err).__name__}: {str(err).splitlines()[0][:120]} |")

    for family, config in CONFIGS.items():
        for name, make in OURS.items():
            sched = make(config, nonfinite_check="off")
            sched.set_timesteps(10, device=device)

            def loop(sched=sched):
                sched.set_timesteps(10, device=device)  # host work only: the grid is laid out before the loop
                x = x0.clone()
                for t in sched.timesteps:
                    x = sched.step(model_output(x, t), t, x).prev_sample

            def steps_only(sched=sched):
                x = x0.clone()
                sched._step_index = None
                sched._momentum.reset()
                for t in sched.timesteps:
                    x = sched.step(model_output(x, t), t, x).prev_sample

            check(f"{name} step() x 10", family, steps_only)
        process = noise_process_from_config(config)
        ptype = "flow_prediction" if family == "flow" else "epsilon"
        cond = torch.ones(2, device=device)
        for rule in (3.0, CFG(3.0), APG(3.0), CFGZeroStar(3.0, zero_init_steps=0)):
            d = Denoiser(_Net(), process, ptype, rule, cond=cond)
            t = torch.tensor(500.0, device=device)
            check(f"Denoiser, {rule!r}", family, lambda d=d, t=t: d(x0, t))
    try:
        sys.path.insert(0, "tests")
        from tiny_pipelines import tiny_sd_pipeline

        from steerdiff.pipelines import guide

        pipe = tiny_sd_pipeline().to(device)
        hook = guide(pipe, APG(5.0), check_finite=False)
        pipe.do_classifier_free_guidance_value = True
        type(pipe).do_classifier_free_guidance = property(lambda self: True)
        latents = torch.randn(4, 4, 16, 16, device=device)
        text = torch.randn(4, 8, 32, device=device)
        t = torch.tensor(500, device=device)
        check("guide() hook, APG, tiny SD UNet call", "vp", lambda: pipe.unet(latents, t, encoder_hidden_states=text))
        hook.remove()
    except Exception as err:  # noqa: BLE001
        rows.append(f"| guide() hook | vp | not run: {type(err).__name__}: {str(err).splitlines()[0][:100]} |")
    return rows


def _time(fn, device, repeats: int = 5) -> float:
    """Median seconds of fn() over ``repeats`` runs (after one warm-up), with CUDA events on CUDA."""
    fn()
    out = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            out.append(start.elapsed_time(end) / 1000)
        else:
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return statistics.median(out)


def step_time(device: torch.device, shape, dtype) -> list[str]:
    rows = ["| scheduler | process | us / step | ratio to diffusers |", "|---|---|---|---|"]
    x0 = torch.randn(*shape, device=device, dtype=dtype)
    outputs = [torch.randn_like(x0) for _ in range(20)]

    def per_step(sched):
        sched.set_timesteps(20, device=device)

        def loop():
            sched.set_timesteps(20, device=device)
            x = x0
            for t, out in zip(sched.timesteps, outputs):
                x = sched.step(out, t, x).prev_sample

        return _time(loop, device) / 20

    for family, config in CONFIGS.items():
        base = per_step(REFERENCE[family](config))
        rows.append(f"| diffusers {REFERENCE[family](config).__class__.__name__} | {family} | {base * 1e6:.0f} | 1.00 |")
        if family == "flow":  # the multistep solver of the same kind, on the flow process
            dpm = per_step(DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction"))
            rows.append(f"| diffusers DPMSolverMultistepScheduler (flow sigmas) | flow | {dpm * 1e6:.0f} | {dpm / base:.2f} |")
        for name, make in OURS.items():
            t = per_step(make(config))
            rows.append(f"| {name} | {family} | {t * 1e6:.0f} | {t / base:.2f} |")
    return rows


SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
)


def network_time(device: torch.device, dtype) -> str:
    """One forward pass of a randomly initialised SDXL UNet on the doubled CFG batch of 4 latents."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_UNET)
    unet = unet.to_empty(device=device).to(dtype).eval()
    with torch.no_grad():
        for p in unet.parameters():
            p.normal_(0, 0.02)
        for b in unet.buffers():
            b.zero_()
    x = torch.randn(8, 4, 128, 128, device=device, dtype=dtype)
    text = torch.randn(8, 77, 2048, device=device, dtype=dtype)
    added = {"text_embeds": torch.randn(8, 1280, device=device, dtype=dtype), "time_ids": torch.randn(8, 6, device=device, dtype=dtype)}
    t = torch.tensor(500, device=device)
    with torch.no_grad():
        seconds = _time(lambda: unet(x, t, encoder_hidden_states=text, added_cond_kwargs=added), device, repeats=3)
    params = sum(p.numel() for p in unet.parameters()) / 1e9
    return f"SDXL UNet ({params:.2f} B parameters, random weights), batch 8 (4 latents x CFG), {dtype}: {seconds * 1e3:.1f} ms per forward pass"


def adjoint_memory(device: torch.device) -> list[str]:
    from steerdiff.pipelines.adjoint import sample_with_grad
    from steerdiff.testbeds.digits import load_digits_model

    unet, scheduler = load_digits_model(device=device)
    rows = ["| mode | 10 steps | 50 steps | 200 steps |", "|---|---|---|---|"]
    x = torch.randn(64, 1, 8, 8, device=device)
    labels = torch.arange(64, device=device) % 10
    for mode in ("adjoint", "checkpoint", "autograd"):
        cells = []
        for n in (10, 50, 200):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            sample_with_grad(unet, x, scheduler, num_inference_steps=n, conditioning=labels, guidance_scale=2.0,
                             loss_fn=lambda x0: x0.square().mean(), mode=mode, order=2)
            cells.append(f"{(torch.cuda.max_memory_allocated(device) - base) / 2**20:.1f} MiB")
        rows.append(f"| {mode} | " + " | ".join(cells) + " |")
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    name = torch.cuda.get_device_name(device) if cuda else "CPU"
    print(f"# device check: {name}, torch {torch.__version__}\n")
    skipped = []

    print("## 1. Step precision: relative error against float64 on the same device, 20 steps\n")
    print("\n".join(precision(device, (2, 4, 64, 64))), "\n")

    if cuda:
        print("## 2. Host synchronisation (torch.cuda.set_sync_debug_mode('error'))\n")
        print("\n".join(no_sync(device)), "\n")
    else:
        skipped.append("2. host synchronisation (needs CUDA; on the CPU tests/test_momentum_schedulers.py runs step() on the meta device)")

    shape, dtype = ((4, 4, 128, 128), torch.float16) if cuda else ((4, 4, 64, 64), torch.float32)
    print(f"## 3. Step time, latent {shape}, {dtype}\n")
    print("\n".join(step_time(device, shape, dtype)), "\n")
    if cuda:
        try:
            print(network_time(device, torch.float16), "\n")
        except Exception as err:  # noqa: BLE001
            print(f"SDXL UNet timing not run: {type(err).__name__}: {err}\n")
    else:
        skipped.append("3. the SDXL UNet forward time (a 2.6 B-parameter network; CUDA only)")

    if cuda:
        print("## 4. Adjoint memory: max_memory_allocated above the weights (digits model, batch 64, order 2, CFG 2)\n")
        print("\n".join(adjoint_memory(device)), "\n")
    else:
        skipped.append("4. adjoint CUDA memory (the CPU has no allocator statistics; tests/test_adjoint.py counts saved tensors)")
    if skipped:
        print("Skipped on this machine:\n" + "\n".join(f"- {s}" for s in skipped))


if __name__ == "__main__":
    main()
