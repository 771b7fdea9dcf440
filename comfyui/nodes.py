"""steerdiff's ComfyUI nodes: SAMPLER nodes for SamplerCustom / SamplerCustomAdvanced (ComfyUI's
``comfy.samplers.KSAMPLER`` around the functions of :mod:`steerdiff.k_diffusion`) and a GUIDER node that applies any
steerdiff guidance rule (a ``comfy.samplers.CFGGuider`` whose prediction is :class:`steerdiff.k_diffusion.GuidedDenoiser`'s).

ComfyUI's modules are imported when a node runs, so this file imports without ComfyUI (as steerdiff's tests do).
"""

from __future__ import annotations

import functools

import yaml

from steerdiff.guidance import RULES, get_rule
from steerdiff.guidance.registry import WRAPPERS
from steerdiff.k_diffusion import (
    PROCESSES, sample_dpmpp_2m_hb, sample_dpmpp_3m_hb, sample_ghvb, sample_plms_hb, sample_unipc_hb,
)

CATEGORY_SAMPLERS = "sampling/custom_sampling/samplers/steerdiff"
CATEGORY_GUIDERS = "sampling/custom_sampling/guiders/steerdiff"

# perturbation rules change the network's layers through diffusers' hooks; a ComfyUI model is not a diffusers
# module, so those rules are left to ComfyUI's own nodes (PerturbedAttentionGuidance, SkipLayerGuidance...)
PERTURBATION_RULES = ("pag", "seg", "slg", "autoguidance")
GUIDER_RULES = tuple(name for name in sorted(RULES) if name not in PERTURBATION_RULES)

_PROCESS = (list(PROCESSES), {"default": "auto", "tooltip": "auto: the model's sampling type (CONST = flow)"})
_BETA = ("FLOAT", {"default": 0.8, "min": 0.01, "max": 1.0, "step": 0.01, "tooltip": "heavy-ball momentum; 1 = none"})


def _ksampler(function, **options):
    import comfy.samplers  # ComfyUI's, when the node runs

    return (comfy.samplers.KSAMPLER(function, extra_options=options),)


def sampler_node(name: str, function, inputs: dict, doc: str):
    """A SAMPLER node class: ``inputs`` are its ComfyUI input declarations, passed to ``function`` as options."""

    def get_sampler(self, **options):
        return _ksampler(function, **options)

    return type(name, (), {
        "__doc__": doc, "INPUT_TYPES": classmethod(lambda cls: {"required": dict(inputs)}), "RETURN_TYPES": ("SAMPLER",),
        "FUNCTION": "get_sampler", "CATEGORY": CATEGORY_SAMPLERS, "get_sampler": get_sampler,
    })


_WEIGHTS = (["variable", "fixed"], {"default": "variable"})
_WARMUP = (["none", "rk4"], {"default": "none"})
SteerdiffSamplerPLMSHB = sampler_node("SteerdiffSamplerPLMSHB", sample_plms_hb, {
    "order": ("INT", {"default": 4, "min": 1, "max": 4}), "beta": _BETA, "adams_weights": _WEIGHTS, "warmup": _WARMUP,
    "process": _PROCESS}, "PLMS with heavy-ball momentum (beta 1: k-diffusion's LMS).")
SteerdiffSamplerGHVB = sampler_node("SteerdiffSamplerGHVB", sample_ghvb, {
    "momentum_number": ("FLOAT", {"default": 3.8, "min": 0.05, "max": 4.0, "step": 0.05}), "adams_weights": _WEIGHTS,
    "warmup": _WARMUP, "process": _PROCESS}, "Generalized heavy ball of momentum number m (3.8 = order 4, beta 0.8; 1 = Euler).")
SteerdiffSamplerDPMPP2MHB = sampler_node("SteerdiffSamplerDPMPP2MHB", sample_dpmpp_2m_hb, {"beta": _BETA, "process": _PROCESS},
                                         "DPM-Solver++ 2M with heavy-ball momentum (beta 1: dpmpp_2m).")
SteerdiffSamplerDPMPP3MHB = sampler_node("SteerdiffSamplerDPMPP3MHB", sample_dpmpp_3m_hb, {"beta": _BETA, "process": _PROCESS},
                                         "DPM-Solver++ 3M with heavy-ball momentum.")
SteerdiffSamplerUniPCHB = sampler_node("SteerdiffSamplerUniPCHB", sample_unipc_hb, {
    "beta": _BETA, "order": ("INT", {"default": 2, "min": 1, "max": 3}), "solver_type": (["bh2", "bh1"], {"default": "bh2"}),
    "process": _PROCESS}, "UniPC with heavy-ball momentum on predictor and corrector.")


def parse_options(text: str) -> dict:
    """The guider node's ``options`` field: a YAML / JSON mapping of the rule's other parameters."""
    options = yaml.safe_load(text) if text and text.strip() else {}
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise ValueError(f"options must be a mapping of the rule's parameters (YAML or JSON), got {text!r}")
    return options


def make_rule(rule: str, scale: float, options: str):
    """The steerdiff rule of the guider node's fields (checked here, before sampling starts)."""
    if rule in PERTURBATION_RULES:
        raise ValueError(f"rule {rule!r} perturbs the network's layers through diffusers' hooks, which a ComfyUI model "
                         "does not have; use ComfyUI's own node for it (allowed here: " + ", ".join(GUIDER_RULES) + ")")
    if rule not in GUIDER_RULES:
        raise ValueError(f"rule must be one of {GUIDER_RULES}, got {rule!r}")
    options = parse_options(options)
    if rule in WRAPPERS:  # interval / adaptive / linear_ag wrap a rule: CFG at the node's scale unless options name one
        options.setdefault("rule", {"name": "cfg", "scale": scale})
    elif rule != "fdg":  # FDG takes per-band scales in its options
        options.setdefault("scale", scale)
    return get_rule(rule, **options)


@functools.cache
def guider_class():
    """The GUIDER class, built on ComfyUI's CFGGuider when a node first needs it (once)."""
    import comfy.samplers

    from steerdiff.k_diffusion import GuidedDenoiser, process_of_model_sampling

    class SteerdiffGuider(comfy.samplers.CFGGuider):
        """CFGGuider whose prediction is the steerdiff rule's: the rows the rule asks for are evaluated with
        ComfyUI's ``calc_cond_batch`` (positive and negative in one batch) and combined by GuidedDenoiser."""

        def __init__(self, model_patcher, rule):
            super().__init__(model_patcher)
            self.rule = rule
            self.denoiser = None

        def inner_sample(self, noise, latent_image, device, sampler, sigmas, *args, **kwargs):
            ms = self.inner_model.model_sampling
            self.denoiser = GuidedDenoiser(self, self.rule, process=process_of_model_sampling(ms))
            self.denoiser.reset(sigmas)
            try:
                return super().inner_sample(noise, latent_image, device, sampler, sigmas, *args, **kwargs)
            finally:
                self.denoiser.finish()

        def predict_noise(self, x, timestep, model_options={}, seed=None):
            positive, negative = self.conds.get("positive"), self.conds.get("negative")
            found = {}

            def evaluate(request, sigma):
                if not request.cond:
                    return {"cond": x * 0}
                rows = request.rows["uncond"]
                wanted = rows is None or rows.numel() > 0
                cond, uncond = comfy.samplers.calc_cond_batch(
                    self.inner_model, [positive, negative if wanted else None], x, timestep, model_options
                )
                found.update(cond=cond, uncond=uncond)
                return {"cond": cond, "uncond": uncond if rows is None else uncond[rows]}

            guided = self.denoiser.guided(x, timestep, evaluate)
            for fn in model_options.get("sampler_post_cfg_function", []):  # other nodes' post-CFG patches, as cfg_function runs them
                guided = fn({
                    "denoised": guided, "cond": positive, "uncond": negative, "cond_scale": self.cfg,
                    "model": self.inner_model, "uncond_denoised": found.get("uncond"), "cond_denoised": found.get("cond"),
                    "sigma": timestep, "model_options": model_options, "input": x,
                })
            return guided

    return SteerdiffGuider


class SteerdiffGuider:
    """Any steerdiff guidance rule (CFG variants, APG, CFG-Zero*, TCFG, FDG, intervals, schedules, Adaptive
    Guidance, LinearAG...) as a GUIDER; ``options`` holds the rule's other parameters as YAML, e.g. ``eta: 0.0``
    (wrappers guide with CFG at ``scale`` unless ``options`` give ``rule: {name: apg, scale: 7}``; FDG reads
    ``scales`` from ``options``)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL",),
            "positive": ("CONDITIONING",),
            "negative": ("CONDITIONING",),
            "rule": (list(GUIDER_RULES), {"default": "apg"}),
            "scale": ("FLOAT", {"default": 5.0, "min": 0.0, "max": 100.0, "step": 0.1}),
            "options": ("STRING", {"default": "", "multiline": True}),
        }}

    RETURN_TYPES = ("GUIDER",)
    FUNCTION = "get_guider"
    CATEGORY = CATEGORY_GUIDERS

    def get_guider(self, model, positive, negative, rule, scale, options):
        guider = guider_class()(model, make_rule(rule, scale, options))
        guider.set_conds(positive, negative)
        guider.set_cfg(scale)
        return (guider,)


NODE_CLASS_MAPPINGS = {
    "SteerdiffSamplerPLMSHB": SteerdiffSamplerPLMSHB,
    "SteerdiffSamplerGHVB": SteerdiffSamplerGHVB,
    "SteerdiffSamplerDPMPP2MHB": SteerdiffSamplerDPMPP2MHB,
    "SteerdiffSamplerDPMPP3MHB": SteerdiffSamplerDPMPP3MHB,
    "SteerdiffSamplerUniPCHB": SteerdiffSamplerUniPCHB,
    "SteerdiffGuider": SteerdiffGuider,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "SteerdiffSamplerPLMSHB": "PLMS + heavy ball (steerdiff)",
    "SteerdiffSamplerGHVB": "GHVB (steerdiff)",
    "SteerdiffSamplerDPMPP2MHB": "DPM++ 2M + heavy ball (steerdiff)",
    "SteerdiffSamplerDPMPP3MHB": "DPM++ 3M + heavy ball (steerdiff)",
    "SteerdiffSamplerUniPCHB": "UniPC + heavy ball (steerdiff)",
    "SteerdiffGuider": "Guidance rule (steerdiff)",
}
