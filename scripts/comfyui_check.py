"""Run steerdiff's ComfyUI nodes through ComfyUI's own sampling path and compare with steerdiff outside ComfyUI.

    python scripts/comfyui_check.py --comfyui /path/to/ComfyUI [--steps 12]

ComfyUI is not on the package index: point ``--comfyui`` at a checkout (its Python dependencies installed: torch,
torchvision, torchsde, einops, av, psutil, safetensors, transformers...).  The script builds two ComfyUI models
without weights, ``comfy.model_base.BaseModel`` with an SD1.5-shaped EPS model sampling and an SD3-shaped FLOW one
(shift 3), whose diffusion model is the exact denoiser of Gaussian data (mean +1 under the positive conditioning,
-1 under the negative, std 0.5), wrapped in ComfyUI's ``ModelPatcher``, and runs the ``SamplerCustomAdvanced`` node
(RandomNoise, a GUIDER, a SAMPLER, sigmas from ComfyUI's ``calculate_sigmas``) with

1. ComfyUI's ``CFGGuider`` (cfg 5) and each steerdiff SAMPLER node (process "auto": read from the model);
2. the steerdiff GUIDER node (several rules) and ComfyUI's own ``euler`` / ``dpmpp_2m`` samplers;
3. both steerdiff's.

The node pack is loaded by ComfyUI's own loader (``nodes.load_custom_node``) and the nodes are taken from ComfyUI's
``NODE_CLASS_MAPPINGS``.  Each ComfyUI sample is compared with the same sampler function and guidance run outside ComfyUI on the same denoiser
(steerdiff.k_diffusion; ComfyUI's k-diffusion functions for its samplers) from the same noise.  Prints one line per
case and exits 1 if any differs by more than ``--tol`` (float32 arithmetic).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

MU, STD = 1.0, 0.5


def exact_denoiser(x, sigma, mean, flow):
    """E[x0 | x] for x0 ~ N(mean, STD^2): x = x0 + sigma eps (EPS) or (1 - sigma) x0 + sigma eps (FLOW)."""
    s = sigma.reshape(-1, *[1] * (x.ndim - 1)).to(x.dtype)
    m = mean.reshape(-1, *[1] * (x.ndim - 1)).to(x.dtype)
    if flow:
        a = 1 - s
        return m + a * STD**2 / (a**2 * STD**2 + s**2) * (x - a * m)
    return m + STD**2 / (STD**2 + s**2) * (x - m)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--comfyui", required=True, type=Path, help="a ComfyUI checkout")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--tol", type=float, default=2e-4)
    args = parser.parse_args()
    root = args.comfyui.resolve()
    if not (root / "comfy" / "samplers.py").is_file():
        parser.error(f"--comfyui: {root} is not a ComfyUI checkout (no comfy/samplers.py)")
    sys.path.insert(0, str(root))
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this repository: comfyui.nodes.make_rule, for the outside runs
    sys.argv = [sys.argv[0], "--cpu"]
    import comfy.options

    comfy.options.enable_args_parsing()
    import comfy.k_diffusion.sampling as comfy_k
    import comfy.latent_formats
    import comfy.model_base
    import comfy.model_patcher
    import comfy.samplers
    import comfy.supported_models_base
    from comfy_extras.nodes_custom_sampler import Noise_RandomNoise, SamplerCustomAdvanced

    import asyncio

    import nodes as comfy_nodes

    pack = Path(__file__).resolve().parents[1] / "comfyui"
    if not asyncio.run(comfy_nodes.load_custom_node(str(pack))):  # ComfyUI's own custom-node loader
        print(f"ComfyUI could not load the node pack {pack}")
        return 1
    NODES = comfy_nodes.NODE_CLASS_MAPPINGS
    missing = [n for n in ("SteerdiffSamplerPLMSHB", "SteerdiffSamplerGHVB", "SteerdiffSamplerDPMPP2MHB",
                           "SteerdiffSamplerDPMPP3MHB", "SteerdiffSamplerUniPCHB", "SteerdiffGuider") if n not in NODES]
    if missing:
        print(f"ComfyUI loaded the pack but lacks the nodes {missing}")
        return 1
    from steerdiff.k_diffusion import GuidedDenoiser, process_of_model_sampling
    import steerdiff.k_diffusion as ours

    class ExactGaussian(torch.nn.Module):
        """ComfyUI diffusion model: the exact prediction for the conditioning's mean (context[:, 0, 0])."""

        def __init__(self, flow=False, device=None, operations=None, **_):
            super().__init__()
            self.flow, self.dtype = flow, torch.float32

        def forward(self, xc, t, context=None, transformer_options={}, **_):
            sigma = transformer_options["sigmas"].to(torch.float32)  # per sample; the call batches conds row-wise
            sigma = sigma.repeat(xc.shape[0] // sigma.shape[0])
            s = sigma.reshape(-1, 1, 1, 1)
            x = xc if self.flow else xc * torch.sqrt(s**2 + 1)  # undo EPS.calculate_input
            d = exact_denoiser(x, sigma, context[:, 0, 0], self.flow)
            return (x - d) / s  # EPS: eps = (x - x0) / sigma; CONST: v = (x - x0) / s

    def comfy_model(flow):
        config = comfy.supported_models_base.BASE({"flow": flow, "in_channels": 4})
        config.latent_format = comfy.latent_formats.LatentFormat()  # identity in / out
        if flow:
            config.sampling_settings = {"shift": 3.0}
        kind = comfy.model_base.ModelType.FLOW if flow else comfy.model_base.ModelType.EPS
        model = comfy.model_base.BaseModel(config, model_type=kind, device=torch.device("cpu"), unet_model=ExactGaussian)
        return comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))

    def conditioning(value):
        return [[torch.full((1, 2, 8), value), {}]]

    latent = {"samples": torch.zeros(2, 4, 8, 8)}
    failures, lines = 0, []

    def start_noise(patcher, sigmas, noise):
        ms = patcher.model.model_sampling
        max_denoise = math.isclose(float(ms.sigma_max), float(sigmas[0]), rel_tol=1e-5) or float(sigmas[0]) > float(ms.sigma_max)
        return ms.noise_scaling(sigmas[0], noise, torch.zeros_like(noise), max_denoise)

    def check(name, patcher, guider, sampler, sigmas, outside):
        nonlocal failures
        noise_node = Noise_RandomNoise(0)
        result = SamplerCustomAdvanced.execute(noise=noise_node, guider=guider, sampler=sampler, sigmas=sigmas, latent_image=latent)
        got = result.result[0]["samples"] if hasattr(result, "result") else result[0]["samples"]
        x_T = start_noise(patcher, sigmas, noise_node.generate_noise(latent))
        want = outside(x_T)
        diff = float((got - want).abs().max())
        ok = diff <= args.tol and bool(torch.isfinite(got).all())
        failures += not ok
        lines.append(f"{'ok  ' if ok else 'FAIL'} {name:64s} max |ComfyUI - outside| = {diff:.2e}")

    for flow in (False, True):
        patcher = comfy_model(flow)
        ms = patcher.model.model_sampling
        family = "FLOW (CONST, shift 3)" if flow else "EPS (SD1.5 schedule)"
        sigmas = comfy.samplers.calculate_sigmas(ms, "simple" if flow else "karras", args.steps).to(torch.float32)
        pos, neg = torch.full((2,), MU), torch.full((2,), -MU)

        def kd_model(x, sigma, cond=None, **_):
            return exact_denoiser(x, sigma, cond if cond is not None else pos, flow)

        def cfg_model(x, sigma, **_):
            u, c = kd_model(x, sigma, neg), kd_model(x, sigma, pos)
            return u + (c - u) * 5.0

        # 1. ComfyUI's CFGGuider with each steerdiff sampler node
        for node, options in [("SteerdiffSamplerGHVB", dict(momentum_number=3.8, adams_weights="variable", warmup="none", process="auto")),
                              ("SteerdiffSamplerPLMSHB", dict(order=4, beta=0.8, adams_weights="variable", warmup="none", process="auto")),
                              ("SteerdiffSamplerDPMPP2MHB", dict(beta=0.8, process="auto")),
                              ("SteerdiffSamplerDPMPP3MHB", dict(beta=0.8, process="auto")),
                              ("SteerdiffSamplerUniPCHB", dict(beta=0.8, order=2, solver_type="bh2", process="auto"))]:
            sampler = NODES[node]().get_sampler(**options)[0]
            guider = comfy.samplers.CFGGuider(patcher)
            guider.set_conds(conditioning(MU), conditioning(-MU))
            guider.set_cfg(5.0)
            function = sampler.sampler_function
            extra = {k: v for k, v in options.items() if k != "process"}
            outside = lambda x, f=function, e=extra: f(cfg_model, x, sigmas, disable=True, process="flow" if flow else "ve", **e)
            check(f"{family}: CFGGuider + {node}", patcher, guider, sampler, sigmas, outside)

        # 2. steerdiff's GUIDER with ComfyUI's samplers, 3. with steerdiff's
        process = process_of_model_sampling(ms)
        rules = [("apg", "eta: 0.0"), ("cfg_rescale", "phi: 0.7"), ("interval", "sigma_low: 0.3\nsigma_high: 5.0")]
        if flow:
            rules = [("apg", "eta: 0.0"), ("cfg_zero_star", "zero_init_steps: 1"), ("tcfg", "")]
        for rule, options in rules:
            for sampler_name in ("euler", "dpmpp_2m", "steerdiff ghvb 3.8"):
                guider = NODES["SteerdiffGuider"]().get_guider(patcher, conditioning(MU), conditioning(-MU), rule, 5.0, options)[0]
                if sampler_name.startswith("steerdiff"):
                    sampler = NODES["SteerdiffSamplerGHVB"]().get_sampler(momentum_number=3.8, adams_weights="variable", warmup="none", process="auto")[0]
                    run = lambda m, x: ours.sample_ghvb(m, x, sigmas, disable=True, momentum_number=3.8, process="flow" if flow else "ve")
                else:
                    sampler = comfy.samplers.sampler_object(sampler_name)
                    fn = getattr(comfy_k, f"sample_{sampler_name}")
                    run = lambda m, x, fn=fn: fn(m, x, sigmas, disable=True)

                def outside(x, rule=rule, options=options, run=run):
                    from comfyui.nodes import make_rule

                    denoiser = GuidedDenoiser(kd_model, make_rule(rule, 5.0, options), process=process)
                    denoiser.reset(sigmas)
                    return run(lambda x_t, sigma: denoiser(x_t, sigma, cond=pos, uncond=neg), x)

                check(f"{family}: SteerdiffGuider({rule}) + {sampler_name}", patcher, guider, sampler, sigmas, outside)

    print("\n".join(lines))
    print(f"{len(lines) - failures} of {len(lines)} cases agree within {args.tol:g}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
