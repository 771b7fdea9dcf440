"""diffusers models as the network of steerdiff's model boundary (:class:`steerdiff.core.Denoiser`): called with
their conditioning as tensors, with the unconditional input of classifier-free guidance.

What "conditioning" is depends on the model:

- class-conditional ``UNet2DModel`` (``num_class_embeds``; null id = the last one): the class embedding vector
  (B, E) or (1, E), i.e. what ``unet.class_embedding`` returns for a label, which is fed to the network
  in place of that lookup; integer labels (B,) are accepted too (then the lookup itself runs);
- ``UNet2DConditionModel``: ``encoder_hidden_states`` (B, L, D) or (1, L, D), e.g. text embeddings;
- :class:`~steerdiff.testbeds.mixture.GaussianMixtureDenoiser`: integer labels (B,) (not differentiable);
- any other diffusers-style model ``model(x, t).sample``: no conditioning (None).

:func:`denoiser_for` builds the boundary for such a model: ``denoiser_for(model, process, prediction_type,
guidance=APG(5), cond=labels)``; guidance (a weight or any rule) is applied there, on one batched network call on
[uncond, cond].
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from ..core.denoiser import Denoiser
from ..testbeds.mixture import GaussianMixtureDenoiser
from .perturb import check_perturbation, perturbed

CONDITIONING_KINDS = ("class_embedding", "encoder_hidden_states", "class_labels", "none")


def conditioning_kind(model: nn.Module) -> str:
    """Which of :data:`CONDITIONING_KINDS` ``model`` takes (see the module docstring)."""
    from diffusers import UNet2DConditionModel, UNet2DModel

    if isinstance(model, UNet2DConditionModel):
        return "encoder_hidden_states"
    if isinstance(model, GaussianMixtureDenoiser):
        return "class_labels" if int(model.config.num_classes) > 0 else "none"
    if isinstance(model, UNet2DModel) and model.class_embedding is not None:
        if not isinstance(model.class_embedding, nn.Embedding):
            raise ValueError(
                f"only UNet2DModel class conditioning through num_class_embeds (an nn.Embedding) is supported, got "
                f"class_embed_type={model.config.class_embed_type!r}"
            )
        return "class_embedding"
    return "none"


def class_embeddings(unet: nn.Module, class_labels) -> torch.Tensor:
    """The class embedding vectors (B, E) of ``class_labels`` (B,): the starting point of an embedding to optimise."""
    labels = torch.as_tensor(class_labels, device=unet.class_embedding.weight.device)
    if labels.ndim == 0:
        labels = labels.reshape(1)
    return unet.class_embedding(labels)


@contextmanager
def class_embedding_override(unet: nn.Module, embedding: torch.Tensor):
    """Within the block, ``unet.class_embedding`` returns ``embedding`` whatever labels it is given."""
    handle = unet.class_embedding.register_forward_hook(lambda module, inputs, output: embedding.to(output.dtype))
    try:
        yield
    finally:
        handle.remove()


class ConditionedNetwork:
    """``(x, t, cond) -> output`` of a diffusers-style model, with ``null`` (the unconditional input) and ``join``
    (the conditioning of a batch [uncond rows; cond rows]) for :class:`~steerdiff.core.Denoiser`.

    ``uncond`` is the unconditional branch's conditioning: None means the model's null input (the null class id
    for class-conditional models); a text-conditioned model needs it given (e.g. the empty prompt's embedding)
    for guidance.  It is held fixed (no gradient flows to a given ``uncond`` tensor; with the default null class
    the gradient reaches the model's own embedding table, which is a parameter).
    """

    def __init__(self, model: nn.Module, uncond: torch.Tensor | None = None):
        self.model = model
        self.kind = conditioning_kind(model)
        self.uncond = None if uncond is None else uncond.detach()

    @property
    def conditional(self) -> bool:
        return self.kind != "none"

    def check_guidance(self, guided: bool) -> None:
        """Raise a clear error when guidance cannot run on this model."""
        if not guided:
            return
        if self.kind == "none":
            raise ValueError("guidance needs a conditional model (class- or text-conditioned)")
        if self.kind == "encoder_hidden_states" and self.uncond is None:
            raise ValueError(
                "uncond_conditioning is required for classifier-free guidance with a text-conditioned model "
                "(the encoder_hidden_states of the empty prompt)"
            )

    def check_conditioning(self, cond) -> None:
        """Raise a clear error when ``cond`` does not fit the model."""
        if self.kind == "none":
            if cond is not None:
                raise ValueError(f"{type(self.model).__name__} is unconditional: conditioning must be None")
            return
        if cond is None:
            if self.kind in ("class_embedding", "encoder_hidden_states"):
                what = "class labels (B,) or class embeddings (B, E)" if self.kind == "class_embedding" else (
                    "encoder_hidden_states (B, L, D)"
                )
                raise ValueError(f"{type(self.model).__name__} needs a conditioning: {what}")
            return
        if not torch.is_tensor(cond):
            raise ValueError(f"conditioning must be a tensor, got {type(cond).__name__}")
        if self.kind == "class_labels" and cond.is_floating_point():
            raise ValueError("a GaussianMixtureDenoiser is conditioned on integer class_labels (B,), got a float tensor")
        if self.kind == "class_embedding" and cond.is_floating_point():
            dim = self.model.class_embedding.embedding_dim
            if cond.ndim != 2 or cond.shape[1] != dim:
                raise ValueError(f"a class embedding must have shape (B, {dim}) or (1, {dim}), got {tuple(cond.shape)}")
        if self.kind == "encoder_hidden_states" and (not cond.is_floating_point() or cond.ndim != 3):
            raise ValueError(f"encoder_hidden_states must be a float tensor (B, L, D), got {tuple(cond.shape)} {cond.dtype}")

    def null(self, batch: int, device) -> torch.Tensor | None:
        if self.uncond is not None:
            if self.uncond.shape[0] == batch:
                return self.uncond
            if self.uncond.shape[0] == 1:
                return self.uncond.expand(batch, *self.uncond.shape[1:])
            raise ValueError(f"uncond_conditioning has a batch of {self.uncond.shape[0]} for {batch} samples")
        if self.kind == "class_embedding":
            return torch.full((batch,), self.model.config.num_class_embeds - 1, dtype=torch.long, device=device)
        if self.kind == "class_labels":
            return torch.full((batch,), int(self.model.config.num_classes), dtype=torch.long, device=device)
        return None

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        if cond is None and self.kind in ("class_embedding", "class_labels"):
            cond = self.null(x.shape[0], x.device)  # the whole mixture / the null class
        if self.kind == "none":
            return self.model(x, t).sample
        if self.kind == "encoder_hidden_states":
            return self.model(x, t, encoder_hidden_states=cond).sample
        if self.kind == "class_labels":
            return self.model(x, t, class_labels=cond).sample
        if not cond.is_floating_point():  # integer labels: the model's own lookup
            return self.model(x, t, class_labels=cond).sample
        with class_embedding_override(self.model, cond):
            return self.model(x, t, class_labels=torch.zeros(x.shape[0], dtype=torch.long, device=x.device)).sample

    def check_perturbations(self, perturbations) -> None:
        """Raise a clear error when a rule's perturbation cannot apply to the model."""
        for perturbation in perturbations.values():
            check_perturbation(self.model, perturbation)

    @contextmanager
    def perturbed(self, perturbation, spatial=None):
        """This network with ``perturbation`` applied (:func:`steerdiff.pipelines.perturb.perturbed`), or the weak
        network's, for the calls made within the block."""
        with perturbed(self.model, perturbation, spatial=spatial) as other:
            yield self if other is None else ConditionedNetwork(other, self.uncond)

    def join(self, uncond: torch.Tensor | None, cond: torch.Tensor | None) -> torch.Tensor | None:
        """The conditioning of the batch [uncond rows; cond rows]."""
        if cond is None:  # a label-conditioned mixture asked for the whole mixture: both branches null
            cond = self.null(uncond.shape[0] if uncond is not None else 0, None if uncond is None else uncond.device)
        if self.kind == "class_embedding" and uncond.is_floating_point() != cond.is_floating_point():
            embed = self.model.class_embedding
            uncond = embed(uncond) if not uncond.is_floating_point() else uncond
            cond = embed(cond) if not cond.is_floating_point() else cond
        return torch.cat([uncond.to(cond.dtype) if cond.is_floating_point() else uncond, cond])


def denoiser_for(model: nn.Module, process, prediction_type: str, guidance=1.0, cond=None, uncond=None,
                 check_finite: bool = False):
    """The :class:`~steerdiff.core.Denoiser` of a diffusers-style ``model`` (see the module docstring) with
    ``guidance`` (a weight or a rule), the samples' conditioning ``cond`` and the unconditional ``uncond``."""
    network = ConditionedNetwork(model, uncond)
    denoiser = Denoiser(network, process, prediction_type, guidance, cond, check_finite)
    network.check_guidance(denoiser.guided)
    network.check_conditioning(cond)
    network.check_perturbations(getattr(denoiser.rule, "perturbations", None) or {})
    return denoiser
