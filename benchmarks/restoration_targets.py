"""The targets of the restoration benchmark, with paired bootstrap intervals, from a finished ``steerdiff restore`` run.

Reads ``<run>/results.jsonl`` and the restorations ``<run>/<task>/<method>.safetensors`` written by
``steerdiff restore --config configs/restore/benchmark.yaml`` and checks, per task:

- inpainting (box, random, extreme): do MCG and DPS beat projection-only on FD (lower) and class accuracy (higher)?
- sigma_y = 0.05: does DPS beat MCG (FD, class accuracy, PSNR, SSIM)?

Each comparison is a difference "method - baseline".  Class accuracy, PSNR and SSIM are means over images and
get a 95% paired bootstrap interval (the same resampled images for both methods).  FD gets none: a bootstrap
resample repeats images, which makes the 64 x 64 feature covariance of N ~ 100-200 samples rank-deficient and the
FD erratic.  Its noise scale is printed instead: the spread of the FD of N *real* test digits (random subsets)
to the training set, an unpaired upper guide for the noise of a paired difference.

Run:  python -m benchmarks.restoration_targets [--run outputs/restore/benchmark] [--resamples 200] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from steerdiff.benchmark.grid import slug
from steerdiff.metrics.classifier import classify_digits, digits_features
from steerdiff.metrics.frechet import frechet_distance_from_features
from steerdiff.metrics.similarity import psnr, ssim
from steerdiff.testbeds.digits import load_digits_data

INPAINTING = ("box", "random50", "random80", "extreme")


def per_image(run: Path, record, originals, labels):
    x = load_file(str(run / slug(record["task"]) / f"{slug(record['method'])}.safetensors"))["restored"]
    x = x.to(torch.float64).clamp(-1, 1)
    return {
        "features": digits_features(x),
        "correct": (classify_digits(x) == labels).double(),
        "psnr": psnr(x, originals),
        "ssim": ssim(x, originals),
    }


def compare(a, b, reference, resamples, generator):
    """{metric: (a - b, lo, hi)} with a 95% paired bootstrap interval."""
    n = a["correct"].shape[0]
    point = {"fd": frechet_distance_from_features(a["features"], reference)
             - frechet_distance_from_features(b["features"], reference)}
    for key in ("correct", "psnr", "ssim"):
        point[key] = float(a[key].mean() - b[key].mean())
    draws = {key: [] for key in point if key != "fd"}
    for _ in range(resamples):
        idx = torch.randint(n, (n,), generator=generator)
        for key in ("correct", "psnr", "ssim"):
            draws[key].append(float(a[key][idx].mean() - b[key][idx].mean()))
    out = {"fd": (point.pop("fd"), float("nan"), float("nan"))}
    for key, value in point.items():
        d = torch.tensor(draws[key], dtype=torch.float64)
        out["accuracy" if key == "correct" else key] = (value, float(d.quantile(0.025)), float(d.quantile(0.975)))
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="outputs/restore/benchmark")
    parser.add_argument("--resamples", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the comparisons here")
    args = parser.parse_args()
    start = time.perf_counter()
    run = Path(args.run)
    records = [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]
    records = [r for r in records if not r.get("skipped")]
    n = records[0]["num_images"]
    originals, labels = load_digits_data("test")
    originals, labels = originals[:n].to(torch.float64), labels[:n]
    reference = digits_features(load_digits_data("train")[0])
    test_features = digits_features(load_digits_data("test")[0])
    g = torch.Generator().manual_seed(args.seed)
    real = torch.tensor([frechet_distance_from_features(test_features[torch.randperm(test_features.shape[0], generator=g)[:n]],
                                                        reference) for _ in range(30)], dtype=torch.float64)
    print(f"FD of {n} random real test digits to the training set (30 subsets): {real.mean():.2f} +- {real.std():.2f}; "
          f"of this run's {n} originals: {records[0].get('fd_originals', float('nan')):.2f}")
    by_cell = {(r["task"], r["method"].split()[0]): r for r in records}
    cache = {}

    def get(task, method):
        if (task, method) not in cache:
            cache[task, method] = per_image(run, by_cell[task, method], originals, labels)
        return cache[task, method]

    results = []
    tasks = list(dict.fromkeys(r["task"] for r in records))
    for task in tasks:
        sigma_y = next(r["sigma_y"] for r in records if r["task"] == task)
        pairs = []
        if task.split()[0] in INPAINTING:
            pairs += [("mcg", "projection"), ("dps", "projection")]
        if sigma_y == 0.05 and (task, "mcg") in by_cell and (task, "dps") in by_cell:
            pairs.append(("dps", "mcg"))
        for a, b in pairs:
            if (task, a) not in by_cell or (task, b) not in by_cell:
                continue
            diff = compare(get(task, a), get(task, b), reference, args.resamples, g)
            results.append({"task": task, "a": a, "b": b, **{k: list(v) for k, v in diff.items()}})
            cells = f"FD {diff.pop('fd')[0]:+7.2f}  " + "  ".join(
                f"{k} {v[0]:+7.3f} [{v[1]:+7.3f}, {v[2]:+7.3f}]" for k, v in diff.items())
            results[-1]["fd"] = results[-1]["fd"][0]
            print(f"{task:<22}{a} - {b:<11}{cells}", flush=True)
    print(f"{n} images, {args.resamples} paired bootstrap resamples, {time.perf_counter() - start:.1f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"num_images": n, "resamples": args.resamples,
                                               "fd_real_subsets": [float(real.mean()), float(real.std())],
                                               "comparisons": results},
                                              indent=1) + "\n")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
