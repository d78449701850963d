"""The SDPA variant of the PyTorch reference computes what the reference computes.

Tolerance: 2e-5 absolute on the logits of a small float32 model (only the rounding order inside
attention differs); with decoder dropout active the SDPA path must also drop (outputs differ
between two training-mode calls).
"""

from __future__ import annotations

import pytest

tr = pytest.importorskip("rankseg_testing.torch_reference")
sdpa = pytest.importorskip("rankseg_testing.torch_sdpa")


def small(head):
    config = tr.SegmenterConfig(
        head=head, img_size=(64, 64), embed_dims=64, num_layers=2, num_heads=2, d_model=64,
        head_layers=3 if head == "rankseg" else 2, head_heads=2, d_ff=256, topk_cls=8,
        drop_path_rate=0.0,
    )  # fmt: skip
    return tr.randomize_parameters_(tr.build_segmenter(config), 0)


@pytest.mark.parametrize("head", ["mask", "rankseg"])
def test_sdpa_matches_reference(torch, head):
    model = small(head).eval()
    x = torch.randn(2, 3, 64, 80, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model.encode_decode(x)
        sdpa.use_sdpa_(model)
        got = model.encode_decode(x)
    assert sdpa.count_sdpa_modules(model) == 2 + (3 if head == "rankseg" else 2)
    assert (got - want).abs().max().item() < 2e-5


def test_sdpa_keeps_decoder_dropout_in_training(torch):
    model = sdpa.use_sdpa_(small("mask")).train()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        a, b = model.encode_decode(x), model.encode_decode(x)
    assert (a - b).abs().max().item() > 0
