"""Feature spaces for Frechet distances and precision/recall, and cached reference features of data sets.

- ``digits``: the penultimate layer (64-d) of the shipped digits classifier
  (:func:`steerdiff.metrics.classifier.digits_features`), for 1x8x8 images;
- ``inception``: the 2048-d pool3 features of the FID Inception-v3 (:mod:`steerdiff.metrics.inception`),
  from a weights file the user supplies (nothing is downloaded);
- ``dinov2`` / ``clip``: DINOv2's CLS token (FD-DINOv2) and CLIP's image embedding (CLIP-FD), from local
  transformers folders.

The three network spaces resize and normalise 8-bit images as a preprocessing mode says
(:mod:`steerdiff.metrics.preprocessing`: pytorch-fid's by default, clean-fid's or torch-fidelity's).

Images are quantized like the field does before features are taken: u8 = round((x + 1) * 127.5) clipped to
[0, 255].  Reference features of a data set are computed once and cached in ``cache_dir`` (default
``$STEERDIFF_CACHE`` or ``~/.cache/steerdiff``), in a file named by the data set, the feature network
(with a hash of its weights) and the resolution the network reads, so a changed network never reuses
stale statistics.
"""

from __future__ import annotations

import hashlib
import json
import os
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from ..atomic_io import atomic_write
from ..options import check_options, named_options
from ..weights import check_safetensors_folder
from .base import Metric, SampleSet
from .classifier import CLASSIFIER_PATH, digits_features, quantize
from .inception import check_weights_file, load_fid_inception
from .preprocessing import MODES, check_mode, resize_for_network

REFERENCE_DATASETS = ("digits", "digits-train", "digits-test")
"""Built-in reference data sets (the 1,797 digits, or their train / test split); a ``.npy`` file of (N, C, H, W)
images in [-1, 1] or a folder of images works too."""
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_projection(output) -> torch.Tensor:
    """The projected embeddings of ``CLIPModel.get_image_features`` / ``get_text_features``: transformers 4 returns
    them, 5 an output whose pooler_output holds them."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


@lru_cache(maxsize=16)
def file_digest(path: str) -> str:
    """The first 12 hex digits of the file's SHA-256 (identifies weights and data files in cache names)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:12]


def default_cache_dir() -> Path:
    return Path(os.environ.get("STEERDIFF_CACHE", Path.home() / ".cache" / "steerdiff"))


class FeatureSpace:
    """A feature network: ``space(images)`` -> float64 (N, d) features of images in [-1, 1]."""

    name: str
    resolution: int

    def key(self) -> str:
        raise NotImplementedError

    def check(self, sample_shape: tuple[int, ...]) -> None:
        raise NotImplementedError

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class DigitsFeatures(FeatureSpace):
    """The digits classifier's penultimate layer (see :mod:`steerdiff.metrics.classifier`)."""

    name = "digits"
    resolution = 8

    def key(self) -> str:
        return f"digits-classifier-{file_digest(str(CLASSIFIER_PATH / 'model.safetensors'))}"

    def check(self, sample_shape) -> None:
        if tuple(sample_shape) != (1, 8, 8):
            raise ValueError(
                f"the digits feature space reads 1x8x8 images; this model makes {'x'.join(map(str, sample_shape))} "
                "samples (use features: inception with a weights file instead)"
            )

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return digits_features(images)


class NetworkFeatures(FeatureSpace):
    """A feature network fed 8-bit RGB images: resized to its input size as the preprocessing ``mode`` does
    (:mod:`steerdiff.metrics.preprocessing`), normalised as the network expects, run in batches on ``device`` in
    ``dtype`` (float32 by default; float16 / bfloat16 where asked), features returned as float64 on the CPU.  The
    folder tool (``steerdiff fid``) and the benchmark metrics both take features through :meth:`features_of_resized`."""

    input_size: int

    def __init__(self, batch_size: int = 50, device: str | None = None, mode: str = "pytorch-fid",
                 dtype: str = "float32"):
        from ..config import DTYPE_NAMES

        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if dtype not in DTYPE_NAMES:
            raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPE_NAMES)}")
        self.batch_size = int(batch_size)
        self.device = device
        self.mode = check_mode(mode).name
        self.dtype = dtype
        self._model = None

    @property
    def resolution(self) -> int:
        return self.input_size

    def check(self, sample_shape) -> None:
        if len(sample_shape) != 3 or sample_shape[0] not in (1, 3):
            raise ValueError(f"{self.name} features need 1- or 3-channel images (C, H, W); got samples of shape "
                             f"{tuple(sample_shape)}")

    def _suffix(self) -> str:
        return "" if self.mode == "pytorch-fid" and self.dtype == "float32" else f"-{self.mode}-{self.dtype}"

    def load(self) -> torch.nn.Module:
        raise NotImplementedError

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, model, x: torch.Tensor) -> torch.Tensor:
        return model(x)

    def model(self):
        from ..config import torch_dtype

        if self._model is None:
            self._model = self.load().to(self.device or "cpu", torch_dtype(self.dtype)).eval().requires_grad_(False)
        return self._model

    @torch.no_grad()
    def features_of_resized(self, x: torch.Tensor) -> torch.Tensor:
        """Features (float64 (N, d), CPU) of images already resized by the mode (``resize_for_network``)."""
        model = self.model()
        param = next(model.parameters())
        out = self.forward(model, self.normalize(x.to(param.device, torch.float32)).to(param.dtype))
        return out.to("cpu", torch.float64)

    def features_of_uint8(self, images: torch.Tensor) -> torch.Tensor:
        """Features of (N, 1 or 3, H, W) uint8 images, in batches of ``batch_size``."""
        images = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images
        out = [self.features_of_resized(resize_for_network(images[i : i + self.batch_size], self.input_size, self.mode))
               for i in range(0, images.shape[0], self.batch_size)]
        return torch.cat(out) if out else torch.empty(0, 0, dtype=torch.float64)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"images must have shape (N, 1 or 3, H, W), got {tuple(images.shape)}")
        return self.features_of_uint8(quantize(images))


class InceptionFeatures(NetworkFeatures):
    """pool3 features of the FID Inception-v3 loaded from ``weights`` (see :mod:`steerdiff.metrics.inception`);
    input 2x - 1 of [0, 1] images (pytorch-fid), or (x - 128) / 128 of [0, 255] ones (clean-fid, torch-fidelity)."""

    name = "inception"
    input_size = 299
    feature_dim = 2048

    def __init__(self, weights: str | None = None, allow_pickle: bool = False, batch_size: int = 50, device: str | None = None,
                 mode: str = "pytorch-fid", dtype: str = "float32"):
        if weights is None:
            raise ValueError(
                "the inception feature space needs `weights`: a local copy of pt_inception-2015-12-05-6726825d.pth "
                "(pytorch-fid's FID Inception weights; nothing is downloaded), preferably converted to safetensors"
            )
        super().__init__(batch_size, device, mode, dtype)
        self.weights = check_weights_file(weights, allow_pickle)
        self.allow_pickle = bool(allow_pickle)

    def key(self) -> str:
        return f"inception-{file_digest(str(self.weights))}{self._suffix()}"

    def load(self):
        return load_fid_inception(self.weights, allow_pickle=self.allow_pickle)

    def normalize(self, x):
        return 2 * x - 1 if self.mode == "pytorch-fid" else (x - 128) / 128


class _TransformersFeatures(NetworkFeatures):
    """A vision network from a local transformers folder (safetensors only), ImageNet-style normalisation."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    input_size = 224

    def __init__(self, model: str | None = None, batch_size: int = 50, device: str | None = None, mode: str = "pytorch-fid",
                 dtype: str = "float32"):
        if model is None:
            raise ValueError(f"the {self.name} feature space needs `model`: a local transformers folder of the network "
                             "(saved with save_pretrained; nothing is downloaded)")
        super().__init__(batch_size, device, mode, dtype)
        self.folder = Path(model).expanduser()
        check_safetensors_folder(self.folder)
        self.config = json.loads((self.folder / "config.json").read_text())

    def key(self) -> str:
        digests = "-".join(file_digest(str(p)) for p in sorted(self.folder.glob("*.safetensors")))
        return f"{self.name}-{digests}{self._suffix()}"

    def normalize(self, x):
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return (x / MODES[self.mode].scale - mean) / std


class DINOv2Features(_TransformersFeatures):
    """DINOv2's CLS token after the final layer norm (``Dinov2Model(...).pooler_output``), the FD-DINOv2 space
    (Stein et al. 2023), from a local transformers DINOv2 folder; 224x224 input, ImageNet mean / std."""

    name = "dinov2"
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

    @property
    def feature_dim(self) -> int:
        return int(self.config["hidden_size"])

    def load(self):
        from transformers import Dinov2Model

        return Dinov2Model.from_pretrained(self.folder, local_files_only=True, use_safetensors=True)

    def forward(self, model, x):
        return model(pixel_values=x).pooler_output


class CLIPFeatures(_TransformersFeatures):
    """CLIP's projected image embedding (``CLIPModel.get_image_features``), the CLIP-FD space, from a local
    transformers CLIP folder (the one ``clip_score`` reads); 224x224 input, CLIP's mean / std."""

    name = "clip"
    mean, std = OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    def __init__(self, model: str | None = None, **options):
        super().__init__(model, **options)
        if self.config.get("model_type") != "clip":
            raise ValueError(f"clip features: {str(self.folder)!r} holds a {self.config.get('model_type')!r} model, "
                             "not CLIPModel")
        self.input_size = int(self.config.get("vision_config", {}).get("image_size", 224))  # the network's own size
        self.feature_dim = int(self.config.get("projection_dim", 512))

    def load(self):
        from transformers import CLIPModel

        return CLIPModel.from_pretrained(self.folder, local_files_only=True, use_safetensors=True)

    def forward(self, model, x):
        return clip_projection(model.get_image_features(pixel_values=x))


FEATURE_SPACES = {"digits": DigitsFeatures, "inception": InceptionFeatures, "dinov2": DINOv2Features, "clip": CLIPFeatures}


def make_feature_space(name: str = "digits", **kwargs) -> FeatureSpace:
    if name not in FEATURE_SPACES:
        raise ValueError(f"unknown feature space {name!r}; available: {', '.join(FEATURE_SPACES)}")
    cls = FEATURE_SPACES[name]
    check_options(f"feature space {name!r}", kwargs, named_options(cls))
    return cls(**kwargs)


def _folder_images(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def reference_id(dataset: str) -> str:
    """The id of a reference data set in cache names: its name, a .npy file's stem and content hash, or a folder's
    name and a hash of its image files' names, sizes and modification times."""
    if dataset in REFERENCE_DATASETS:
        return dataset
    path = Path(dataset).expanduser()
    if path.is_dir():
        listing = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in _folder_images(path)]
        return f"{path.name}-{hashlib.sha256(repr(listing).encode()).hexdigest()[:12]}"
    return f"{path.stem}-{file_digest(str(path))}" if path.is_file() else str(path)


def image_sizes(files: list[Path], name=lambda f: repr(str(f))) -> list[tuple[int, int]]:
    """(width, height) of every file, reading headers only; an unreadable file is a ValueError naming it
    (``name(file)``: its quoted path by default)."""
    from PIL import Image, UnidentifiedImageError

    sizes = []
    for f in files:
        try:
            with Image.open(f) as im:
                sizes.append(im.size)
        except (OSError, UnidentifiedImageError) as err:
            raise ValueError(f"{name(f)} is not a readable image ({err})") from None
    return sizes


def scan_image_folder(path: Path) -> list[Path]:
    """The image files of a reference folder, after reading every file's header: the folder holds images, each
    readable, all of one size (errors name the folder and the file)."""
    files = _folder_images(path)
    if not files:
        raise ValueError(f"reference folder {str(path)!r} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    try:
        sizes = image_sizes(files, name=lambda f: f.name)
    except ValueError as err:
        raise ValueError(f"reference folder {str(path)!r}: {err}") from None
    for f, size in zip(files, sizes):
        if size != sizes[0]:
            raise ValueError(
                f"reference folder {str(path)!r}: {files[0].name} is {sizes[0][0]}x{sizes[0][1]} but {f.name} is "
                f"{size[0]}x{size[1]}; the images must share one size (resize them once, e.g. to your samples' size)"
            )
    return files


def load_image_folder(path: Path) -> torch.Tensor:
    """(N, 3, H, W) in [-1, 1]: every image file of a folder (RGB), which must all have one size."""
    from PIL import Image

    arrays = []
    for f in scan_image_folder(path):
        try:
            with Image.open(f) as im:
                arrays.append(np.asarray(im.convert("RGB"), dtype=np.float32))
        except OSError as err:  # a header that reads but pixels that do not (a truncated file)
            raise ValueError(f"reference folder {str(path)!r}: {f.name} is not a readable image ({err})") from None
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    return x / 127.5 - 1


def check_reference(dataset: str) -> None:
    """A reference data set is usable, checked before any sampling: a built-in name, a ``.npy`` file of
    (N, C, H, W) images, or a folder of readable images of one size."""
    if dataset in REFERENCE_DATASETS:
        return
    path = Path(dataset).expanduser()
    if path.is_dir():
        scan_image_folder(path)
        return
    if path.suffix != ".npy" or not path.is_file():
        raise ValueError(
            f"reference {dataset!r} must be a built-in data set {REFERENCE_DATASETS}, an existing .npy file of "
            "(N, C, H, W) images in [-1, 1] or a folder of images"
        )
    try:
        shape = np.load(path, mmap_mode="r", allow_pickle=False).shape
    except (OSError, ValueError) as err:
        raise ValueError(f"reference file {str(path)!r} cannot be read as a .npy array ({err})") from None
    if len(shape) != 4:
        raise ValueError(f"reference file {str(path)!r} must hold (N, C, H, W) images, got shape {tuple(shape)}")


def reference_images(dataset: str) -> tuple[torch.Tensor, str]:
    """Images (N, C, H, W) in [-1, 1] of a reference data set, and the data set's id for cache names."""
    if dataset in REFERENCE_DATASETS:  # digits, digits-train, digits-test
        from ..testbeds.digits import load_digits_data

        return load_digits_data(dataset.partition("-")[2] or "all")[0], dataset
    path = Path(dataset).expanduser()
    if path.is_dir():
        return load_image_folder(path), reference_id(dataset)
    check_reference(dataset)
    return torch.from_numpy(np.load(path, allow_pickle=False)).float(), reference_id(dataset)


def reference_features(space: FeatureSpace, dataset: str = "digits", cache_dir: str | Path | None = None) -> torch.Tensor:
    """Features (float64 (N, d)) of a reference data set in ``space``, cached on disk."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = cache_dir / "reference" / f"{reference_id(dataset)}__{space.key()}__{space.resolution}px.npz"
    if path.is_file():
        with np.load(path, allow_pickle=False) as f:
            return torch.from_numpy(f["features"])
    images, _ = reference_images(dataset)  # only on a cache miss
    features = space(images).to(torch.float64)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, features=features.numpy(), mu=features.mean(0).numpy(), sigma=np.cov(features.numpy(), rowvar=False))

    atomic_write(path, write)
    return features


class FeatureMetric(Metric):
    """Base of metrics that compare the samples' features with a reference data set's in one feature space."""

    default_features = "digits"

    def __init__(self, features: str | None = None, reference: str = "digits", **feature_kwargs):
        self.space = make_feature_space(features or self.default_features, **feature_kwargs)
        self.reference = reference

    def fingerprint(self) -> str:
        return f"{self.name}:{self.space.key()}:{reference_id(self.reference)}"

    def check(self, sample_shape, denoiser=None) -> None:
        self.space.check(sample_shape)
        check_reference(self.reference)

    def features(self, samples: SampleSet) -> tuple[torch.Tensor, torch.Tensor]:
        """(reference features, sample features), float64."""
        return reference_features(self.space, self.reference, samples.cache_dir), samples.features(self.space)
