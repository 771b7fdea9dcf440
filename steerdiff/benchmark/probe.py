"""Count the real calls of a denoiser and find the first one that saw or produced NaN/Inf.

A forward hook on the network records, per call, the batch size and one finite/non-finite flag (kept on the
device as a tensor, so sampling is never synchronised with the host); :meth:`NetworkProbe.first_nonfinite_call`
reads the flags once, after sampling.  In a pipeline that calls the network once per loop iteration (every
diffusers-style pipeline; a CFG batch [uncond, cond] is one call), the call index is the sampling step.
"""

from __future__ import annotations

import torch

from ..pipelines.hooks import output_tensor


class NetworkProbe:
    """``with NetworkProbe(pipe.unet) as probe: pipe(...)``; then ``probe.calls``, ``probe.rows``,
    ``probe.first_nonfinite_call()``."""

    def __init__(self, module: torch.nn.Module):
        self.module = module
        self.calls = 0
        self.rows = 0
        self._finite: list[torch.Tensor] = []
        self._handle = None

    def _hook(self, module, args, kwargs, output) -> None:
        sample = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))  # UNets / transformers
        out = output_tensor(output)
        self.calls += 1
        self.rows += sample.shape[0]
        self._finite.append(torch.isfinite(sample).all() & torch.isfinite(out).all())

    def __enter__(self) -> "NetworkProbe":
        self._handle = self.module.register_forward_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()

    def first_nonfinite_call(self) -> int | None:
        """Index of the first call whose input or output held NaN/Inf, or None."""
        if not self._finite:
            return None
        bad = (~torch.stack(self._finite).cpu()).nonzero()
        return int(bad[0, 0]) if bad.numel() else None
