"""Apply a perturbation (:mod:`steerdiff.guidance.perturbations`) to a diffusers network for one evaluation, with
diffusers' own machinery, and undo it exactly.

- :class:`AttentionIdentity` (PAG): the layers are found as diffusers' PAG pipelines find ``pag_applied_layers``
  (a regular expression searched in the names of the self-attention modules).  Where diffusers has PAG attention
  processors for a layer's processor (``AttnProcessor2_0``: UNets, DiT, PixArt; SD3's joint attention; Sana's
  linear attention), they define the perturbation, as in the ``*PAGPipeline`` classes: a call whose batch is two
  or three equal groups with the perturbed rows last runs under ``PAGIdentity*`` / ``PAGCFG*`` exactly as those
  pipelines run it, and a call whose rows are all perturbed runs each such layer on its rows twice, [org; ptb],
  keeping the perturbed half (only those layers repeat work), so both give the same perturbed prediction.  (On
  SD3's joint attention that is diffusers' masked identity: image tokens attend to themselves and to the text.)
  Elsewhere (Flux, Wan, Qwen-Image) diffusers' attention-score skip hook
  (``diffusers.hooks.layer_skip.AttentionProcessorSkipHook`` with ``skip_attention_scores``: scaled dot-product
  attention returns its values), as its modular PAG guider does.
- :class:`QueryBlur` (SEG): a ``diffusers.hooks`` hook on the query projection of those layers blurs its output
  over the token grid as the SEG paper's code does (Gaussian of std sigma, kernel ceil(6 sigma) + 1 made odd,
  reflect padding; sigma = inf: the mean).  diffusers' ``SmoothedEnergyGuidanceHook`` is not used: its
  ``_gaussian_blur_2d`` takes the mean for finite sigma and blurs for infinite sigma, the reverse of the paper's
  code (SusungHong/SEG-SDXL).  The grid follows the latent's aspect ratio (the paper's code assumes square images).
- :class:`SkipLayers` (SLG / STG): a ``diffusers.hooks`` hook on each skipped block returns the block's inputs in
  the order the block returns its outputs, read from diffusers' ``TransformerBlockRegistry``.  (diffusers'
  ``TransformerBlockSkipHook`` returns (hidden_states, encoder_hidden_states) whatever that order is, which swaps
  the text and image streams of blocks that return the text stream first, SD3's ``JointTransformerBlock`` and
  Flux's among them.)  ``skip="attention"`` uses diffusers' layer-skip hook for the self-attention of those blocks.
- :class:`WeakModel` (AutoGuidance): the weak network is called instead (loaded once from a folder when given one).

Every hook is registered for the duration of one ``with perturbed(...)`` block and removed after it, leaving each
module's ``__dict__`` as it was.
"""

from __future__ import annotations

import json
import math
import re
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.hooks import HookRegistry, LayerSkipConfig, ModelHook
from diffusers.hooks._common import _ATTENTION_CLASSES
from diffusers.hooks._helpers import AttentionProcessorRegistry, TransformerBlockRegistry
from diffusers.hooks.layer_skip import AttentionProcessorSkipHook, _apply_layer_skip_hook
from diffusers.models import attention_processor as ap

from ..guidance.perturbations import AttentionIdentity, Perturbation, QueryBlur, SkipLayers, WeakModel
from ..testbeds.digits import DIGITS_FLOW_WEAK_MODEL_PATH, DIGITS_WEAK_MODEL_PATH
from ..weights import check_safetensors_folder

HOOK_NAME = "steerdiff_perturbation"
BLOCK_STACKS = ("transformer_blocks", "blocks", "layers", "single_transformer_blocks", "temporal_transformer_blocks")
"""The block stacks ``fqn="auto"`` looks for, in this order (diffusers' own "auto" order varies from run to run)."""

# processor of an unperturbed layer -> diffusers' PAG processors for batches [uncond; cond; perturbed] and [cond; perturbed]
_PAG_PROCESSORS = {
    ap.AttnProcessor2_0: (ap.PAGCFGIdentitySelfAttnProcessor2_0, ap.PAGIdentitySelfAttnProcessor2_0),
    ap.JointAttnProcessor2_0: (ap.PAGCFGJointAttnProcessor2_0, ap.PAGJointAttnProcessor2_0),
    ap.SanaLinearAttnProcessor2_0: (ap.PAGCFGSanaLinearAttnProcessor2_0, ap.PAGIdentitySanaLinearAttnProcessor2_0),
}


def _base(module: torch.nn.Module) -> torch.nn.Module:
    return getattr(module, "_orig_mod", module)  # torch.compile's OptimizedModule keeps the network here


# -- finding layers ------------------------------------------------------------------------------------------
def self_attention_layers(module: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(name, module) of every self-attention layer of ``module``."""
    return [
        (name, m) for name, m in _base(module).named_modules()
        if isinstance(m, _ATTENTION_CLASSES) and not getattr(m, "is_cross_attention", False)
    ]


def _matches(layer: str, name: str) -> bool:
    """diffusers' PAGMixin rule: the pattern is searched in the module name (not a numeric last-part coincidence)."""
    if re.search(layer, name) is None:
        return False
    a, b = layer.split(".")[-1], name.split(".")[-1]
    return not (a.isnumeric() and b.isnumeric() and a == b)


def _listing(names: list[str], limit: int = 12) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


_MATCHED: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()


def matched_attention_layers(module: torch.nn.Module, layers: tuple[str, ...]) -> list[tuple[str, torch.nn.Module]]:
    """The self-attention layers the patterns ``layers`` select (found once per network and patterns); a pattern
    that selects none is an error naming the layers that exist."""
    cache = _MATCHED.setdefault(_base(module), {})
    if layers not in cache:
        cache[layers] = _match_attention_layers(module, layers)
    return cache[layers]


def _match_attention_layers(module: torch.nn.Module, layers: tuple[str, ...]) -> list[tuple[str, torch.nn.Module]]:
    available = self_attention_layers(module)
    if not available:
        raise ValueError(f"{type(_base(module)).__name__} has no self-attention layers to perturb")
    chosen: dict[str, torch.nn.Module] = {}
    for layer in layers:
        try:
            hits = [(n, m) for n, m in available if _matches(layer, n)]
        except re.error as err:
            raise ValueError(f"layer {layer!r} is not a valid regular expression ({err})") from None
        if not hits:
            raise ValueError(
                f"layer {layer!r} matches no self-attention layer of {type(_base(module)).__name__}; its self-attention "
                f"layers are: {_listing([n for n, _ in available])}"
            )
        chosen.update(hits)
    return list(chosen.items())


def _block_stack(module: torch.nn.Module, perturbation: SkipLayers) -> str:
    """The fully qualified name of the block stack the layers index, checked against the network: ``fqn="auto"``
    is the first of :data:`BLOCK_STACKS` at the top level; an explicit fqn may name any ``ModuleList`` of blocks
    (a UNet's ``mid_block.attentions`` with ``skip="attention"``)."""
    base = _base(module)
    lists = {name: len(m) for name, m in base.named_modules() if isinstance(m, torch.nn.ModuleList) and name}
    stacks = {n: k for n, k in lists.items() if n.split(".")[-1] in (*BLOCK_STACKS, "attentions")}
    described = ", ".join(f"{n} ({k} blocks)" for n, k in stacks.items()) or "none"
    fqn = perturbation.fqn
    if fqn == "auto":
        fqn = next((n for n in BLOCK_STACKS if n in lists), None)
        if fqn is None:
            raise ValueError(f"{type(base).__name__} has no top-level transformer block stack; give fqn, one of: {described}")
    if fqn not in lists:
        raise ValueError(f"fqn {fqn!r} is not a block stack of {type(base).__name__}; its block stacks: {described}")
    bad = [i for i in perturbation.layers if i >= lists[fqn]]
    if bad:
        raise ValueError(f"layers {bad} do not exist in {fqn} of {type(base).__name__} ({lists[fqn]} blocks: 0..{lists[fqn] - 1})")
    return fqn


def check_perturbation(module: torch.nn.Module, perturbation: Perturbation) -> None:
    """Raise a clear error when ``perturbation`` cannot apply to ``module`` (before any sampling)."""
    if isinstance(perturbation, (AttentionIdentity, QueryBlur)):
        matched_attention_layers(module, perturbation.layers)
        if isinstance(perturbation, QueryBlur):
            missing = [n for n, m in matched_attention_layers(module, perturbation.layers) if not isinstance(getattr(m, "to_q", None), torch.nn.Linear)]
            if missing:
                raise ValueError(f"SEG blurs the query projection to_q, which these layers lack: {_listing(missing)}")
    elif isinstance(perturbation, SkipLayers):
        fqn = _block_stack(module, perturbation)
        for i in perturbation.layers:
            block = _base(module).get_submodule(fqn)[i]
            try:
                if perturbation.skip == "block":
                    TransformerBlockRegistry.get(type(block))
                else:
                    for _, m in self_attention_layers(block):
                        AttentionProcessorRegistry.get(type(m.processor))
            except ValueError:
                what = f"{type(block).__name__} blocks" if perturbation.skip == "block" else "the attention processors of " + type(block).__name__
                raise ValueError(f"skip={perturbation.skip!r} is not available for {what} (diffusers' layer-skip hooks do not know them)") from None
    elif isinstance(perturbation, WeakModel):
        if perturbation.model is module or perturbation.model is _base(module):
            raise ValueError("weak_model is the model itself: AutoGuidance needs a weaker network")
        weak_network(module, perturbation)  # a folder is loaded (and checked) now, before any sampling
    else:
        raise TypeError(f"unknown perturbation {perturbation!r}")


def supports_groups(module: torch.nn.Module, perturbation: Perturbation) -> bool:
    """Whether a call of equal row groups, the last perturbed, can run as one call (PAG on layers whose processors
    have diffusers' PAG counterparts)."""
    if not isinstance(perturbation, AttentionIdentity):
        return False
    return all(type(m.processor) in _PAG_PROCESSORS for _, m in matched_attention_layers(module, perturbation.layers))


class _PerturbedRowsOnly:
    """Every row of the call perturbed through diffusers' two-group PAG processor: the layer's rows are doubled,
    [org; ptb], and the perturbed half is returned."""

    def __init__(self, pag):
        self.pag = pag

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        n = hidden_states.shape[0]
        double = lambda t: None if t is None else torch.cat([t, t])  # noqa: E731
        extra = {} if temb is None else {"temb": double(temb)}
        out = self.pag(attn, double(hidden_states), double(encoder_hidden_states), attention_mask, **extra)
        if isinstance(out, tuple):
            return tuple(o[n:] for o in out)
        return out[n:]


# -- hooks -------------------------------------------------------------------------------------------------
@contextmanager
def _hooked(modules: list[torch.nn.Module], make_hook) -> Iterator[None]:
    """``make_hook()`` registered on each module through diffusers' HookRegistry, removed afterwards with the
    module's ``forward`` and ``_diffusers_hook`` attributes as they were."""
    saved = [(m, m.__dict__.get("forward", _MISSING), m.__dict__.get("_diffusers_hook", _MISSING)) for m in modules]
    try:
        for m in modules:
            HookRegistry.check_if_exists_or_initialize(m).register_hook(make_hook(), HOOK_NAME)
        yield
    finally:
        _unhook(saved)


def _unhook(saved) -> None:
    for m, forward, registry in saved:
        hooks = m.__dict__.get("_diffusers_hook")
        if hooks is not None:
            hooks.remove_hook(HOOK_NAME, recurse=False)
        for key, value in (("forward", forward), ("_diffusers_hook", registry)):
            if value is _MISSING:
                m.__dict__.pop(key, None)
            else:
                m.__dict__[key] = value


_MISSING = object()


def _kernel(sigma: float, size: int, device, dtype) -> torch.Tensor:
    """The SEG code's 1-D Gaussian: ceil(6 sigma) + 1 taps made odd, at most the axis length (+1 when even)."""
    k = math.ceil(6 * sigma) + 1 - math.ceil(6 * sigma) % 2
    k = min(k, size - (size % 2 - 1))
    half = (k - 1) * 0.5
    x = torch.linspace(-half, half, steps=k, dtype=torch.float64)
    pdf = torch.exp(-0.5 * (x / sigma) ** 2)
    return (pdf / pdf.sum()).to(device=device, dtype=dtype)


def _grid(seq: int, spatial) -> tuple[int, int] | None:
    """(h, w) with h w = seq and h / w the latent's aspect ratio (square when unknown); None if there is none."""
    if spatial is not None:
        H, W = spatial
        w = round(math.sqrt(seq * W / H))
        if w > 0 and seq % w == 0 and abs(seq // w * W - w * H) <= max(H, W):
            return seq // w, w
    side = math.isqrt(seq)
    return (side, side) if side * side == seq else None


def blur_queries(query: torch.Tensor, sigma: float, spatial=None, layer: str = "") -> torch.Tensor:
    """SEG's query blur on a query tensor (B, N, C) whose N tokens form an image grid."""
    b, n, c = query.shape
    grid = _grid(n, spatial)
    if grid is None:
        known = f"a {spatial[0]} x {spatial[1]} latent" if spatial is not None else "a square grid (the latent's size is not known here)"
        raise ValueError(
            f"SEG cannot lay the {n} query tokens of layer {layer!r} out on {known}: it blurs the queries of image "
            "tokens only, not video tokens nor joint text-image streams (Flux's single blocks; name its double-stream "
            "blocks with '^transformer_blocks')"
        )
    h, w = grid
    q = query.transpose(1, 2).reshape(b, c, h, w)
    if math.isinf(sigma):
        q = q.mean(dim=(-2, -1), keepdim=True).expand(b, c, h, w)
    else:
        ky = _kernel(sigma, h, q.device, q.dtype)
        kx = _kernel(sigma, w, q.device, q.dtype)
        py, px = ky.numel() // 2, kx.numel() // 2
        q = F.pad(q, [px, px, py, py], mode="reflect")
        q = F.conv2d(q, (ky[:, None] * kx[None, :]).expand(c, 1, ky.numel(), kx.numel()), groups=c)
    return q.reshape(b, c, n).transpose(1, 2).contiguous()


class _QueryBlurHook(ModelHook):
    def __init__(self, sigma: float, spatial, layer: str):
        super().__init__()
        self.sigma, self.spatial, self.layer = sigma, spatial, layer

    def post_forward(self, module, output):
        return blur_queries(output, self.sigma, self.spatial, self.layer)


class _BlockSkipHook(ModelHook):
    """A transformer block that returns its inputs, in the order and number of its own outputs."""

    def initialize_hook(self, module):
        self._metadata = TransformerBlockRegistry.get(type(module))
        return module

    def new_forward(self, module, *args, **kwargs):
        meta = self._metadata
        hidden = meta._get_parameter_from_args_kwargs(meta.hidden_states_argument_name, args, kwargs)
        if meta.return_encoder_hidden_states_index is None:
            return hidden
        encoder = meta._get_parameter_from_args_kwargs(meta.encoder_hidden_states_argument_name, args, kwargs)
        outputs = [None, None]
        outputs[meta.return_hidden_states_index] = hidden
        outputs[meta.return_encoder_hidden_states_index] = encoder
        return tuple(outputs)


# -- weak models --------------------------------------------------------------------------------------------
def _load_weak(perturbation: WeakModel, like: torch.nn.Module) -> torch.nn.Module:
    """The weak network of a folder, as the model's class, on its device and dtype (cached)."""
    base = _base(like)
    cls = type(base)
    key = (cls, base.device, base.dtype)
    if key in perturbation.loaded:
        return perturbation.loaded[key]
    root = _weak_folder(perturbation.model)
    folder = root
    if (root / "model_index.json").is_file():
        subfolders = [d for d in sorted(root.iterdir()) if (d / "config.json").is_file()
                      and json.loads((d / "config.json").read_text()).get("_class_name") == cls.__name__]
        if len(subfolders) != 1:
            raise ValueError(
                f"weak_model {str(root)!r} is a pipeline folder with {len(subfolders)} {cls.__name__} components; "
                "give the model's own folder (the one holding config.json)"
            )
        folder = subfolders[0]
    check_safetensors_folder(folder)
    declared = json.loads((folder / "config.json").read_text()).get("_class_name")
    if declared not in (None, cls.__name__):
        raise ValueError(f"weak_model {str(folder)!r} holds a {declared}; the model is a {cls.__name__}")
    weak = cls.from_pretrained(folder, use_safetensors=True, local_files_only=True, torch_dtype=base.dtype)
    weak = weak.to(base.device).eval().requires_grad_(False)
    perturbation.loaded[key] = weak
    return weak


def _weak_folder(model) -> Path:
    """A weak model's folder: the path itself, or a built-in weak digits model."""
    if isinstance(model, Path):
        return model
    return {"digits-weak": DIGITS_WEAK_MODEL_PATH, "digits-flow-weak": DIGITS_FLOW_WEAK_MODEL_PATH}[model]


def weak_network(module: torch.nn.Module, perturbation: WeakModel) -> torch.nn.Module:
    """The network AutoGuidance calls in place of ``module`` (a folder's is loaded once)."""
    if isinstance(perturbation.model, (str, Path)):
        return _load_weak(perturbation, module)
    return perturbation.model


# -- the one entry point ----------------------------------------------------------------------------------------
@contextmanager
def perturbed(module: torch.nn.Module, perturbation: Perturbation, groups: int | None = None,
              spatial: tuple[int, int] | None = None) -> Iterator[torch.nn.Module | None]:
    """Within the block, a call of ``module`` gives the perturbed prediction; the value yielded is the network to
    call instead (AutoGuidance's weak model), or None (call ``module`` itself).

    ``groups``: the call's batch is ``groups`` (2 or 3) equal row groups and only the last one is perturbed (PAG's
    batched layout; only where :func:`supports_groups`); None: every row is perturbed.  ``spatial``: (H, W) of the
    latent, for SEG's token grid.
    """
    if isinstance(perturbation, WeakModel):
        if groups is not None:
            raise ValueError("a weak model cannot share a batch with the model")
        yield weak_network(module, perturbation)
        return
    if isinstance(perturbation, AttentionIdentity):
        layers = matched_attention_layers(module, perturbation.layers)
        if groups is not None:
            if groups not in (2, 3) or not supports_groups(module, perturbation):
                raise ValueError(f"PAG's batched layout needs 2 or 3 groups and layers with PAG processors, got {groups}")
            saved = [(m, m.processor) for _, m in layers]
            try:
                for m, processor in saved:
                    cfg, plain = _PAG_PROCESSORS[type(processor)]
                    m.processor = (cfg if groups == 3 else plain)()
                yield None
            finally:
                for m, processor in saved:
                    m.processor = processor
            return
        with_pag = [m for _, m in layers if type(m.processor) in _PAG_PROCESSORS]
        others = [m for _, m in layers if type(m.processor) not in _PAG_PROCESSORS]
        saved = [(m, m.processor) for m in with_pag]
        try:
            for m, processor in saved:
                m.processor = _PerturbedRowsOnly(_PAG_PROCESSORS[type(processor)][1]())
            with _hooked(others, lambda: AttentionProcessorSkipHook(None, skip_attention_scores=True)):
                yield None
        finally:
            for m, processor in saved:
                m.processor = processor
        return
    if groups is not None:
        raise ValueError(f"{type(perturbation).__name__} perturbs whole calls only")
    if isinstance(perturbation, QueryBlur):
        hooks = [(m.to_q, _QueryBlurHook(perturbation.sigma, spatial, name))
                 for name, m in matched_attention_layers(module, perturbation.layers)]
        saved = [(q, q.__dict__.get("forward", _MISSING), q.__dict__.get("_diffusers_hook", _MISSING)) for q, _ in hooks]
        try:
            for q, hook in hooks:
                HookRegistry.check_if_exists_or_initialize(q).register_hook(hook, HOOK_NAME)
            yield None
        finally:
            _unhook(saved)
        return
    if isinstance(perturbation, SkipLayers):
        fqn = _block_stack(module, perturbation)
        base = _base(module)
        blocks = [base.get_submodule(fqn)[i] for i in perturbation.layers]
        if perturbation.skip == "block":
            with _hooked(blocks, _BlockSkipHook):
                yield None
            return
        config = LayerSkipConfig(indices=list(perturbation.layers), fqn=fqn, skip_attention=True, skip_ff=False)
        touched = [m for block in blocks for m in block.modules()]  # where diffusers registers its hooks
        saved = [(m, m.__dict__.get("forward", _MISSING), m.__dict__.get("_diffusers_hook", _MISSING)) for m in touched]
        try:
            _apply_layer_skip_hook(base, config, name=HOOK_NAME)
            yield None
        finally:
            _unhook(saved)
        return
    raise TypeError(f"unknown perturbation {perturbation!r}")


__all__ = ["BLOCK_STACKS", "blur_queries", "check_perturbation", "matched_attention_layers", "perturbed",
           "self_attention_layers", "supports_groups", "weak_network"]
