"""``watch_nonfinite(pipe)``: stop any diffusers pipeline at the first denoiser output holding NaN/Inf, naming the
step and the timestep, without changing what the pipeline computes.

A forward hook on each denoiser of the pipeline (``unet``, ``transformer``, ``transformer_2``) feeds its output to a
:class:`~steerdiff.core.nonfinite.NonFiniteWatch` ("auto": raises at the step on CPU, at the end of the call on an
accelerator, one host read per call).  Steps are counted per ``set_timesteps`` of the pipeline's scheduler, so a
step is the sampler's step, not the network call (a pipeline calling its network twice per step counts it once).
"""

from __future__ import annotations

import functools
from contextlib import contextmanager

import torch

from ..core.nonfinite import NonFiniteWatch
from .hooks import DENOISERS, output_tensor


@contextmanager
def watch_nonfinite(pipe, mode: str = "auto", what: str = "the denoiser output"):
    """Context manager: see the module docstring.  Removes its hooks on exit, also on an exception."""
    watch = NonFiniteWatch(mode, what=what)
    state = {"step": -1, "last_t": None}
    handles = []

    def on_forward(module, args, kwargs, output):
        t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        key = None if t is None else float(torch.as_tensor(t).reshape(-1)[0]) if torch.as_tensor(t).device.type == "cpu" else id(t)
        if key is None or key != state["last_t"]:
            state["step"] += 1
            state["last_t"] = key
        watch.update(state["step"], output_tensor(output), timestep=t)

    for name in DENOISERS:
        module = getattr(pipe, name, None)
        if isinstance(module, torch.nn.Module):
            handles.append(module.register_forward_hook(on_forward, with_kwargs=True))
    scheduler = getattr(pipe, "scheduler", None)
    original = getattr(scheduler, "set_timesteps", None)
    patched_before = scheduler is not None and "set_timesteps" in vars(scheduler)  # e.g. by guide()

    def set_timesteps(*args, **kwargs):  # a new sampling run: steps count from 0 again (wraps keeps the signature
        # that pipelines inspect: retrieve_timesteps asks whether set_timesteps takes sigmas=)
        watch.finish()
        watch.reset()
        state.update(step=-1, last_t=None)
        return original(*args, **kwargs)

    if original is not None:
        scheduler.set_timesteps = functools.wraps(original)(set_timesteps)
    try:
        yield watch
        watch.finish()
    finally:
        for h in handles:
            h.remove()
        if original is not None:
            if patched_before:
                scheduler.set_timesteps = original
            else:
                del scheduler.set_timesteps


__all__ = ["watch_nonfinite"]
