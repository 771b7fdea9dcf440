"""Fixed against variable-step Adams-Bashforth weights, cell by cell, from a momentum_variable_* run folder.

For every momentum sampler run with both weights (labels "X (fixed)" and "X"), counts the cells (model, w, NFE)
where the variable weights give the lower solver error (mixture models, ``l2_error``) or FD (the others), and
prints them.

    python -m benchmarks.weights_comparison runs/benchmark/momentum_variable_vp
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path)
    args = p.parse_args(argv)
    records = [json.loads(line) for line in (args.run / "results.jsonl").read_text().splitlines() if line.strip()]
    ok = {(r["model"], r["scheduler"], r["guidance"], r["nfe"]): r for r in records if r["status"] != "skipped"}
    pairs = sorted({r["scheduler"][: -len(" (fixed)")] for r in records if r["scheduler"].endswith(" (fixed)")})
    print("| sampler | model | metric | variable better | cells |")
    print("|---|---|---|---|---|")
    for name in pairs:
        for model in sorted({r["model"] for r in records}):
            key = "l2_error" if model.startswith("mixture") else "fd"
            wins = total = 0
            for (m, s, g, n), r in ok.items():
                if m != model or s != name:
                    continue
                fixed = ok.get((m, f"{name} (fixed)", g, n))
                if fixed is None:
                    continue
                value = lambda rec: rec["metrics"][key] if rec["status"] == "ok" else float("inf")  # noqa: E731
                total += 1
                wins += value(r) < value(fixed)
            print(f"| {name} | {model} | {key} | {wins} | {total} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
