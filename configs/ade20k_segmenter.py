"""ADE20K-150 Segmenter rows of the RankSeg paper (ViT-B/16 512 and ViT-L/16 640).

Arg grammar (comma-separated): variant=B/16|L/16 (L implies 640), head=rankseg|mask|gt, oce,
runlocal. Examples:
  --config=configs/ade20k_segmenter.py                      # ViT-B/16 + RankSeg, 49.7 mIoU row
  --config=configs/ade20k_segmenter.py:head=mask            # Segmenter baseline, 48.8 row
  --config=configs/ade20k_segmenter.py:variant=L/16         # ViT-L/16 640 + RankSeg, 52.6 row
  --config=configs/ade20k_segmenter.py:oce                  # + OCE backbone class embeddings
  --config=configs/ade20k_segmenter.py:head=gt              # GT oracle, 63.6 row
"""

import ml_collections

from rankseg_jax import recipes


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = recipes.parse_arg(arg, variant="B/16", head="rankseg", oce=False, runlocal=False)
    size = 640 if arg.variant == "L/16" else 512
    return recipes.segmenter_config(
        "ade20k",
        variant=arg.variant,
        head=arg.head,
        oce=arg.oce,
        runlocal=arg.runlocal,
        iters=160_000,
        crop=size,
        img_size=size,
        img_scale=(4 * size, size),
        k=50,
        img_loss="asl",
        img_loss_weight=10.0,
        weight_decay=1e-6 if arg.head in ("rankseg", "gt") else 0.0,
        rankseg_decay_mult=arg.head in ("rankseg", "gt"),
    )
