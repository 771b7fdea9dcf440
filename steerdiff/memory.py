"""Deterministic memory accounting of autograd graphs: bytes of tensors saved for backward.

:class:`SavedTensorMeter` installs ``torch.autograd.graph.saved_tensors_hooks``: every tensor an operation saves
for its backward pass is counted while the graph holds it (until the backward pass frees it or the graph is
dropped).  Storages are counted once however many operations save them (views included), and tensors to
``exclude`` (the model's weights, which exist anyway) are not counted.  The peak is a property of the
computation, not of the allocator, so it is the same on every run and every device; on CUDA
``torch.cuda.max_memory_allocated`` measures the allocator's side.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def _storage_key(t: torch.Tensor) -> tuple[str, int]:
    return (str(t.device), t.untyped_storage().data_ptr())


class _Held:
    """What the pack hook returns: counts its storage while alive."""

    __slots__ = ("tensor", "meter", "key")

    def __init__(self, tensor: torch.Tensor, meter: "SavedTensorMeter", key):
        self.tensor, self.meter, self.key = tensor.detach(), meter, key  # detached: no cycle through grad_fn
        if key is not None:
            meter._acquire(key, tensor.untyped_storage().nbytes())

    def __del__(self):
        if self.key is not None:
            self.meter._release(self.key)


class SavedTensorMeter:
    """``with SavedTensorMeter(exclude=model.parameters()) as meter: ...``; then ``meter.peak_bytes``.

    ``current_bytes`` is what live graphs hold now, ``peak_bytes`` the maximum since entry, ``total_bytes`` the
    sum over every save (with repeats).
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = ()):
        self._excluded = {_storage_key(t) for t in exclude}
        self._live: dict[tuple[str, int], list[int]] = {}  # key -> [references, nbytes]
        self.current_bytes = 0
        self.peak_bytes = 0
        self.total_bytes = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _acquire(self, key, nbytes: int) -> None:
        self.total_bytes += nbytes
        entry = self._live.get(key)
        if entry is None:
            self._live[key] = [1, nbytes]
            self.current_bytes += nbytes
            self.peak_bytes = max(self.peak_bytes, self.current_bytes)
        else:
            entry[0] += 1

    def _release(self, key) -> None:
        entry = self._live[key]
        entry[0] -= 1
        if entry[0] == 0:
            self.current_bytes -= entry[1]
            del self._live[key]

    def _pack(self, tensor: torch.Tensor) -> _Held:
        key = _storage_key(tensor)
        return _Held(tensor, self, None if key in self._excluded else key)

    @staticmethod
    def _unpack(held: _Held) -> torch.Tensor:
        return held.tensor

    def __enter__(self) -> "SavedTensorMeter":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)


__all__ = ["SavedTensorMeter"]
