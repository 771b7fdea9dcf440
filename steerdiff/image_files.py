"""Images on disk with their settings: the grid of a run, PNGs carrying their settings in text chunks, and reading
back an image an earlier run made with the same settings."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo


def image_grid(images: np.ndarray, rows: int, upscale: int = 1, gap: int = 1) -> Image.Image:
    """Tile (N, H, W, C) images in [0, 1] into ``rows`` rows, each nearest-neighbour upscaled, with ``gap`` white
    pixels between cells (so that neighbouring images do not run together)."""
    n, h, w, c = images.shape
    cols = -(-n // rows)
    big = np.repeat(np.repeat(images, upscale, axis=1), upscale, axis=2) if upscale > 1 else images
    hh, ww = h * upscale, w * upscale
    grid = np.ones((rows * hh + (rows - 1) * gap, cols * ww + (cols - 1) * gap, c), dtype=np.float64)
    for i, img in enumerate(big):
        r, k = divmod(i, cols)
        top, left = r * (hh + gap), k * (ww + gap)
        grid[top : top + hh, left : left + ww] = img
    return to_pil(grid)


def tensor_grid(images: torch.Tensor, rows: int, upscale: int = 1) -> Image.Image:
    """:func:`image_grid` of (N, C, H, W) tensor images in model space [-1, 1] (clipped to it)."""
    pixels = ((images.detach().to("cpu", torch.float32).clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy()
    return image_grid(pixels, rows=rows, upscale=upscale)


def to_pil(image: np.ndarray) -> Image.Image:
    """(H, W, C) in [0, 1] -> an 8-bit PIL image (grey for one channel)."""
    u8 = (np.asarray(image, dtype=np.float64) * 255).round().clip(0, 255).astype(np.uint8)
    return Image.fromarray(u8[..., 0] if u8.shape[-1] == 1 else u8)


def png_info(settings: dict[str, Any]) -> PngInfo:
    """PNG text chunks: ``steerdiff`` (all settings as JSON) and one chunk per main setting."""
    info = PngInfo()
    info.add_text("steerdiff", json.dumps(settings, sort_keys=True))
    for key in ("model", "prompt", "negative_prompt", "class_label", "seed", "steps"):
        if settings.get(key) is not None:
            info.add_text(key, str(settings[key]))
    for key in ("scheduler", "guidance"):
        if settings.get(key) is not None:
            info.add_text(key, json.dumps(settings[key], sort_keys=True))
    return info


def finished_image(path: Path, settings: dict[str, Any]) -> np.ndarray | None:
    """The image at ``path`` (H, W, C) in [0, 1] if an earlier run wrote it with these exact settings, else None."""
    if not path.is_file():
        return None
    try:
        with Image.open(path) as im:
            if json.loads(im.text.get("steerdiff", "null")) != json.loads(json.dumps(settings)):
                return None
            pixels = np.asarray(im, dtype=np.float64) / 255
    except (OSError, ValueError):
        return None  # unreadable or damaged: made again
    return pixels[..., None] if pixels.ndim == 2 else pixels


def images_folder(output: Path) -> Path:
    """Where the images and manifest of the grid ``output`` go: the folder beside it named after it."""
    return output.with_suffix("")
