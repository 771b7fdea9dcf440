"""The machine and the package versions a benchmark ran with, recorded with every result."""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata

import torch
from .. import __version__

PACKAGES = ("steerdiff", "torch", "diffusers", "accelerate", "numpy", "scipy", "safetensors")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device | str | None = None) -> dict:
    device = torch.device(device or "cpu")
    info = {
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def package_versions() -> dict[str, str]:
    versions = {"python": sys.version.split()[0]}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            if name == "steerdiff":
                versions[name] = __version__
    return versions
