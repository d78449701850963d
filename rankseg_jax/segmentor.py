"""`Segmentor`: the inference wrapper users call (not the Flax module).

seg = rankseg_jax.Segmentor.from_config("configs/ade20k_segmenter.py:head=mask", checkpoint)
seg.logits(images)        # normalised float32 (B, H, W, 3) → (B, H, W, n_cls) numpy
seg.class_scores(images)  # → scores (B, n_cls) float32, topk (B, k) int32
seg.predict(image)        # raw uint8 RGB (H, W, 3) → label map (H, W) int32
"""

from __future__ import annotations

import functools
import pathlib

import cv2
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from rankseg_jax import configuration
from rankseg_jax.convert import loading
from rankseg_jax.models.segmenter import Segmenter, create_model


def rescale_size(height: int, width: int, scale: tuple[int, int]) -> tuple[int, int]:
    """mmcv `imrescale` keep-ratio target size (h, w): int(side·factor + 0.5)."""
    long_edge, short_edge = max(scale), min(scale)
    factor = min(long_edge / max(height, width), short_edge / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


def check_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 RGB image (H, W, 3), got {image.dtype} {image.shape}")
    if min(image.shape[:2]) < 1:
        raise ValueError(f"empty image of shape {image.shape}")
    return image


def check_batch(images) -> jax.Array:
    images = jnp.asarray(images, jnp.float32)
    if images.ndim != 4 or images.shape[-1] != 3 or min(images.shape[1:3]) < 16:
        raise ValueError(f"expected normalised images (B, H≥16, W≥16, 3), got {images.shape}")
    return images


class Segmentor:
    """A Segmenter with its params and config: logits, class scores and label maps."""

    def __init__(self, config: ml_collections.ConfigDict, model: Segmenter, params) -> None:
        self.config = config
        self.model = model
        self.params = params
        self._encode_decode = jax.jit(functools.partial(model.apply, method=model.encode_decode))
        self._class_scores = jax.jit(functools.partial(model.apply, method=model.class_scores))

    @classmethod
    def from_config(
        cls,
        config: ml_collections.ConfigDict | str,
        checkpoint: str | pathlib.Path | None = None,
    ) -> Segmentor:
        """Build from a config (object or `--config` string) and optional weights file.

        Without a checkpoint the params are the model's seeded random initialisation.
        """
        config = configuration.resolve(config)
        model = create_model(config.model)
        if checkpoint is None:
            params = init_params(model, config)
        else:
            params = loading.load_params(checkpoint, model, config)
        return cls(config, model, params)

    @property
    def num_params(self) -> int:
        return int(sum(np.size(x) for x in jax.tree.leaves(self.params)))

    def logits(self, images, gt_labels=None) -> np.ndarray:
        """Normalised float32 (B, H, W, 3), any H, W ≥ 16 → logits (B, H, W, n_cls)."""
        out = self._encode_decode({"params": self.params}, check_batch(images), gt_labels)
        return np.asarray(out)

    def class_scores(self, images) -> tuple[np.ndarray, np.ndarray]:
        """Image-level class scores (B, n_cls) float32 and top-k ids (B, k) int32 (RankSeg)."""
        if self.config.model.head != "rankseg":
            raise ValueError(f"head={self.config.model.head!r} has no image-level class scores")
        scores, topk = self._class_scores({"params": self.params}, check_batch(images))
        return np.asarray(scores), np.asarray(topk)

    def normalise(self, image: np.ndarray) -> np.ndarray:
        """Raw uint8 RGB → the test-scale, normalised float32 image (1, h, w, 3)."""
        image = check_image(image)
        h, w = rescale_size(*image.shape[:2], tuple(self.config.data.test_scale))
        resized = cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)
        mean = np.asarray(self.config.data.mean, np.float32)
        std = np.asarray(self.config.data.std, np.float32)
        return ((resized.astype(np.float32) - mean) / std)[None]

    def predict(self, image: np.ndarray, gt_label: np.ndarray | None = None) -> np.ndarray:
        """Raw uint8 RGB (H, W, 3) → label map (H, W) int32, whole-image inference.

        The image is resized keep-ratio to `data.test_scale`, the logits are resized back to
        (H, W) bilinearly, and the argmax of the softmax is returned (as the reference).
        """
        image = check_image(image)
        gt = None if gt_label is None else jnp.asarray(gt_label)[None]
        logits = self.logits(self.normalise(image), gt)
        probs = jax.nn.softmax(
            jax.image.resize(
                jnp.asarray(logits),
                (1, *image.shape[:2], logits.shape[-1]),
                method="linear",
                antialias=False,
            ),
            axis=-1,
        )
        return np.asarray(jnp.argmax(probs[0], axis=-1), np.int32)


def init_params(model: Segmenter, config: ml_collections.ConfigDict):
    """Seeded random params (float32), created under jit."""
    size = tuple(config.model.img_size)
    images = jnp.zeros((1, *size, 3), jnp.float32)
    labels = jnp.zeros((1, *size), jnp.int32)
    init = jax.jit(lambda key: model.init(key, images, gt_labels=labels)["params"])
    return init(jax.random.PRNGKey(config.seed))
