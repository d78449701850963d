"""Your own data end to end: the folder dataset through the config template, training with
class weights, evaluation with the extended metrics and the confusion matrix, prediction with
the dataset's names and palette (images and video), TFDS preparation, and bad inputs as one
line with exit status 2."""

from __future__ import annotations

import pathlib
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from rankseg_jax import config as config_lib
from rankseg_jax import losses, train
from rankseg_jax.data import class_stats, folder_demo

REPO = pathlib.Path(__file__).resolve().parents[1]
LOSS_CONFIG = dict(
    img_loss="asl", img_loss_weight=10.0, gamma_neg=2.0, gamma_pos=0.0, clip=0.05, eps=1e-5,
    seg_loss_weight=1.0, dice_weight=0.0,
)  # fmt: skip


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> pathlib.Path:
    """The generated 7-class folder dataset: palette PNG labels, and val_rgb colour masks."""
    return pathlib.Path(folder_demo.generate_folder(tmp_path_factory.mktemp("own") / "ds", 8, 4))


def custom_config(root: pathlib.Path, extra: str = "") -> config_lib.ml_collections.ConfigDict:
    spec = f"{REPO / 'configs' / 'custom.py'}:root={root},runlocal" + (f",{extra}" if extra else "")
    return config_lib.resolve(spec)


# ---------------------------------------------------------------------------------- config
def test_template_reads_the_class_count_and_picks_k(dataset):
    config = custom_config(dataset)
    assert config.data.dataset == "folder" and config.model.n_cls == 7
    assert config.model.classifier == "rankseg" and config.model.k == 5  # ≤ n_cls, see default_k
    base = custom_config(dataset, "head=mask")
    assert base.model.classifier == "full" and base.model.k == 7
    real = config_lib.resolve(f"{REPO / 'configs' / 'custom.py'}:root={dataset},variant=B/16")
    assert real.model.variant == "B/16" and real.model.n_cls == 7 and real.model.k == 5
    assert real.model.pretrained == "augreg_vit_b16_384"
    with pytest.raises(config_lib.ConfigError, match="k=9"):
        custom_config(dataset, "k=9")


def test_class_weight_setting_is_validated(dataset):
    config = custom_config(dataset)
    with config.unlocked():
        config.loss.class_weight = "1,2,3"
    with pytest.raises(config_lib.ConfigError, match="3 weights for model.n_cls=7"):
        config_lib.validate(config)
    with config.unlocked():
        config.loss.class_weight = "1,1,1,1,1,1,-1"
    with pytest.raises(config_lib.ConfigError, match="loss.class_weight"):
        config_lib.validate(config)
    with config.unlocked():
        config.loss.class_weight = "inverse_freq"
    with pytest.raises(config_lib.ConfigError, match="loss.class_weight"):
        config_lib.validate(config)
    with config.unlocked():
        config.loss.class_weight = "1, 2,3,4,5,6,7"
    assert config_lib.class_weight_setting(config) == (1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0)


# ---------------------------------------------------------------------------------- losses
def _outputs(head: str, rng: np.random.Generator, n_cls: int = 7, k: int = 5):
    b, h, w = 2, 4, 4
    channels = n_cls if head == "mask" else k
    masks = jnp.asarray(rng.normal(size=(b, h, w, channels)), jnp.float32)
    labels = rng.integers(0, n_cls, (b, 8, 8))
    labels[0, :2] = 255
    out = {"masks": masks}
    if head == "rankseg":
        out["topk"] = jnp.asarray(np.stack([rng.permutation(n_cls)[:k] for _ in range(b)]))
        out["img_logits"] = jnp.asarray(rng.normal(size=(b, n_cls)), jnp.float32)
    return out, jnp.asarray(labels, jnp.int32)


@pytest.mark.parametrize("head", ["mask", "rankseg"])
def test_loss_terms_use_the_class_weights_and_dice(head):
    rng = np.random.default_rng(0)
    outputs, labels = _outputs(head, rng)
    weight = jnp.asarray([0.5, 1.0, 2.0, 0.0, 1.5, 3.0, 1.0], jnp.float32)
    plain = losses.loss_terms(outputs, labels, LOSS_CONFIG, 7)
    weighted = losses.loss_terms(outputs, labels, LOSS_CONFIG, 7, class_weight=weight)
    batch, alone = losses.weighted_seg_loss(outputs, labels, weight)
    np.testing.assert_allclose(weighted.metrics["decode.loss_seg"], batch, rtol=1e-6)
    np.testing.assert_allclose(weighted.per_image["decode.loss_seg"], alone, rtol=1e-6)
    assert abs(float(weighted.metrics["decode.loss_seg"] - plain.metrics["decode.loss_seg"])) > 1e-3
    dice_config = dict(LOSS_CONFIG, dice_weight=0.4)
    with_dice = losses.loss_terms(outputs, labels, dice_config, 7, class_weight=weight)
    logits = losses.upsample_logits(outputs["masks"], labels.shape[1:])
    target = labels
    if head == "rankseg":
        target = losses.relabel_to_slots(labels, outputs["topk"], 255)
    expected = losses.dice_loss(logits, target, 255, loss_weight=0.4)
    np.testing.assert_allclose(with_dice.metrics["decode.loss_dice"], expected, rtol=1e-6)
    np.testing.assert_allclose(
        with_dice.total, weighted.total + expected, rtol=1e-6
    )  # the Dice term enters the total
    assert "decode.loss_dice" not in weighted.metrics


def test_inverse_frequency_weights_resolved_once_then_cached(dataset, monkeypatch):
    config = custom_config(dataset, "class_weight=inverse_frequency")
    source = train.source_from_config(config, "train")
    shutil.rmtree(dataset / class_stats.CACHE_DIRNAME, ignore_errors=True)
    calls = []
    original = class_stats.class_pixel_counts
    monkeypatch.setattr(
        class_stats, "class_pixel_counts", lambda *a, **k: calls.append(1) or original(*a, **k)
    )
    first = train.resolve_class_weight(config, source)
    second = train.resolve_class_weight(config, source)
    assert len(first) == 7 and first == second and calls == [1]
    counts = original(source, progress=False)
    np.testing.assert_allclose(first, class_stats.inverse_frequency(counts))
    assert list((dataset / class_stats.CACHE_DIRNAME).glob("class_weights-train-*.json"))
    assert train.resolve_class_weight(custom_config(dataset), source) is None
