"""safetensors + JSON sidecar: bit-identical round trip, order, metadata, atomic writes."""

from __future__ import annotations

import collections
import json

import ml_dtypes
import numpy as np
import pytest

from rankseg_jax.convert import safetensors_io as st

META = {
    "variant": "B/16",
    "n_cls": 3,
    "k": 2,
    "img_size": (64, 64),
    "mean": [127.5] * 3,
    "std": np.array([127.5, 127.5, 127.5]),
    "class_names": ["wall", "floor", "ceiling"],
}


def _state_dict():
    rng = np.random.default_rng(0)
    return collections.OrderedDict(
        [
            ("backbone.pos_embed", rng.standard_normal((1, 17, 8), dtype=np.float32)),
            ("backbone.cls_token", np.array([[[np.nan, -0.0, np.inf, 1e-40]]], np.float32)),
            ("decode_head.proj_patch", rng.standard_normal((8, 4), dtype=np.float32).T),
            ("a.bf16", rng.standard_normal(6).astype(ml_dtypes.bfloat16)),
            ("a.ids", np.arange(-3, 3, dtype=np.int64)),
            ("a.flag", np.array([True, False])),
        ]
    )


def test_round_trip_is_bit_identical(tmp_path):
    sd = _state_dict()
    path = tmp_path / "out" / "model.safetensors"
    sidecar = st.save_safetensors(sd, path, META)
    assert sidecar == tmp_path / "out" / "model.json"
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.json", "model.safetensors"]
    loaded, meta = st.load_safetensors(path)
    assert list(loaded) == list(sd)  # order kept although safetensors sorts internally
    for key, value in sd.items():
        assert loaded[key].dtype == value.dtype and loaded[key].shape == value.shape, key
        assert loaded[key].tobytes() == np.ascontiguousarray(value).tobytes(), key
    assert meta == json.loads(json.dumps(META, default=lambda a: a.tolist()))
    assert meta["img_size"] == [64, 64] and meta["std"] == [127.5] * 3
    assert json.loads(sidecar.read_text())["class_names"] == META["class_names"]


def test_metadata_also_in_header_and_torch_reads_it(tmp_path):
    path = tmp_path / "model.safetensors"
    sd = _state_dict()
    st.save_safetensors(sd, path, {"n_cls": 3})
    st.sidecar_path(path).unlink()
    loaded, meta = st.load_safetensors(path)
    assert meta == {"n_cls": 3} and list(loaded) == list(sd)
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    assert tensors["a.bf16"].dtype == torch.bfloat16
    np.testing.assert_array_equal(
        tensors["decode_head.proj_patch"].numpy(), sd["decode_head.proj_patch"]
    )


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.safetensors"):
        st.load_safetensors(tmp_path / "nothing.safetensors")
    with pytest.raises(TypeError, match="metadata entry 'bad'"):
        st.save_safetensors(_state_dict(), tmp_path / "m.safetensors", {"bad": object()})
    with pytest.raises(TypeError, match="'x' is int"):
        st.save_safetensors({"x": 3}, tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match="expected a .safetensors"):
        st.save_safetensors(_state_dict(), tmp_path / "m.pth")
    assert list(tmp_path.iterdir()) == []  # nothing written by the failed calls
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 20)
    with pytest.raises(ValueError, match="junk.safetensors"):
        st.load_safetensors(junk)


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "model.safetensors"
    st.save_safetensors(_state_dict(), path, {"v": 1})
    before = path.read_bytes()

    def broken(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(st.safetensors.numpy, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        st.save_safetensors(_state_dict(), path, {"v": 2})
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.json", "model.safetensors"]
