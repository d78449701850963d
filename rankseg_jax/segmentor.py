"""`Segmentor`: the inference wrapper users call (not the Flax module).

seg = rankseg_jax.Segmentor.from_config("configs/ade20k_segmenter.py:head=mask", checkpoint)
seg.logits(images)        # normalised float32 (B, H, W, 3) → (B, H, W, n_cls) numpy
seg.class_scores(images)  # → scores (B, n_cls) float32, topk (B, k) int32
seg.predict(image)        # raw uint8 RGB (H, W, 3) → label map (H, W) int32
"""

from __future__ import annotations

import functools
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from rankseg_jax import checkpoint, inference
from rankseg_jax import config as config_lib
from rankseg_jax.convert import loading
from rankseg_jax.errors import CheckpointNotFoundError, InputError
from rankseg_jax.models.segmenter import Segmenter, create_model


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
    """A Segmenter with its params and config: logits, class scores and label maps.

    `model_state`: the model's non-param collections (BatchNorm running statistics of the conv
    families, {} for the ViT Segmenter); every forward here is an eval forward with them.
    """

    def __init__(
        self, config: ml_collections.ConfigDict, model: Segmenter, params, model_state=None
    ) -> None:
        self.config = config
        self.model = model
        self.params = params
        self.model_state = dict(model_state or {})
        self.weights = "(given params)"
        self.step: int | None = None  # the checkpoint step when loaded from a workdir
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
        config = config_lib.resolve(config)
        model = create_model(config.model)
        if checkpoint is None:
            variables = init_variables(model, config)
        else:
            variables = loading.load_variables(checkpoint, model, config)
        return cls(config, model, variables.pop("params"), variables)

    @classmethod
    def from_workdir(
        cls, config: ml_collections.ConfigDict | str, workdir: str | pathlib.Path
    ) -> Segmentor:
        """Weights as a run finds them: the workdir's latest checkpoint, else `init_from`.

        Raises CheckpointNotFoundError when neither exists. `self.weights` says which was used.
        """
        config = config_lib.resolve(config)
        model = create_model(config.model)
        step = checkpoint.latest_step(workdir)
        if step is not None:
            abstract = loading.expected_params(model, config)
            params = checkpoint.restore_params(workdir, abstract, step)
            state = checkpoint.restore_model_state(
                workdir, loading.expected_model_state(model, config), step
            )
            weights = f"{checkpoint.checkpoint_dir(workdir)}/{step}"
        elif config.init_from:
            # Only an AugReg .npz (backbone only) needs the initialised head.
            npz = pathlib.Path(config.init_from).suffix == ".npz"
            base = init_variables(model, config) if npz else None
            state = loading.load_variables(config.init_from, model, config, base)
            params = state.pop("params")
            weights = config.init_from
        else:
            raise CheckpointNotFoundError(
                f"no checkpoint in {workdir} and no init_from: train first, or set "
                "--config.init_from=PATH (.pth, .safetensors, .npz or an orbax workdir)"
            )
        segmentor = cls(config, model, params, state)
        segmentor.weights = weights
        segmentor.step = step
        return segmentor

    @property
    def variables(self) -> dict:
        """{'params': ..., **model_state}: what `model.apply` takes."""
        return {"params": self.params, **self.model_state}

    @property
    def num_params(self) -> int:
        return int(sum(np.size(x) for x in jax.tree.leaves(self.params)))

    def logits(self, images, gt_labels=None) -> np.ndarray:
        """Normalised float32 (B, H, W, 3), any H, W ≥ 16 → logits (B, H, W, n_cls)."""
        out = self._encode_decode(self.variables, check_batch(images), gt_labels)
        return np.asarray(out)

    def class_scores(self, images) -> tuple[np.ndarray, np.ndarray]:
        """Image-level class scores (B, n_cls) float32 and top-k ids (B, k) int32 (RankSeg)."""
        if self.config.model.classifier != "rankseg":
            raise InputError(
                f"model.classifier={self.config.model.classifier!r} has no image-level class scores"
            )
        scores, topk = self._class_scores(self.variables, check_batch(images))
        return np.asarray(scores), np.asarray(topk)

    @functools.cached_property
    def inferencer(self) -> inference.Inferencer:
        """The test-time inference of the config (slide windows, scales, flip).

        The GT-oracle head gets each image's class set in every window (`gt_class_set`), as
        the reference passes the whole-image label to every window: per (scale, flip) pass,
        the label resized (nearest) and flipped with the image (`inference.pass_label`).
        """
        settings, _ = inference.settings_from_config(self.config)
        n_cls = self.config.model.n_cls
        label_context = None
        if self.config.model.classifier == "gt":
            label_context = functools.partial(inference.gt_class_set, n_cls=n_cls)
        # The inferencer's "params" are the variables dict (params and model_state).
        forward = lambda variables, images, gt_labels=None: self.model.apply(
            variables, images, gt_labels, method=self.model.encode_decode
        )
        return inference.Inferencer(
            forward, self.variables, n_cls, settings,
            ignore_index=self.config.data.ignore_index, label_context=label_context,
        )  # fmt: skip

    def predict(self, image: np.ndarray, gt_label: np.ndarray | None = None) -> np.ndarray:
        """Raw uint8 RGB (H, W, 3) → label map (H, W) int32 with the config's test inference.

        As the reference: keep-ratio resize to `data.test_scale` (and the `eval.scales` ratios,
        `eval.flip`), sliding windows of `eval.crop`/`eval.stride` with averaged logits, resize
        back to (H, W), softmax, argmax. The GT-oracle head needs `gt_label` (H, W) class ids
        (its class set after each pass's nearest resize goes to every window).
        """
        image = check_image(image)
        _, kw = inference.settings_from_config(self.config)
        passes = inference.image_passes(
            image, mean=kw["mean"], std=kw["std"], test_scale=kw["test_scale"],
            ratios=kw["ratios"], flip=kw["flip"],
        )  # fmt: skip
        label = None
        if self.config.model.classifier == "gt":
            if gt_label is None:
                raise ValueError("the GT-oracle head needs the image's label map (gt_label)")
            label = np.asarray(gt_label)  # each pass's class set: this label resized with it
        return self.inferencer.predict_passes(passes, image.shape[:2], label=label).pred


def init_variables(model: Segmenter, config: ml_collections.ConfigDict) -> dict:
    """Seeded random variables ({'params'[, 'batch_stats']}, float32), created under jit."""
    size = tuple(config.model.img_size)
    images = jnp.zeros((1, *size, 3), jnp.float32)
    labels = jnp.zeros((1, *size), jnp.int32)
    init = jax.jit(lambda key: model.init(key, images, gt_labels=labels))
    return dict(init(jax.random.PRNGKey(config.seed)))


def init_params(model: Segmenter, config: ml_collections.ConfigDict):
    """Seeded random params (float32), created under jit."""
    return init_variables(model, config)["params"]
