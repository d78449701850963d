"""Weights files → params: formats, and one clear message per kind of mismatch."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from rankseg_jax.convert import loading, mmseg
from rankseg_jax.convert.safetensors_io import save_safetensors
from rankseg_jax.errors import CheckpointError
from rankseg_jax.models.segmenter import create_model
from rankseg_testing.official import load_small, small_config


def load(path, head="rankseg", **model):
    config = small_config(head)
    with config.unlocked():
        config.model.update(model)
    return loading.load_params(path, create_model(config.model), config)


def test_torch_free_load_equals_fixture_tensors(official, torch):
    state = torch.load(official / "rankseg_small.pth", weights_only=True)["state_dict"]
    params = load(official / "rankseg_small.pth")
    back = mmseg.params_to_state_dict(jax.tree.map(np.asarray, params))
    assert list(back) == list(state)
    for key, value in state.items():
        np.testing.assert_array_equal(back[key], value.numpy())


def test_safetensors_round_trip(official, tmp_path):
    _, params = load_small(official / "rankseg_small.pth")
    state = mmseg.params_to_state_dict(jax.tree.map(np.asarray, params))
    save_safetensors(state, tmp_path / "model.safetensors", {"n_cls": 150})
    again = load(tmp_path / "model.safetensors")
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(again), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "head,model,message",
    [
        ("mask", {}, "checkpoint has a 'rankseg' head, config model.classifier='full'"),
        ("rankseg", {"n_cls": 171}, "checkpoint has n_cls=150, config model.n_cls=171"),
        ("rankseg", {"k": 25}, "checkpoint has k=50, config model.k=25"),
        ("rankseg", {"dec_layers": 2}, "12 unexpected keys: decode_head.blocks.2."),
        ("rankseg", {"depth": 3}, "12 missing keys: backbone.layers.2."),
        ("rankseg", {"mlp_dim": 128}, r"ffn.layers.0.0.bias has shape \(256,\), the model "
                                      r"expects \(128,\)"),
    ],
)  # fmt: skip
def test_mismatch_messages(official, head, model, message):
    with pytest.raises(CheckpointError, match=message) as info:
        load(official / "rankseg_small.pth", head, **model)
    assert "rankseg_small.pth" in str(info.value)


def test_missing_and_unknown_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.pth"):
        load(tmp_path / "absent.pth")
    (tmp_path / "weights.ckpt").write_text("x")
    with pytest.raises(CheckpointError, match="unsupported weights format"):
        load(tmp_path / "weights.ckpt")
