"""ImageNet ResNetV1c initialisation by name: `model.pretrained=resnet101_v1c` (issue 17).

The real file (download.openmmlab.com/pretrain/third_party/resnet101_v1c-e67eebb6.pth) is not
reachable offline, so these tests write one in its key layout for the small runlocal DeepLab
(`configs/deeplabv3.py:runlocal`, one bottleneck per stage) and serve it from the local HTTP
server under the registry's file name. The layout is built here from mmseg's
`mmseg/models/backbones/resnet.py` (ResNetV1c = ResNet with deep_stem=True: `stem` is an
nn.Sequential conv/BN/ReLU ×3, so its convs are `stem.0/3/6` and BNs `stem.1/4/7`; each
`layer{i}` is a ResLayer of Bottlenecks registering conv1, bn1, conv2, bn2, conv3, bn3 and, on
the first block, `downsample` = Sequential(conv, BN)), plus the ImageNet classifier `fc.weight`
(1000, C) / `fc.bias` (1000,) such a classification checkpoint carries, wrapped in a
{'state_dict': ...} dict (which copies of the real file are read from, e.g. a Paddle port's
`state['state_dict']`) and, in one test, bare (mmcv's loader takes both). Written here, apart
from rankseg_jax.convert, so a layout bug there fails. The real file's num_batches_tracked
buffers could not be checked offline: a file without them loads too (torch's rule).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib

import jax
import numpy as np
import pytest

from rankseg_jax import checkpoint, optim, train, weights
from rankseg_jax import config as configuration
from rankseg_jax import sharding as shd
from rankseg_jax.convert import loading
from rankseg_jax.download import ChecksumError
from rankseg_jax.errors import CheckpointError, UserError
from rankseg_jax.models.segmenter import create_model
from rankseg_testing.file_server import FileServer
from rankseg_testing.torch_files import write_state_dict_pth

NAME = "resnet101_v1c"
# XLA CPU at optimisation level 0 (as tests/test_upernet_runtime.py): the state's compile takes
# about a third of the default time; the values it produces are those of an init, not compared
# across compilers.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _imagenet_v1c(stem: int, base: int, blocks: tuple[int, ...], seed: int = 0) -> dict:
    """An mmcv ImageNet ResNetV1c state dict (torch layouts, registration order), random values.

    Conv weights OIHW float32, BN weight/bias/running_mean/running_var (C,) float32 (variances
    positive), num_batches_tracked 0-d int64; then `fc.weight` (1000, 4·base·8), `fc.bias`.
    """
    rng = np.random.default_rng(seed)
    sd: dict[str, np.ndarray] = collections.OrderedDict()

    def conv(name: str, cout: int, cin: int, k: int) -> None:
        sd[f"{name}.weight"] = rng.standard_normal((cout, cin, k, k)).astype(np.float32)

    def bn(name: str, c: int) -> None:
        sd[f"{name}.weight"] = rng.uniform(0.5, 1.5, c).astype(np.float32)
        sd[f"{name}.bias"] = rng.standard_normal(c).astype(np.float32)
        sd[f"{name}.running_mean"] = rng.standard_normal(c).astype(np.float32)
        sd[f"{name}.running_var"] = rng.uniform(0.5, 2.0, c).astype(np.float32)
        sd[f"{name}.num_batches_tracked"] = np.array(rng.integers(1, 10**6), np.int64)

    conv("stem.0", stem // 2, 3, 3)
    bn("stem.1", stem // 2)
    conv("stem.3", stem // 2, stem // 2, 3)
    bn("stem.4", stem // 2)
    conv("stem.6", stem, stem // 2, 3)
    bn("stem.7", stem)
    inplanes = stem
    for i, n_blocks in enumerate(blocks):
        planes = base * 2**i
        for j in range(n_blocks):
            block = f"layer{i + 1}.{j}"
            cin = inplanes if j == 0 else 4 * planes
            conv(f"{block}.conv1", planes, cin, 1)
            bn(f"{block}.bn1", planes)
            conv(f"{block}.conv2", planes, planes, 3)
            bn(f"{block}.bn2", planes)
            conv(f"{block}.conv3", 4 * planes, planes, 1)
            bn(f"{block}.bn3", 4 * planes)
            if j == 0:
                conv(f"{block}.downsample.0", 4 * planes, cin, 1)
                bn(f"{block}.downsample.1", 4 * planes)
        inplanes = 4 * planes
    sd["fc.weight"] = rng.standard_normal((1000, inplanes)).astype(np.float32)
    sd["fc.bias"] = rng.standard_normal(1000).astype(np.float32)
    return sd


def _flax_leaf(key: str) -> tuple[str, tuple[str, ...]]:
    """(collection, path under 'backbone') of a torch key: `layer1.0.bn1.running_mean` ->
    ('batch_stats', ('layer1_0', 'bn1', 'mean')) — the Flax tree's naming convention."""
    parts = key.split(".")
    modules: list[str] = []
    for part in parts[:-1]:
        if part.isdigit():
            modules[-1] += f"_{part}"
        else:
            modules.append(part)
    leaf = parts[-1]
    stats = {"running_mean": "mean", "running_var": "var", "num_batches_tracked": leaf}
    if leaf in stats:
        return "batch_stats", (*modules, stats[leaf])
    is_bn = modules[-1].startswith("bn") or modules[-1] in ("stem_1", "stem_4", "stem_7")
    is_bn = is_bn or modules[-1] == "downsample_1"
    if leaf == "weight":
        return "params", (*modules, "scale" if is_bn else "kernel")
    return "params", (*modules, leaf)


def _small_config(pretrained: str = NAME):
    config = configuration.load_config("configs/deeplabv3.py:runlocal")
    with config.unlocked():
        config.model.resnet.stage_blocks = (1, 1, 1, 1)
        config.model.pretrained = pretrained
    return config


def _write(path, sd: dict, wrap: bool = True) -> bytes:
    """`sd` as torch.save writes it: mmcv's {'state_dict': ...} or the bare OrderedDict."""
    write_state_dict_pth(str(path), sd, key="state_dict" if wrap else None)
    return path.read_bytes()


def _loaded_state(config, workdir, init, monkeypatch):
    """(state from `init`, the fresh variables initial_state loaded it onto): one compile of the
    state, the fresh variables caught on their way into loading.load_variables."""
    caught = {}

    def spy(path, model, config, base_variables=None):
        caught.update(jax.tree.map(np.asarray, base_variables))
        return load_variables(path, model, config, base_variables=base_variables)

    load_variables = loading.load_variables
    monkeypatch.setattr(loading, "load_variables", spy)
    model, tx = create_model(config.model), optim.make_optimizer(config)
    manager = checkpoint.make_manager(workdir, config)
    state, _, origin = train.initial_state(
        config, workdir, model, tx, shd.mesh_from_config(config), manager, init,
        compiler_options=FAST_COMPILE,
    )  # fmt: skip
    manager.close()
    return state, caught, origin


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RANKSEG_JAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("RANKSEG_JAX_OFFLINE", raising=False)
    return tmp_path / "cache"


def _leaf(tree, path):
    for part in path:
        tree = tree[part]
    return np.asarray(tree)


def _flat(tree) -> dict:
    return {
        jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(tree)
    }


def test_resnet101_v1c_by_name_fills_the_backbone_with_the_file(cache, tmp_path, monkeypatch):
    """model.pretrained=resnet101_v1c, served locally, through resolve_init_weights and
    initial_state: every backbone param and BN statistic is the file's (OIHW → HWIO, BN weight
    → scale, running_mean/var → mean/var, int64 counter → int32), `fc.*` is dropped, the heads
    keep their fresh init; the registry's pinned digest is enforced."""
    entry = weights.get(NAME)
    config = _small_config()
    r = config.model.resnet
    sd = _imagenet_v1c(r.stem_channels, r.base_channels, tuple(r.stage_blocks), seed=1)
    data = _write(tmp_path / "v1c.pth", sd)
    digest = hashlib.sha256(data).hexdigest()
    with FileServer({"/" + entry.filename: data}) as server:
        monkeypatch.setenv("RANKSEG_JAX_WEIGHTS_BASE_URL", server.base_url)
        # the real entry pins mmcv's published digest prefix: another file is refused, one line
        with pytest.raises(ChecksumError) as info:
            train.resolve_init_weights(config)
        assert "\n" not in str(info.value) and NAME in str(info.value)
        assert not weights.cached_path(NAME).exists()
        monkeypatch.setitem(weights.REGISTRY, NAME, dataclasses.replace(entry, sha256=digest))
        init = train.resolve_init_weights(config)
        assert server.gets["/" + entry.filename] == 2
    assert init.key == "model.pretrained" and init.spec == NAME and init.sha256 == digest
    assert init.path == weights.cached_path(NAME) and init.path.read_bytes() == data
    loaded, fresh, origin = _loaded_state(config, tmp_path / "wd", init, monkeypatch)
    assert NAME in origin and digest in origin
    variables = {"params": loaded.params, **loaded.model_state}
    seen = set()
    for key, value in sd.items():
        if key.startswith("fc."):
            continue
        collection, path = _flax_leaf(key)
        got = _leaf(variables[collection]["backbone"], path)
        want = value.transpose(2, 3, 1, 0) if value.ndim == 4 else value  # OIHW → HWIO
        assert got.dtype == (np.int32 if value.dtype == np.int64 else np.float32), key
        np.testing.assert_array_equal(got, want, err_msg=key)
        seen.add((collection, path))
    backbone_leaves = {
        (c, tuple(p.key for p in path))
        for c in ("params", "batch_stats")
        for path, _ in jax.tree_util.tree_leaves_with_path(variables[c]["backbone"])
    }
    assert seen == backbone_leaves  # every backbone leaf came from the file, none is left over
    assert not np.array_equal(
        _leaf(fresh["params"]["backbone"], ("stem_0", "kernel")),
        _leaf(loaded.params["backbone"], ("stem_0", "kernel")),
    )
    for collection in ("params", "batch_stats"):  # the heads: initial_state's fresh init
        for head in ("decode_head", "auxiliary_head"):
            a = _flat(fresh[collection][head])
            b = _flat(variables[collection][head])
            assert a.keys() == b.keys() and a, (head, collection)
            for k in a:
                np.testing.assert_array_equal(a[k], b[k], err_msg=f"{collection} {head}{k}")
    shapes = {v.shape for v in _flat(variables).values()}
    assert (1000,) not in shapes and (1000, sd["fc.weight"].shape[1]) not in shapes  # no fc


def _base_variables(config):
    model = create_model(config.model)
    abstract = loading.expected_variables(model, config)
    return model, jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract)


def test_bare_state_dict_and_missing_counters_load(tmp_path):
    """The same layout saved bare (torch.save(model.state_dict())) loads too; a file without
    BN `num_batches_tracked` (saved before torch had it) counts 0, as torch's BatchNorm does."""
    config = _small_config("none")
    r = config.model.resnet
    sd = _imagenet_v1c(r.stem_channels, r.base_channels, tuple(r.stage_blocks), seed=2)
    model, base = _base_variables(config)
    path = tmp_path / "bare.pth"
    _write(path, sd, wrap=False)
    bare = loading.load_variables(path, model, config, base_variables=base)
    np.testing.assert_array_equal(
        _leaf(bare["params"]["backbone"], ("layer4_0", "conv2", "kernel")),
        sd["layer4.0.conv2.weight"].transpose(2, 3, 1, 0),
    )
    old = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    _write(path, old)
    loaded = loading.load_variables(path, model, config, base_variables=base)
    stats = loaded["batch_stats"]["backbone"]["layer1_0"]["downsample_1"]
    assert int(stats["num_batches_tracked"]) == 0
    np.testing.assert_array_equal(stats["var"], sd["layer1.0.downsample.1.running_var"])


@pytest.mark.parametrize(
    "change, named",
    [
        ("missing", "missing: layer2.0.bn1.running_var"),
        ("extra", "unexpected: layer1.0.conv4.weight"),
        ("shape", "shape: stem.3.weight (4, 4, 1, 1) != (4, 4, 3, 3)"),
        ("deeper", "unexpected: layer1.1.conv1.weight"),
    ],
)
def test_backbone_that_does_not_fit_is_one_line_naming_the_file(tmp_path, change, named):
    config = _small_config("none")
    r = config.model.resnet
    blocks = (2, 1, 1, 1) if change == "deeper" else tuple(r.stage_blocks)
    sd = _imagenet_v1c(r.stem_channels, r.base_channels, blocks, seed=3)
    if change == "missing":
        del sd["layer2.0.bn1.running_var"]
    elif change == "extra":
        sd["layer1.0.conv4.weight"] = np.zeros((16, 4, 1, 1), np.float32)
    elif change == "shape":
        sd["stem.3.weight"] = np.zeros((4, 4, 1, 1), np.float32)
    path = tmp_path / f"{change}_v1c.pth"
    _write(path, sd)
    model, base = _base_variables(config)
    with pytest.raises(CheckpointError) as info:
        loading.load_variables(path, model, config, base_variables=base)
    message = str(info.value)
    assert isinstance(info.value, UserError) and "\n" not in message
    assert str(path) in message and named in message, message
    assert "backbone." not in message.replace(str(path), "")  # the file's own key names
