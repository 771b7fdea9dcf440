"""The device a command runs on, checked before any work: a string torch does not know, or a device this machine
does not have, is a clear error naming the ``device`` field and the allowed values."""

from __future__ import annotations

import torch


def check_device(name: str, field: str = "device") -> torch.device:
    """``torch.device(name)`` when this machine has it, else a ValueError naming ``field``."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"{field}: {name!r} is not a torch device; use cpu, cuda, cuda:<index> or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{field}: {name!r} asked for, but this machine has no CUDA device; use cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"{field}: {name!r} asked for, but this machine has {torch.cuda.device_count()} CUDA devices")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{field}: {name!r} asked for, but MPS is not available on this machine; use cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"{field}: {name!r} is not supported; use cpu, cuda, cuda:<index> or mps")
    return device


__all__ = ["check_device"]
