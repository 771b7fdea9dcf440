"""The run folder: everything a benchmark writes, each file written atomically so a killed run can resume.

    <output_dir>/
      config.yaml                       the validated config of the last invocation
      cells/<cell_id>/chunk_00003.safetensors   samples 3B..4B-1 of the cell (+ call counts, timing)
      cells/<cell_id>/chunk_00003.error.json    a chunk that raised (retried on the next run)
      cells/<cell_id>/record.json       the finished cell: config, metrics, NFE, calls, time, machine
      references/<key>-....safetensors  reference solutions shared by cells with the same noise
      results.jsonl  table.md  plots/<metric>.png
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from ..atomic_io import atomic_save_safetensors, atomic_write_json
from ..weights import check_safetensors_file

FINISHED = ("ok", "diverged", "skipped")


@dataclass
class Chunk:
    samples: torch.Tensor
    labels: torch.Tensor
    calls: int
    rows: int
    first_nonfinite_step: int | None  # the sampling step of the first call that saw or made NaN/Inf
    seconds: float
    rank: int = 0


def _read_json(path: Path, remedy: str) -> dict:
    """A JSON file of the run folder, or a ValueError naming it and what to do (delete it, then ``remedy``)."""
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{str(path)!r} is damaged (not complete JSON: {err}); delete it and {remedy}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{str(path)!r} is damaged (not a JSON object); delete it and {remedy}")
    return value


class RunFolder:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def cell_dir(self, cell_id: str) -> Path:
        return self.root / "cells" / cell_id

    def chunk_path(self, cell_id: str, k: int) -> Path:
        return self.cell_dir(cell_id) / f"chunk_{k:05d}.safetensors"

    def error_path(self, cell_id: str, k: int) -> Path:
        return self.cell_dir(cell_id) / f"chunk_{k:05d}.error.json"

    def record_path(self, cell_id: str) -> Path:
        return self.cell_dir(cell_id) / "record.json"

    # -- chunks -------------------------------------------------------------------------------------
    def has_chunk(self, cell_id: str, k: int) -> bool:
        return self.chunk_path(cell_id, k).is_file()

    def save_chunk(self, cell_id: str, k: int, chunk: Chunk) -> None:
        meta = {
            "calls": str(chunk.calls),
            "rows": str(chunk.rows),
            "first_nonfinite_step": "" if chunk.first_nonfinite_step is None else str(chunk.first_nonfinite_step),
            "seconds": repr(chunk.seconds),
            "rank": str(chunk.rank),
        }
        atomic_save_safetensors(self.chunk_path(cell_id, k), {"samples": chunk.samples, "labels": chunk.labels}, meta)
        self.error_path(cell_id, k).unlink(missing_ok=True)

    def load_chunk(self, cell_id: str, k: int) -> Chunk:
        path = self.chunk_path(cell_id, k)
        try:
            check_safetensors_file(path)
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata()
                samples, labels = f.get_tensor("samples"), f.get_tensor("labels")
        except Exception as err:  # noqa: BLE001 - any read failure means the same to the user
            raise ValueError(f"chunk file {str(path)!r} cannot be read ({err}); delete it and run again to regenerate "
                             "those samples") from None
        # chunks written before this field held the step stored the call index (the step for one call per step)
        first = meta.get("first_nonfinite_step", meta.get("first_nonfinite_call", ""))
        return Chunk(samples, labels, int(meta["calls"]), int(meta["rows"]), int(first) if first else None,
                     float(meta["seconds"]), int(meta["rank"]))

    def save_chunk_error(self, cell_id: str, k: int, message: str) -> None:
        atomic_write_json(self.error_path(cell_id, k), {"chunk": k, "error": message})

    def chunk_error(self, cell_id: str, k: int) -> str | None:
        path = self.error_path(cell_id, k)
        return _read_json(path, "run again to retry the chunk")["error"] if path.is_file() else None

    def delete_chunks(self, cell_id: str) -> None:
        for path in self.cell_dir(cell_id).glob("chunk_*.safetensors"):
            path.unlink()

    # -- records ------------------------------------------------------------------------------------
    def load_record(self, cell_id: str) -> dict | None:
        path = self.record_path(cell_id)
        return _read_json(path, "run again to recompute the cell") if path.is_file() else None

    def save_record(self, cell_id: str, record: dict) -> None:
        atomic_write_json(self.record_path(cell_id), record)
