"""Calibrate LinearAG (Castillo et al., AAAI 2025) for a model, a sampler and a step count, one file per scale.

LinearAG replaces the unconditional prediction of every other step by u_hat_i = b_i0 c_i + b_i1 c_{i-1} +
b_i2 u_{i-1} + b_i3, with the b fitted by least squares on full-CFG runs (:meth:`LinearAG.calibrate`).  The
coefficients belong to one timestep grid, so they are fitted on the grid the benchmark samples on.  Calibration
samples use seeds ``--seed`` + i, far from the benchmark's seeds 0..N-1, so that no benchmark noise is fitted.

    python -m scripts.calibrate_linear_ag --model digits --scheduler dpmpp_2m --timestep-spacing trailing --steps 20 --scales 3 5 9 15
    # writes runs/linear_ag/digits_dpmpp_2m_20_w{scale}.safetensors, the files configs/benchmark/guidance.yaml uses
    python -m scripts.calibrate_linear_ag --model digits-flow --scheduler flow_euler --steps 10 --scales 3 5 9
    # the same for the rectified-flow model (configs/benchmark/flow_guidance.yaml)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from steerdiff.guidance import CFG, LinearAG  # noqa: E402
from steerdiff.pipelines.hooks import CFG_ON  # noqa: E402
from steerdiff.pipelines.loading import load_pipeline  # noqa: E402
from steerdiff.samplers.registry import make_scheduler  # noqa: E402


def calibration_path(out_dir: Path, model: str, scheduler: str, steps: int, scale: float) -> Path:
    return out_dir / f"{Path(model).name}_{scheduler}_{steps}_w{scale:g}.safetensors"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="digits", help="digits, digits-flow, mixture, mixture-flow or a local pipeline folder")
    p.add_argument("--scheduler", default="dpmpp_2m", help="a steerdiff.samplers.make_scheduler name")
    p.add_argument("--timestep-spacing", default=None,
                   help="VP schedulers' timestep_spacing (the benchmark configs use trailing); flow grids have none")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--scales", type=float, nargs="+", default=[3.0, 5.0, 9.0, 15.0])
    p.add_argument("--runs", type=int, default=4, help="calibration pipeline calls per scale")
    p.add_argument("--per-run", type=int, default=20, help="samples per call (classes cycle 0..9)")
    p.add_argument("--seed", type=int, default=1_000_000)
    p.add_argument("--out-dir", type=Path, default=Path("runs/linear_ag"))
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error(f"--steps must be >= 1, got {args.steps}")

    pipe = load_pipeline(args.model)
    spacing = {} if args.timestep_spacing is None else {"timestep_spacing": args.timestep_spacing}
    pipe.scheduler = make_scheduler(args.scheduler, pipe.scheduler.config, **spacing)
    pipe.set_progress_bar_config(disable=True)
    n_classes = 10
    for scale in args.scales:
        calls = []
        for r in range(args.runs):
            seeds = [args.seed + r * args.per_run + i for i in range(args.per_run)]
            calls.append({
                "class_labels": [s % n_classes for s in seeds],
                "num_inference_steps": args.steps,
                "guidance_scale": CFG_ON,  # turns the pipeline's CFG branch on; the rule sets the weight
                "generator": [torch.Generator().manual_seed(s) for s in seeds],
                "output_type": "latent",
            })
        t0 = time.perf_counter()
        rule = LinearAG.calibrate(pipe, CFG(scale), calls)
        path = rule.save(calibration_path(args.out_dir, args.model, args.scheduler, args.steps, scale))
        print(f"w={scale:g}: {int(rule.skip.sum())} of {args.steps} unconditional calls estimated; "
              f"{time.perf_counter() - t0:.1f} s -> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
