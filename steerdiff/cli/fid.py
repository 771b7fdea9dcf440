"""``steerdiff fid PATH1 PATH2``: FID (and KID, FD-DINOv2, CLIP-FD, precision / recall) between two folders of images or
statistics files, in pytorch-fid's command shape; ``--save-stats FOLDER OUT.npz`` writes a folder's statistics.

The work is :mod:`steerdiff.metrics.folder_features` (features of a folder: parallel decoding, batches, a cache,
``accelerate launch`` sharding) and :mod:`steerdiff.metrics.folder_comparison`; this module parses and prints.
Module-level imports stay light: ``steerdiff --help`` builds this parser without loading torch.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

HELP = ("FID / KID / FD-DINOv2 / CLIP-FD / precision-recall between two folders of images or statistics files "
        "(pytorch-fid's command shape; nothing is downloaded)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", nargs=2, metavar="PATH",
                   help="two folders of images (searched recursively: png, jpg, webp) or .npz statistics / features "
                        "files; PATH1 is the reference set for precision / recall.  With --save-stats or "
                        "--save-features: the folder, then the output .npz")
    p.add_argument("--features", choices=["inception", "dinov2", "clip"], default="inception",
                   help="feature space: Inception pool3 (FID), DINOv2 CLS token (FD-DINOv2), CLIP image embedding (CLIP-FD)")
    p.add_argument("--weights", help="Inception weights: a .safetensors file (scripts/convert_inception_weights.py "
                                     "converts pytorch-fid's pt_inception-2015-12-05 .pth), or the .pth with --allow-pickle")
    p.add_argument("--allow-pickle", action="store_true", help="allow a pickled .pth Inception weights file (loaded "
                                                               "with torch.load(weights_only=True))")
    p.add_argument("--model", help="the local transformers folder of the DINOv2 or CLIP network (--features dinov2 | clip)")
    p.add_argument("--mode", choices=["pytorch-fid", "clean", "torch-fidelity"], default="pytorch-fid",
                   help="preprocessing: pytorch-fid's bilinear resize (default), clean-fid's PIL bicubic ('clean'), "
                        "or torch-fidelity's TensorFlow-1 bilinear")
    p.add_argument("--kid", action="store_true", help="add KID (unbiased, cubic polynomial kernel)")
    p.add_argument("--kid-subsets", type=int, default=100)
    p.add_argument("--kid-subset-size", type=int, default=1000)
    p.add_argument("--precision-recall", action="store_true", help="add precision and recall (k = 3)")
    p.add_argument("--bootstrap", type=int, default=0, metavar="N", help="95%% bootstrap interval of the distance from N resamples")
    p.add_argument("--seed", type=int, default=0, help="seed of the KID subsets and the bootstrap")
    p.add_argument("--allow-low-rank", action="store_true",
                   help="compute the distance even where a side has no more images than the feature dimension")
    p.add_argument("--save-stats", action="store_true", help="write PATH1's mu / sigma to PATH2 (pytorch-fid's .npz)")
    p.add_argument("--save-features", action="store_true", help="write PATH1's features (and mu / sigma) to PATH2")
    p.add_argument("--json", action="store_true", help="print every result as one JSON object")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--num-workers", type=int, default=None, help="image decoding processes (default: min(8, CPUs))")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:<index> or mps")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16", "float64"], default="float32",
                   help="the network's precision (features are float64 from there on)")
    p.add_argument("--cache-dir", help="feature cache (default $STEERDIFF_CACHE or ~/.cache/steerdiff)")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write cached folder features")
    p.add_argument("--no-progress", action="store_true")


def _check(args) -> None:
    """Every option checked before any image is read."""
    from ..devices import check_device

    for name in ("batch_size", "kid_subsets"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.kid_subset_size < 2:
        raise ValueError(f"--kid-subset-size must be >= 2, got {args.kid_subset_size}")
    if args.bootstrap < 0 or (args.num_workers is not None and args.num_workers < 0):
        raise ValueError("--bootstrap and --num-workers must be >= 0")
    check_device(args.device)
    if args.features == "inception" and args.weights is None:
        raise ValueError("--weights: the Inception weights file is needed (steerdiff never downloads it): "
                         "pt_inception-2015-12-05-6726825d.pth converted with scripts/convert_inception_weights.py")
    if args.features != "inception" and args.model is None:
        raise ValueError(f"--model: --features {args.features} needs the network's local transformers folder")
    if args.save_stats and args.save_features:
        raise ValueError("give --save-stats or --save-features, not both")
    if args.save_stats or args.save_features:
        from ..run_folder import check_output_file

        if Path(args.paths[0]).suffix == ".npz":
            raise ValueError(f"--save-stats / --save-features read a folder of images; {args.paths[0]!r} is a file")
        check_output_file(args.paths[1], "PATH2 (the output)", suffixes=(".npz",))
    else:
        for path in args.paths:
            p = Path(path).expanduser()
            if not (p.is_dir() or (p.suffix == ".npz" and p.is_file())):
                raise FileNotFoundError(f"{path!r} is neither a folder of images nor an existing .npz statistics file")


def make_space(args):
    from ..metrics.features import CLIPFeatures, DINOv2Features, InceptionFeatures

    common = dict(batch_size=args.batch_size, device=args.device, mode=args.mode, dtype=args.dtype)
    if args.features == "inception":
        return InceptionFeatures(args.weights, allow_pickle=args.allow_pickle, **common)
    return (DINOv2Features if args.features == "dinov2" else CLIPFeatures)(args.model, **common)


def main(args) -> int:
    from ..benchmark.sharding import current_shard
    from ..metrics.folder_comparison import FD_KEYS, compare, load_side
    from ..metrics.statistics_files import save_features, save_statistics

    _check(args)
    space = make_space(args)
    shard = current_shard(cpu=not str(args.device).startswith("cuda"))
    workers = args.num_workers if args.num_workers is not None else min(8, os.cpu_count() or 1)
    options = dict(num_workers=workers, cache_dir=args.cache_dir, use_cache=not args.no_cache,
                   progress=not args.no_progress and not args.json, shard=shard)
    if args.save_stats or args.save_features:
        side = load_side(args.paths[0], space, **options)
        if shard.is_main:
            out = (save_statistics if args.save_stats else save_features)(args.paths[1], side)
            print(f"wrote {'statistics' if args.save_stats else 'features'} of {side.count} images to {out}")
        return 0
    from ..metrics.folder_comparison import check_rank
    from ..metrics.folder_features import list_images

    for path in args.paths:  # before any features are computed
        if not path.endswith(".npz"):
            check_rank(path, len(list_images(path)), space.feature_dim, args.allow_low_rank)
    sides = [load_side(path, space, **options) for path in args.paths]
    if not shard.is_main:
        return 0
    result = compare(*sides, args.features, kid=args.kid, kid_subsets=args.kid_subsets,
                     kid_subset_size=args.kid_subset_size, precision_recall=args.precision_recall,
                     bootstrap=args.bootstrap, seed=args.seed, allow_low_rank=args.allow_low_rank)
    result["settings"] = {"features": args.features, "mode": args.mode, "dtype": args.dtype, "space": space.key()}
    if args.json:
        print(json.dumps(result, sort_keys=True))
        return 0
    key = FD_KEYS[args.features]
    print(f"{key.upper() if key == 'fid' else key}: {result[key]:.6g}")
    if "kid" in result:
        print(f"KID: {result['kid']['mean']:.6g} +- {result['kid']['std']:.3g}")
    if "precision" in result:
        print(f"precision: {result['precision']:.4f}  recall: {result['recall']:.4f}")
    if f"{key}_bootstrap_95" in result:
        b = result[f"{key}_bootstrap_95"]
        print(f"{key} 95% bootstrap interval: [{b['low']:.6g}, {b['high']:.6g}] ({b['rounds']} resamples)")
    return 0
