"""Weights files: steerdiff reads safetensors only and never unpickles a file the user did not explicitly allow.

``PICKLE_SUFFIXES`` names the pickled formats it refuses; :func:`check_safetensors_folder` checks a diffusers
model folder (``config.json`` + ``*.safetensors``, each file complete: :func:`check_safetensors_file`) before
``from_pretrained(..., use_safetensors=True)`` reads it.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def check_safetensors_folder(folder: Path) -> None:
    """Refuse a model folder whose weights are not safetensors, naming the file found."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder {str(folder)!r} does not exist")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"model folder {str(folder)!r} has no config.json (diffusers' model folder format)")
    files = sorted(folder.glob("*.safetensors"))
    if files:
        for path in files:
            check_safetensors_file(path)
        return
    pickled = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickled:
        raise ValueError(
            f"model folder {str(folder)!r} holds only pickled weights ({', '.join(pickled)}); steerdiff loads "
            "safetensors only. Convert them once with safetensors.torch.save_file in a trusted environment."
        )
    raise FileNotFoundError(f"model folder {str(folder)!r} has no *.safetensors weights file")


def check_safetensors_file(path: Path) -> None:
    """Read the header of a safetensors file and check that the data it announces is all there, naming the file
    when it is empty, truncated or not safetensors at all (reading it would fail with a bare deserialisation error)."""
    path = Path(path)
    size = path.stat().st_size
    damaged = f"weights file {str(path)!r} is damaged ({{}}); replace it with a complete copy"
    if size < 8:
        raise ValueError(damaged.format(f"{size} bytes: empty or truncated"))
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > size - 8:
            raise ValueError(damaged.format("truncated, or not a safetensors file: its header runs past the end"))
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ValueError(damaged.format("not a safetensors file: its header is not JSON")) from None
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
    need = 8 + header_len + max(ends, default=0)
    if need > size:
        raise ValueError(damaged.format(f"truncated: {size} bytes, its header describes {need}"))
