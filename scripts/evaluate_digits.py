"""Quality check of the embedded digits model: class accuracy and Frechet distance of its samples.

Protocol
    * 1,000 class-conditional samples, 100 per class 0-9; sample i (class i // 100) starts from noise drawn
      from its own ``torch.Generator`` seeded ``--seed + i``, so a sample does not depend on the batch.
    * ``steerdiff.pipelines.class_conditional.ClassConditionalPipeline`` with classifier-free guidance in
      diffusers' convention g = u + w (c - u) (u: null-class prediction, c: conditional), 50 steps, for
      DDIM (eta = 0) and DPM-Solver++ 2M (diffusers' schedulers, built from the model's scheduler config),
      at w = 3 and w = 1 (plain conditional sampling).
    * Samples and data are quantized to 8 bits (u8 = round((x + 1) * 127.5)) before the classifier.
    * accuracy: fraction of samples the digits classifier assigns to their conditioning class (target
      >= 90% at w = 3);
    * FD(samples): Frechet distance, in the classifier's penultimate-layer features, between the 1,000
      samples and the full data set (1,797 images);
    * FD(halves): FD between two disjoint random halves of the data set (898 / 899 images, permutation seed
      ``--seed``): the floor set by finite-sample noise.  Target: FD(samples) <= 3 x FD(halves) at w = 3.
      The halves' FD over ten permutation seeds is printed too, to show how much that floor itself varies.
    * within-class spread: mean over classes of tr(Cov samples_c) / tr(Cov data_c) in feature space -- the
      diversity that guidance trades for class fidelity (1 = as varied as the data).

    python -m scripts.evaluate_digits                    # prints a table, writes --json if given
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see scripts/train_digits.py

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from steerdiff.metrics.classifier import classify_digits, digits_features, load_digits_classifier  # noqa: E402
from steerdiff.metrics.frechet import feature_statistics, frechet_distance  # noqa: E402
from steerdiff.testbeds.digits import DIGITS_MODEL_PATH, NUM_CLASSES, load_digits_data, load_digits_model  # noqa: E402

SAMPLERS = ("ddim", "dpmpp_2m", "flow_euler")
ACCURACY_TARGET = 0.90
FD_RATIO_TARGET = 3.0


def make_scheduler(name: str, config):
    """A diffusers scheduler for ``name`` from the model's scheduler config, through steerdiff's registry, which
    keeps the noise process: DPM-Solver++ 2M runs in its flow mode on the flow model, DDIM is refused there (use
    flow_euler, its flow analogue) and FlowMatchEuler on the VP model."""
    from steerdiff.samplers import make_scheduler as registry_scheduler

    if name not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {name!r}")
    return registry_scheduler(name, config)


def generate(unet, scheduler, labels: torch.Tensor, guidance_scale: float, steps: int, seed: int, batch_size: int) -> torch.Tensor:
    """Class-conditional samples in model space [-1, 1]-ish (unclipped), one generator per sample."""
    from steerdiff.pipelines.class_conditional import ClassConditionalPipeline

    pipe = ClassConditionalPipeline(unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    out = []
    for start in range(0, labels.numel(), batch_size):
        chunk = labels[start : start + batch_size]
        gens = [torch.Generator().manual_seed(seed + start + i) for i in range(chunk.numel())]
        res = pipe(class_labels=chunk, num_inference_steps=steps, guidance_scale=guidance_scale, generator=gens, output_type="latent")
        out.append(res.images.float().cpu())
    return torch.cat(out)


def fd_between_halves(feats: torch.Tensor, seed: int) -> float:
    """FD between two disjoint halves of the rows of ``feats`` (random permutation seeded ``seed``)."""
    perm = torch.randperm(feats.shape[0], generator=torch.Generator().manual_seed(seed))
    half = feats.shape[0] // 2
    return frechet_distance(*feature_statistics(feats[perm[:half]]), *feature_statistics(feats[perm[half:]]))


def data_statistics(seed: int, repeats: int = 10):
    """Features and labels of the full data set, FD between halves for ``seed``, and over ``repeats`` seeds."""
    images, labels = load_digits_data("all")
    feats = digits_features(images)
    spread = torch.tensor([fd_between_halves(feats, seed + k) for k in range(repeats)], dtype=torch.float64)
    return feats, labels, fd_between_halves(feats, seed), spread


def within_class_spread(feats: torch.Tensor, labels: torch.Tensor, data_feats: torch.Tensor, data_labels: torch.Tensor) -> float:
    """Mean over classes of tr(Cov of the samples' features) / tr(Cov of the data's features), per class.

    1 means the samples of a class are as varied as the data of that class; guidance lowers it.
    """
    ratios = [
        float(feature_statistics(feats[labels == c])[1].trace() / feature_statistics(data_feats[data_labels == c])[1].trace())
        for c in range(NUM_CLASSES)
    ]
    return sum(ratios) / len(ratios)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=DIGITS_MODEL_PATH,
                   help="pipeline folder (default: the shipped digits model), 'flow' for its rectified-flow twin, or "
                        "'mixture' for the analytic digits mixture")
    p.add_argument("--samplers", nargs="+", default=list(SAMPLERS), choices=SAMPLERS)
    p.add_argument("--guidance", nargs="+", type=float, default=[3.0, 1.0])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--per-class", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    if args.per_class < 1:
        p.error(f"--per-class must be >= 1, got {args.per_class}")
    if args.steps < 1:
        p.error(f"--steps must be >= 1, got {args.steps}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    if str(args.model) == "mixture":  # the analytic mixture fitted to the digits, on the same trailing grid
        from diffusers import DDPMScheduler

        from steerdiff.pipelines.loading import load_pipeline

        pipe = load_pipeline("mixture")
        unet, ddpm = pipe.unet, DDPMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    elif str(args.model) == "flow":
        unet, ddpm = load_digits_model(variant="flow")
    else:
        unet, ddpm = load_digits_model(path=args.model)
    classifier = load_digits_classifier()
    data_feats, data_labels, fd_halves, spread = data_statistics(args.seed)
    mu_data, sigma_data = feature_statistics(data_feats)
    labels = torch.arange(NUM_CLASSES).repeat_interleave(args.per_class)
    print(
        f"data: FD between two disjoint random halves = {fd_halves:.3f} (seed {args.seed}; over seeds "
        f"{args.seed}..{args.seed + spread.numel() - 1}: mean {spread.mean():.3f}, min {spread.min():.3f}, max {spread.max():.3f}); "
        f"{labels.numel()} samples per setting, {args.steps} steps",
        flush=True,
    )

    rows = []
    for sampler in args.samplers:
        for w in args.guidance:
            t1 = time.perf_counter()
            x = generate(unet, make_scheduler(sampler, ddpm.config), labels, w, args.steps, args.seed, args.batch_size)
            pred = classify_digits(x, classifier=classifier)
            acc = float((pred == labels).double().mean())
            per_class = [float((pred[labels == c] == c).double().mean()) for c in range(NUM_CLASSES)]
            feats = digits_features(x, classifier=classifier)
            fd = frechet_distance(*feature_statistics(feats), mu_data, sigma_data)
            spread_ratio = within_class_spread(feats, labels, data_feats, data_labels) if args.per_class > 1 else float("nan")
            row = {
                "sampler": sampler,
                "guidance_scale": w,
                "steps": args.steps,
                "accuracy": acc,
                "per_class_accuracy": per_class,
                "fd_samples": fd,
                "fd_halves": fd_halves,
                "fd_ratio": fd / fd_halves,
                "within_class_spread": spread_ratio,
                "out_of_range_fraction": float((x.abs() > 1).double().mean()),
                "seconds": round(time.perf_counter() - t1, 1),
            }
            rows.append(row)
            print(
                f"{sampler:9s} w={w:<4g} accuracy {acc:.4f}  FD(samples) {fd:8.3f}  FD(halves) {fd_halves:.3f}  "
                f"ratio {fd / fd_halves:5.2f}  within-class spread {spread_ratio:.2f}  ({row['seconds']} s)",
                flush=True,
            )

    checks = [r for r in rows if r["guidance_scale"] == 3.0 and r["steps"] == 50]
    passed = all(r["accuracy"] >= ACCURACY_TARGET and r["fd_ratio"] <= FD_RATIO_TARGET for r in checks) if checks else None
    result = {
        "model": str(args.model),
        "seed": args.seed,
        "fd_halves": fd_halves,
        "fd_halves_over_seeds": spread.tolist(),
        "rows": rows,
        "targets_met_at_w3": passed,
        "wall_time_s": round(time.perf_counter() - t0, 1),
    }
    if passed is not None:
        verdict = "MET" if passed else "NOT MET"
        print(f"targets at w=3, 50 steps (accuracy >= {ACCURACY_TARGET:.0%}, FD ratio <= {FD_RATIO_TARGET:g}): {verdict}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
