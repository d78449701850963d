"""AugReg .npz -> mmseg backbone: names, shapes, the maths of each transpose, the pos resize."""

from __future__ import annotations

import numpy as np
import pytest

from rankseg_jax.convert import augreg_npz as an
from rankseg_jax.convert import segmenter_layout as layout
from rankseg_jax.convert import torch_pickle as tp
from rankseg_jax.errors import CheckpointError

DIM, HEADS, MLP, LAYERS, PATCH, GRID = 64, 2, 256, 2, 16, 24


def _fake_augreg(seed: int = 0) -> dict[str, np.ndarray]:
    """Random arrays under the real AugReg names and layouts (D=64, 2 heads, 2 blocks, 24x24)."""
    rng = np.random.default_rng(seed)
    r = lambda *shape: rng.standard_normal(shape).astype(np.float32)
    head_dim = DIM // HEADS
    arrays = {
        "embedding/kernel": r(PATCH, PATCH, 3, DIM),
        "embedding/bias": r(DIM),
        "cls": r(1, 1, DIM),
        "Transformer/posembed_input/pos_embedding": r(1, 1 + GRID * GRID, DIM),
        "Transformer/encoder_norm/scale": r(DIM),
        "Transformer/encoder_norm/bias": r(DIM),
        "head/kernel": r(DIM, 10),
        "head/bias": r(10),
    }
    for i in range(LAYERS):
        base = f"Transformer/encoderblock_{i}/"
        att = base + "MultiHeadDotProductAttention_1/"
        for name in ("query", "key", "value"):
            arrays[f"{att}{name}/kernel"] = r(DIM, HEADS, head_dim)
            arrays[f"{att}{name}/bias"] = r(HEADS, head_dim)
        arrays[att + "out/kernel"] = r(HEADS, head_dim, DIM)
        arrays[att + "out/bias"] = r(DIM)
        for ln in ("LayerNorm_0", "LayerNorm_2"):
            arrays[f"{base}{ln}/scale"] = r(DIM)
            arrays[f"{base}{ln}/bias"] = r(DIM)
        arrays[base + "MlpBlock_3/Dense_0/kernel"] = r(DIM, MLP)
        arrays[base + "MlpBlock_3/Dense_0/bias"] = r(MLP)
        arrays[base + "MlpBlock_3/Dense_1/kernel"] = r(MLP, DIM)
        arrays[base + "MlpBlock_3/Dense_1/bias"] = r(DIM)
    return arrays


@pytest.fixture(scope="module")
def npz_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("augreg") / "B_16-fake.npz"
    np.savez(path, **_fake_augreg())
    return path


def test_keys_and_shapes_match_the_official_backbone(official, npz_path):
    """The small official model is this size with a 4x4 grid, so names and shapes must match."""
    sd = an.augreg_npz_to_mmseg(npz_path, grid=(4, 4))
    official_sd = layout.state_dict_from_checkpoint(
        tp.load_pth(official / "baseline_small.pth", use_torch=False)
    )
    backbone = {k: v.shape for k, v in official_sd.items() if k.startswith("backbone.")}
    assert list(sd) == list(backbone)
    assert {k: v.shape for k, v in sd.items()} == backbone
    assert all(v.dtype == np.float32 and v.flags.c_contiguous for v in sd.values())


def test_converted_layers_compute_what_the_flax_layout_computes(npz_path):
    """Each PyTorch (out, in) tensor applied as x W^T + b equals the AugReg einsum (tol 1e-4)."""
    arrays = an.load_augreg_npz(npz_path)
    sd = an.augreg_npz_to_mmseg(npz_path)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((5, DIM)).astype(np.float32)
    att = "Transformer/encoderblock_1/MultiHeadDotProductAttention_1/"
    w_in = sd["backbone.layers.1.attn.attn.in_proj_weight"]
    b_in = sd["backbone.layers.1.attn.attn.in_proj_bias"]
    for j, name in enumerate(("query", "key", "value")):
        flax = (
            np.einsum("nd,dhk->nhk", x, arrays[f"{att}{name}/kernel"]) + arrays[f"{att}{name}/bias"]
        )
        torch_like = x @ w_in[j * DIM : (j + 1) * DIM].T + b_in[j * DIM : (j + 1) * DIM]
        np.testing.assert_allclose(torch_like, flax.reshape(5, DIM), atol=1e-4)
    heads = rng.standard_normal((5, HEADS, DIM // HEADS)).astype(np.float32)
    flax_out = (
        np.einsum("nhk,hkd->nd", heads, arrays[att + "out/kernel"]) + arrays[att + "out/bias"]
    )
    w_out, b_out = (sd[f"backbone.layers.1.attn.attn.out_proj.{p}"] for p in ("weight", "bias"))
    np.testing.assert_allclose(heads.reshape(5, DIM) @ w_out.T + b_out, flax_out, atol=1e-4)
    mlp = "Transformer/encoderblock_0/MlpBlock_3/Dense_0/"
    np.testing.assert_allclose(
        x @ sd["backbone.layers.0.ffn.layers.0.0.weight"].T,
        x @ arrays[mlp + "kernel"],
        atol=1e-4,
    )
    patch = rng.standard_normal((PATCH, PATCH, 3)).astype(np.float32)  # one HWC patch
    np.testing.assert_allclose(
        np.einsum("hwc,dchw->d", patch, sd["backbone.patch_embed.projection.weight"]),
        np.einsum("hwc,hwcd->d", patch, arrays["embedding/kernel"]),
        atol=1e-3,
    )
    np.testing.assert_array_equal(
        sd["backbone.ln1.weight"], arrays["Transformer/encoder_norm/scale"]
    )
    np.testing.assert_array_equal(
        sd["backbone.layers.0.ln2.bias"], arrays["Transformer/encoderblock_0/LayerNorm_2/bias"]
    )


def test_opt_target_prefix_variant(tmp_path, npz_path):
    prefixed = tmp_path / "prefixed.npz"
    np.savez(prefixed, **{"opt/target/" + k: v for k, v in _fake_augreg().items()})
    plain, other = an.augreg_npz_to_mmseg(npz_path), an.augreg_npz_to_mmseg(prefixed)
    assert list(plain) == list(other)
    for key in plain:
        np.testing.assert_array_equal(plain[key], other[key])


@pytest.mark.parametrize("new_grid", [(32, 32), (40, 40), (30, 30), (16, 32), (4, 4)])
def test_pos_embed_resize_matches_torch_bicubic(torch, npz_path, new_grid):
    """The mmseg routine: grid to (1, D, 24, 24), F.interpolate bicubic, cls kept (tol 1e-5)."""
    sd = an.augreg_npz_to_mmseg(npz_path, grid=new_grid)
    pos = an.load_augreg_npz(npz_path)["Transformer/posembed_input/pos_embedding"]
    grid = torch.from_numpy(pos[:, 1:]).reshape(1, GRID, GRID, DIM).permute(0, 3, 1, 2)
    resized = torch.nn.functional.interpolate(
        grid, size=new_grid, mode="bicubic", align_corners=False
    )
    expected = np.concatenate([pos[:, :1], resized.flatten(2).transpose(1, 2).numpy()], axis=1)
    got = sd["backbone.pos_embed"]
    assert got.shape == (1, 1 + new_grid[0] * new_grid[1], DIM)
    np.testing.assert_array_equal(got[:, 0], pos[:, 0])
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


def test_small_non_square_resize_matches_torch(torch):
    pos = np.random.default_rng(2).standard_normal((1, 1 + 4 * 4, 3)).astype(np.float32)
    got = an.resize_pos_embed(pos, (4, 7))
    grid = torch.from_numpy(pos[:, 1:]).reshape(1, 4, 4, 3).permute(0, 3, 1, 2)
    ref = torch.nn.functional.interpolate(grid, size=(4, 7), mode="bicubic", align_corners=False)
    np.testing.assert_allclose(got[:, 1:], ref.flatten(2).transpose(1, 2).numpy(), atol=1e-5)


def test_errors_name_the_file_and_key(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        an.augreg_npz_to_mmseg(tmp_path / "missing.npz")
    arrays = _fake_augreg()
    del arrays["Transformer/encoderblock_1/MlpBlock_3/Dense_1/bias"]
    broken = tmp_path / "broken.npz"
    np.savez(broken, **arrays)
    with pytest.raises(
        CheckpointError, match=r"broken\.npz.*encoderblock_1/MlpBlock_3/Dense_1/bias"
    ):
        an.augreg_npz_to_mmseg(broken)
    garbage = tmp_path / "garbage.npz"
    garbage.write_text("not a zip")
    with pytest.raises(CheckpointError, match="garbage.npz"):
        an.augreg_npz_to_mmseg(garbage)
    with pytest.raises(CheckpointError, match="not square"):
        an.resize_pos_embed(np.zeros((1, 1 + 12, 4), np.float32), (4, 4))
