"""Your own data: train, evaluate and predict on a dataset folder with your classes.

    python main.py --config=configs/custom.py:root=DIR --workdir=W              # train
    python main.py --config=configs/custom.py:root=DIR --workdir=W --mode=eval
    python main.py --config=configs/custom.py:root=DIR --workdir=W --mode=predict \\
        --config.predict.input=PHOTOS_OR_VIDEO

DIR holds classes.txt (one name per line; line order = class id) or classes.json (names and
palette), images/{train,val}/* and annotations/{train,val}/* paired by file stem; see
data/README.md ("Your own data") and rankseg_jax/data/folder.py for the label formats.

Args (comma-separated after the colon):
  root=DIR        the dataset folder (required)
  variant=tiny    tiny (default): a small ViT from scratch that a 2-core CPU trains in minutes
                  (as configs/demo.py); B/16 or L/16: the paper's backbones, AugReg
                  ImageNet-21k weights, 512 px crops, 40k steps (a GPU/TPU job)
  head=rankseg    rankseg | mask (the baseline mask transformer, one arg away) | gt
  k=0             RankSeg's k; 0 = the default below
  class_weight=   inverse_frequency | "" (unweighted); or --config.loss.class_weight=w0,w1,...
  runlocal        a smoke run: tiny model, 10 steps, 4 evaluation images

The class count, names and palette are read from DIR now (or from --config.data.classes /
--config.data.palette), so model.n_cls always matches the data.
"""

import ml_collections

from rankseg_jax import recipes
from rankseg_jax.data import readers


def default_k(n_cls: int) -> int:
    """RankSeg's k for n_cls classes: round(n_cls / 3), at least 5, never more than n_cls.

    k must be ≤ n_cls (the head keeps the k best-ranked classes of each image). The paper's
    ADE20K rows use k = 50 of 150 classes, i.e. a third; with a small label set a third would
    drop classes that co-occur in one image (an image whose classes miss the top-k loses those
    pixels), so k stays at 5 or more: with 7 classes k = 5, with 3 classes every class (k = 3).
    """
    return min(n_cls, max(5, round(n_cls / 3)))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = recipes.parse_arg(
        arg, root="", variant="tiny", head="rankseg", k=0, class_weight="", runlocal=False
    )
    if not arg.root:
        raise recipes.ConfigError(
            "configs/custom.py needs root=DIR, the dataset folder "
            "(--config=configs/custom.py:root=DIR; see data/README.md, Your own data)"
        )
    kind = recipes.classifier(arg.head)
    data = recipes.data_overrides("folder")
    data.update(root=arg.root)
    names, _ = readers.dataset_labels(ml_collections.ConfigDict(data))
    n_cls = len(names)
    k = arg.k or default_k(n_cls)
    if kind == "rankseg" and not 1 <= k <= n_cls:
        raise recipes.ConfigError(f"k={k}: RankSeg's k must be in 1..{n_cls} (the class count)")
    if arg.variant in ("B/16", "L/16"):
        return _backbone(arg, kind, data, n_cls, k)
    if arg.variant != "tiny":
        raise recipes.ConfigError(f"variant={arg.variant!r} is not one of tiny, B/16, L/16")
    data.update(recipes.DEMO_DATA)
    steps = 2000
    overrides = dict(
        batch_size=8,
        total_steps=steps,
        model=dict(
            variant="custom",
            classifier=kind,
            n_cls=n_cls,
            k=k if kind == "rankseg" else n_cls,
            width=128,
            depth=4,
            num_heads=4,
            mlp_dim=512,
            dec_heads=4,
            dec_layers=3 if kind == "rankseg" else 2,
            img_size=(64, 64),
            patch_size=8,
            drop_path_rate=0.0,
            dropout=0.0,
            pretrained="none",  # from scratch: the tiny ViT has no published weights
        ),
        data=data,
        optimizer=dict(name="adamw", lr=2.5e-4, weight_decay=1e-4),
        # like the demo: stop after 5 minutes of training on a slow CPU at the latest
        schedule=dict(warmup_steps=10, min_lr=1e-5, max_train_seconds=300.0),
        loss=dict(class_weight=arg.class_weight),
        eval=dict(
            crop=(64, 64), stride=(48, 48), every_steps=steps, window_batch=16, tile=(64, 256)
        ),
        checkpoint=dict(every_steps=max(steps // 4, 1)),
        logging=dict(every_steps=25),
    )
    if arg.runlocal:
        overrides["model"].update(width=64, depth=2, num_heads=2, mlp_dim=256, dec_heads=2)
        overrides["data"].update(num_workers=0)
        overrides.update(batch_size=2, total_steps=10)
        overrides["schedule"]["max_train_seconds"] = 0.0
        overrides["eval"].update(every_steps=10, max_images=4)
        overrides["checkpoint"].update(every_steps=10)
        overrides["logging"] = dict(every_steps=1)
    return recipes.with_defaults(overrides)


def _backbone(arg, kind: str, data: dict, n_cls: int, k: int) -> ml_collections.ConfigDict:
    """The paper's Segmenter recipe (ADE20K hyper-parameters, 40k steps) on the folder data."""
    config = recipes.segmenter_config(
        "folder",
        variant=arg.variant,
        head=arg.head,
        oce=False,
        runlocal=arg.runlocal,
        iters=40_000,
        crop=512,
        img_size=512,
        img_scale=(2048, 512),
        k=k,
        n_cls=n_cls,
    )
    with config.unlocked():
        config.data.root = arg.root
        config.loss.class_weight = arg.class_weight
    return config
