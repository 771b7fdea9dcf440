"""Convert pytorch-fid's FID Inception weights (pt_inception-2015-12-05-6726825d.pth) to safetensors, once.

    python scripts/convert_inception_weights.py pt_inception-2015-12-05-6726825d.pth fid_inception.safetensors

The .pth file is read with ``torch.load(weights_only=True)`` (tensors only, no code is run), checked against
the FID Inception-v3 key layout (:mod:`steerdiff.metrics.inception`), and written as safetensors; point a
benchmark's ``fid`` metric at the result: ``{name: fid, kwargs: {weights: fid_inception.safetensors}}``.
"""

from __future__ import annotations

import argparse

from safetensors.torch import save_file

from steerdiff.metrics.inception import load_fid_inception


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="the .pth weights file")
    parser.add_argument("target", help="the .safetensors file to write")
    args = parser.parse_args()
    model = load_fid_inception(args.source, allow_pickle=True)  # validates every key and shape
    state = {k: v.contiguous() for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    save_file(state, args.target)
    print(f"wrote {args.target} ({len(state)} tensors)")


if __name__ == "__main__":
    main()
