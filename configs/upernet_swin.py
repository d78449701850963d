"""UperNet Swin-B (window 12, ImageNet-22k 384 pretraining) with and without RankSeg (issue #18).

Args: dataset=ade20k|coco_stuff10k, head=rankseg|base, ms_flip (multi-scale + flip test),
runlocal (the family fixtures' small Swin UperNet, 48 px crops, 10 steps, random init), demo
(a small Swin UperNet + RankSeg on the generated ADE20K-format data, no download: `python
main.py --config=configs/upernet_swin.py:demo --workdir=DIR`).

Seed rows (RankSeg fork README at fb7a30f, `mmseg/configs/swin/README.md`): ADE20K 512 160k —
Swin 50.8 (ms+flip 52.4), + RankSeg 51.4 (53.0); COCO-Stuff10k 512 40k — 45.7 (47.2), + RankSeg
46.6 (47.9).

Recipe (each value and its source: the comments above `recipes.SWIN_OPTIMIZER`):
* model: mmseg `SwinTransformer` embed 128, depths 2-2-18-2, heads 4-8-16-32, window 12,
  drop-path 0.3, no absolute position embedding (`model.swin`); `UPerHead` pool scales
  (1, 2, 3, 6), channels 512, dropout 0.1; FCN auxiliary head on stage 3, 256 channels, × 0.4.
  RankSeg (fb7a30f `_base_/models/upernet_swin_mlseg.py`): k 50, image head on the last stage
  (d_encoder 1024) with hidden 512, 8 heads, d_ff 2048, dropout 0.1, no pooling, class
  embeddings shared with the pixel classifier; ASL γ− 2, γ+ 0 × 10.
* pretrained: `swin_base_patch4_window12_384_22k` (weights registry; Microsoft layout converted
  on load, convert/swin_pretrained.py).
* optimiser: AdamW lr 6e-5, betas (0.9, 0.999), weight decay 0.01, decay_mult 0 for
  absolute_pos_embed / relative_position_bias_table / norm; RankSeg: the image head's `block.`
  and `fc` at lr × 0.1 (mmcv custom keys: the longer key wins, so those norms decay).
* schedule: linear warm-up 1500 iterations from 1e-6, then poly power 1.0 to 0; batch 16;
  160k (ADE20K) / 40k (COCO-Stuff10k) iterations. (The fb7a30f RankSeg file, read literally,
  would inherit `schedule_160k.py`'s poly 0.9 / min_lr 1e-4 and batch 32:
  `recipes.SWIN_LITERAL_FB7A30F_SCHEDULE`; its README says batch 16 as Swin's.)
* data: RandomResize (2048, 512) ratio 0.5–2.0, crop 512 cat_max_ratio 0.75, flip, photometric;
  test: whole image resized to (2048, 512) (`test_cfg mode='whole'`).
"""

import ml_collections

from rankseg_jax import recipes


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = recipes.parse_arg(
        arg, dataset="ade20k", head="rankseg", ms_flip=False, runlocal=False, demo=False
    )
    return recipes.upernet_config(
        "swin", arg.dataset, head=arg.head, ms_flip=arg.ms_flip, runlocal=arg.runlocal,
        demo=arg.demo,
    )  # fmt: skip
