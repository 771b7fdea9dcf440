"""steerdiff where k-diffusion, ComfyUI, Forge / A1111 and sdkit users are: the momentum samplers as functions with
k-diffusion's signature (:mod:`.sampling`) and any guidance rule as a k-diffusion denoiser wrapper (:mod:`.guided`).
The ComfyUI nodes built on them live in the repository's ``comfyui/`` folder."""

from .guided import GuidedDenoiser, process_of_model_sampling, schedule_from_sigmas
from .sampling import (
    PROCESSES, SAMPLERS, resolve_process, run_sampler, sample_dpmpp_2m_hb, sample_dpmpp_3m_hb, sample_ghvb,
    sample_plms_hb, sample_unipc_hb,
)

__all__ = [
    "GuidedDenoiser", "PROCESSES", "SAMPLERS", "process_of_model_sampling", "resolve_process", "run_sampler",
    "sample_dpmpp_2m_hb", "sample_dpmpp_3m_hb", "sample_ghvb", "sample_plms_hb", "sample_unipc_hb",
    "schedule_from_sigmas",
]
