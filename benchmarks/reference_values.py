"""Reference values for reading the digits benchmarks (configs/benchmark/baselines.yaml):

1. the noise floor of the digits Frechet distance: FD (and precision/recall) between two disjoint random halves
   of the digits data set (898 vs 899 images) in the digits classifier's feature space, over several splits;
2. what exact samples of the analytic mixture score: FD of 1,000 class-balanced samples drawn exactly from the
   fitted mixture (``GaussianMixtureDenoiser.sample``) against the data set, and their mean exact
   log-likelihood log p(x | c) -- the values an ODE sampler at guidance 1 converges to as its error vanishes.

3. the floor at a benchmark's sample count N (``--samples``): FD between N random data images and the other
   1,797 - N (disjoint), next to the FD of N exact mixture samples against the whole set.

    python -m benchmarks.reference_values [--splits 5] [--samples 500]
"""

from __future__ import annotations

import argparse
import statistics

import torch

from steerdiff.metrics.classifier import digits_features
from steerdiff.metrics.frechet import frechet_distance_from_features
from steerdiff.metrics.likelihood import mixture_log_likelihood
from steerdiff.metrics.precision_recall import precision_recall
from steerdiff.testbeds.digits import load_digits_data
from steerdiff.testbeds.mixture import fit_digits_mixture


def _summary(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"mean {statistics.mean(values):.4f}, sd {sd:.4f} over {len(values)}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--splits", type=int, default=5)
    parser.add_argument("--samples", type=int, default=1000, help="samples per benchmark cell (N)")
    args = parser.parse_args()
    images, _ = load_digits_data("all")
    features = digits_features(images)
    fds = []
    for seed in range(args.splits):
        perm = torch.randperm(features.shape[0], generator=torch.Generator().manual_seed(seed))
        a, b = features[perm[: len(perm) // 2]], features[perm[len(perm) // 2 :]]
        fds.append(frechet_distance_from_features(a, b))
        p, r = precision_recall(b, a)
        print(f"halves, split {seed}: FD {fds[-1]:.4f}, precision {p:.4f}, recall {r:.4f}")
    print(f"FD between disjoint halves of the digits set: {_summary(fds)} splits")
    n = args.samples
    if not 1 < n < features.shape[0] - 1:
        parser.error(f"--samples must be in 2..{features.shape[0] - 2}, got {n}")
    rest = []
    for seed in range(args.splits):
        perm = torch.randperm(features.shape[0], generator=torch.Generator().manual_seed(seed))
        rest.append(frechet_distance_from_features(features[perm[:n]], features[perm[n:]]))
    print(f"FD between {n} random digits and the other {features.shape[0] - n}: {_summary(rest)} splits")

    mixture = fit_digits_mixture()
    labels = torch.arange(n) % 10
    mix_fd, mix_ll = [], []
    for seed in range(args.splits):
        gens = [torch.Generator().manual_seed(seed * 100_000 + i) for i in range(n)]
        x = mixture.sample(class_labels=labels, generator=gens)
        mix_fd.append(frechet_distance_from_features(digits_features(x), features))
        mix_ll.append(float(mixture_log_likelihood(mixture, x, labels).mean()))
    print(f"exact mixture samples ({n}, class-balanced) vs the digits set: FD {_summary(mix_fd)} draws")
    print(f"their exact log-likelihood log p(x | c): {_summary(mix_ll)} draws (nats per image)")


if __name__ == "__main__":
    main()
