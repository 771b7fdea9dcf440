"""The noise floor of the digits Frechet distance: FD between two disjoint random halves of the digits data set
(898 vs 899 images) in the digits classifier's feature space, over several random splits.  A benchmark cell's FD
(1,000 samples against all 1,797 images) near this value is as good as the finite sample sizes can show.

    python benchmarks/fd_noise_floor.py [--splits 5]
"""

from __future__ import annotations

import argparse
import statistics

import torch

from steerdiff.metrics.classifier import digits_features
from steerdiff.metrics.frechet import frechet_distance_from_features
from steerdiff.metrics.precision_recall import precision_recall
from steerdiff.testbeds.digits import load_digits_data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--splits", type=int, default=5)
    args = parser.parse_args()
    images, _ = load_digits_data("all")
    features = digits_features(images)
    fds, prs = [], []
    for seed in range(args.splits):
        perm = torch.randperm(features.shape[0], generator=torch.Generator().manual_seed(seed))
        a, b = features[perm[: len(perm) // 2]], features[perm[len(perm) // 2 :]]
        fds.append(frechet_distance_from_features(a, b))
        prs.append(precision_recall(b, a))
        print(f"split {seed}: FD {fds[-1]:.4f}, precision {prs[-1][0]:.4f}, recall {prs[-1][1]:.4f}")
    print(f"FD between disjoint halves: mean {statistics.mean(fds):.4f}, sd {statistics.stdev(fds) if len(fds) > 1 else 0:.4f} "
          f"over {args.splits} splits")


if __name__ == "__main__":
    main()
