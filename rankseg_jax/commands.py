"""What each `main.py --mode` does; every function takes (config, workdir) and returns a code."""

from __future__ import annotations

import pathlib
import sys

import cv2
import ml_collections
import numpy as np

from rankseg_jax.convert import export
from rankseg_jax.segmentor import Segmentor


def read_rgb(path: str) -> np.ndarray:
    """A uint8 RGB image from disk, with a clear error naming the file."""
    image = cv2.imread(path, cv2.IMREAD_COLOR)
    if image is None:
        raise FileNotFoundError(f"cannot read image {path}")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def demo_image(seed: int = 0, size: tuple[int, int] = (96, 128)) -> np.ndarray:
    """A generated RGB image (smooth colour blobs) for a forward pass without any data."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)
    return cv2.resize(small, size[::-1], interpolation=cv2.INTER_CUBIC)


def predict(config: ml_collections.ConfigDict, workdir: str) -> int:
    """Predict one image (config.predict.input, or a generated one) and print its classes."""
    checkpoint = config.init_from or None
    segmentor = Segmentor.from_config(config, checkpoint)
    source = config.predict.input
    image = read_rgb(source) if source else demo_image(config.seed)
    labels = segmentor.predict(image)
    ids, counts = np.unique(labels, return_counts=True)
    order = np.argsort(-counts)
    size = f"{image.shape[1]}x{image.shape[0]}"
    weights = checkpoint or "(random init)"
    print(f"image {source or '(generated)'} {size}, weights {weights}, ", end="")
    print(f"{segmentor.num_params:,} parameters")
    for i in order:
        print(f"  class {ids[i]:4d}: {100 * counts[i] / labels.size:5.1f}% of pixels")
    pathlib.Path(workdir).mkdir(parents=True, exist_ok=True)
    return 0


def train(config: ml_collections.ConfigDict, workdir: str) -> int:
    """Train (resuming from the workdir); dataset and checkpoint problems are one line."""
    from rankseg_jax import train as train_lib

    results = train_lib.train_and_evaluate(config, workdir)
    if results:
        print(f"final mIoU {100 * results['mIoU']:.2f} (aAcc {100 * results['aAcc']:.2f})")
    return 0


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> int:
    """Evaluate the workdir's checkpoint (else init_from) on the val split; see eval_mode."""
    from rankseg_jax import eval_mode

    return eval_mode.eval_command(config, workdir)


def run(mode: str, config: ml_collections.ConfigDict, workdir: str) -> int:
    """Run one mode; user errors (data, weights, config) print one line and exit 2."""
    from rankseg_jax.errors import USER_ERRORS

    commands = {"train": train, "eval": evaluate, "predict": predict, "export": export.export}
    try:
        return commands[mode](config, workdir)
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
