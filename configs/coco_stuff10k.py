"""COCO-Stuff10k (171 classes, ImageNet mean/std) Segmenter rows of the RankSeg paper.

Args: variant=B/16|L/16 (L implies 640), head=rankseg|mask|gt, iters=40000|80000, oce, runlocal.
The ViT-B RankSeg configs leave loss_img out in the reference and so train with BCE
(×10 at 40k, ×5 at 80k); ViT-L RankSeg uses ASL(2, 0) ×10. Weight decay is 0 everywhere.
"""

import ml_collections

from rankseg_jax import recipes


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = recipes.parse_arg(
        arg, variant="B/16", head="rankseg", iters=40_000, oce=False, runlocal=False
    )
    if arg.iters not in (40_000, 80_000):
        raise recipes.ConfigError(f"iters={arg.iters}: the reference trains 40000 or 80000")
    if arg.variant == "L/16" and arg.iters != 40_000:
        raise recipes.ConfigError("variant=L/16 has only a 40000-iteration row")
    large = arg.variant == "L/16"
    size = 640 if large else 512
    return recipes.segmenter_config(
        "coco_stuff10k",
        variant=arg.variant,
        head=arg.head,
        oce=arg.oce,
        runlocal=arg.runlocal,
        iters=arg.iters,
        crop=size,
        img_size=size,
        img_scale=(4 * size, size),
        k=50,
        img_loss="asl" if large else "bce",
        img_loss_weight=5.0 if arg.iters == 80_000 else 10.0,
    )
