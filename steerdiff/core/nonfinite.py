"""Catching NaN/Inf in model outputs: the step, the timestep and how many samples, without needless host syncs.

:class:`NonFiniteWatch` is fed one tensor per sampling step (a model output, a guided prediction).  Its modes:

- ``"eager"``: raise at the step that produced the values (reads one flag per step: a sync on accelerators);
- ``"deferred"``: keep "first bad step", its timestep and its number of bad samples in device tensors and raise at
  :meth:`NonFiniteWatch.finish`, naming that step (one host read per run);
- ``"auto"``: eager for CPU tensors, where reading costs no sync, else deferred;
- ``"off"``: nothing (a benchmark that records divergence itself).

Rows are folded into samples: a tensor of ``k * batch`` rows (the unconditional and conditional halves of a CFG
batch) counts sample i as bad when any of its rows is, so the message counts samples, not rows.
"""

from __future__ import annotations

import torch

NONFINITE_CHECKS = ("auto", "eager", "deferred", "off")


def check_mode(mode: str) -> str:
    if mode not in NONFINITE_CHECKS:
        raise ValueError(f"nonfinite_check must be one of {NONFINITE_CHECKS}, got {mode!r}")
    return mode


def bad_samples(tensor: torch.Tensor, batch: int | None = None, row_samples: torch.Tensor | None = None) -> torch.Tensor:
    """bool (batch,): samples with a NaN/Inf value in any of their rows.  ``tensor`` has k * batch rows (sample i in
    rows i, batch + i, ...), or ``row_samples`` gives the sample of each row (a CFG batch whose unconditional rows
    cover some samples only, a perturbed prediction of some samples)."""
    bad = ~torch.isfinite(tensor.reshape(tensor.shape[0], -1)).all(dim=1)
    if row_samples is not None:
        counts = torch.zeros(batch, dtype=torch.long, device=bad.device)
        return counts.index_add_(0, row_samples.to(bad.device), bad.long()) > 0
    if batch is not None and bad.numel() != batch and bad.numel() % batch == 0:
        bad = bad.reshape(-1, batch).any(dim=0)
    return bad


def _flagged(tensors, batch: int | None, row_samples) -> torch.Tensor:
    """bool (batch,) of one tensor, or of several (the first is batched; a NaN/Inf in any other marks every sample:
    an adjoint's parameter states have no batch dimension)."""
    if isinstance(tensors, torch.Tensor):
        return bad_samples(tensors, batch, row_samples)
    first, *rest = tensors
    bad = bad_samples(first, batch, row_samples)
    if rest:
        others = torch.stack([~torch.isfinite(t).all() for t in rest]).any()
        bad = bad | others
    return bad


class NonFiniteWatch:
    """See the module docstring.  ``what`` names the watched quantity in the message; ``total`` is the number of
    steps of the run (for the message)."""

    def __init__(self, mode: str = "auto", what: str = "the model output", total: int | None = None, unit: str = "step"):
        self.mode, self.what, self.total, self.unit = check_mode(mode), what, total, unit
        self._first: torch.Tensor | None = None
        self._timestep: torch.Tensor | None = None
        self._count: torch.Tensor | None = None
        self._batch = 0

    def reset(self) -> None:
        self._first = self._timestep = self._count = None

    @property
    def first_step(self) -> torch.Tensor | None:
        """Device tensor: the first bad step so far, -1 if none (deferred mode; None before the first update)."""
        return self._first

    def _message(self, step: int, timestep: float | None, count: int) -> str:
        of = f" of {self.total}" if self.total is not None else ""
        at = f" (timestep {timestep:g})" if timestep is not None else ""
        return f"{self.what} holds NaN/Inf at {self.unit} {step}{of}{at} in {count} of {self._batch} samples"

    def update(self, step: int, tensor, timestep=None, batch: int | None = None,
               row_samples: torch.Tensor | None = None) -> None:
        """Watch ``tensor`` (rows folded into ``batch`` samples, or mapped by ``row_samples``; or a sequence of tensors,
        the first batched) produced at ``step`` / ``timestep``."""
        mode = self.mode
        if mode == "off":
            return
        first = tensor if isinstance(tensor, torch.Tensor) else tensor[0]
        self._batch = batch or first.shape[0]
        if mode == "eager" or (mode == "auto" and first.device.type == "cpu"):
            # a sum is NaN/Inf whenever an entry is (and, rarely, on overflow): one cheap pass, then the exact count
            sums = [tensor.sum()] if isinstance(tensor, torch.Tensor) else [t.sum() for t in tensor]
            if not bool(torch.isfinite(torch.stack(sums)).all()):
                count = int(_flagged(tensor, batch, row_samples).sum())
                if count:
                    t = None if timestep is None else float(torch.as_tensor(timestep).reshape(-1)[0])
                    raise FloatingPointError(self._message(step, t, count))
            return
        bad = _flagged(tensor, batch, row_samples)
        found = bad.any()
        if self._first is None:
            device = first.device
            self._first = torch.full((), -1, dtype=torch.long, device=device)
            self._timestep = torch.full((), float("nan"), dtype=torch.float64, device=device)
            self._count = torch.zeros((), dtype=torch.long, device=device)
        new = found & (self._first < 0)
        self._first = torch.where(new, step, self._first)
        self._count = torch.where(new, bad.sum(), self._count)
        if timestep is not None:
            t = torch.as_tensor(timestep, device=first.device).reshape(-1)[0].to(torch.float64)
            self._timestep = torch.where(new, t, self._timestep)

    def finish(self, describe=None) -> None:
        """Raise for a deferred run that saw NaN/Inf (the one host read of such a run); ``describe(step)`` words the
        error where the caller knows more about the step than its number (the adjoint's states and clocks)."""
        if self._first is None:
            return
        step = int(self._first)
        if step >= 0:
            if describe is not None:
                raise FloatingPointError(describe(step))
            t = float(self._timestep)
            raise FloatingPointError(
                self._message(step, None if t != t else t, int(self._count))
                + "; found at the end of the run because the check does not synchronise with the device each step "
                "(nonfinite_check='eager' stops at the bad step)"
            )


def finish_earliest(*watches: NonFiniteWatch) -> None:
    """Finish deferred watches of one run, raising for the one whose NaN/Inf came first; a tie goes to the watch
    given first (a bad model output at step i also spoils the update made from it at step i).  One host read."""
    found = [w for w in watches if w.first_step is not None]  # watches that deferred something
    if not found:
        return
    device = found[0].first_step.device
    steps = torch.stack([w.first_step.to(device) for w in found]).tolist()
    bad = [(step, k) for k, step in enumerate(steps) if step >= 0]
    if bad:
        found[min(bad)[1]].finish()  # raises


__all__ = ["NONFINITE_CHECKS", "NonFiniteWatch", "bad_samples", "check_mode", "finish_earliest"]
