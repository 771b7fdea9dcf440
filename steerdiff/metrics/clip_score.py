"""CLIP score of text-to-image samples against their prompts (Hessel et al., "CLIPScore: A Reference-free Evaluation
Metric for Image Captioning", EMNLP 2021), from a CLIP model the user keeps in a local folder.

    clip_score = mean_i 100 * max(cos(E_img(x_i), E_txt(p_i)), 0)

with E_img / E_txt the projected image and text embeddings of ``transformers.CLIPModel`` (the scale 100 and the
clamp at 0 as in torchmetrics' CLIPScore; the paper's CLIP-S uses 2.5 instead of 100).  Images are resized
(bicubic, shorter side to the vision tower's size), centre-cropped and normalised with the folder's
``preprocessor_config.json`` mean and std, or OpenAI CLIP's when it has none.  The folder is what
``CLIPModel.save_pretrained`` and a tokenizer's ``save_pretrained`` write (safetensors weights); nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from ..weights import check_safetensors_folder
from .base import Metric, SampleSet
from .features import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, clip_projection, file_digest


def clip_pixels(images: torch.Tensor, size: int, mean, std) -> torch.Tensor:
    """(N, 3, H, W) in [-1, 1] -> CLIP's input: shorter side resized to ``size`` (bicubic), centre crop, normalised."""
    x = ((images.to(torch.float32) + 1) / 2).clamp(0, 1)
    h, w = x.shape[-2:]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    top, left = (nh - size) // 2, (nw - size) // 2
    x = x[..., top : top + size, left : left + size]
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


class CLIPScore(Metric):
    """``clip_score``: kwargs ``model`` (a local CLIP folder, required), ``batch_size``, ``device``."""

    name = "clip_score"
    keys = ("clip_score",)

    def __init__(self, model: str | None = None, batch_size: int = 32, device: str | None = None):
        if model is None:
            raise ValueError("clip_score needs `model`: a local CLIP folder (CLIPModel.save_pretrained plus its tokenizer); "
                             "nothing is downloaded")
        self.folder = Path(model).expanduser()
        check_safetensors_folder(self.folder)
        config = json.loads((self.folder / "config.json").read_text())
        if config.get("model_type") != "clip":
            raise ValueError(f"clip_score: {str(self.folder)!r} holds a {config.get('model_type')!r} model, not a CLIP model")
        if int(batch_size) < 1:
            raise ValueError(f"clip_score: batch_size must be >= 1, got {batch_size}")
        self.batch_size, self.device = int(batch_size), device
        self._model = self._tokenizer = None

    def fingerprint(self) -> str:
        return "clip_score:" + ",".join(file_digest(str(p)) for p in sorted(self.folder.glob("*.safetensors")))

    def check(self, sample_shape, denoiser=None) -> None:
        if len(sample_shape) != 3 or sample_shape[0] != 3:
            raise ValueError(f"clip_score needs RGB images (3, H, W); this model makes {tuple(sample_shape)} samples")

    def _load(self):
        if self._model is None:
            from transformers import AutoTokenizer, CLIPModel

            self._model = CLIPModel.from_pretrained(self.folder, local_files_only=True, use_safetensors=True).eval()
            self._model.to(self.device or "cpu")
            self._tokenizer = AutoTokenizer.from_pretrained(self.folder, local_files_only=True)
        return self._model, self._tokenizer

    def __call__(self, samples: SampleSet) -> dict[str, float]:
        if samples.prompts is None:
            raise ValueError("clip_score scores images against their prompts: text-to-image models only")
        cos = self.cosines(samples.samples, samples.prompts)
        return {"clip_score": float((100 * cos.clamp(min=0)).mean())}

    def cosines(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """cos(E_img(x_i), E_txt(p_i)) per sample, float64 (N,), for (N, 3, H, W) images in [-1, 1]."""
        model, tokenizer = self._load()
        pre = self.folder / "preprocessor_config.json"
        stats = json.loads(pre.read_text()) if pre.is_file() else {}
        mean, std = stats.get("image_mean", OPENAI_CLIP_MEAN), stats.get("image_std", OPENAI_CLIP_STD)
        size = int(model.config.vision_config.image_size)
        device = next(model.parameters()).device
        out = []
        with torch.no_grad():
            for start in range(0, images.shape[0], self.batch_size):
                texts = list(prompts[start : start + self.batch_size])
                pixels = clip_pixels(images[start : start + self.batch_size], size, mean, std).to(device)
                tokens = tokenizer(texts, padding=True, truncation=True, return_tensors="pt").to(device)
                img = clip_projection(model.get_image_features(pixel_values=pixels)).to(torch.float64)
                txt = clip_projection(model.get_text_features(**tokens)).to(torch.float64)
                out.append(F.cosine_similarity(img, txt, dim=-1).cpu())
        return torch.cat(out)
