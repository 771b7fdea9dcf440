"""Benchmark results as JSON lines, a Markdown report and PNG plots of each metric against NFE.

- ``results.jsonl``: one record per cell (see :mod:`steerdiff.benchmark.runner`);
- ``table.md``: per (model, guidance) a scheduler x NFE table of each headline metric (``report.pivot``), then
  every cell in one table (all metrics, steps, network evaluations per sample, time);
- ``plots/<metric>.png``: the metric against NFE, one line per scheduler, one panel per (model, guidance);
- restoration runs (``steerdiff restore``): ``table.md``, one row per (task, method), :func:`restoration_table`.

With several seeds a table or plot entry is the mean over seeds.  A diverged cell shows as ``div@k`` (its
samples went non-finite at sampling step k), a skipped one as ``n/a``.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from ..atomic_io import atomic_write, atomic_write_text

HEADLINE = ("fd", "fid", "l2_error")


def write_results(root: Path, records: list[dict]) -> Path:
    return atomic_write_text(Path(root) / "results.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))


def load_results(path: str | Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _unique(values):
    return list(dict.fromkeys(values))


def metric_keys(records: list[dict]) -> list[str]:
    return _unique(k for r in records for k in r.get("metrics", {}))


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def _entry(group: list[dict], key: str) -> tuple[str, float | None]:
    """Table text and mean value over the seeds of one (model, guidance, scheduler, NFE)."""
    if any(r["status"] == "diverged" for r in group):
        return f"div@{min(r['diverged']['step'] for r in group if r['status'] == 'diverged')}", None
    if any(r["status"] == "failed" for r in group):
        return "failed", None
    if all(r["status"] == "skipped" for r in group):
        return "n/a", None
    values = [r["metrics"][key] for r in group if key in r.get("metrics", {})]
    if not values:
        return "", None
    mean = sum(values) / len(values)
    return _fmt(mean), mean


def _groups(records: list[dict]):
    table = defaultdict(list)
    for r in records:
        table[r["model"], r["guidance"], r["scheduler"], r["nfe"]].append(r)
    return table


def markdown_report(records: list[dict], pivot: list[str] | None = None, columns: list[str] | None = None, title: str = "benchmark") -> str:
    keys = metric_keys(records)
    pivot = [k for k in (pivot if pivot is not None else HEADLINE) if k in keys]
    columns = [k for k in (columns if columns is not None else keys) if k in keys]
    groups = _groups(records)
    models, guidance = _unique(r["model"] for r in records), _unique(r["guidance"] for r in records)
    schedulers, nfes = _unique(r["scheduler"] for r in records), sorted({r["nfe"] for r in records})
    lines = [f"# {title}", ""]
    done = [r for r in records if r["status"] in ("ok", "diverged")]
    if done:
        machine, versions = done[0]["machine"], done[0]["versions"]
        seconds = sum(r["timing"]["sample_seconds"] for r in done)
        lines += [
            f"{len(records)} cells; {sum(r['status'] == 'ok' for r in records)} ok, "
            f"{sum(r['status'] == 'diverged' for r in records)} diverged, {sum(r['status'] == 'skipped' for r in records)} skipped, "
            f"{sum(r['status'] == 'failed' for r in records)} failed. Sampling time (sum over cells and processes): {seconds:.0f} s.",
            f"Machine: {machine['cpu']} ({machine['cpu_count']} CPUs, device {machine['device']}); "
            + ", ".join(f"{k} {v}" for k, v in versions.items()) + ".",
            "",
        ]
    for key in pivot:
        for model in models:
            for guid in guidance:
                present = [groups[model, guid, s, n] for s in schedulers for n in nfes if (model, guid, s, n) in groups]
                if not any(key in r.get("metrics", {}) for group in present for r in group):
                    continue
                lines += [f"## {key}: {model}, {guid}", "", "| scheduler | " + " | ".join(f"NFE {n}" for n in nfes) + " |",
                          "|---|" + "---:|" * len(nfes)]
                for sched in schedulers:
                    cells = [_entry(groups[model, guid, sched, n], key)[0] if (model, guid, sched, n) in groups else "" for n in nfes]
                    lines.append(f"| {sched} | " + " | ".join(cells) + " |")
                lines.append("")
    lines += ["## All cells", "",
              "| model | guidance | scheduler | NFE | steps | evals/sample | " + " | ".join(columns) + " | s/sample | status |",
              "|---|---|---|---:|---:|---:|" + "---:|" * len(columns) + "---:|---|"]
    for r in records:
        evals = f"{r['network_calls']['evaluations_per_sample']:g}" if "network_calls" in r else ""
        vals = [_fmt(r["metrics"][k]) if k in r.get("metrics", {}) else "" for k in columns]
        per_sample = f"{r['timing']['seconds_per_sample']:.2e}" if "timing" in r else ""
        status = r["status"] if r["status"] != "diverged" else f"diverged@{r['diverged']['step']}"
        steps = "" if r.get("steps") is None else str(r["steps"])
        lines.append(f"| {r['model']} | {r['guidance']} | {r['scheduler']} | {r['nfe']} | {steps} | {evals} | "
                     + " | ".join(vals) + f" | {per_sample} | {status} |")
    return "\n".join(lines) + "\n"


def plot_metric(records: list[dict], key: str, path: str | Path, log_scale: bool = False) -> Path:
    """``key`` against NFE: one line per scheduler, one panel per (model, guidance)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = _groups(records)
    scored = [r for r in records if key in r.get("metrics", {})] or records
    models, guidance = _unique(r["model"] for r in scored), _unique(r["guidance"] for r in scored)
    schedulers, nfes = _unique(r["scheduler"] for r in records), sorted({r["nfe"] for r in records})
    fig, axes = plt.subplots(len(models), len(guidance), figsize=(4.2 * len(guidance), 3.4 * len(models)),
                             squeeze=False, sharex=True)
    for i, model in enumerate(models):
        for j, guid in enumerate(guidance):
            ax = axes[i][j]
            for sched in schedulers:
                pts = [(n, _entry(groups[model, guid, sched, n], key)[1]) for n in nfes if (model, guid, sched, n) in groups]
                pts = [(n, v) for n, v in pts if v is not None]
                if pts:
                    ax.plot(*zip(*pts), marker="o", ms=3, label=sched)
            ax.set_title(f"{model}, {guid}", fontsize=9)
            ax.set_xscale("log")
            ax.set_xticks(nfes, [str(n) for n in nfes])
            ax.minorticks_off()
            if log_scale:
                ax.set_yscale("log")
            ax.grid(alpha=0.3)
            if i == len(models) - 1:
                ax.set_xlabel("NFE")
            if j == 0:
                ax.set_ylabel(key)
    handles, labels = axes[0][0].get_legend_handles_labels()
    for row in axes:
        for ax in row:
            for h, lab in zip(*ax.get_legend_handles_labels()):
                if lab not in labels:
                    handles.append(h)
                    labels.append(lab)
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.07 if handles else 0, 1, 1))
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return Path(path)


def write_report(root: str | Path, records: list[dict], spec, title: str) -> list[Path]:
    """``table.md`` and ``plots/<metric>.png`` in the run folder ``root``."""
    root = Path(root)
    keys = metric_keys(records)
    out = [atomic_write_text(root / "table.md", markdown_report(records, spec.pivot, spec.table, title))]
    for key in [k for k in (spec.plots if spec.plots is not None else keys) if k in keys]:
        positive = all(v > 0 for r in records for k, v in r.get("metrics", {}).items() if k == key)
        out.append(plot_metric(records, key, root / "plots" / f"{key}.png", log_scale=key in spec.log_scale and positive))
    return out


RESTORATION_COLUMNS = [("psnr", "PSNR dB", "{:.2f}"), ("ssim", "SSIM", "{:.3f}"), ("fd", "FD", "{:.2f}"),
                       ("accuracy", "class acc.", "{:.3f}")]


def restoration_table(records: list[dict]) -> str:
    """The records of ``steerdiff restore`` (one per task and method) as a Markdown table, with the FD floor: what
    the original images themselves score."""
    cols = [c for c in RESTORATION_COLUMNS if any(c[0] in r for r in records)]
    head = ["task", "sigma_y", "method"] + [c[1] for c in cols] + ["network calls (fwd / bwd)", "time s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in records:
        if r.get("skipped"):
            cells = ["n/a"] * len(cols) + [r["skipped"], ""]
        else:
            cells = [fmt.format(r[key]) if key in r else "" for key, _, fmt in cols]
            cells += [f"{r['network_calls']} / {r['backward_calls']}", f"{r['wall_s']:.1f}"]
        lines.append("| " + " | ".join([r["task"], f"{r['sigma_y']:g}", r["method"]] + cells) + " |")
    floor = next((r for r in records if "fd_originals" in r), None)
    if floor is not None:  # FD is strongly biased upwards at small N: show what the originals themselves score
        lines += ["", f"FD of the {floor['num_images']} original images themselves: {floor['fd_originals']:.2f} "
                      "(the floor for this number of images; compare FDs with it, not with 0)"]
    return "\n".join(lines) + "\n"
