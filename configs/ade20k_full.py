"""ADE20K-Full (847 classes). OURS: the reference ships no config for this row of the paper.

Values follow the ADE20K-150 ViT-B/16 recipe; k=100 (our choice), ignore 65535 (MaskFormer's
preparation writes uint16 labels where 255 is a real class). Args: head=rankseg|mask, runlocal.
"""

import ml_collections

from rankseg_jax import recipes


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = recipes.parse_arg(arg, head="rankseg", runlocal=False)
    if arg.head == "gt":
        raise recipes.ConfigError("ade20k_full has no GT-oracle row")
    rankseg = arg.head == "rankseg"
    return recipes.segmenter_config(
        "ade20k_full",
        variant="B/16",
        head=arg.head,
        oce=False,
        runlocal=arg.runlocal,
        iters=160_000,
        crop=512,
        img_size=512,
        img_scale=(2048, 512),
        k=100,
        weight_decay=1e-6 if rankseg else 0.0,
        rankseg_decay_mult=rankseg,
    )
