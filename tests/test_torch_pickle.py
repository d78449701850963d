"""The torch-free .pth reader against torch itself, hostile files, and the checkpoint layouts."""

from __future__ import annotations

import collections
import os
import pathlib
import pickle
import subprocess
import sys
import zipfile

import ml_dtypes
import numpy as np
import pytest

from rankseg_jax.convert import segmenter_layout as layout
from rankseg_jax.convert import torch_pickle as tp
from rankseg_jax.errors import CheckpointError, UnsafeCheckpointError
from rankseg_testing.torch_files import Global, TensorSpec, build_pickle, write_torch_zip

BOTH = [False, True]  # use_torch


def _load(path, use_torch):
    if use_torch:
        pytest.importorskip("torch")
    return tp.load_pth(path, use_torch=use_torch)


def _assert_same_tree(a, b):
    """Same nested structure and types; arrays equal bit for bit with the same dtype."""
    assert type(a) is type(b), (type(a), type(b))
    if isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert a.flags.c_contiguous and b.flags.c_contiguous
        assert a.tobytes() == b.tobytes()
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            _assert_same_tree(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _assert_same_tree(x, y)
    else:
        assert a == b


def _torch_numpy(torch, t):
    if t.dtype == torch.bfloat16:
        return t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


# ------------------------------------------------------------------ official fixtures


@pytest.mark.parametrize("name", ["rankseg_small", "baseline_small"])
def test_official_fixture_same_with_and_without_torch(official, torch, name):
    path = official / f"{name}.pth"
    free = tp.load_pth(path, use_torch=False)
    with_torch = tp.load_pth(path, use_torch=True)
    _assert_same_tree(free, with_torch)
    reference = torch.load(path, weights_only=True)["state_dict"]
    assert list(free["state_dict"]) == list(reference)
    for key, tensor in reference.items():
        np.testing.assert_array_equal(free["state_dict"][key], tensor.numpy())
    assert free["meta"]["mmcv_version"] == "1.3.12"


def test_official_fixture_state_dict(official):
    sd = layout.state_dict_from_checkpoint(
        tp.load_pth(official / "rankseg_small.pth", use_torch=False)
    )
    assert len(sd) == 79 and sum(v.size for v in sd.values()) == 332_474  # fixtures README
    assert all(v.dtype == np.float32 and v.flags.c_contiguous for v in sd.values())
    assert sd["backbone.layers.0.attn.attn.in_proj_weight"].shape == (192, 64)


# ------------------------------------------------------------------ files torch writes


def _tricky_tensors(torch):
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(6, 8, generator=gen)
    return collections.OrderedDict(
        offset=base[2:4],  # storage offset 16
        row=base[5],  # offset 40, shares the storage
        transposed=base.t(),  # non-contiguous
        strided=base[::2, 1::3],  # offset and steps
        expanded=torch.randn(1, 3, generator=gen).expand(4, 3),  # stride 0
        half=torch.randn(3, 5, generator=gen).half()[:, 1:],
        bf16=torch.randn(4, 4, generator=gen).bfloat16().t(),
        f64=torch.randn(2, 3, generator=gen).double(),
        i64=torch.arange(-5, 7).view(3, 4)[:, ::2],
        i32=torch.arange(6, dtype=torch.int32),
        i8=torch.arange(-4, 4, dtype=torch.int8),
        u8=torch.arange(250, 256, dtype=torch.uint8),
        flag=torch.tensor([True, False, True]),
        scalar=torch.tensor(3.5),
        empty=torch.zeros(0, 4),
        param=torch.nn.Parameter(torch.randn(2, 2, generator=gen)),
    )


@pytest.mark.parametrize("use_torch", BOTH)
def test_torch_written_tricky_tensors(torch, tmp_path, use_torch):
    tensors = _tricky_tensors(torch)
    path = tmp_path / "tricky.pth"
    torch.save({"state_dict": tensors, "meta": {"iter": 7, "CLASSES": ("a", "b")}}, path)
    loaded = tp.load_pth(path, use_torch=use_torch)
    assert loaded["meta"] == {"iter": 7, "CLASSES": ("a", "b")}
    sd = loaded["state_dict"]
    assert isinstance(sd, collections.OrderedDict) and list(sd) == list(tensors)
    for key, tensor in tensors.items():
        expected = _torch_numpy(torch, tensor.detach().contiguous())
        got = sd[key]
        assert got.dtype == expected.dtype and got.shape == expected.shape, key
        assert got.flags.c_contiguous and got.flags.owndata, key
        assert got.tobytes() == expected.tobytes(), key
    assert sd["bf16"].dtype == ml_dtypes.bfloat16
    sd["offset"][0, 0] = 1e6  # views of one storage come back as independent copies
    assert sd["row"][0] != 1e6 and sd["transposed"][0, 2] != 1e6


def test_torch_written_same_tree_both_readers(torch, tmp_path):
    path = tmp_path / "tricky.pth"
    torch.save({"state_dict": _tricky_tensors(torch), "list": [1, (2.0, None)]}, path)
    _assert_same_tree(tp.load_pth(path, use_torch=False), tp.load_pth(path, use_torch=True))


def _training_checkpoint(torch, path):
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3)).sum().backward()
    sgd.step()
    state = collections.OrderedDict(("module." + k, v) for k, v in model.state_dict().items())
    torch.save({"meta": {"iter": 1}, "state_dict": state, "optimizer": sgd.state_dict()}, path)
    return model


def test_checkpoint_with_optimizer_state(torch, tmp_path):
    path = tmp_path / "train.pth"
    model = _training_checkpoint(torch, path)
    free, with_torch = tp.load_pth(path, use_torch=False), tp.load_pth(path, use_torch=True)
    _assert_same_tree(free, with_torch)
    group = free["optimizer"]["param_groups"][0]
    assert group["momentum"] == 0.9 and group["params"] == [0, 1, 2, 3]
    assert free["optimizer"]["state"][0]["momentum_buffer"].shape == (4, 3)
    sd = layout.state_dict_from_checkpoint(free)  # "module." stripped, optimizer ignored
    assert list(sd) == list(model.state_dict())
    np.testing.assert_array_equal(sd["0.weight"], model[0].weight.detach().numpy())


# ------------------------------------------------------------------ torch 1.x layout, byte order


def _torch1_file(path, prefix, byteorder=None):
    """A file laid out like torch 1.8.1 wrote it: no byteorder record, pointer-like keys."""
    base = np.arange(30, dtype=np.float32) / 7
    ids = np.array([3, -1, 2**40], dtype=np.int64)
    key_a, key_b = "94433262519920", "94433262520064"
    obj = {
        "state_dict": collections.OrderedDict(
            w=TensorSpec(key_a, np.float32, 30, 3, (4, 5), (1, 4)),
            v=TensorSpec(key_a, np.float32, 30, 10, (2, 3), (3, 1), location="cuda:0"),
            ids=TensorSpec(key_b, np.int64, 3, 0, (3,), (1,)),
        ),
        "meta": {"epoch": 1, "PALETTE": [[1, 2, 3]], "lr": 0.5, "ok": None},
    }
    order = ">" if byteorder == "big" else "<"
    storages = {
        key_a: base.astype(order + "f4").tobytes(),
        key_b: ids.astype(order + "i8").tobytes(),
    }
    write_torch_zip(str(path), build_pickle(obj), storages, prefix=prefix, byteorder=byteorder)
    strided = np.lib.stride_tricks.as_strided
    expected_w = strided(base[3:], (4, 5), (4, 16))
    expected_v = strided(base[10:], (2, 3), (12, 4))
    return expected_w, expected_v, ids


@pytest.mark.parametrize("use_torch", BOTH)
@pytest.mark.parametrize(
    ("prefix", "byteorder"), [("archive", None), ("segmenter_vitb", None), ("model", "big")]
)
def test_hand_built_torch1_zip(tmp_path, use_torch, prefix, byteorder):
    path = tmp_path / "old.pth"
    expected_w, expected_v, ids = _torch1_file(path, prefix, byteorder)
    names = zipfile.ZipFile(path).namelist()
    assert f"{prefix}/byteorder" in names if byteorder else not any("byteorder" in n for n in names)
    loaded = _load(path, use_torch)
    np.testing.assert_array_equal(loaded["state_dict"]["w"], expected_w)
    np.testing.assert_array_equal(loaded["state_dict"]["v"], expected_v)
    np.testing.assert_array_equal(loaded["state_dict"]["ids"], ids)
    assert loaded["state_dict"]["ids"].dtype == np.int64
    assert loaded["meta"] == {"epoch": 1, "PALETTE": [[1, 2, 3]], "lr": 0.5, "ok": None}


# ------------------------------------------------------------------ bad files


@pytest.mark.parametrize("use_torch", BOTH)
def test_legacy_non_zip_file_is_refused(torch, tmp_path, use_torch):
    path = tmp_path / "legacy.pth"
    torch.save({"w": torch.ones(2)}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match=r"legacy.*re-save it with a recent torch"):
        tp.load_pth(path, use_torch=use_torch)


def test_missing_and_non_checkpoint_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        tp.load_pth(tmp_path / "nope.pth", use_torch=False)
    text = tmp_path / "notes.pth"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        tp.load_pth(text, use_torch=False)
    plain = tmp_path / "plain.pth"
    plain.write_bytes(pickle.dumps({"a": 1}, protocol=2))
    with pytest.raises(CheckpointError, match="plain pickle"):
        tp.load_pth(plain, use_torch=False)
    other_zip = tmp_path / "other.pth"
    with zipfile.ZipFile(other_zip, "w") as zf:
        zf.writestr("x/readme.txt", "hi")
    with pytest.raises(CheckpointError, match="no 'x/data.pkl' record"):
        tp.load_pth(other_zip, use_torch=False)
    with pytest.raises(CheckpointError, match="directory"):
        tp.load_pth(tmp_path, use_torch=False)


def _hostile_zip(path, data_pkl):
    write_torch_zip(str(path), data_pkl, {}, prefix="hostile", byteorder="little")


class _System:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


@pytest.mark.parametrize("use_torch", BOTH)
def test_malicious_pickles_are_refused_and_run_nothing(tmp_path, use_torch):
    marker = tmp_path / "pwned"
    payloads = {
        "system": pickle.dumps({"state_dict": _System(f"touch {marker}")}, protocol=2),
        "builtins.open": build_pickle({"x": Global("builtins", "open", (str(marker), "w"))}),
        "builtins.exec": build_pickle([Global("builtins", "exec", ("open('x','w')",))]),
        "numpy.core.multiarray._reconstruct": build_pickle(
            Global("numpy.core.multiarray", "_reconstruct", ())
        ),
    }
    for name, payload in payloads.items():
        path = tmp_path / f"{name}.pth"
        _hostile_zip(path, payload)
        with pytest.raises(UnsafeCheckpointError, match=name):
            _load(path, use_torch)
        assert not marker.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{n}.pth" for n in payloads)


def test_out_of_bounds_view_is_refused(tmp_path):
    path = tmp_path / "oob.pth"
    spec = TensorSpec("0", np.float32, 4, 2, (2, 3), (3, 1))  # last element 2 + 3 + 2 = 7 > 3
    write_torch_zip(str(path), build_pickle({"w": spec}), {"0": np.zeros(4, np.float32).tobytes()})
    with pytest.raises(CheckpointError, match="reads past the end of storage"):
        tp.load_pth(path, use_torch=False)
    short = tmp_path / "short.pth"
    spec = TensorSpec("0", np.float32, 8, 0, (8,), (1,))
    write_torch_zip(str(short), build_pickle({"w": spec}), {"0": b"\0" * 16})
    with pytest.raises(CheckpointError, match="has 16 bytes, the pickle says 32"):
        tp.load_pth(short, use_torch=False)


def test_new_dtype_without_legacy_storage_is_named(torch, tmp_path):
    path = tmp_path / "u16.pth"
    torch.save({"w": torch.zeros(2, dtype=torch.uint16)}, path)
    with pytest.raises(UnsafeCheckpointError, match=r"torch\._utils\._rebuild_tensor_v3"):
        tp.load_pth(path, use_torch=False)


# ------------------------------------------------------------------ state-dict layouts


def test_state_dict_from_checkpoint_errors():
    with pytest.raises(CheckpointError, match="no 'state_dict' or 'model' entry"):
        layout.state_dict_from_checkpoint({"meta": {}, "epoch": 3})
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        layout.state_dict_from_checkpoint([1, 2])
    with pytest.raises(CheckpointError, match="non-tensor"):
        layout.state_dict_from_checkpoint({"state_dict": {"a": 1}})


def test_segmenter_layout_round_trip(official):
    sd = layout.state_dict_from_checkpoint(
        tp.load_pth(official / "baseline_small.pth", use_torch=False)
    )
    official_sd = layout.mmseg_to_segmenter(sd, n_cls=150)
    assert official_sd["encoder.head.weight"].shape == (1000, 64)
    assert official_sd["encoder.head.bias"].shape == (1000,)
    assert "encoder.blocks.1.attn.qkv.weight" in official_sd
    assert "encoder.blocks.0.mlp.fc2.bias" in official_sd and "decoder.proj_patch" in official_sd
    assert (
        list(official_sd).index("encoder.head.weight")
        == list(official_sd).index("encoder.norm.bias") + 1
    )
    back = layout.segmenter_to_mmseg(official_sd)
    _assert_same_tree(back, sd)
    from_file_layout = layout.state_dict_from_checkpoint({"model": official_sd, "n_cls": 150})
    _assert_same_tree(from_file_layout, sd)
    with pytest.raises(CheckpointError, match=r"expected \(1, 21, 64\)"):
        layout.mmseg_to_segmenter(sd, n_cls=21)


def test_rankseg_head_has_no_segmenter_layout(official):
    sd = layout.state_dict_from_checkpoint(
        tp.load_pth(official / "rankseg_small.pth", use_torch=False)
    )
    with pytest.raises(CheckpointError, match="decode_head.decoder_norm2"):
        layout.mmseg_to_segmenter(sd, n_cls=150)


# ------------------------------------------------------------------ writing


def test_save_pth_round_trip(torch, tmp_path):
    rng = np.random.default_rng(0)
    sd = collections.OrderedDict(
        a=rng.standard_normal((3, 4), dtype=np.float32).T,  # non-contiguous input
        b=rng.standard_normal(5).astype(ml_dtypes.bfloat16),
        c=np.arange(4, dtype=np.int64),
    )
    obj = {"model": sd, "n_cls": 150, "meta": {"CLASSES": ("x", "y")}}
    path = tmp_path / "sub" / "out.pth"
    tp.save_pth(obj, path)
    assert sorted(os.listdir(path.parent)) == ["out.pth"]  # no temporary file left behind
    for use_torch in BOTH:
        loaded = tp.load_pth(path, use_torch=use_torch)
        _assert_same_tree(
            loaded["model"],
            collections.OrderedDict((k, np.ascontiguousarray(v)) for k, v in sd.items()),
        )
        assert loaded["n_cls"] == 150 and loaded["meta"] == {"CLASSES": ("x", "y")}
    assert torch.load(path, weights_only=True)["model"]["b"].dtype == torch.bfloat16


def test_save_pth_without_torch_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(tp, "_import_torch", lambda: None)
    with pytest.raises(ImportError, match="save_pth needs PyTorch"):
        tp.save_pth({"a": np.zeros(1)}, tmp_path / "x.pth")
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------ without torch


def test_default_reader_falls_back_without_torch(official, monkeypatch):
    path = official / "baseline_small.pth"
    expected = tp.load_pth(path, use_torch=False)
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    _assert_same_tree(tp.load_pth(path), expected)
    with pytest.raises(ImportError, match="use_torch=True"):
        tp.load_pth(path, use_torch=True)


def test_convert_modules_import_without_torch():
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import rankseg_jax.convert.torch_pickle, rankseg_jax.convert.augreg_npz\n"
        "import rankseg_jax.convert.safetensors_io\n"
    )
    repo = pathlib.Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=repo, timeout=120
    )
    assert result.returncode == 0, result.stderr
