"""DeepLabV3 as a registry family: configs, Segmentor, export, training with BatchNorm state.

* `configs/deeplabv3.py:runlocal` is the official family fixtures' small model: its official
  checkpoints load through `Segmentor.from_config` (BN running stats included) and give the
  official eval logits; `--mode=export`'s writer gives an mmseg `.pth` that the torch model
  written from the spec (tests/deeplab_torch.py) loads with strict=True and the same logits,
  and a `.safetensors` that loads back bit-identically.
* the four seed rows of `configs/deeplabv3.py` have the official full-size parameter counts.
* `configs/demo.py:model=deeplab,runlocal` trains through main.py (aux loss logged, batch
  stats in the checkpoint, moved by training); killed by SIGKILL after a checkpoint and
  restarted it ends with params and batch_stats bit-identical to a straight run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import REPO

from rankseg_jax import checkpoint, predict, visualize
from rankseg_jax import config as config_lib
from rankseg_jax.convert import export, loading, mmseg_conv
from rankseg_jax.models.segmenter import CANVAS_FILL, create_model
from rankseg_jax.segmentor import Segmentor

TOL = 1e-5
SMALL = "configs/deeplabv3.py:runlocal"


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


@pytest.mark.parametrize("name", ["deeplab_rankseg", "deeplab_baseline"])
def test_official_checkpoint_through_config_segmentor_and_export(
    name, official_family, torch, tmp_path
):
    """from_config(runlocal, official .pth): the official whole-image logits and argmax; the
    export (.pth, .safetensors) loads strictly in torch with the same logits, and back."""
    from deeplab_torch import DeepLabV3  # needs torch (optional dependency)

    rankseg = name.endswith("rankseg")
    spec = SMALL + ("" if rankseg else ",head=base")
    seg = Segmentor.from_config(spec, official_family / f"{name}.pth")
    assert set(seg.model_state) == {"batch_stats"}  # the running statistics came along
    x = np.load(official_family / "fam_x48.npy")
    ref = np.load(official_family / f"{name}_fwd_x48.npz")
    logits = seg.logits(x.transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(logits.argmax(-1), ref["seg_pred"])
    if rankseg:
        scores, topk = seg.class_scores(x.transpose(0, 2, 3, 1))
        np.testing.assert_array_equal(topk, ref["topk_index"])
        assert _rel(scores, ref["img_pred"]) <= TOL
        # --mode=predict's per-image path: RankSeg's image-level ranking with running stats
        predictor = predict.Predictor(seg)
        image = np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)
        pred = predictor(image)
        assert pred.labels.shape == (40, 56) and pred.scores.shape == (171,)
        assert "RankSeg" in pred.score_kind and pred.selected is not None
        record = predict.prediction_record(predictor, pred, "x.png", image.shape[:2])
        assert len(record["topk"]) == 50 and record["selected"]
        fig = visualize.ranking_figure(
            image, pred.labels, pred.scores, predictor.class_names, predictor.palette, topk=10,
            score_label=pred.score_kind, title="x",
        )  # fmt: skip
        visualize.save_figure(fig, str(tmp_path / "ranking.png"))
        assert (tmp_path / "ranking.png").stat().st_size > 0

    config = config_lib.load_config(spec)
    written = export.export_params(
        seg.params, config, tmp_path, "test", 0, model_state=seg.model_state
    )
    assert {p.name for p in written} >= {export.MMSEG_PTH, export.SAFETENSORS}
    sd = torch.load(tmp_path / export.MMSEG_PTH, map_location="cpu", weights_only=True)
    reference = DeepLabV3(171, rankseg=rankseg).eval()
    reference.load_state_dict(sd["state_dict"], strict=True)
    with torch.no_grad():
        torch_logits = reference(torch.from_numpy(x)).numpy().transpose(0, 2, 3, 1)
    valid = torch_logits != CANVAS_FILL
    np.testing.assert_array_equal(logits != CANVAS_FILL, valid)
    assert _rel(logits[valid], torch_logits[valid]) <= TOL
    tracked = [k for k in sd["state_dict"] if k.endswith("num_batches_tracked")]
    assert tracked and all(sd["state_dict"][k].dtype == torch.int64 for k in tracked)

    again = Segmentor.from_config(spec, tmp_path / export.SAFETENSORS)
    for a, b in zip(jax.tree.leaves(again.variables), jax.tree.leaves(seg.variables), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "arg,total",
    [
        ("", 91_516_613),
        ("head=base", 87_222_198),
        ("dataset=ade20k", 91_489_670),
        ("dataset=ade20k,head=base", 87_206_028),
    ],
)
def test_seed_rows_have_the_official_parameter_counts(arg, total):
    """configs/deeplabv3.py rows → the official counts (fixtures README), shapes only."""
    config = config_lib.resolve(f"configs/deeplabv3.py:{arg}")
    assert config.model.pretrained == "resnet101_v1c" and config.eval.mode == "whole"
    assert (config.optimizer.lr, config.optimizer.weight_decay, config.batch_size) == (
        0.01,
        5e-4,
        16,
    )
    shapes = loading.expected_variables(create_model(config.model), config)
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes["params"])) == total
    assert all(x.dtype in (jnp.float32, jnp.int32) for x in jax.tree.leaves(shapes["batch_stats"]))


def test_stage_blocks_sets_the_blocks_per_stage_and_is_checked():
    """`model.resnet.stage_blocks` (mmseg's `stage_blocks`) overrides the depth's blocks; a
    wrong length is one ConfigError line before anything is built."""
    config = config_lib.resolve("configs/deeplabv3.py:runlocal")
    config.model.resnet.stage_blocks = (1, 2, 1, 1)
    shapes = loading.expected_variables(create_model(config.model), config)["params"]
    blocks = sorted(k for k in shapes["backbone"] if k.startswith("layer"))
    assert blocks == ["layer1_0", "layer2_0", "layer2_1", "layer3_0", "layer4_0"]
    config.model.resnet.stage_blocks = (1, 1, 1)
    with pytest.raises(config_lib.ConfigError, match="model.resnet.stage_blocks"):
        config_lib.validate(config)


# --------------------------------------------------------------------------------------------
# Training through main.py: a straight run, and one killed by SIGKILL after a checkpoint
# --------------------------------------------------------------------------------------------

STEPS = 8


def _run(workdir, data_root, cache, wait=True):
    args = [
        sys.executable, str(REPO / "main.py"), "--config=configs/demo.py:model=deeplab,runlocal",
        f"--workdir={workdir}", "--mode=train", f"--config.total_steps={STEPS}",
        f"--config.data.root={data_root}", "--config.data.generate_if_missing=False",
        "--config.data.num_workers=1", "--config.batch_size=2",
        "--config.model.img_size=(32, 32)", "--config.data.crop_size=(32, 32)",
        "--config.data.img_scale=(128, 32)", "--config.data.test_scale=(128, 32)",
        "--config.eval.mode=whole", "--config.eval.every_steps=0", "--config.eval.max_images=1",
        "--config.checkpoint.every_steps=2", "--config.checkpoint.async_save=False",
        "--config.logging.every_steps=2", "--config.model.dropout=0.1",
        "--config.model.rankseg_img_head.dropout=0.1",
        # one bottleneck per stage: every kind of block and BN, a fraction of the compile time
        "--config.model.resnet.stage_blocks=(1, 1, 1, 1)",
    ]  # fmt: skip
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        JAX_COMPILATION_CACHE_DIR=str(cache),  # the three runs compile the same step once
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    )
    proc = subprocess.Popen(
        args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: SIGKILL reaches the data workers too
    )  # fmt: skip
    if not wait:
        return proc
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out.decode()[-3000:]
    return out.decode()


def _final(workdir):
    config = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
    model = create_model(config.model)
    params = checkpoint.restore_params(workdir, loading.expected_params(model, config))
    state = checkpoint.restore_model_state(workdir, loading.expected_model_state(model, config))
    return config, model, params, state


def test_train_and_resume_after_sigkill_restore_batch_stats(synthetic_ade, tmp_path):
    cache = tmp_path / "jax_cache"
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    out = _run(straight, synthetic_ade, cache)
    assert "final mIoU" in out
    logged = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert logged and all(np.isfinite(r["loss"]) and "aux.loss_seg" in r for r in logged)
    assert all("decode.loss_img" in r for r in logged)  # RankSeg's ASL term
    config, model, params, state = _final(straight)
    assert set(state) == {"batch_stats"}
    init = loading.expected_variables(model, config)  # shapes; values from a fresh init:
    fresh = jax.jit(lambda: model.init(jax.random.PRNGKey(config.seed), jnp.zeros((1, 32, 32, 3))))
    stats0 = fresh()["batch_stats"]
    assert jax.tree.structure(init["batch_stats"]) == jax.tree.structure(state["batch_stats"])
    counts = [int(v) for p, v in jax.tree_util.tree_leaves_with_path(state) if "num" in str(p)]
    assert counts and set(counts) == {STEPS}  # one BN update per training step
    moved = max(_rel(a, b) for a, b in zip(jax.tree.leaves(state["batch_stats"]),
                jax.tree.leaves(stats0), strict=True) if a.dtype != jnp.int32)  # fmt: skip
    assert moved > 1e-3

    proc = _run(killed, synthetic_ade, cache, wait=False)
    done = killed / "checkpoints" / "2"
    deadline = time.time() + 600
    while not done.exists():
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        assert time.time() < deadline, "no checkpoint in time"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=120)
    assert checkpoint.latest_step(killed) < STEPS
    _run(killed, synthetic_ade, cache)
    _, _, params2, state2 = _final(killed)
    for a, b in zip(jax.tree.leaves((params, state)), jax.tree.leaves((params2, state2)),
                    strict=True):  # fmt: skip
        np.testing.assert_array_equal(a, b)
    exported = mmseg_conv.variables_to_state_dict({"params": params2, **state2})
    assert int(exported["backbone.stem.1.num_batches_tracked"]) == STEPS
