"""The ComfyUI node pack (comfyui/) without ComfyUI: it imports, every node's inputs are valid ComfyUI declarations
whose defaults the steerdiff function accepts, and the guider's rule fields are checked before sampling.  The run
through ComfyUI's own sampling path is scripts/comfyui_check.py (needs a ComfyUI checkout; see docs/comfyui.md)."""

import sys

import pytest
import torch
from test_k_diffusion import gaussian_denoiser, karras

import comfyui
from comfyui import nodes
from steerdiff.guidance import CFG


def test_imports_without_comfyui():
    assert "comfy" not in sys.modules
    assert set(comfyui.NODE_CLASS_MAPPINGS) == set(comfyui.NODE_DISPLAY_NAME_MAPPINGS)


FUNCTIONS = {
    "SteerdiffSamplerPLMSHB": nodes.sample_plms_hb, "SteerdiffSamplerGHVB": nodes.sample_ghvb,
    "SteerdiffSamplerDPMPP2MHB": nodes.sample_dpmpp_2m_hb, "SteerdiffSamplerDPMPP3MHB": nodes.sample_dpmpp_3m_hb,
    "SteerdiffSamplerUniPCHB": nodes.sample_unipc_hb,
}


def _defaults(node):
    out = {}
    for name, spec in node.INPUT_TYPES()["required"].items():
        kind, options = spec[0], spec[1] if len(spec) > 1 else {}
        assert isinstance(kind, (str, list)), name
        out[name] = options.get("default", kind[0] if isinstance(kind, list) else None)
    return out


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_sampler_nodes_pass_options_their_function_takes(name, monkeypatch):
    made = []
    monkeypatch.setattr(nodes, "_ksampler", lambda fn, **options: made.append((fn, options)) or ("SAMPLER",))
    node = nodes.NODE_CLASS_MAPPINGS[name]
    assert node.RETURN_TYPES == ("SAMPLER",)
    getattr(node(), node.FUNCTION)(**_defaults(node))
    fn, options = made[0]
    assert fn is FUNCTIONS[name]
    sigmas = karras(5)
    x = torch.randn(2, 3, dtype=torch.float64) * sigmas[0]
    out = fn(gaussian_denoiser, x, sigmas, disable=True, **options)
    assert torch.isfinite(out).all()


def test_guider_rules_are_checked_before_sampling():
    assert "pag" not in nodes.GUIDER_RULES and "apg" in nodes.GUIDER_RULES
    assert nodes.make_rule("apg", 4.0, "eta: 0.0\nmomentum: -0.25").momentum == -0.25
    wrapped = nodes.make_rule("interval", 4.0, "sigma_low: 0.5")  # a wrapper guides with CFG at the node's scale
    assert isinstance(wrapped.rule, CFG) and wrapped.rule.scale == 4.0 and wrapped.sigma_low == 0.5
    with pytest.raises(ValueError, match="perturbs the network's layers.*ComfyUI's own node"):
        nodes.make_rule("pag", 3.0, "")
    with pytest.raises(ValueError, match="options must be a mapping"):
        nodes.make_rule("apg", 3.0, "- 1\n- 2")
    with pytest.raises(ValueError, match="has no option"):
        nodes.make_rule("apg", 3.0, "etaa: 1")
