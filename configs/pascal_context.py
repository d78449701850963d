"""Pascal-Context-60 Segmenter rows of the RankSeg paper: ViT-B/16, 480 crops, img_size 512.

Args: head=rankseg|mask|gt, ss, msflip, runlocal. Every forward resizes the 32x32 position
embedding to 30x30, as the reference does.

Evaluation follows each row's official config: the RankSeg row uses
`pascal_context_meanstd0.5_test.py`, whose val/test pipeline is multi-scale (ratios 0.5-1.75)
+ flip, so its training-time and final evaluation are ms+flip by default (`ss`: single scale
instead); the baseline (head=mask) and GT rows use the single-scale pipeline (`msflip`: ms+flip
instead).
"""

import ml_collections

from rankseg_jax import recipes

MS_RATIOS = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = recipes.parse_arg(arg, head="rankseg", ss=False, msflip=False, runlocal=False)
    rankseg = arg.head == "rankseg"
    if arg.ss and arg.msflip:
        raise recipes.ConfigError("pascal_context: give ss (single scale) or msflip, not both")
    msflip = arg.msflip or (rankseg and not arg.ss)  # the official test pipeline of each row
    return recipes.segmenter_config(
        "pascal_context",
        variant="B/16",
        head=arg.head,
        oce=False,
        runlocal=arg.runlocal,
        iters=80_000,
        crop=480,
        img_size=512,
        img_scale=(4160, 520),
        k=25,
        img_loss="asl",
        img_loss_weight=5.0,
        weight_decay=1e-6 if rankseg else 0.0,
        rankseg_decay_mult=rankseg,
        eval_scales=MS_RATIOS if msflip else (1.0,),
        eval_flip=msflip,
    )
