"""Count the real calls of a denoiser and find the first sampling step that saw or produced NaN/Inf.

A forward hook on the network records, per call, the batch size, the first call whose input or output held NaN/Inf
(a deferred :class:`~steerdiff.core.nonfinite.NonFiniteWatch`, kept on the device, so sampling is never
synchronised with the host) and the scheduler's step index at that call (a Python
number the scheduler keeps; no device read).  :meth:`NetworkProbe.first_nonfinite_step` reads the flags once, after
sampling, and names the step, also in pipelines that call the network twice per step (Flux with true CFG,
Qwen-Image, Wan), where the call index is not the step.
"""

from __future__ import annotations

import torch

from ..core.nonfinite import NonFiniteWatch
from ..pipelines.hooks import output_tensor


class NetworkProbe:
    """``with NetworkProbe(pipe.unet, pipe.scheduler) as probe: pipe(...)``; then ``probe.calls``, ``probe.rows``,
    ``probe.first_nonfinite_step()`` (``first_nonfinite_call()``)."""

    def __init__(self, module: torch.nn.Module, scheduler=None):
        self.module = module
        self.scheduler = scheduler
        self.calls = 0
        self.rows = 0
        self._watch = NonFiniteWatch("deferred", "the network's input or output")  # by call index; read, never raised
        self._steps: list[int] = []
        self._handle = None

    def _step(self) -> int:
        """The sampling step the pipeline is at: its scheduler's step index (the begin index before its first step);
        schedulers that keep none (DDIM, PNDM, DDPM count nothing) call the network once per step: the call index."""
        if not hasattr(self.scheduler, "step_index"):
            return self.calls - 1
        index = self.scheduler.step_index
        if index is None:
            index = getattr(self.scheduler, "begin_index", None) or 0
        return int(index)

    def _hook(self, module, args, kwargs, output) -> None:
        sample = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))  # UNets / transformers
        out = output_tensor(output)
        self.calls += 1
        self.rows += sample.shape[0]
        self._watch.update(self.calls - 1, [out, sample])
        self._steps.append(self._step() if self.scheduler is not None else self.calls - 1)

    def __enter__(self) -> "NetworkProbe":
        self._handle = self.module.register_forward_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()

    def first_nonfinite_call(self) -> int | None:
        """Index of the first call whose input or output held NaN/Inf, or None."""
        first = self._watch.first_step
        if first is None:
            return None
        call = int(first)
        return call if call >= 0 else None

    def first_nonfinite_step(self) -> int | None:
        """The sampling step of that call (its call index when no scheduler was given), or None."""
        call = self.first_nonfinite_call()
        return None if call is None else self._steps[call]
