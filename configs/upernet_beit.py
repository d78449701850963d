"""UperNet BEiT-L/16 at 640 (ImageNet-22k self-supervised + fine-tuned) ± RankSeg (issue #18).

Args: dataset=ade20k|coco_stuff10k, head=rankseg|base, ms_flip (multi-scale + flip test),
runlocal (the family fixtures' small BEiT UperNet, 48 px crops, 10 steps, random init).

Seed rows (RankSeg fork README at fb7a30f, `mmseg/configs/beit/README.md` and the paper):
ADE20K 640 160k — BEiT 56.7 (ms+flip 57.0), + RankSeg 57.0 (57.8); COCO-Stuff10k 640 — 49.7,
+ RankSeg 49.9.

Recipe (each value and its source: the comments above `recipes.SWIN_OPTIMIZER`; the row files
are fb7a30f `configs/beit/upernet-unilm_beit-l16_640x640_slide_320k_ade20k.py` and
`upernet-unilm_mlseg_beit-l16_640x640_slide_320k_ade20k.py`):
* model: unilm `BEiT` img 640, patch 16, embed 1024, depth 24, heads 16, qkv bias (q, v),
  relative position bias per block, layer scale 1e-6, drop-path 0.2, out_indices 7/11/15/23
  with the fpn1–fpn4 necks (`model.beit`); `UPerHead` channels 1024, dropout 0.1; FCN
  auxiliary head (256 channels, × 0.4). RankSeg: k 50, image head on the last output with
  hidden 1024, 16 heads, d_ff 4096, no pooling, its OWN class embeddings; ASL γ− 2, γ+ 0 × 5.
* pretrained: `beit_large_patch16_224_pt22k_ft22k` (weights registry; relative position tables
  interpolated to the 40 × 40 grid on load, convert/beit_pretrained.py).
* optimiser: AdamW lr 2e-5, betas (0.9, 0.999), weight decay 0.05 with unilm's
  `LayerDecayOptimizerConstructor` (24 layers, rate 0.95; no decay on 1-D tensors and biases).
  The RankSeg file's custom keys (image head lr × 0.1) are ignored by that constructor in the
  official code, and here (optimizer.constructor='layer_decay').
* schedule: linear warm-up 3000 iterations from 1e-6, poly power 1.0 to 0, 320k iterations of
  batch 8 with gradient accumulation 2 (`update_interval=2` on 8 GPUs × 1 image): 160k updates
  of 16 images. `remat` is off as in the recipe (`use_checkpoint=False`); `model.remat=full`
  checkpoints every block (benchmarks/README.md for the memory it saves).
* data: RandomResize (2560, 640) ratio 0.5–2.0, crop 640, flip, photometric; test: slide 640
  windows, stride 426, at (2560, 640).
"""

import ml_collections

from rankseg_jax import recipes


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = recipes.parse_arg(arg, dataset="ade20k", head="rankseg", ms_flip=False, runlocal=False)
    return recipes.upernet_config(
        "beit", arg.dataset, head=arg.head, ms_flip=arg.ms_flip, runlocal=arg.runlocal
    )
