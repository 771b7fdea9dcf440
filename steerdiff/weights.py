"""Weights files: steerdiff reads safetensors only and never unpickles a file the user did not explicitly allow.

``PICKLE_SUFFIXES`` names the pickled formats it refuses; :func:`check_safetensors_folder` checks a diffusers
model folder (``config.json`` + ``*.safetensors``) before ``from_pretrained(..., use_safetensors=True)`` reads it.
"""

from __future__ import annotations

from pathlib import Path

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def check_safetensors_folder(folder: Path) -> None:
    """Refuse a model folder whose weights are not safetensors, naming the file found."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder {str(folder)!r} does not exist")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"model folder {str(folder)!r} has no config.json (diffusers' model folder format)")
    if any(folder.glob("*.safetensors")):
        return
    pickled = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickled:
        raise ValueError(
            f"model folder {str(folder)!r} holds only pickled weights ({', '.join(pickled)}); steerdiff loads "
            "safetensors only. Convert them once with safetensors.torch.save_file in a trusted environment."
        )
    raise FileNotFoundError(f"model folder {str(folder)!r} has no *.safetensors weights file")
