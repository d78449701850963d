"""COCO-Stuff 10k and 164k (171 classes) in the layouts mmseg's conversion scripts write.

COCO-Stuff10k (mmseg `tools/convert_datasets/coco_stuff10k.py`; data.root = coco_stuff10k):

    images/{train2014,test2014}/COCO_*.jpg
    annotations/{train2014,test2014}/COCO_*_labelTrainIds.png
    imageLists/{train,test}.txt        (optional; from the original zip)

Labels are uint8 train ids 1..171 with 0 = unlabeled; `reduce_zero_label` (as the 10k configs):
0 → ignore (255), k → k - 1. Split names: "train" / "test" (also the folder names). When the
split list exists (`imageLists/`, or `imagesLists/`/`imagelists/`) it selects and orders the
examples; without it every image in the split folder is used, sorted, as mmseg does.

COCO-Stuff164k (mmseg `tools/convert_datasets/coco_stuff164k.py`; data.root = coco_stuff164k):

    images/{train2017,val2017}/*.jpg
    annotations/{train2017,val2017}/*_labelTrainIds.png

Labels are uint8 train ids 0..170 with 255 = ignore; NO zero reduction (mmseg's
COCOStuffDataset docstring and its coco-stuff164k config: 0 is "person", a real class).
"""

from __future__ import annotations

import os

import numpy as np

from rankseg_jax.data.base import SegmentationSource

IGNORE_INDEX = 255

# mmseg COCOStuffDataset.CLASSES.
CLASS_NAMES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat",
    "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack",
    "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball",
    "kite", "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket",
    "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair",
    "couch", "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse",
    "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink",
    "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier",
    "toothbrush", "banner", "blanket", "branch", "bridge", "building-other", "bush",
    "cabinet", "cage", "cardboard", "carpet", "ceiling-other", "ceiling-tile", "cloth",
    "clothes", "clouds", "counter", "cupboard", "curtain", "desk-stuff", "dirt", "door-stuff",
    "fence", "floor-marble", "floor-other", "floor-stone", "floor-tile", "floor-wood",
    "flower", "fog", "food-other", "fruit", "furniture-other", "grass", "gravel",
    "ground-other", "hill", "house", "leaves", "light", "mat", "metal", "mirror-stuff", "moss",
    "mountain", "mud", "napkin", "net", "paper", "pavement", "pillow", "plant-other",
    "plastic", "platform", "playingfield", "railing", "railroad", "river", "road", "rock",
    "roof", "rug", "salad", "sand", "sea", "shelf", "sky-other", "skyscraper", "snow",
    "solid-other", "stairs", "stone", "straw", "structural-other", "table", "tent",
    "textile-other", "towel", "tree", "vegetable", "wall-brick", "wall-concrete",
    "wall-other", "wall-panel", "wall-stone", "wall-tile", "wall-wood", "water-other",
    "waterdrops", "window-blind", "window-other", "wood",
)  # fmt: skip

# mmseg COCOStuffDataset.PALETTE (it repeats a few colours; kept as the community draws them).
PALETTE = np.array(
    [
        [0, 192, 64], [0, 192, 64], [0, 64, 96], [128, 192, 192], [0, 64, 64],
        [0, 192, 224], [0, 192, 192], [128, 192, 64], [0, 192, 96], [128, 192, 64],
        [128, 32, 192], [0, 0, 224], [0, 0, 64], [0, 160, 192], [128, 0, 96],
        [128, 0, 192], [0, 32, 192], [128, 128, 224], [0, 0, 192], [128, 160, 192],
        [128, 128, 0], [128, 0, 32], [128, 32, 0], [128, 0, 128], [64, 128, 32],
        [0, 160, 0], [0, 0, 0], [192, 128, 160], [0, 32, 0], [0, 128, 128],
        [64, 128, 160], [128, 160, 0], [0, 128, 0], [192, 128, 32], [128, 96, 128],
        [0, 0, 128], [64, 0, 32], [0, 224, 128], [128, 0, 0], [192, 0, 160],
        [0, 96, 128], [128, 128, 128], [64, 0, 160], [128, 224, 128], [128, 128, 64],
        [192, 0, 32], [128, 96, 0], [128, 0, 192], [0, 128, 32], [64, 224, 0],
        [0, 0, 64], [128, 128, 160], [64, 96, 0], [0, 128, 192], [0, 128, 160],
        [192, 224, 0], [0, 128, 64], [128, 128, 32], [192, 32, 128], [0, 64, 192],
        [0, 0, 32], [64, 160, 128], [128, 64, 64], [128, 0, 160], [64, 32, 128],
        [128, 192, 192], [0, 0, 160], [192, 160, 128], [128, 192, 0], [128, 0, 96],
        [192, 32, 0], [128, 64, 128], [64, 128, 96], [64, 160, 0], [0, 64, 0],
        [192, 128, 224], [64, 32, 0], [0, 192, 128], [64, 128, 224], [192, 160, 0],
        [0, 192, 0], [192, 128, 96], [192, 96, 128], [0, 64, 128], [64, 0, 96],
        [64, 224, 128], [128, 64, 0], [192, 0, 224], [64, 96, 128], [128, 192, 128],
        [64, 0, 224], [192, 224, 128], [128, 192, 64], [192, 0, 96], [192, 96, 0],
        [128, 64, 192], [0, 128, 96], [0, 224, 0], [64, 64, 64], [128, 128, 224],
        [0, 96, 0], [64, 192, 192], [0, 128, 224], [128, 224, 0], [64, 192, 64],
        [128, 128, 96], [128, 32, 128], [64, 0, 192], [0, 64, 96], [0, 160, 128],
        [192, 0, 64], [128, 64, 224], [0, 32, 128], [192, 128, 192], [0, 64, 224],
        [128, 160, 128], [192, 128, 0], [128, 64, 32], [128, 32, 64], [192, 0, 128],
        [64, 192, 32], [0, 160, 64], [64, 0, 0], [192, 192, 160], [0, 32, 64],
        [64, 128, 128], [64, 192, 160], [128, 160, 64], [64, 128, 0], [192, 192, 32],
        [128, 96, 192], [64, 0, 128], [64, 64, 32], [0, 224, 192], [192, 0, 0],
        [192, 64, 160], [0, 96, 192], [192, 128, 128], [64, 64, 160], [128, 224, 192],
        [192, 128, 64], [192, 64, 32], [128, 96, 64], [192, 0, 192], [0, 192, 32],
        [64, 224, 64], [64, 0, 64], [128, 192, 160], [64, 96, 64], [64, 128, 192],
        [0, 192, 160], [192, 224, 64], [64, 128, 64], [128, 192, 32], [192, 32, 192],
        [64, 64, 192], [0, 64, 32], [64, 160, 192], [192, 64, 64], [128, 64, 160],
        [64, 32, 192], [192, 192, 192], [0, 64, 160], [192, 160, 192], [192, 192, 0],
        [128, 64, 96], [192, 32, 64], [192, 64, 128], [64, 192, 96], [64, 160, 64],
        [64, 64, 0],
    ],
    np.uint8,
)  # fmt: skip
PALETTE.setflags(write=False)

_LIST_DIRS = ("imageLists", "imagesLists", "imagelists")


class _COCOStuff(SegmentationSource):
    n_cls = 171
    ignore_index = IGNORE_INDEX
    class_names = CLASS_NAMES
    palette = PALETTE
    label_bits = 8
    image_suffix = ".jpg"
    label_suffix = "_labelTrainIds.png"
    root_marker = "images"

    def _split_folder(self, split: str) -> str:
        return split

    def _split_paths(self, split: str) -> tuple[str, str, str | None]:
        folder = self._split_folder(split)
        return (
            os.path.join(self.root, "images", folder),
            os.path.join(self.root, "annotations", folder),
            self._find_list(split),
        )

    def _find_list(self, split: str) -> str | None:
        return None


class COCOStuff10k(_COCOStuff):
    """COCO-Stuff10k: train2014 (9k) / test2014 (1k), labels 1..171 with 0 = unlabeled."""

    dataset = "coco_stuff10k"
    reduce_zero_label = True
    root_dirname = "coco_stuff10k"
    split_aliases = {"train": ("train2014", "training"), "test": ("test2014", "val", "validation")}
    expected_tree = (
        "coco_stuff10k/{images/{train2014,test2014}/*.jpg, "
        "annotations/{train2014,test2014}/*_labelTrainIds.png, imageLists/{train,test}.txt}"
    )

    def _split_folder(self, split: str) -> str:
        return f"{split}2014"

    def _find_list(self, split: str) -> str | None:
        for name in _LIST_DIRS:
            path = os.path.join(self.root, name, f"{split}.txt")
            if os.path.isfile(path):
                return path
        return None


class COCOStuff164k(_COCOStuff):
    """COCO-Stuff164k: train2017 / val2017, labels 0..170 with 255 = ignore (no reduction)."""

    dataset = "coco_stuff164k"
    reduce_zero_label = False
    root_dirname = "coco_stuff164k"
    split_aliases = {"train2017": ("train", "training"), "val2017": ("val", "validation")}
    expected_tree = (
        "coco_stuff164k/{images,annotations}/{train2017,val2017}/*{.jpg,_labelTrainIds.png}"
    )
