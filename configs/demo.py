"""The demo: a small Segmenter + RankSeg on the generated ADE20K-format dataset, on a laptop CPU.

Needs no download: the data are generated under `data.root` if missing. Deviations from the
reference recipe (listed in the README): a tiny ViT trained from scratch, 64 px crops and
milder scale jitter, a higher learning rate. Args: head=rankseg|mask, runlocal.
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = common.parse_arg(arg, head="rankseg", runlocal=False)
    if arg.head not in ("rankseg", "mask"):
        raise common.ConfigError(f"demo head={arg.head!r}: rankseg or mask")
    data = common.dataset_overrides("synthetic_ade20k")
    data.update(
        crop_size=(64, 64),
        img_scale=(256, 64),
        ratio_range=(0.75, 1.5),
        test_scale=(256, 64),
        num_workers=1,
        generate_if_missing=True,
        synthetic_train=400,
        synthetic_val=50,
    )
    steps = 60 if arg.runlocal else 1500
    return common.with_defaults(
        dict(
            batch_size=8,
            total_steps=steps,
            model=dict(
                variant="custom",
                head=arg.head,
                width=128,
                depth=4,
                num_heads=4,
                mlp_dim=512,
                dec_heads=4,
                dec_layers=3 if arg.head == "rankseg" else 2,
                img_size=(64, 64),
                k=16 if arg.head == "rankseg" else 150,
                drop_path_rate=0.0,
                dropout=0.0,
            ),
            data=data,
            optimizer=dict(name="adamw", lr=1e-3, weight_decay=1e-4),
            schedule=dict(warmup_steps=50, min_lr=1e-5),
            eval=dict(crop=(64, 64), stride=(48, 48), every_steps=steps, window_batch=16),
            checkpoint=dict(every_steps=max(steps // 3, 1)),
            logging=dict(every_steps=25),
        )
    )
