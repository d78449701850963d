"""Prepare a local dataset as TFDS array_record for clusters and TPU pods.

    python data/prepare_tfds.py --dataset=ade20k --root=data/ade --data_dir=/shared/tfds

reads the download with the directory reader of `--dataset` and writes every split to
`<data_dir>/rankseg_<dataset>/1.0.0/`; train or evaluate on it with
`--config.data.source=tfds --config.data.tfds_data_dir=<data_dir>`. See data/README.md
("Prepared formats") and rankseg_jax/data/tfds_builders/builders.py.
"""

from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from rankseg_jax.data.tfds_builders import builders  # noqa: E402

if __name__ == "__main__":
    sys.exit(builders.main())
