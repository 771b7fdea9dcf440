"""Benchmark of the three gradient modes of ``steerdiff.pipelines.adjoint.sample_with_grad`` on the digits model.

For each number of steps and solver order it measures, per mode: the peak bytes saved for backward (counted
with ``torch.autograd.graph.saved_tensors_hooks``, model weights excluded), the bytes the mode carries outside
the graph (stored states), the wall time (median of ``--repeats`` runs, the modes interleaved so that load from
other processes hits them alike), and the agreement of dL/dx_T,
dL/d(class embedding) and dL/d(all weights) with plain autograd (cosine similarity and relative error).
On CUDA it also reports ``torch.cuda.max_memory_allocated``.  The loss is the digits classifier's cross
entropy towards ``--target-class`` (the loss of the noise-optimisation task).

    python -m benchmarks.adjoint --steps 10 50 200 --orders 1 2 --json docs/benchmarks/adjoint.json

Targets (issue 7): adjoint and checkpoint at <= 3x the time of autograd, checkpoint exact, adjoint cosine
>= 0.99 at 50 steps.  The script prints the measured ratios; it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from steerdiff.memory import SavedTensorMeter
from steerdiff.pipelines.adjoint import MODES, sample_with_grad
from steerdiff.pipelines.class_conditional import sample_shape
from steerdiff.pipelines.conditioning import class_embeddings
from steerdiff.pipelines.loading import load_pipeline


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0))


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def flat_params(result) -> torch.Tensor:
    return torch.cat([g.flatten() for g in result.grad_params.values()])


def run_case(pipe, classifier, steps: int, order: int, args) -> list[dict]:
    unet, device = pipe.unet, pipe.device
    gen = torch.Generator().manual_seed(args.seed)
    x_T = torch.randn(args.batch, *sample_shape(unet), generator=gen).to(device, unet.dtype)
    labels = torch.arange(args.batch) % 10
    emb = class_embeddings(unet, labels.to(device)).detach()
    target = torch.full((args.batch,), args.target_class, device=device)

    def loss_fn(x0):
        return F.cross_entropy(classifier(x0.float()), target)

    kw = dict(num_inference_steps=steps, conditioning=emb, guidance_scale=args.guidance_scale, loss_fn=loss_fn,
              params="all", order=order)
    rows, results = [], {}
    for mode in MODES:
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        with SavedTensorMeter(exclude=list(unet.parameters()) + list(unet.buffers())) as meter:
            results[mode] = sample_with_grad(unet, x_T, pipe.scheduler, mode=mode, **kw)
        cuda_peak = None
        if device.type == "cuda":
            torch.cuda.synchronize()
            cuda_peak = torch.cuda.max_memory_allocated() - base
        rows.append({"steps": steps, "order": order, "mode": mode, "saved_bytes_peak": meter.peak_bytes,
                     "state_bytes": results[mode].state_bytes, "cuda_max_memory_allocated": cuda_peak,
                     "nfe": results[mode].nfe, "seconds_all": [], "cpu_seconds_all": []})
    for _ in range(args.repeats):
        for row in rows:
            start, start_cpu = time.perf_counter(), time.process_time()
            sample_with_grad(unet, x_T, pipe.scheduler, mode=row["mode"], **kw)
            if device.type == "cuda":
                torch.cuda.synchronize()
            row["seconds_all"].append(time.perf_counter() - start)
            row["cpu_seconds_all"].append(time.process_time() - start_cpu)
    for row in rows:
        row["seconds"] = statistics.median(row["seconds_all"])
        row["cpu_seconds"] = statistics.median(row["cpu_seconds_all"])
    ref = results["autograd"]
    for row in rows:
        res = results[row["mode"]]
        for name, got, want in (("x_T", res.grad_x_T, ref.grad_x_T), ("embedding", res.grad_conditioning, ref.grad_conditioning),
                                ("weights", flat_params(res), flat_params(ref))):
            row[f"cos_{name}"] = cosine(got, want)
            row[f"rel_{name}"] = relative_error(got, want)
        auto = next(r for r in rows if r["mode"] == "autograd")
        row["time_vs_autograd"] = row["seconds"] / auto["seconds"]
        row["cpu_time_vs_autograd"] = row["cpu_seconds"] / auto["cpu_seconds"]
    return rows


def fmt_bytes(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.2f} MiB"


def markdown(rows: list[dict]) -> str:
    cuda = any(r["cuda_max_memory_allocated"] is not None for r in rows)
    lines = [
        "| order | steps | mode | saved for backward (peak) | carried states | total |"
        + (" CUDA max allocated |" if cuda else "")
        + " wall time | CPU time | time / autograd (wall, CPU) | cos x_T | rel x_T | cos emb | rel emb | cos weights |"
        " rel weights |",
        "|---|---|---|---|---|---|" + ("---|" if cuda else "") + "---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['order']} | {r['steps']} | {r['mode']} | {fmt_bytes(r['saved_bytes_peak'])} | {fmt_bytes(r['state_bytes'])} | "
            f"{fmt_bytes(r['saved_bytes_peak'] + r['state_bytes'])} |"
            + (f" {fmt_bytes(r['cuda_max_memory_allocated'])} |" if cuda else "")
            + f" {r['seconds']:.2f} s | {r['cpu_seconds']:.2f} s | {r['time_vs_autograd']:.2f}, {r['cpu_time_vs_autograd']:.2f} | "
            f"{r['cos_x_T']:.6f} | {r['rel_x_T']:.2e} | {r['cos_embedding']:.6f} | {r['rel_embedding']:.2e} | "
            f"{r['cos_weights']:.6f} | {r['rel_weights']:.2e} |"
        )
    return "\n".join(lines)


def memory_ratios(rows: list[dict]) -> list[str]:
    out = []
    for order in sorted({r["order"] for r in rows}):
        for mode in MODES:
            mine = sorted((r for r in rows if r["order"] == order and r["mode"] == mode), key=lambda r: r["steps"])
            if len(mine) < 2:
                continue
            base = mine[0]
            parts = [
                f"{r['steps']}: saved x{r['saved_bytes_peak'] / base['saved_bytes_peak']:.2f}, "
                f"total x{(r['saved_bytes_peak'] + r['state_bytes']) / (base['saved_bytes_peak'] + base['state_bytes']):.2f}"
                for r in mine[1:]
            ]
            out.append(f"order {order} {mode}: vs {base['steps']} steps -> " + "; ".join(parts))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="digits")
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, nargs="+", default=[10, 50, 200])
    p.add_argument("--orders", type=int, nargs="+", default=[1, 2])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--guidance-scale", type=float, default=2.0)
    p.add_argument("--target-class", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the rows here (atomically)")
    args = p.parse_args()

    from steerdiff.metrics.classifier import load_digits_classifier

    torch.set_num_threads(args.threads)
    pipe = load_pipeline(args.model, device=args.device)
    pipe.unet.requires_grad_(True)
    classifier = load_digits_classifier(device=args.device)
    start = time.perf_counter()
    rows = []
    for order in args.orders:
        for steps in args.steps:
            rows.extend(run_case(pipe, classifier, steps, order, args))
            print(f"order {order}, {steps} steps done ({time.perf_counter() - start:.0f} s)", file=sys.stderr)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, " \
              f"{args.threads} thread(s), device {args.device}"
    print(f"# sample_with_grad on {args.model}: batch {args.batch}, guidance {args.guidance_scale}, float32, {machine}")
    print(markdown(rows))
    print()
    print("\n".join(memory_ratios(rows)))
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump({"machine": machine, "args": vars(args), "rows": rows}, f, indent=2)
        os.replace(tmp, path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
