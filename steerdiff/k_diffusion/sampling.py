"""steerdiff's samplers with k-diffusion's signature, for k-diffusion, ComfyUI, Forge / A1111 and sdkit.

    x = sample_ghvb(model, x, sigmas, extra_args=None, callback=None, disable=None, momentum_number=3.8)

``model(x, sigma * s_in, **extra_args)`` returns the denoised x0 (k-diffusion's denoiser interface); ``sigmas`` is
decreasing, usually ends at 0, and ``x`` starts as noise * sigmas[0].  ``callback`` gets k-diffusion's dict
{"x", "i", "sigma", "sigma_hat", "denoised"} once per step, and a tqdm bar counts the network calls unless
``disable``.

Each function is the steerdiff scheduler of the same name run on these sigmas: the scheduler's update is the only
copy of each formula (:mod:`steerdiff.core`), started with :meth:`~steerdiff.samplers.base.MomentumScheduler.start_run`
on a grid whose timestep is the noise level itself (:mod:`steerdiff.core.sigma_process`).  So a function here and
the scheduler give the same samples on the same noise levels, and with ``beta=1`` they are the base solvers:
``sample_plms_hb`` is k-diffusion's ``sample_lms`` of the same order (variable-step weights; exact integrals where
k-diffusion uses ``scipy.integrate.quad``), ``sample_ghvb(momentum_number=1)`` its ``sample_euler``,
``sample_dpmpp_2m_hb`` its ``sample_dpmpp_2m``.  A step to sigma = 0 is the solver's own step there, as in
k-diffusion (LMS integrates its polynomial to 0; DPM-Solver++ takes its first-order step, which lands on the
denoised sample).

The noise process (``process``):

- ``"ve"``: x = x0 + sigma eps, k-diffusion's convention (VP models enter it through their wrapper);
- ``"flow"``: x = (1 - s) x0 + s eps with sigma = s in [0, 1], as ComfyUI runs flow-matching models (SD3, Flux,
  Wan, Qwen-Image): the steps then integrate the flow ODE in its own variables (lambda = log((1 - s) / s), the
  velocity in s), not k-diffusion's VE formulas applied to s;
- ``"auto"`` (default): ComfyUI's model sampling when the model carries it (``CONST`` -> flow, ``EPS`` and its
  subclasses -> ve; any other type is an error naming it), else k-diffusion's convention, ve.
"""

from __future__ import annotations

import torch
from tqdm.auto import trange

from ..core.grid import make_grid
from ..core.sigma_process import FlowSigma, VarianceExplodingSigma
from ..samplers.ghvb import GHVBScheduler
from ..samplers.heavy_ball import HeavyBallDPMSolverScheduler, HeavyBallPLMSScheduler, HeavyBallUniPCScheduler

PROCESSES = ("auto", "ve", "flow")

# ComfyUI's model-sampling classes (comfy/model_sampling.py) by the x they sample: its sampler functions see
# x = x0 + sigma eps for EPS and its subclasses (V_PREDICTION, EDM, X0, IMG_TO_IMG) and COSMOS_RFLOW (noise_scaling
# adds sigma * noise), and x = (1 - sigma) x0 + sigma eps for CONST.
_COMFY_FAMILIES = {"CONST": "flow", "EPS": "ve", "COSMOS_RFLOW": "ve"}


def comfy_model_sampling(model):
    """ComfyUI's model-sampling object of a model its sampler functions are given (``KSamplerX0Inpaint``, whose
    ``inner_model`` is the guider holding the ``model_patcher``), or None for a model that is not ComfyUI's."""
    patcher = getattr(getattr(model, "inner_model", None), "model_patcher", None)
    get = getattr(patcher, "get_model_object", None)
    if get is None:
        return None
    return get("model_sampling")


def model_sampling_family(model_sampling) -> str:
    """"ve" or "flow" for a ComfyUI model-sampling object (by its class and the classes it derives from)."""
    names = [cls.__name__ for cls in type(model_sampling).__mro__]
    for name in names:
        if name in _COMFY_FAMILIES:
            return _COMFY_FAMILIES[name]
    raise ValueError(
        f"ComfyUI model sampling {type(model_sampling).__name__} (classes {names[:4]}) is none of "
        f"{sorted(_COMFY_FAMILIES)}: steerdiff does not know how it noises x; pass process='ve' or process='flow'"
    )


def resolve_process(model, process: str = "auto") -> str:
    """The noise process ("ve" or "flow") the sampler integrates (see the module docstring)."""
    if process not in PROCESSES:
        raise ValueError(f"process must be one of {PROCESSES}, got {process!r}")
    if process != "auto":
        return process
    model_sampling = comfy_model_sampling(model)
    return "ve" if model_sampling is None else model_sampling_family(model_sampling)


def _check_sigmas(sigmas, x: torch.Tensor) -> torch.Tensor:
    if not torch.is_tensor(x) or not x.is_floating_point() or x.ndim < 1:
        raise ValueError(f"x must be a floating-point tensor (B, ...), got {type(x).__name__}")
    s = torch.as_tensor(sigmas)
    if s.ndim != 1:
        raise ValueError(f"sigmas must be a 1-D tensor of noise levels, got shape {tuple(s.shape)}")
    return s


def run_sampler(scheduler, model, x, sigmas, extra_args=None, callback=None, disable=None, process: str = "auto"):
    """Sample with ``scheduler`` (a steerdiff momentum scheduler built with ``prediction_type="sample"``) over the
    k-diffusion ``sigmas``: one ``model(x, sigma * s_in, **extra_args)`` per network call of the scheduler."""
    extra_args = {} if extra_args is None else extra_args
    sigmas = _check_sigmas(sigmas, x)
    if sigmas.numel() <= 1:
        return x
    family = resolve_process(model, process)
    noise_process = FlowSigma() if family == "flow" else VarianceExplodingSigma()
    levels = sigmas.detach().to("cpu", torch.float64)
    scheduler.start_run(make_grid(noise_process, levels, levels if family == "flow" else None, device=x.device))
    s_in = x.new_ones([x.shape[0]])
    calls = scheduler.network_calls
    sigmas = sigmas.to(x.device)
    last = -1
    for k in trange(len(calls), disable=disable):
        t, i = calls[k]
        sigma = sigmas[i] if i != last else torch.tensor(t, dtype=sigmas.dtype, device=x.device)
        denoised = model(x, sigma * s_in, **extra_args)
        if callback is not None and i != last:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        last = i
        x = scheduler.step(denoised, t, x).prev_sample
    return x


def _sample(cls, model, x, sigmas, extra_args, callback, disable, process, **options):
    """Build the scheduler ``cls`` for the process the model is noised with (read once) and sample with it."""
    family = resolve_process(model, process)
    scheduler = cls(noise_process="flow" if family == "flow" else "vp", prediction_type="sample", **options)
    return run_sampler(scheduler, model, x, sigmas, extra_args, callback, disable, family)


@torch.no_grad()
def sample_plms_hb(model, x, sigmas, extra_args=None, callback=None, disable=None, order=4, beta=0.8,
                   adams_weights="variable", warmup="none", process="auto"):
    """PLMS of ``order`` with heavy-ball momentum ``beta`` (Wizadwongsa & Suwajanakorn, ICLR 2024):
    v <- (1 - beta) v + beta AB_r(d), x <- x + (sigma' - sigma) v, with d = (x - denoised) / sigma
    (:class:`~steerdiff.samplers.HeavyBallPLMSScheduler`).  ``beta=1`` is k-diffusion's ``sample_lms``."""
    return _sample(HeavyBallPLMSScheduler, model, x, sigmas, extra_args, callback, disable, process,
                   order=order, beta=beta, adams_weights=adams_weights, warmup=warmup)


@torch.no_grad()
def sample_ghvb(model, x, sigmas, extra_args=None, callback=None, disable=None, momentum_number=3.8,
                adams_weights="variable", warmup="none", process="auto"):
    """Generalized heavy ball of momentum number m = order - (1 - beta) (GHVB 3.8: order 4, beta 0.8;
    :class:`~steerdiff.samplers.GHVBScheduler`).  ``momentum_number=1`` is k-diffusion's ``sample_euler``."""
    return _sample(GHVBScheduler, model, x, sigmas, extra_args, callback, disable, process,
                   momentum_number=momentum_number, adams_weights=adams_weights, warmup=warmup)


@torch.no_grad()
def sample_dpmpp_2m_hb(model, x, sigmas, extra_args=None, callback=None, disable=None, beta=0.8,
                       lower_order_final=False, process="auto"):
    """DPM-Solver++ 2M with heavy-ball momentum on its data term (:class:`~steerdiff.samplers.HeavyBallDPMSolverScheduler`).
    First order on the first step and on a step to sigma = 0, as k-diffusion's ``sample_dpmpp_2m``, which
    ``beta=1`` is; ``lower_order_final=True`` adds diffusers' rule (a first-order last step below 15 steps)."""
    return _sample(HeavyBallDPMSolverScheduler, model, x, sigmas, extra_args, callback, disable, process,
                   beta=beta, solver_order=2, lower_order_final=lower_order_final)


@torch.no_grad()
def sample_dpmpp_3m_hb(model, x, sigmas, extra_args=None, callback=None, disable=None, beta=0.8,
                       lower_order_final=False, process="auto"):
    """DPM-Solver++ 3M (diffusers' third-order multistep update) with heavy-ball momentum on its data term;
    ``beta=1`` is diffusers' DPMSolverMultistepScheduler with ``solver_order=3`` on these noise levels."""
    return _sample(HeavyBallDPMSolverScheduler, model, x, sigmas, extra_args, callback, disable, process,
                   beta=beta, solver_order=3, lower_order_final=lower_order_final)


@torch.no_grad()
def sample_unipc_hb(model, x, sigmas, extra_args=None, callback=None, disable=None, beta=0.8, order=2,
                    solver_type="bh2", lower_order_final=True, process="auto"):
    """UniPC (predictor and corrector on data predictions) with heavy-ball momentum on both
    (:class:`~steerdiff.samplers.HeavyBallUniPCScheduler`); ``beta=1`` is diffusers' UniPCMultistepScheduler of
    ``order`` on these noise levels.  The corrector of each step uses the next step's model call."""
    return _sample(HeavyBallUniPCScheduler, model, x, sigmas, extra_args, callback, disable, process,
                   beta=beta, solver_order=order, solver_type=solver_type, lower_order_final=lower_order_final)


SAMPLERS = {
    "plms_hb": sample_plms_hb,
    "ghvb": sample_ghvb,
    "dpmpp_2m_hb": sample_dpmpp_2m_hb,
    "dpmpp_3m_hb": sample_dpmpp_3m_hb,
    "unipc_hb": sample_unipc_hb,
}
"""The functions by the names ComfyUI's sampler list and steerdiff's scheduler registry use."""

__all__ = [
    "PROCESSES", "SAMPLERS", "comfy_model_sampling", "model_sampling_family", "resolve_process", "run_sampler",
    "sample_dpmpp_2m_hb", "sample_dpmpp_3m_hb", "sample_ghvb", "sample_plms_hb", "sample_unipc_hb",
]
