"""What to change in the network for a perturbed prediction: descriptions that rules declare in their
``perturbations``; :mod:`steerdiff.pipelines.perturb` applies them to diffusers models, reversibly, for one
evaluation at a time.

=====================  ==============================================================  ============================
perturbation           the perturbed evaluation                                        used by
=====================  ==============================================================  ============================
AttentionIdentity      self-attention maps replaced by the identity (output = value)    PAG (Ahn et al. 2024)
                       in the layers whose names match ``layers`` (regular
                       expressions, diffusers' ``pag_applied_layers``)
QueryBlur              the queries of those self-attention layers blurred by a          SEG (Hong 2024)
                       Gaussian of std ``sigma`` over the token grid (inf: their mean)
SkipLayers             the listed transformer blocks (``layers``: indices into the      SLG (SD3.5), STG
                       block stack ``fqn``) skipped whole, or their attention only
WeakModel              another network called in the model's place (a smaller or       AutoGuidance (Karras et al.
                       less-trained version of it, or a local folder holding one)      2024)
=====================  ==============================================================  ============================

Every perturbed prediction is evaluated on the conditional inputs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any


class Perturbation:
    """Base class of the descriptions above."""

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self._fields().items())
        return f"{type(self).__name__}({fields})"

    def _fields(self) -> dict[str, Any]:
        return dict(vars(self))


def _names(layers, what: str) -> tuple[str, ...]:
    if isinstance(layers, str):
        layers = (layers,)
    if not isinstance(layers, Sequence) or not layers or not all(isinstance(x, str) and x for x in layers):
        raise ValueError(f"{what} must be a non-empty list of layer names (regular expressions), got {layers!r}")
    return tuple(layers)


class AttentionIdentity(Perturbation):
    """Self-attention replaced by the identity in the layers matching ``layers`` (PAG's perturbation).  A name is
    matched as diffusers' PAG pipelines match ``pag_applied_layers``: a regular expression searched in the module
    names of the self-attention layers ("mid", "down.block_1", "transformer_blocks.(0|1)")."""

    def __init__(self, layers: str | Sequence[str] = ("mid",)):
        self.layers = _names(layers, "layers")


class QueryBlur(Perturbation):
    """The queries of the matching self-attention layers blurred by a 2-D Gaussian of std ``sigma`` tokens over the
    token grid (SEG's perturbation); ``sigma = inf`` replaces every query by their mean (uniform attention)."""

    def __init__(self, layers: str | Sequence[str] = ("mid",), sigma: float = math.inf):
        self.layers = _names(layers, "layers")
        if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not sigma > 0:
            raise ValueError(f"sigma must be a number > 0 (inf: uniform queries), got {sigma!r}")
        self.sigma = float(sigma)


SKIPS = ("block", "attention")


class SkipLayers(Perturbation):
    """The transformer blocks ``layers`` (indices into the block stack ``fqn``; "auto": the network's main stack,
    e.g. ``transformer_blocks``) skipped: ``skip="block"`` passes the block's input through (SD3's ``skip_layers``,
    skip-layer guidance), ``skip="attention"`` skips its self-attention only (spatiotemporal guidance, STG-A)."""

    def __init__(self, layers: int | Sequence[int], fqn: str = "auto", skip: str = "block"):
        if isinstance(layers, int) and not isinstance(layers, bool):
            layers = (layers,)
        if (
            not isinstance(layers, Sequence) or isinstance(layers, str) or not layers
            or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers)
        ):
            raise ValueError(f"layers must be a non-empty list of block indices >= 0, got {layers!r}")
        if not isinstance(fqn, str) or not fqn:
            raise ValueError(f"fqn must be the name of a block stack (or 'auto'), got {fqn!r}")
        if skip not in SKIPS:
            raise ValueError(f"skip must be one of {SKIPS}, got {skip!r}")
        self.layers, self.fqn, self.skip = tuple(layers), fqn, skip


BUILTIN_WEAK_MODELS = ("digits-weak", "digits-flow-weak")
"""The shipped weak versions of the digits models (the same networks trained for 1/8 of the budget)."""


class WeakModel(Perturbation):
    """Another network called in the model's place: ``model`` is a module with the same call signature as the
    model (a smaller or less-trained version of it), the path of a local folder holding one (a pipeline folder
    with ``model_index.json``, whose component of the model's own class is used, or a model folder with
    ``config.json``; safetensors only), or one of :data:`BUILTIN_WEAK_MODELS`; folders are loaded once, on the
    model's device and dtype, when the rule is attached."""

    def __init__(self, model):
        if isinstance(model, str) and model in BUILTIN_WEAK_MODELS:
            pass
        elif isinstance(model, (str, Path)):
            model = Path(model).expanduser()
            if not model.is_dir():
                raise FileNotFoundError(
                    f"weak_model {str(model)!r} is not a folder (a diffusers pipeline or model folder) nor one of the "
                    f"built-in weak models {BUILTIN_WEAK_MODELS}"
                )
        elif not callable(model):
            raise TypeError(f"weak_model must be a network (an nn.Module) or a local folder, got {type(model).__name__}")
        self.model = model
        self.loaded: dict = {}  # (module class, device, dtype) -> the loaded network, for folders

    def _fields(self) -> dict[str, Any]:
        model = self.model
        return {"model": model if isinstance(model, str) else str(model) if isinstance(model, Path) else type(model).__name__}


__all__ = ["BUILTIN_WEAK_MODELS", "SKIPS", "AttentionIdentity", "Perturbation", "QueryBlur", "SkipLayers", "WeakModel"]
