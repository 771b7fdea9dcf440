"""Images per second of ``steerdiff fid``'s folder features against pytorch-fid's own code path, on the same PNGs
and the same Inception weights, with the features compared.

    python -m benchmarks.fid_speed --pytorch-fid-python /path/to/venv/bin/python [--images 2000] [--size 64]

pytorch-fid needs torchvision, which steerdiff does not install, so its path runs in another interpreter that has
``pytorch-fid`` (``--pytorch-fid-python``): there ``pytorch_fid.fid_score.get_activations`` (its DataLoader of
``ImagePathDataset`` with ``ToTensor``, its ``InceptionV3`` with ``resize_input`` and ``normalize_input``) runs on
the folder, its weights loader handed the same state dict as ours (no download).  Without real FID weights
(``--weights``) both use one random Inception-v3 with Kaiming-initialised convolutions, whose features vary.
Prints one table: images / s of each, the time ratio, and the largest feature difference.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import torch

PYTORCH_FID = textwrap.dedent('''
    import sys, time, json, numpy as np, torch
    from pathlib import Path
    from safetensors.torch import load_file
    import pytorch_fid.inception as inception
    from pytorch_fid.fid_score import get_activations
    folder, weights, out, batch, workers, threads = sys.argv[1:7]
    torch.set_num_threads(int(threads))
    state = load_file(weights)
    inception.load_state_dict_from_url = lambda *a, **k: state  # the same weights, no download
    model = inception.InceptionV3([inception.InceptionV3.BLOCK_INDEX_BY_DIM[2048]])
    files = sorted(Path(folder).glob("*.png"))
    t0 = time.perf_counter()
    acts = get_activations(files, model, batch_size=int(batch), dims=2048, device="cpu", num_workers=int(workers))
    seconds = time.perf_counter() - t0
    np.save(out, acts)
    print(json.dumps({"seconds": seconds, "torch": torch.__version__}))
''')


def write_images(folder: Path, n: int, size: int, seed: int = 0) -> None:
    """Smooth random colour images (low-frequency noise upsampled), 8-bit PNG."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        coarse = rng.random((size // 8, size // 8, 3)) * 255
        img = Image.fromarray(coarse.astype(np.uint8)).resize((size, size), Image.BILINEAR)
        img.save(folder / f"{i:05d}.png")


def random_inception(path: Path) -> None:
    from safetensors.torch import save_file
    from torch import nn

    from steerdiff.metrics.inception import FIDInceptionV3

    torch.manual_seed(0)
    model = FIDInceptionV3()
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pytorch-fid-python", required=True, help="an interpreter with pytorch-fid (and torchvision)")
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--num-workers", type=int, default=2)
    ap.add_argument("--weights", help="FID Inception weights (.safetensors); default: a random Inception-v3")
    ap.add_argument("--folder", help="where to write the images (default: a temporary folder)")
    args = ap.parse_args(argv)

    from steerdiff.metrics.features import InceptionFeatures
    from steerdiff.metrics.folder_features import folder_features

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = Path(args.folder) if args.folder else tmp / "images"
        if not (folder.is_dir() and len(list(folder.glob("*.png"))) == args.images):
            write_images(folder, args.images, args.size)
        weights = Path(args.weights) if args.weights else tmp / "inception.safetensors"
        if not args.weights:
            random_inception(weights)
        threads = torch.get_num_threads()
        run = subprocess.run([args.pytorch_fid_python, "-c", PYTORCH_FID, str(folder), str(weights), str(tmp / "pf.npy"),
                              str(args.batch_size), str(args.num_workers), str(threads)],
                             capture_output=True, text=True, check=False)
        if run.returncode != 0:
            print(run.stderr[-3000:], file=sys.stderr)
            return 1
        theirs = json.loads(run.stdout.strip().splitlines()[-1])
        space = InceptionFeatures(str(weights), batch_size=args.batch_size)
        t0 = time.perf_counter()
        ours = folder_features(folder, space, num_workers=args.num_workers, use_cache=False, progress=False)
        seconds = time.perf_counter() - t0
        reference = torch.from_numpy(np.load(tmp / "pf.npy")).double()
    diff = (ours - reference).abs().max().item()
    scale = reference.abs().max().item()
    print(f"{args.images} PNGs of {args.size}x{args.size}, batch {args.batch_size}, {args.num_workers} decoding workers, "
          f"{threads} torch threads, CPU")
    print("| path | torch | seconds | images / s |")
    print("|---|---|---:|---:|")
    print(f"| pytorch-fid get_activations | {theirs['torch']} | {theirs['seconds']:.1f} | {args.images / theirs['seconds']:.1f} |")
    print(f"| steerdiff folder_features | {torch.__version__} | {seconds:.1f} | {args.images / seconds:.1f} |")
    print(f"time ratio steerdiff / pytorch-fid: {seconds / theirs['seconds']:.3f}; features: max |difference| {diff:.3g} "
          f"(largest feature {scale:.3g}; equal: {torch.equal(ours, reference)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
