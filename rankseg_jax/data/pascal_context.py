"""Pascal-Context-60 in mmseg's layout (VOC2010 + the converted context labels).

Layout (data.root points at VOCdevkit/VOC2010, or at VOCdevkit):

    VOC2010/JPEGImages/<id>.jpg
    VOC2010/SegmentationClassContext/<id>.png      (written by mmseg's pascal_context.py)
    VOC2010/ImageSets/SegmentationContext/{train,val}.txt

Labels are uint8 with 0 = background (a real class, scored) and 1..59 the other classes; 255 is
ignore. No zero reduction (mmseg PascalContextDataset, 60 classes).
"""

from __future__ import annotations

import os

from rankseg_jax.data.ade20k import PALETTE as _ADE_PALETTE
from rankseg_jax.data.base import SegmentationSource

IGNORE_INDEX = 255

# mmseg PascalContextDataset.CLASSES.
CLASS_NAMES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
    "chair", "cow", "table", "dog", "horse", "motorbike", "person", "pottedplant", "sheep",
    "sofa", "train", "tvmonitor", "bag", "bed", "bench", "book", "building", "cabinet",
    "ceiling", "cloth", "computer", "cup", "door", "fence", "floor", "flower", "food", "grass",
    "ground", "keyboard", "light", "mountain", "mouse", "curtain", "platform", "sign", "plate",
    "road", "rock", "shelves", "sidewalk", "sky", "snow", "bedclothes", "track", "tree",
    "truck", "wall", "water", "window", "wood",
)  # fmt: skip

# mmseg PascalContextDataset.PALETTE is the first 60 colours of the ADE20K palette.
PALETTE = _ADE_PALETTE[:60].copy()
PALETTE.setflags(write=False)


class PascalContext(SegmentationSource):
    """Pascal-Context with 60 classes (background included), split lists from ImageSets."""

    dataset = "pascal_context"
    n_cls = 60
    ignore_index = IGNORE_INDEX
    reduce_zero_label = False
    class_names = CLASS_NAMES
    palette = PALETTE
    label_bits = 8
    image_suffix = ".jpg"
    label_suffix = ".png"
    root_marker = "JPEGImages"
    root_dirname = "VOC2010"
    split_aliases = {"train": ("training",), "val": ("validation", "test")}
    expected_tree = (
        "VOC2010/{JPEGImages/*.jpg, SegmentationClassContext/*.png, "
        "ImageSets/SegmentationContext/{train,val}.txt}"
    )

    def _split_paths(self, split: str) -> tuple[str, str, str]:
        return (
            os.path.join(self.root, "JPEGImages"),
            os.path.join(self.root, "SegmentationClassContext"),
            os.path.join(self.root, "ImageSets", "SegmentationContext", f"{split}.txt"),
        )
