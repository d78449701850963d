"""Pretrained weights by name: the registry, and ``resolve`` (name, URL or path -> local file).

Why: every paper row starts from a published file (an AugReg ImageNet-21k backbone, or a
released RankSeg/Segmenter checkpoint for evaluation) whose URL used to live only in
``docs/checkpoints.md``. Each entry here knows its URL, its format and the config it goes with,
and is downloaded through :mod:`rankseg_jax.download` (cache, resume, checksum, lock, offline).

``RANKSEG_JAX_WEIGHTS_BASE_URL`` replaces every entry's URL by ``BASE/<filename>`` (a mirror, or
the local test server). ``python -m rankseg_jax.weights`` lists the names;
``python -m rankseg_jax.weights fetch NAME`` downloads one and prints its path.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re

from rankseg_jax import download
from rankseg_jax.download import DownloadError

__all__ = [
    "FORMATS",
    "REGISTRY",
    "UnknownWeightsError",
    "Weights",
    "cached_path",
    "fetch",
    "get",
    "local_path",
    "names",
    "resolve",
    "url_of",
]

# What each format is, so a reader knows which loader applies.
FORMATS = {
    "augreg_npz": "big_vision/vision_transformer AugReg .npz (ViT backbone only)",
    "mmseg_pth": "mmseg checkpoint {'meta', 'state_dict'} (whole model)",
    "segmenter_pth": "official rstrudel/segmenter checkpoint {'model', ...} (whole model)",
    "torch_pth": "plain PyTorch state dict of a backbone (as mmseg's pretrained= reads it)",
}

_AUGREG = "https://storage.googleapis.com/vit_models/augreg/"
_RANKSEG = "https://github.com/openseg-group/RankSeg/releases/download/v1.0.2/"


class UnknownWeightsError(DownloadError):
    """A ``model.pretrained``/``init_from`` value that is no name, URL or existing path."""


@dataclasses.dataclass(frozen=True)
class Weights:
    """One published file.

    ``filename`` is its name in the cache and under a mirror base URL (unique in the registry;
    keeps the suffix the loaders dispatch on). ``sha256`` is a full digest or a published prefix
    (>= 8 hex digits), None when unknown (then recorded on first download).
    """

    name: str
    url: str
    format: str
    config: str
    description: str
    filename: str = ""
    sha256: str | None = None

    def __post_init__(self):
        if not self.filename:
            object.__setattr__(self, "filename", self.url.rsplit("/", 1)[-1])
        if self.format not in FORMATS:
            raise ValueError(f"{self.name}: unknown format {self.format!r}")


def _rankseg(stem: str, config: str, description: str) -> Weights:
    return Weights(stem, _RANKSEG + stem + ".pth", "mmseg_pth", config, description)


_ENTRIES = [
    # AugReg ImageNet-21k -> ImageNet-1k 384 px backbones: what every Segmenter row starts from
    # (the official `_base_/models/segmenter_vit-b16.py` `pretrained=` files).
    Weights(
        "augreg_vit_b16_384",
        _AUGREG + "B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0--imagenet2012-"
        "steps_20k-lr_0.01-res_384.npz",
        "augreg_npz",
        "configs/ade20k_segmenter.py, configs/coco_stuff10k.py, configs/pascal_context.py, "
        "configs/ade20k_full.py (variant=B/16)",
        "AugReg ViT-B/16, ImageNet-21k pretrained, ImageNet-1k fine-tuned at 384 px",
    ),
    Weights(
        "augreg_vit_l16_384",
        _AUGREG + "L_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.1-sd_0.1--imagenet2012-"
        "steps_20k-lr_0.01-res_384.npz",
        "augreg_npz",
        "configs/ade20k_segmenter.py:variant=L/16, configs/coco_stuff10k.py:variant=L/16",
        "AugReg ViT-L/16, ImageNet-21k pretrained, ImageNet-1k fine-tuned at 384 px",
    ),
    # The RankSeg release (docs/checkpoints.md): trained models, for evaluation.
    _rankseg(
        "segmenter_vitb_ade20k_baseline",
        "configs/ade20k_segmenter.py:head=mask",
        "ViT-B/16 Segmenter, ADE20K",
    ),
    _rankseg(
        "segmenter_vitb_ade20k_rankseg", "configs/ade20k_segmenter.py", "ViT-B/16 + RankSeg, ADE20K"
    ),
    _rankseg(
        "segmenter_vitl_ade20k_rankseg",
        "configs/ade20k_segmenter.py:variant=L/16",
        "ViT-L/16 640 + RankSeg, ADE20K",
    ),
    _rankseg(
        "segmenter_vitb_ade_gt",
        "configs/ade20k_segmenter.py:head=gt",
        "ViT-B/16 + RankSeg GT oracle, ADE20K",
    ),
    _rankseg(
        "segmenter_vitb_cocostuff_baseline",
        "configs/coco_stuff10k.py:head=mask",
        "ViT-B/16 Segmenter, COCO-Stuff10k, 40k",
    ),
    _rankseg(
        "segmenter_vitb_cocostuff_rankseg",
        "configs/coco_stuff10k.py",
        "ViT-B/16 + RankSeg, COCO-Stuff10k, 40k",
    ),
    _rankseg(
        "segmenter_vitb_cocostuff_baseline_80k",
        "configs/coco_stuff10k.py:head=mask,iters=80000",
        "ViT-B/16 Segmenter, COCO-Stuff10k, 80k",
    ),
    _rankseg(
        "segmenter_vitb_cocostuff_rankseg_80k",
        "configs/coco_stuff10k.py:iters=80000",
        "ViT-B/16 + RankSeg, COCO-Stuff10k, 80k",
    ),
    _rankseg(
        "segmenter_vitl_cocostuff_baseline",
        "configs/coco_stuff10k.py:variant=L/16,head=mask",
        "ViT-L/16 640 Segmenter, COCO-Stuff10k",
    ),
    _rankseg(
        "segmenter_vitl_cocostuff_rankseg",
        "configs/coco_stuff10k.py:variant=L/16",
        "ViT-L/16 640 + RankSeg, COCO-Stuff10k",
    ),
    _rankseg(
        "segmenter_vitb_cocostuff_gt",
        "configs/coco_stuff10k.py:head=gt",
        "ViT-B/16 GT oracle, COCO-Stuff10k",
    ),
    _rankseg(
        "segmenter_vitb_pascal_rankseg",
        "configs/pascal_context.py",
        "ViT-B/16 + RankSeg, Pascal-Context 60",
    ),
    _rankseg(
        "segmenter_vitb_pascal_gt",
        "configs/pascal_context.py:head=gt",
        "ViT-B/16 GT oracle, Pascal-Context 60",
    ),
    _rankseg(
        "segmenter_vitb_cocostuff_transdec",
        "none (its img_cls_head has no model here; loading it is refused)",
        "ViT-B/16 COCO-Stuff10k decoder ablation (listed so the refusal is explicit)",
    ),
    _rankseg(
        "segmenter_vitb_cocostuff_pooling",
        "none (its img_cls_head has no model here; loading it is refused)",
        "ViT-B/16 COCO-Stuff10k global-pooling ablation (listed so the refusal is explicit)",
    ),
    # The official Segmenter model zoo: the paper's ViT-L ADE20K baseline row (52.0).
    Weights(
        "seg_large_mask_640",
        "https://www.rocq.inria.fr/cluster-willow/rstrudel/segmenter/checkpoints/ade20k/"
        "seg_large_mask_640/checkpoint.pth",
        "segmenter_pth",
        "configs/ade20k_segmenter.py:variant=L/16,head=mask",
        "official Segmenter ViT-L/16 640 mask decoder, ADE20K (rstrudel/segmenter zoo)",
        filename="seg_large_mask_640_checkpoint.pth",
    ),
    # Backbones of the conv-head rows (DeepLabV3, UperNet-Swin, UperNet-BEiT).
    Weights(
        "resnet101_v1c",
        "https://download.openmmlab.com/pretrain/third_party/resnet101_v1c-e67eebb6.pth",
        "torch_pth",
        "DeepLabV3 R-101 (mmseg open-mmlab://resnet101_v1c)",
        "mmseg ResNetV1c-101, ImageNet-1k (deep stem)",
        sha256="e67eebb6",  # the digest prefix mmcv publishes in the file name
    ),
    Weights(
        "swin_base_patch4_window12_384_22k",
        "https://github.com/SwinTransformer/storage/releases/download/v1.0.0/"
        "swin_base_patch4_window12_384_22k.pth",
        "torch_pth",
        "UperNet Swin-B (RankSeg upernet_swin_mlseg_base_patch4_window12_..._22K.py)",
        "official Swin-B window 12, ImageNet-22k at 384 px (Microsoft key layout)",
    ),
    Weights(
        "beit_large_patch16_224_pt22k_ft22k",
        "https://conversationhub.blob.core.windows.net/beit-share-public/beit/"
        "beit_large_patch16_224_pt22k_ft22k.pth",
        "torch_pth",
        "UperNet BEiT-L (RankSeg BEiT semantic_segmentation configs)",
        "official BEiT-L/16, self-supervised on ImageNet-22k then fine-tuned on it",
    ),
]

REGISTRY: dict[str, Weights] = {w.name: w for w in _ENTRIES}
assert len(REGISTRY) == len(_ENTRIES), "duplicate weights names"
assert len({w.filename for w in _ENTRIES}) == len(_ENTRIES), "duplicate weights file names"

_URL = re.compile(r"^https?://", re.IGNORECASE)


def names() -> list[str]:
    """Every registered name, in registry order."""
    return list(REGISTRY)


def get(name: str) -> Weights:
    """The entry called ``name``; one line listing the names otherwise."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise UnknownWeightsError(
            f"unknown weights name {name!r}; known: {', '.join(REGISTRY)}"
        ) from None


def url_of(entry: Weights) -> str:
    """The entry's URL, or ``$RANKSEG_JAX_WEIGHTS_BASE_URL/<filename>`` when that is set."""
    base = os.environ.get("RANKSEG_JAX_WEIGHTS_BASE_URL", "").strip()
    return f"{base.rstrip('/')}/{entry.filename}" if base else entry.url


def cached_path(name: str) -> pathlib.Path:
    """Where ``name`` lives in the cache (whether or not it is there yet)."""
    return download.cache_dir() / get(name).filename


def fetch(name: str, *, progress: bool = True) -> pathlib.Path:
    """The local path of registered weights ``name``, downloading them if needed."""
    entry = get(name)
    return download.fetch(
        url_of(entry), entry.filename, sha256=entry.sha256, label=name, progress=progress
    )


def local_path(spec: str | os.PathLike) -> pathlib.Path:
    """Registry names and URLs -> their cached file (downloaded if needed); paths unchanged.

    What the loaders call: a missing path still fails where it is opened, with its own message.
    """
    text = os.fspath(spec).strip()
    if text in REGISTRY or _URL.match(text):
        return resolve(text)
    return pathlib.Path(spec)


def resolve(spec: str | os.PathLike, *, progress: bool = True) -> pathlib.Path:
    """A registry name, an ``http(s)://`` URL or a local path -> a local file (or workdir).

    Names are looked up first (so a name wins over a same-named file in the working directory),
    then URLs (downloaded into the cache under a name derived from the URL), then paths, which
    must exist. Anything else is one line saying what was expected.
    """
    text = os.fspath(spec).strip()
    if text in REGISTRY:
        return fetch(text, progress=progress)
    if _URL.match(text):
        return download.fetch(text, download.url_filename(text), label=text, progress=progress)
    path = pathlib.Path(text).expanduser()
    if path.exists():
        return path
    raise UnknownWeightsError(
        f"weights {text!r}: not a registered name (python -m rankseg_jax.weights lists them), "
        "an http(s):// URL or an existing path"
    )
