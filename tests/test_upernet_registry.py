"""UperNet on Swin / BEiT through the model registry and the recipe files (issue #18).

* configs/upernet_{swin,beit}.py build, through `create_model`, models whose full-size
  parameter counts are the official ones (README: 121,415,076 / 125,172,382 / 441,271,084 /
  455,228,454) and whose `runlocal` models are the family fixtures' small models: the official
  state dicts load strictly (registry `STATE_DICT` converter), export back unchanged, and the
  eval forward reproduces the official logits (1e-5 of their scale) and `seg_pred` exactly;
* the recipe values reach the optimiser (per-leaf lr multipliers and weight decay);
* FSDP shards the BEiT-L 640 UperNet's big matrices; bad settings are one-line ConfigErrors.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import upernet_beit, upernet_swin
from rankseg_jax import config as config_lib
from rankseg_jax import optim, recipes
from rankseg_jax import sharding as shd
from rankseg_jax.convert.segmenter_layout import state_dict_from_checkpoint
from rankseg_jax.convert.torch_pickle import load_pth
from rankseg_jax.errors import ConfigError
from rankseg_jax.models import registry
from rankseg_jax.models.segmenter import create_model

RTOL = 1e-5
MODULES = {"swin": upernet_swin, "beit": upernet_beit}


def n_params(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def abstract_variables(config):
    model = create_model(config.model)
    x = jnp.zeros((1, *config.model.img_size, 3), jnp.float32)
    return model, jax.eval_shape(model.init, jax.random.key(0), x)


@functools.cache
def full_size(backbone: str, head: str):
    """(config, abstract variables) of a full-size row (traced once per test session)."""
    config = config_lib.resolve(MODULES[backbone].get_config(f"head={head}"))
    return config, abstract_variables(config)[1]


# The builders' counts of all four rows are checked in test_swin.py / test_beit.py; here the
# recipe files' composition through the registry, one row per backbone and per classifier.
@pytest.mark.parametrize(
    "backbone, head, count",
    [("swin", "base", 121_415_076), ("beit", "rankseg", 455_228_454)],
)
def test_full_size_parameter_counts_are_the_official_ones(backbone, head, count):
    _, variables = full_size(backbone, head)
    assert n_params(variables["params"]) == count
    assert set(variables) == {"params", "batch_stats"}


@pytest.mark.parametrize("backbone", ["swin", "beit"])
@pytest.mark.parametrize("head", ["baseline", "rankseg"])
def test_runlocal_models_load_the_fixtures(official_family, backbone, head):
    """Strict load of the official small checkpoint into the registry-built runlocal model
    (same names and shapes as the parity-tested builders) and export back to the same state
    dict."""
    arg = "runlocal" + (",head=base" if head == "baseline" else "")
    config = config_lib.resolve(MODULES[backbone].get_config(arg))
    name = f"{backbone}_upernet_{head}"
    sd = state_dict_from_checkpoint(load_pth(official_family / f"{name}.pth"))
    model, shapes = abstract_variables(config)
    converter = registry.state_dict_module(config.model)
    variables = converter.state_dict_to_variables(sd, shapes, name)
    back = converter.variables_to_state_dict(variables)
    assert set(back) == set(sd)
    for key, value in sd.items():
        np.testing.assert_array_equal(np.asarray(back[key]), np.asarray(value), err_msg=key)


def test_registry_model_reproduces_the_official_forward(official_family):
    """The registry composition (multi-level Segmenter: backbone, uper head, aux head) runs the
    official BEiT UperNet + RankSeg: `encode_decode` logits of image 0 within 1e-5 of their
    scale, `seg_pred` exact (the builders' full parity is in test_beit.py / test_uper.py)."""
    config = config_lib.resolve(upernet_beit.get_config("runlocal"))
    name = "beit_upernet_rankseg"
    sd = state_dict_from_checkpoint(load_pth(official_family / f"{name}.pth"))
    model, shapes = abstract_variables(config)
    variables = registry.state_dict_module(config.model).state_dict_to_variables(sd, shapes)
    x = np.load(official_family / "fam_x48.npy").transpose(0, 2, 3, 1)
    logits = jax.jit(lambda v, x: model.apply(v, x, method=model.encode_decode))(variables, x)
    ref = np.load(official_family / f"{name}_fwd_x48.npz")
    want = ref["seg_logits_img0"].transpose(1, 2, 0)
    err, scale = float(np.abs(np.asarray(logits[0]) - want).max()), float(np.abs(want).max())
    assert err <= RTOL * scale, f"logits: {err:.3g} > {RTOL} × {scale:.3g}"
    np.testing.assert_array_equal(np.asarray(logits.argmax(-1)), ref["seg_pred"])


def test_recipe_values_reach_the_optimiser():
    """Swin RankSeg: image head `block.` / `fc` at lr × 0.1 (full decay), tables and norms
    decay-free; BEiT: layer decay over the config's 24 layers, custom keys empty."""
    swin = config_lib.resolve(upernet_swin.get_config("runlocal"))
    _, variables = abstract_variables(swin)
    groups = optim.param_groups(variables["params"], swin)
    img = groups["lr_mult"]["decode_head"]["img_cls_head"]
    assert {m for m in jax.tree.leaves(img["block"])} == {0.1}
    assert img["fc"]["W"] == 0.1 and img["proj_dec"]["depthwise_conv"]["conv"]["kernel"] == 1.0
    wd = groups["weight_decay"]
    assert wd["decode_head"]["img_cls_head"]["block"]["norm1"]["scale"] == 0.01
    assert (
        wd["backbone"]["stages_0"]["blocks_0"]["attn"]["w_msa"]["relative_position_bias_table"]
        == 0.0
    )
    assert wd["backbone"]["norm0"]["scale"] == 0.0
    base = config_lib.resolve(upernet_swin.get_config("head=base"))
    assert base.optimizer.lr_mult == ()

    beit, _ = full_size("beit", "rankseg")
    assert beit.optimizer.constructor == "layer_decay"
    assert beit.optimizer.layer_decay_num_layers == 24
    assert (beit.optimizer.grad_accum_steps, beit.batch_size, beit.total_steps) == (2, 8, 320_000)
    assert (beit.eval.mode, tuple(beit.eval.stride)) == ("slide", (426, 426))
    small = config_lib.resolve(upernet_beit.get_config("runlocal"))
    _, variables = abstract_variables(small)
    lr = optim.param_groups(variables["params"], small)["lr_mult"]
    assert lr["backbone"]["patch_embed"]["proj"]["kernel"] == pytest.approx(0.95**5)
    assert lr["decode_head"]["img_cls_head"]["fc"]["W"] == 1.0


def test_fsdp_shards_the_beit_large_matrices():
    """With an 8-way 'fsdp' axis every BEiT-L block matrix (qkv, proj, fc1, fc2) and the big
    decode-head convs are split; what stays replicated is under 1 % of the bytes."""
    config, variables = full_size("beit", "rankseg")
    flat = jax.tree_util.tree_flatten_with_path(variables["params"])[0]
    total = replicated = 0
    for path, leaf in flat:
        name = shd.path_name(path)
        nbytes = int(np.prod(leaf.shape)) * 4
        spec = shd.fsdp_spec(leaf.shape, nbytes, 8, config.mesh.fsdp_min_size_mb)
        total += nbytes
        if shd.FSDP_AXIS not in tuple(spec):
            replicated += nbytes
        if "/blocks_" in name and name.endswith("kernel") and leaf.ndim == 2:
            assert shd.FSDP_AXIS in tuple(spec), name
        if name.startswith("decode_head/fpn_bottleneck/conv"):
            assert shd.FSDP_AXIS in tuple(spec), name
    assert replicated < 0.01 * total, replicated / total


def test_bad_settings_are_config_errors():
    config = upernet_beit.get_config("runlocal")
    with config.unlocked():
        config.model.img_size = (64, 64)
        config.data.crop_size = (64, 64)
    with pytest.raises(ConfigError, match=r"model.img_size=\(64, 64\): the beit_test backbone"):
        config_lib.validate(config)
    config = upernet_swin.get_config("runlocal")
    with config.unlocked():
        config.model.remat = "dots"
    with pytest.raises(ConfigError, match="model.remat='dots': the swin encoder"):
        config_lib.validate(config)
    config = upernet_swin.get_config("runlocal")
    with config.unlocked():
        config.model.swin.variant = "swin_huge"
    with pytest.raises(ConfigError, match="model.swin.variant='swin_huge'"):
        config_lib.validate(config)
    with pytest.raises(ConfigError, match="dataset='cityscapes'"):
        upernet_swin.get_config("dataset=cityscapes")
    config = upernet_swin.get_config("runlocal")
    with config.unlocked():
        config.model.encoder = "vit"
    with pytest.raises(ConfigError, match="multi-level encoder"):
        create_model(config.model)


def test_recipes_name_registered_weights():
    from rankseg_jax import weights

    for name in recipes.UPERNET_PRETRAINED.values():
        assert name in weights.REGISTRY


def _to_original_swin(mmseg_key: str) -> str:
    """mmseg Swin backbone key → the Microsoft checkpoint's name (inverse of swin2mmseg)."""
    key = mmseg_key.removeprefix("backbone.").replace("stages.", "layers.")
    key = key.replace(".attn.w_msa.", ".attn.").replace(
        "patch_embed.projection", "patch_embed.proj"
    )
    return key.replace(".ffn.layers.0.0.", ".mlp.fc1.").replace(".ffn.layers.1.", ".mlp.fc2.")


@pytest.mark.parametrize("backbone", ["swin", "beit"])
def test_pretrained_backbone_fills_every_backbone_leaf_but_the_fresh_ones(backbone):
    """A classification checkpoint in the public layout (Microsoft Swin / unilm BEiT, random
    values, with its classifier and buffers) lands on every backbone leaf of the runlocal model
    except Swin's per-stage norms / BEiT's fpn necks, with the converters' values; a checkpoint
    lacking a block is one CheckpointError."""
    from rankseg_jax.convert import mmseg_upernet
    from rankseg_jax.convert.beit_pretrained import beit_backbone_state
    from rankseg_jax.convert.swin_pretrained import swin_backbone_state
    from rankseg_jax.errors import CheckpointError

    config = config_lib.resolve(MODULES[backbone].get_config("runlocal"))
    _, shapes = abstract_variables(config)
    names = mmseg_upernet.variables_to_state_dict(
        jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
    )
    rng = np.random.default_rng(0)
    ckpt = {}
    for key, value in names.items():
        if not key.startswith("backbone.") or key.endswith("relative_position_index"):
            continue
        if backbone == "swin" and not key.startswith("backbone.norm"):
            ckpt[_to_original_swin(key)] = rng.standard_normal(value.shape).astype(np.float32)
        if backbone == "beit" and not key.startswith("backbone.fpn"):
            ckpt[key.removeprefix("backbone.")] = rng.standard_normal(value.shape).astype(
                np.float32
            )
    ckpt.update({"head.weight": np.zeros((3, 4), np.float32), "norm.weight": np.ones(4)})
    assert mmseg_upernet.pretrained_kind(ckpt) == backbone
    loaded = mmseg_upernet.pretrained_backbone(ckpt, shapes, "test.pth")
    got = mmseg_upernet.variables_to_state_dict(loaded)
    if backbone == "swin":
        want = swin_backbone_state(ckpt)
        fresh = "backbone.norm"
    else:
        want = beit_backbone_state(ckpt, 4, (3, 3))
        fresh = "backbone.fpn"
    assert set(got) - {k for k in got if k.endswith("relative_position_index")} == set(want)
    for key, value in want.items():
        np.testing.assert_array_equal(np.asarray(got[key]), value, err_msg=key)
    backbone_keys = {k for k in names if k.startswith("backbone.") and "index" not in k}
    assert backbone_keys - set(want) == {k for k in backbone_keys if k.startswith(fresh)}

    block = "layers.1.blocks.0." if backbone == "swin" else "blocks.1."
    partial = {k: v for k, v in ckpt.items() if not k.startswith(block)}
    with pytest.raises(CheckpointError, match=f"does not fit the {backbone} backbone: missing"):
        mmseg_upernet.pretrained_backbone(partial, shapes, "test.pth")


SWIN_22K, BEIT_22K = "swin_base_patch4_window12_384_22k", "beit_large_patch16_224_pt22k_ft22k"
# (module, arg, dataset, n_cls, crop, iters, batch, accum, classifier, k, img weight, lr, wd,
#  warm-up, lr_mult keys, test mode, test stride, pretrained)
ROWS = [
    (upernet_swin, "head=base", "ade20k", 150, 512, 160_000, 16, 1, "full", 150, 10.0, 6e-5, 0.01, 1500, 0, "whole", 512, SWIN_22K),  # noqa: E501
    (upernet_swin, "", "ade20k", 150, 512, 160_000, 16, 1, "rankseg", 50, 10.0, 6e-5, 0.01, 1500, 2, "whole", 512, SWIN_22K),  # noqa: E501
    (upernet_swin, "dataset=coco_stuff10k,head=base", "coco_stuff10k", 171, 512, 40_000, 16, 1, "full", 171, 10.0, 6e-5, 0.01, 1500, 0, "whole", 512, SWIN_22K),  # noqa: E501
    (upernet_swin, "dataset=coco_stuff10k", "coco_stuff10k", 171, 512, 40_000, 16, 1, "rankseg", 50, 10.0, 6e-5, 0.01, 1500, 2, "whole", 512, SWIN_22K),  # noqa: E501
    (upernet_beit, "head=base", "ade20k", 150, 640, 320_000, 8, 2, "full", 150, 5.0, 2e-5, 0.05, 3000, 0, "slide", 426, BEIT_22K),  # noqa: E501
    (upernet_beit, "", "ade20k", 150, 640, 320_000, 8, 2, "rankseg", 50, 5.0, 2e-5, 0.05, 3000, 0, "slide", 426, BEIT_22K),  # noqa: E501
    (upernet_beit, "dataset=coco_stuff10k", "coco_stuff10k", 171, 640, 320_000, 8, 2, "rankseg", 50, 5.0, 2e-5, 0.05, 3000, 0, "slide", 426, BEIT_22K),  # noqa: E501
]  # fmt: skip


@pytest.mark.parametrize("row", ROWS, ids=lambda r: f"{r[0].__name__}:{r[1]}")
def test_row_values(row):
    module, arg, dataset, n_cls, crop, iters, batch, accum, classifier, k, weight = row[:11]
    lr, wd, warmup, n_lr_keys, mode, stride, pretrained = row[11:]
    c = config_lib.resolve(module.get_config(arg))
    m = c.model
    assert (c.data.dataset, m.n_cls, m.classifier, m.k) == (dataset, n_cls, classifier, k)
    assert c.data.crop_size == m.img_size == (crop, crop) == tuple(c.eval.crop)
    assert tuple(c.data.img_scale) == tuple(c.data.test_scale) == (4 * crop, crop)
    assert (c.total_steps, c.batch_size, c.optimizer.grad_accum_steps) == (iters, batch, accum)
    assert (c.eval.mode, tuple(c.eval.stride)) == (mode, (stride, stride))
    assert (c.optimizer.name, c.optimizer.lr, c.optimizer.weight_decay) == ("adamw", lr, wd)
    assert tuple(c.optimizer.betas) == (0.9, 0.999) and len(c.optimizer.lr_mult) == n_lr_keys
    s = c.schedule
    assert (s.power, s.min_lr, s.warmup_steps, s.warmup_ratio) == (1.0, 0.0, warmup, 1e-6)
    assert (c.loss.img_loss, c.loss.img_loss_weight, c.loss.aux_weight) == ("asl", weight, 0.4)
    assert m.pretrained == pretrained and m.rankseg_img_head.downsample == 0
    assert m.rankseg_img_head.share_embedding == (module is upernet_swin)
    assert c.eval.every_steps == c.checkpoint.every_steps == iters // 10
    ms = config_lib.resolve(module.get_config(",".join(filter(None, [arg, "ms_flip"]))))
    assert tuple(ms.eval.scales) == recipes.MS_RATIOS and ms.eval.flip


def test_demo_is_a_small_swin_upernet_on_generated_data():
    c = config_lib.resolve(upernet_swin.get_config("demo"))
    assert (c.model.encoder, c.model.decode_head, c.model.classifier) == ("swin", "uper", "rankseg")
    assert c.model.swin.variant == "swin_test" and c.model.pretrained == "none"
    assert c.data.dataset == "synthetic_ade20k" and c.data.generate_if_missing
