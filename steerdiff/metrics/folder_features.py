"""Features of a folder of image files, fast and resumable: what ``steerdiff fid`` computes for each folder.

- The folder is read recursively (``.png``, ``.jpg`` / ``.jpeg``, ``.webp``), files in sorted order of their relative
  paths.  Every file's header is read first: an unreadable file is an error naming it; images of several sizes are
  reported (each is resized to the network's input as the preprocessing mode says, one image at a time).
- Images are decoded (and, for mixed sizes or the clean mode, resized) in a ``torch.utils.data.DataLoader`` with
  ``num_workers`` worker processes, and the network runs on batches of ``batch_size`` (:meth:`~steerdiff.metrics.features.NetworkFeatures.features_of_resized`),
  with a progress bar.
- Features are cached in ``cache_dir/folders/`` under a key of the feature space (its weights' hash, mode, dtype) and
  of the folder's content (every file's relative path and the SHA-256 of its bytes), so a changed file or network
  never reuses stale features and a renamed folder still hits the cache.
- Under ``accelerate launch`` the files are split into fixed chunks of ``CHUNK_BATCHES`` batches that the processes
  share round-robin (the benchmark's sharding); each process writes its chunks' features, the main process joins
  them in file order.  Batches are the same whatever the process count, so the features are too.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..atomic_io import atomic_write
from .features import NetworkFeatures, default_cache_dir, image_sizes
from .preprocessing import resize_for_network

FOLDER_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
CHUNK_BATCHES = 20  # batches per shard chunk


def list_images(folder: str | Path) -> list[Path]:
    """Image files under ``folder`` (recursively), sorted by relative path; an empty folder is an error."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"{str(root)!r} is neither a folder of images nor a statistics file (.npz)")
    files = sorted((p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in FOLDER_SUFFIXES),
                   key=lambda p: p.relative_to(root).as_posix())
    if not files:
        raise ValueError(f"folder {str(root)!r} holds no images ({', '.join(FOLDER_SUFFIXES)}, searched recursively)")
    return files


class ResizedImages(torch.utils.data.Dataset):
    """File i decoded as 8-bit RGB (uint8 (3, H, W)), and with ``resize`` resized to the network's input by the
    preprocessing mode (float32 (3, S, S)).  Images of one size are resized in batches in the main process (as
    pytorch-fid does: the workers then pass small uint8 images); mixed sizes, and clean-fid's per-channel PIL resize,
    are resized here in the workers."""

    def __init__(self, files: list[Path], size: int, mode: str, resize: bool = True):
        self.files, self.size, self.mode, self.resize = files, size, mode, resize

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        from PIL import Image

        try:
            with Image.open(self.files[i]) as im:
                pixels = np.asarray(im.convert("RGB"))
        except OSError as err:  # a header that reads and pixels that do not (a truncated file)
            raise ValueError(f"{str(self.files[i])!r} is not a readable image ({err})") from None
        u8 = torch.from_numpy(pixels.copy()).permute(2, 0, 1)
        return resize_for_network(u8[None], self.size, self.mode)[0] if self.resize else u8.contiguous()


def content_key(space: NetworkFeatures, root: Path, files: list[Path]) -> str:
    """Identifies (feature space, every file's relative path and bytes)."""
    h = hashlib.sha256(space.key().encode())
    for f in files:
        h.update(f.relative_to(root).as_posix().encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


def _compute(space: NetworkFeatures, files: list[Path], indices: range, num_workers: int, bar,
             in_workers: bool) -> torch.Tensor:
    data = torch.utils.data.Subset(ResizedImages(files, space.input_size, space.mode, resize=in_workers), list(indices))
    loader = torch.utils.data.DataLoader(data, batch_size=space.batch_size, shuffle=False, num_workers=num_workers)
    out = []
    for batch in loader:
        resized = batch if in_workers else resize_for_network(batch, space.input_size, space.mode)
        out.append(space.features_of_resized(resized))
        bar.update(batch.shape[0])
    return torch.cat(out)


def folder_features(folder: str | Path, space: NetworkFeatures, num_workers: int = 0, cache_dir: str | Path | None = None,
                    use_cache: bool = True, progress: bool = True, shard=None, log=print) -> torch.Tensor:
    """Features (float64 (N, d)) of every image under ``folder`` in ``space`` (module docstring)."""
    root = Path(folder).expanduser()
    files = list_images(root)
    sizes = Counter(image_sizes(files))
    if len(sizes) > 1:
        listed = ", ".join(f"{n} at {w}x{h}" for (w, h), n in sorted(sizes.items(), key=lambda kv: -kv[1])[:4])
        log(f"{root}: images of {len(sizes)} sizes ({listed}); each is resized to {space.input_size}x"
            f"{space.input_size} by the {space.mode} preprocessing")
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = content_key(space, root, files) if use_cache else f"uncached-{space.key()}"
    path = cache / "folders" / f"{root.name}-{key}.npz"
    if use_cache and path.is_file():
        with np.load(path, allow_pickle=False) as f:
            return torch.from_numpy(f["features"])
    from ..benchmark.sharding import chunk_bounds

    shard = shard if shard is not None else _single_process()
    chunks = chunk_bounds(len(files), space.batch_size * CHUNK_BATCHES)
    parts = path.with_suffix(".parts")
    mine = [k for k in range(len(chunks)) if shard.owns(k)]
    with tqdm(total=sum(chunks[k][1] - chunks[k][0] for k in mine), desc=f"features {root.name}", unit="image",
              disable=not (progress and shard.is_main)) as bar:
        results = {}
        for k in mine:
            start, stop = chunks[k]
            results[k] = _compute(space, files, range(start, stop), num_workers, bar,
                                  in_workers=len(sizes) > 1 or space.mode == "clean")
            if shard.world_size > 1:
                atomic_write(parts / f"{k:06d}.npy", lambda tmp, a=results[k].numpy(): _save(tmp, np.save, a))
    shard.barrier()
    if shard.world_size > 1:
        results = {k: torch.from_numpy(np.load(parts / f"{k:06d}.npy", allow_pickle=False)) for k in range(len(chunks))}
        shard.barrier()  # every process has read every part
    features = torch.cat([results[k] for k in range(len(chunks))])
    if use_cache and shard.is_main:
        atomic_write(path, lambda tmp: _save(tmp, np.savez, features=features.numpy()))
    if shard.is_main and parts.is_dir():
        for p in sorted(parts.glob("*.npy")):
            p.unlink()
        parts.rmdir()
    return features


def _save(tmp: Path, save, *args, **kwargs) -> None:
    with open(tmp, "wb") as f:  # through a handle: numpy would append a suffix to the temporary name
        save(f, *args, **kwargs)


def _single_process():
    from ..benchmark.sharding import Shard

    return Shard()


__all__ = ["FOLDER_SUFFIXES", "ResizedImages", "content_key", "folder_features", "list_images"]
