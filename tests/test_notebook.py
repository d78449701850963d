"""notebooks/colab_eval.ipynb runs top to bottom on CPU (tiny config, generated data, no install).

The parameter cell is replaced (RUN_INSTALL=False, the runlocal ADE20K config, a missing
DATA_ROOT so the generated dataset is used). The checkpoint is loaded by name as a user does
(CHECKPOINT = a registry name): an mmseg .pth of biased random weights, served under that name
by a local HTTP server (RANKSEG_JAX_WEIGHTS_BASE_URL; no test touches the internet). The
notebook's mIoU must equal the mIoU of its own predicted label PNGs against the generated
labels, which ties the evaluation path and the predict path together.
"""

from __future__ import annotations

import json
import pathlib

import jax
import numpy as np
import pytest

from rankseg_jax import weights
from rankseg_jax.config import load_config
from rankseg_jax.convert import loading, mmseg
from rankseg_jax.data import synthetic
from rankseg_jax.data.readers import make_source
from rankseg_jax.metrics import MeanIoU, counts_numpy
from rankseg_jax.models.segmenter import create_model
from rankseg_testing.file_server import FileServer
from rankseg_testing.torch_files import write_state_dict_pth

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "colab_eval.ipynb"
CONFIG = "configs/ade20k_segmenter.py:runlocal"  # ViT width 64, depth 2; eval.max_images=4
IMAGES = 4
CHECKPOINT_NAME = "segmenter_vitb_ade20k_rankseg"  # the name the notebook's default uses


def frequent_classes(count: int) -> list[int]:
    """The `count` largest classes (0-based ids) of the generated images the notebook uses."""
    seed = load_config(CONFIG).data.synthetic_val_seed
    pixels = np.zeros(151, np.int64)
    for i in range(IMAGES):
        _, raw = synthetic.make_example(seed, 1, i)
        pixels += np.bincount(raw.ravel(), minlength=151)
    return [int(c) - 1 for c in np.argsort(-pixels[1:])[:count] + 1]


def biased_checkpoint(path: pathlib.Path) -> pathlib.Path:
    """Random weights of the CONFIG model, saved as an mmseg .pth (no compilation, no torch),
    biased towards classes of the evaluated images so that the mIoU is not zero: their
    image-level scores rank them first (ml_fc bias) and the first slots get a mask bias."""
    config = load_config(CONFIG)
    shapes = loading.expected_params(create_model(config.model), config)
    rng = np.random.default_rng(0)

    def fill(path, leaf):
        name = jax.tree_util.keystr(path)
        if "scale" in name:
            return np.ones(leaf.shape, np.float32)
        if "bias" in name or name.endswith("['b']"):
            return np.zeros(leaf.shape, np.float32)
        return (rng.standard_normal(leaf.shape) * 0.05).astype(np.float32)

    params = jax.tree_util.tree_map_with_path(fill, shapes)
    head = params["decode_head"]
    for rank, cls in enumerate(frequent_classes(3)):
        head["ml_fc"]["b"][0, cls] = 5.0 - rank
    head["mask_norm"]["bias"][:3] = (0.6, 0.4, 0.2)
    write_state_dict_pth(str(path), mmseg.params_to_state_dict(params))
    return path


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("notebook")
    checkpoint = biased_checkpoint(tmp / "tiny.pth")
    served = "/" + weights.get(CHECKPOINT_NAME).filename
    nb = nbformat.read(NOTEBOOK, as_version=4)
    (cell,) = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    server = FileServer({served: checkpoint.read_bytes()}).start()
    cell.source = "\n".join([
        "import os",
        f"os.environ['RANKSEG_JAX_WEIGHTS_BASE_URL'] = {server.base_url!r}",
        f"os.environ['RANKSEG_JAX_CACHE'] = {str(tmp / 'cache')!r}",
        "RUN_INSTALL = False",
        f"REPO_DIR = {str(REPO)!r}",
        f"CONFIG = {CONFIG!r}",
        f"CHECKPOINT = {CHECKPOINT_NAME!r}",
        f"DATA_ROOT = {str(tmp / 'no_ade20k_here')!r}",
        "MAX_IMAGES = 0",
        f"SYNTHETIC_IMAGES = {IMAGES}",
        f"SHOW_IMAGES = {IMAGES}",
        f"OUTPUT_DIR = {str(tmp / 'out')!r}",
    ])  # fmt: skip
    client = nbclient.NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp)}}
    )
    try:
        client.execute()
    finally:
        server.stop()
    assert server.gets[served] == 1  # fetched by name once, into the cache
    return nb, tmp / "out"


def outputs(nb, output_type: str | None = None) -> list[dict]:
    found = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    return [o for o in found if output_type is None or o["output_type"] == output_type]


def test_notebook_runs_and_shows_figures(executed):
    nb, out = executed
    assert not outputs(nb, "error")
    pictures = [o for o in outputs(nb) if "image/png" in o.get("data", {})]
    assert len(pictures) == IMAGES + 1  # one figure per image + the contact sheet
    figures = sorted((out / "predict" / "figures").glob("*.png"))
    assert len(figures) == IMAGES and (out / "predict" / "contact_sheet.png").is_file()
    text = "".join(o.get("text", "") for o in outputs(nb, "stream"))
    assert "evaluating on 4 generated images" in text and "mIoU" in text
    tables = [o for o in outputs(nb) if "text/html" in o.get("data", {})]
    assert tables and "<table>" in tables[0]["data"]["text/html"]


def test_notebook_miou_matches_its_predictions(executed):
    """The evaluation JSON equals the mIoU of the written label maps against the labels."""
    _, out = executed
    results = json.loads((out / "eval_results.json").read_text())
    assert results["num_images"] == IMAGES and results["weights"].endswith(
        weights.get(CHECKPOINT_NAME).filename
    )
    source = make_source("synthetic_ade20k", out / "synthetic_ade", "validation")
    from PIL import Image

    meter = MeanIoU(150)
    predicted = set()
    for i in range(IMAGES):
        example = source[i]
        with Image.open(out / "predict" / "labels" / f"{example['name']}.png") as img:
            pred = np.asarray(img)
        meter.update(counts_numpy(pred, example["label"], 150))
        predicted |= set(np.unique(pred).tolist())
    assert len(predicted) > 1
    expected = meter.result()
    # The biased weights hit some pixels (a real comparison), and not all of them.
    assert 0.0 < expected["mIoU"] < 0.9 and 0.01 < expected["aAcc"] < 0.9, expected["summary"]
    assert results["mIoU"] == pytest.approx(expected["mIoU"], abs=1e-12)
    assert results["aAcc"] == pytest.approx(expected["aAcc"], abs=1e-12)


def test_notebook_miou_equals_eval_mode(executed, tmp_path):
    """`main.py --mode=eval` on the same config, checkpoint and images writes the same mIoU."""
    from rankseg_jax.modes import evaluate as evaluate_mode

    nb, out = executed
    notebook = json.loads((out / "eval_results.json").read_text())
    config = load_config(CONFIG)
    with config.unlocked():
        config.init_from = notebook["weights"]
        config.data.root = str(out / "synthetic_ade" / "ADEChallengeData2016")
        config.eval.max_images = IMAGES
    assert evaluate_mode.run(config, str(tmp_path)) == 0
    (written,) = (tmp_path / "eval").glob("results_step*.json")
    results = json.loads(written.read_text())
    assert results["mIoU"] == pytest.approx(notebook["mIoU"], abs=1e-12)
    assert results["aAcc"] == pytest.approx(notebook["aAcc"], abs=1e-12)
