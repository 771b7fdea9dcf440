"""Any steerdiff guidance rule as a k-diffusion denoiser wrapper (k-diffusion's ``CFGDenoiser`` pattern).

    denoiser = GuidedDenoiser(model, APG(7.5, eta=0.0), process=NoiseSchedule.from_config(pipe.scheduler.config))
    x = sample_ghvb(denoiser, x, sigmas, extra_args={"cond": c, "uncond": uc})     # or any k-diffusion sampler

``model(x, sigma, cond=..., **extra_args)`` is a k-diffusion denoiser (it returns x0).  At each call the rule says
which rows it needs (:func:`steerdiff.core.guidance_protocol.apply_rule`): the conditional and unconditional rows
run in one call on [uncond rows; cond] (k-diffusion's CFGDenoiser layout), each perturbed prediction the rule
declares in its own call on the conditional inputs, and rows the rule does not need are not run.  The rule combines
the denoised predictions (parametrization "sample"), converting to its own space where it declares one.

The rule's noise levels (``process``):

- a VP :class:`~steerdiff.core.NoiseSchedule` (the model's training schedule): k-diffusion's sigma is sigma_bar, so
  the rule sees alpha = 1 / sqrt(1 + sigma^2), sigma_vp = sigma alpha, x_vp = alpha x and the timestep
  t(sigma_bar) of the schedule, exactly what it sees in a diffusers pipeline at that noise level;
- ``"flow"`` or a :class:`~steerdiff.core.FlowMatchSchedule`: x = (1 - s) x0 + s eps with sigma = s, the timestep
  s (or s T);
- ``"ve"``: alpha = 1 and the timestep sigma; rules that read the progress of the run need a schedule then;
- ``"auto"`` (default): ComfyUI's model sampling when the model carries it (its sigma table gives the VP schedule;
  CONST is flow), else a k-diffusion ``DiscreteSchedule`` wrapper's ``sigmas`` table, else an error asking for it.

A run starts (the rule's state is reset) at the first call and whenever sigma rises above the previous call's;
:meth:`GuidedDenoiser.reset` starts one by hand and, given the run's sigmas, tells rules the number of steps.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from ..core.guidance_protocol import COND, UNCOND, GuidanceState, Request, apply_rule
from ..core.nonfinite import NonFiniteWatch, finish_earliest
from ..core.process import NoiseProcess
from ..core.schedule import NoiseSchedule
from ..core.sigma_process import FlowSigma, VarianceExplodingSigma
from ..core.tensors import expand_to, take_rows
from ..guidance.base import GuidanceRule
from ..guidance.cfg import CFG
from ..guidance.perturbations import WeakModel
from .sampling import PROCESSES, comfy_model_sampling, model_sampling_family


def schedule_from_sigmas(sigmas) -> NoiseSchedule:
    """The VP schedule of a training sigma_bar table (k-diffusion's ``DiscreteSchedule.sigmas``, ComfyUI's
    ``model_sampling.sigmas``): alphas_cumprod = 1 / (1 + sigma^2)."""
    s = torch.as_tensor(sigmas).detach().to("cpu", torch.float64).reshape(-1)
    return NoiseSchedule.from_alphas_cumprod(1.0 / (1.0 + s**2))


def process_of_model_sampling(model_sampling) -> NoiseProcess:
    """The steerdiff process of a ComfyUI model-sampling object: flow for CONST, else the VP schedule of its table."""
    if model_sampling_family(model_sampling) == "flow":
        return FlowSigma()
    table = getattr(model_sampling, "sigmas", None)
    if table is None:
        raise ValueError(f"ComfyUI model sampling {type(model_sampling).__name__} has no sigmas table; pass process=")
    return schedule_from_sigmas(table)


def resolve_guidance_process(model, process) -> NoiseProcess:
    if isinstance(process, NoiseProcess):
        return process
    if process not in PROCESSES:
        raise ValueError(f"process must be a steerdiff NoiseProcess or one of {PROCESSES}, got {process!r}")
    if process == "ve":
        return VarianceExplodingSigma()
    if process == "flow":
        return FlowSigma()
    model_sampling = comfy_model_sampling(model)
    if model_sampling is not None:
        return process_of_model_sampling(model_sampling)
    table = getattr(model, "sigmas", None)
    if torch.is_tensor(table) and table.ndim == 1 and table.numel() > 1:
        return schedule_from_sigmas(table)
    raise ValueError(
        "GuidedDenoiser cannot read the model's noise process: pass process= (the model's VP schedule, e.g. "
        "steerdiff.core.NoiseSchedule.from_config(pipe.scheduler.config), 'flow', or 've' for rules that do not read "
        "the progress of the run)"
    )


def _cat(parts: list):
    """Concatenate conditioning along the batch: tensors, or dicts / lists of tensors (k-diffusion's SDXL-style
    conditioning dicts), key by key."""
    first = parts[0]
    if torch.is_tensor(first):
        return torch.cat(parts)
    if isinstance(first, Mapping):
        return {k: _cat([p[k] for p in parts]) for k in first}
    if isinstance(first, (list, tuple)):
        return type(first)(_cat([p[i] for p in parts]) for i in range(len(first)))
    raise TypeError(f"conditioning must be tensors or dicts / lists of tensors, got {type(first).__name__}")


def _expand(cond, batch: int):
    """One conditioning row made ``batch`` rows (k-diffusion callers often pass a single uncond row)."""
    if torch.is_tensor(cond):
        return cond.expand(batch, *cond.shape[1:]) if cond.shape[0] == 1 and batch != 1 else cond
    if isinstance(cond, Mapping):
        return {k: _expand(v, batch) for k, v in cond.items()}
    if isinstance(cond, (list, tuple)):
        return type(cond)(_expand(v, batch) for v in cond)
    return cond


class GuidedDenoiser:
    """See the module docstring.

    Args:
        model: a k-diffusion denoiser ``model(x, sigma, cond=..., **extra_args) -> x0``.
        rule: a steerdiff guidance rule (:mod:`steerdiff.guidance`), or a number w (classifier-free guidance).
        process: the rule's noise levels (module docstring).
        network: the torch module layer perturbations (PAG, SEG, SLG) apply to (default: ``model`` when it is one);
            AutoGuidance's weak model is called as a k-diffusion denoiser of the same signature.
        nonfinite_check: NaN/Inf in the model's outputs and the guided result ("eager" by default: k-diffusion's
            samplers read sigmas on the host every step anyway; "auto", "deferred" (raised at :meth:`finish` or
            the next run's start), "off").
    """

    def __init__(self, model: Callable, rule, process="auto", network: torch.nn.Module | None = None,
                 nonfinite_check: str = "eager"):
        if not callable(model):
            raise TypeError(f"model must be a k-diffusion denoiser (callable), got {type(model).__name__}")
        if isinstance(rule, (int, float)) and not isinstance(rule, bool):
            rule = CFG(rule)
        if not isinstance(rule, GuidanceRule) and not (callable(rule) and hasattr(rule, "uncond_needed")):
            raise TypeError(f"rule must be a steerdiff guidance rule or a number (CFG weight), got {type(rule).__name__}")
        self.model, self.rule = model, rule
        self.process = resolve_guidance_process(model, process)
        self.network = network if network is not None else (model if isinstance(model, torch.nn.Module) else None)
        self._watch = NonFiniteWatch(nonfinite_check, "the model's denoised output")
        self._guided_watch = NonFiniteWatch(nonfinite_check, f"the guided prediction of {rule!r}")
        self.network_calls = 0
        self.reset()

    # -- runs -------------------------------------------------------------------------------------------------
    def reset(self, sigmas=None) -> None:
        """Start a run: the rule's state and the evaluation counter; ``sigmas`` (the run's, ending at 0) tells rules
        the number of steps and the run's timesteps."""
        self.finish()
        self._step, self._last_sigma = 0, None
        timesteps = None
        if sigmas is not None:
            s = torch.as_tensor(sigmas).detach().to("cpu", torch.float64).reshape(-1)
            s = s[s > 0]
            timesteps = self.process.timestep_of_sigmas(s)
            self._num_steps = int(s.numel())
        else:
            self._num_steps = None
        self.rule.reset(timesteps)

    def finish(self) -> None:
        """Raise what a deferred NaN/Inf check found in the run so far (the earlier finding)."""
        finish_earliest(self._watch, self._guided_watch)
        self._watch.reset()
        self._guided_watch.reset()

    # -- noise levels -----------------------------------------------------------------------------------------
    def _levels(self, x: torch.Tensor, sigma: torch.Tensor):
        """(x in the process's convention, alpha, sigma) of k-diffusion's x at ``sigma`` (B,) float64."""
        alpha, sigma_p = self.process.alpha_sigma_of_sigmas(sigma)
        return (x * expand_to(alpha, x).to(x.dtype) if self.process.kind == "vp" else x), alpha, sigma_p

    # -- the call ---------------------------------------------------------------------------------------------
    def __call__(self, x: torch.Tensor, sigma, cond=None, uncond=None, **extra_args) -> torch.Tensor:
        """The guided denoised x0 at (x, sigma) for conditioning ``cond`` and the unconditional ``uncond``."""
        batch = x.shape[0]
        if cond is None or uncond is None:
            raise ValueError("GuidedDenoiser needs both cond= and uncond= (pass them in the sampler's extra_args)")
        cond, uncond = _expand(cond, batch), _expand(uncond, batch)

        def run(x_in, s_in, c_in, model=None):
            self.network_calls += 1
            return (model or self.model)(x_in, s_in, cond=c_in, **extra_args)

        def evaluate(request: Request, sigma_in: torch.Tensor) -> dict[str, torch.Tensor]:
            if not request.cond:
                return {COND: torch.zeros_like(x)}
            rows = request.rows[UNCOND]
            out = {}
            if rows is None or rows.numel():
                ux = x if rows is None else x[rows]
                us = sigma_in if rows is None else sigma_in[rows]
                both = run(torch.cat([ux, x]), torch.cat([us, sigma_in]), _cat([uncond if rows is None else take_rows(uncond, rows, batch), cond]))
                out[UNCOND], out[COND] = both[: ux.shape[0]], both[ux.shape[0]:]
            else:
                out[COND] = run(x, sigma_in, cond)
            for name, prow in request.perturbed():
                px = x if prow is None else x[prow]
                ps = sigma_in if prow is None else sigma_in[prow]
                out[name] = self._perturbed(request.perturbations[name], run, px, ps, cond if prow is None else take_rows(cond, prow, batch))
            return out

        return self.guided(x, sigma, evaluate)

    def _perturbed(self, perturbation, run, x, sigma, cond):
        if isinstance(perturbation, WeakModel):
            if not callable(perturbation.model) or isinstance(perturbation.model, str):
                raise ValueError("with k-diffusion, AutoGuidance's weak model must be a k-diffusion denoiser of the same "
                                 "signature as the model (wrap the weak network as the model is wrapped)")
            return run(x, sigma, cond, model=perturbation.model)
        if self.network is None:
            raise ValueError(f"{perturbation!r} changes the network: pass network= (the torch module the model calls)")
        from ..pipelines.perturb import perturbed  # diffusers' hook machinery, imported only for perturbation rules

        with perturbed(self.network, perturbation, spatial=tuple(x.shape[-2:])):
            return run(x, sigma, cond)

    def guided(self, x: torch.Tensor, sigma, evaluate: Callable[[Request, torch.Tensor], Mapping[str, torch.Tensor]]) -> torch.Tensor:
        """The rule applied at (x, sigma): ``evaluate(request, sigma_per_sample)`` returns the denoised rows the
        request asks for (this is the part a host such as ComfyUI's guider supplies)."""
        batch = x.shape[0]
        sigma_in = torch.as_tensor(sigma, device=x.device)
        sigma_in = (sigma_in.expand(batch) if sigma_in.numel() == 1 else sigma_in).reshape(batch)
        level = sigma_in.to(torch.float64)
        highest = float(level.max())  # one host read (k-diffusion's samplers read each sigma on the host anyway)
        if self._last_sigma is not None and highest > self._last_sigma:
            self.reset()  # the noise level rose: a new run
        self._last_sigma = highest
        sample, alpha, sigma_p = self._levels(x, level)
        state = GuidanceState(self.process, self.process.timestep_of_sigmas(level), sample, "sample", self._step, alpha=alpha,
                              sigma=sigma_p, num_steps=self._num_steps)

        def checked(request: Request) -> Mapping[str, torch.Tensor]:
            outputs = evaluate(request, sigma_in)
            if request.cond:
                self._watch.update(self._step, torch.cat(list(outputs.values())), float(level[0]), batch)
            return outputs

        out = apply_rule(self.rule, state, checked)
        self._guided_watch.update(self._step, out, float(level[0]), batch)
        self._step += 1
        return out


__all__ = ["GuidedDenoiser", "process_of_model_sampling", "resolve_guidance_process", "schedule_from_sigmas"]
