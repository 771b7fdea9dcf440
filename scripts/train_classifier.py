"""Train the digits classifier whose penultimate layer is the feature space of the digits Frechet distance.

Data: the 80% side of the fixed stratified split (seed 0) of scikit-learn's digits; accuracy is reported
on the held-out 20% (360 images).  Inputs go through the same 8-bit quantization as at evaluation time
(``steerdiff.metrics.classifier.quantize`` / ``dequantize``).

Augmentation: grey-level jitter only -- each pixel gets uniform noise of +-half a grey level
(+-1/16 in [-1, 1] units) before quantization.  The data sit on 17 grey levels while generated images
are continuous; the jitter keeps the features from keying on that lattice, without changing the digits'
shapes (no shifts, flips or rotations: the digits are size-normalised and centred).

Objective: cross-entropy, Adam with cosine learning-rate decay, dropout 0.3 before the last layer.
Output: ``--out`` (default: the shipped ``steerdiff/testbeds/assets/digits_classifier``) with
``config.json`` (architecture, accuracy, command) and ``model.safetensors``.

    python -m scripts.train_classifier
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from steerdiff.metrics.classifier import CLASSIFIER_PATH, DigitsClassifier, dequantize, quantize  # noqa: E402
from steerdiff.testbeds.digits import MAX_GREY_LEVEL, load_digits_data  # noqa: E402

HALF_GREY_LEVEL = 1.0 / MAX_GREY_LEVEL  # one grey level is 2/16 in [-1, 1] units


@torch.no_grad()
def accuracy(model: DigitsClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    pred = model(dequantize(quantize(images))).argmax(dim=1)
    return float((pred == labels).double().mean())


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=CLASSIFIER_PATH)
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--jitter", type=float, default=HALF_GREY_LEVEL, help="half-width of the uniform pixel jitter, in [-1, 1] units")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    if args.epochs < 1:
        p.error(f"--epochs must be >= 1, got {args.epochs}")
    if args.jitter < 0:
        p.error(f"--jitter must be >= 0, got {args.jitter}")
    return args


def main(argv=None) -> dict:
    from safetensors.torch import save_file

    args = parse_args(argv)
    t0 = time.perf_counter()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    x_train, y_train = load_digits_data("train")
    x_test, y_test = load_digits_data("test")
    model = DigitsClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    n = x_train.shape[0]
    steps_per_epoch = math.ceil(n / args.batch_size)
    total = args.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))

    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(n, generator=gen)
        running = 0.0
        for i in range(0, n, args.batch_size):
            idx = perm[i : i + args.batch_size]
            x = x_train[idx]
            if args.jitter > 0:
                x = x + (torch.rand(x.shape, generator=gen) * 2 - 1) * args.jitter
            x = dequantize(quantize(x.clamp(-1, 1)))
            loss = torch.nn.functional.cross_entropy(model(x), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            running += loss.item() * idx.numel()
        if (epoch + 1) % 10 == 0 or epoch + 1 == args.epochs:
            train_acc, test_acc = accuracy(model, x_train, y_train), accuracy(model, x_test, y_test)
            print(f"epoch {epoch + 1:3d}  loss {running / n:.4f}  train acc {train_acc:.4f}  test acc {test_acc:.4f}", flush=True)

    model.eval()
    test_acc = accuracy(model, x_test, y_test)
    train_acc = accuracy(model, x_train, y_train)
    wall = time.perf_counter() - t0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    config = {
        "_class_name": "DigitsClassifier",
        **model.config,
        "input": "float (N, 1, 8, 8) in [-1, 1], after 8-bit quantization u8 = round((x + 1) * 127.5), x = u8 / 127.5 - 1",
        "features": "penultimate layer (after SiLU), float64 via steerdiff.metrics.classifier.digits_features",
        "split": "sklearn load_digits, stratified 80/20 train_test_split, random_state=0",
        "train_accuracy": round(train_acc, 6),
        "test_accuracy": round(test_acc, 6),
        "num_test_images": int(x_test.shape[0]),
        "command": "python -m scripts.train_classifier " + " ".join(sys.argv[1:] if argv is None else argv),
        "wall_time_s": round(wall, 1),
        "torch": torch.__version__,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    n_test = x_test.shape[0]
    print(f"held-out accuracy {test_acc:.4f} ({round(test_acc * n_test)}/{n_test}); saved to {out}; wall time {wall:.1f} s", flush=True)
    return config


if __name__ == "__main__":
    main()
