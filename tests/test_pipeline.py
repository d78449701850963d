"""Tests of the grain input pipelines (rankseg_jax/data/pipeline.py) on an in-memory source."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from rankseg_jax.data import pipeline as pl
from rankseg_jax.data import transforms as T
from rankseg_jax.errors import CheckpointError, CorruptDataError
from rankseg_testing.fake_data import FakeSource

AUG = T.TrainAugment(crop_size=(32, 32), img_scale=(128, 32), ignore_index=255)
CFG = pl.PipelineConfig(seed=3, global_batch=4, augment=AUG, test_scale=(128, 32))


def local_batches(source, cfg, p, n_proc, steps, start=0):
    ds = pl.train_dataset(
        source, cfg, process_index=p, process_count=n_proc, start_step=start, num_steps=steps
    )
    it = iter(ds)
    try:
        return list(it)
    finally:
        getattr(it, "close", lambda: None)()


def take(iterator, n):
    out = []
    for _ in range(n):
        batch = next(iterator)
        out.append((batch, iterator.positions.copy()))
    return out


def assert_same_stream(a, b):
    assert len(a) == len(b)
    for (x, px), (y, py) in zip(a, b, strict=True):
        np.testing.assert_array_equal(px, py)
        for key in ("image", "label"):
            np.testing.assert_array_equal(np.asarray(x[key]), np.asarray(y[key]))


# ------------------------------------------------------------------ training order


@pytest.mark.parametrize("n_proc", [2, 4])
def test_epoch_coverage_disjoint_and_complete(n_proc):
    source = FakeSource(24)
    cfg = dataclasses.replace(CFG, global_batch=8)
    spe = pl.steps_per_epoch(len(source), cfg.global_batch)  # 3 steps = one full epoch
    seen = []
    for p in range(n_proc):
        batches = local_batches(source, cfg, p, n_proc, spe)
        assert all(b["index"].shape == (8 // n_proc,) for b in batches)
        seen.append(np.concatenate([b["index"] for b in batches]))
    flat = np.concatenate(seen)
    assert len(flat) == len(set(flat.tolist()))  # disjoint
    assert sorted(flat.tolist()) == list(range(24))  # complete


def test_global_batches_equal_for_1_2_4_processes():
    source = FakeSource(20)  # 20 // 4 = 5 steps per epoch; 7 steps cross an epoch boundary
    steps = 7
    by_count = {}
    for n_proc in (1, 2, 4):
        per_step = [dict() for _ in range(steps)]
        for p in range(n_proc):
            for k, b in enumerate(local_batches(source, CFG, p, n_proc, steps)):
                for i, pos in enumerate(b["position"]):
                    per_step[k][int(pos)] = (int(b["index"][i]), b["image"][i], b["label"][i])
        by_count[n_proc] = per_step
    for k in range(steps):
        ref = by_count[1][k]
        assert sorted(ref) == list(range(4 * k, 4 * k + 4))
        for n_proc in (2, 4):
            got = by_count[n_proc][k]
            assert sorted(got) == sorted(ref)
            for pos, (index, image, label) in ref.items():
                assert got[pos][0] == index
                np.testing.assert_array_equal(got[pos][1], image)
                np.testing.assert_array_equal(got[pos][2], label)


def test_example_equals_reference_transform_of_its_position():
    source = FakeSource(12)
    batch = local_batches(source, CFG, 1, 2, 2, start=1)[0]
    it = pl.TrainIterator(source, CFG, start_step=1, num_steps=2, process_index=1, process_count=2)
    normalised = next(it)
    for i in range(2):
        record = source[int(batch["index"][i])]
        rng = pl.augment_rng(CFG.seed, int(batch["position"][i]))
        image, label = T.reference_train_transform(
            record["image"], record["label"], rng, AUG, CFG.mean, CFG.std
        )
        np.testing.assert_array_equal(normalised["image"][i], image)  # bit-exact
        np.testing.assert_array_equal(normalised["label"][i], label)
        np.testing.assert_array_equal(batch["label"][i], label)
    assert batch["position"].tolist() == [6, 7]  # step 1, slots 2 and 3 of batch 4


def test_worker_count_does_not_change_stream():
    source = FakeSource(16, probe_jax=True)
    cfg0 = dataclasses.replace(CFG, num_workers=0)
    cfg2 = dataclasses.replace(CFG, num_workers=2)
    a = local_batches(source, cfg0, 0, 1, 5)
    b = local_batches(source, cfg2, 0, 1, 5)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x["index"], y["index"])
        np.testing.assert_array_equal(x["image"], y["image"])
    # the workers never opened a JAX backend
    eval_names = [
        n
        for batch in pl.eval_batches(source, cfg2, max_examples=4, process_index=0, process_count=1)
        for n in batch["name"]
    ]
    assert eval_names and all(n.endswith("jax_backend=False") for n in eval_names)


def test_resume_with_prefetch_is_exact_and_worker_count_free():
    source = FakeSource(12)
    cfg = dataclasses.replace(CFG, num_workers=2, prefetch=2)
    it = pl.TrainIterator(source, cfg, process_index=0, process_count=1)
    take(it, 3)  # workers have prefetched beyond step 3 by now
    state = it.get_state()
    expected = take(it, 4)  # crosses the epoch boundary at step 3
    it.close()
    assert state["step"] == 3
    for workers in (1, 0):
        resumed = pl.TrainIterator(
            source, dataclasses.replace(cfg, num_workers=workers), process_index=0, process_count=1
        )
        resumed.set_state(state)
        assert_same_stream(take(resumed, 4), expected)
        resumed.close()


def test_set_state_accepts_json_and_other_process_counts():
    source = FakeSource(12)
    it = pl.TrainIterator(source, CFG, process_index=0, process_count=1)
    take(it, 2)
    state = json.dumps(it.get_state())
    expected = {int(p) for p in take(it, 1)[0][1]}
    halves = set()
    for p in range(2):
        other = pl.TrainIterator(source, CFG, process_index=p, process_count=2)
        other.set_state(state)
        halves |= {int(q) for q in take(other, 1)[0][1]}
    assert halves == expected == set(range(8, 12))


def test_pipeline_config_from_schema_config():
    common = pytest.importorskip("rankseg_jax.config")
    config = common.with_defaults()
    cfg = pl.PipelineConfig.from_config(config)
    assert cfg.augment.crop_size == (512, 512) and cfg.augment.img_scale == (2048, 512)
    assert cfg.augment.ratio_range == (0.5, 2.0) and cfg.augment.cat_max_ratio == 0.75
    assert cfg.global_batch == config.batch_size and cfg.test_scale == (2048, 512)
    assert cfg.mean == (127.5,) * 3 and cfg.num_workers == config.data.num_workers
    assert cfg.eval_scales == tuple(config.eval.scales)


def test_set_state_rejects_foreign_state():
    it = pl.TrainIterator(FakeSource(12), CFG, process_index=0, process_count=1)
    state = it.get_state()
    for key, value in (("seed", 99), ("global_batch", 8), ("num_examples", 13)):
        with pytest.raises(CheckpointError, match=key):
            it.set_state({**state, key: value})
    with pytest.raises(CheckpointError, match="lacks"):
        it.set_state({"step": 3})


def test_clear_errors_for_bad_sizes():
    with pytest.raises(ValueError, match="fewer than one batch"):
        pl.TrainIterator(FakeSource(3), CFG, process_index=0, process_count=1)
    with pytest.raises(ValueError, match="not divisible by the 3 processes"):
        pl.TrainIterator(FakeSource(12), CFG, process_index=0, process_count=3)


# ------------------------------------------------------------------ corrupt records


def test_corrupt_record_stops_by_default_through_workers():
    source = FakeSource(8, corrupt=tuple(range(8)))
    cfg = dataclasses.replace(CFG, num_workers=1)
    with pytest.raises(CorruptDataError, match=r"record \d+ of FakeSource"):
        local_batches(source, cfg, 0, 1, 2)


def test_skip_corrupt_keeps_batches_full_and_deterministic():
    corrupt = (1, 5, 6)
    source = FakeSource(16, corrupt=corrupt)
    cfg = dataclasses.replace(CFG, skip_corrupt=True)
    steps = 8  # two epochs: every corrupt record is hit twice
    a = local_batches(source, cfg, 0, 1, steps)
    b = local_batches(source, cfg, 0, 1, steps)
    for x, y in zip(a, b, strict=True):
        assert x["index"].shape == (4,)
        assert not set(x["index"].tolist()) & set(corrupt)
        np.testing.assert_array_equal(x["index"], y["index"])
        np.testing.assert_array_equal(x["image"], y["image"])
    it = pl.TrainIterator(source, cfg, num_steps=steps, process_index=0, process_count=1)
    take(it, steps)
    # each corrupt record is met once per epoch (plus when a replacement run crosses it)
    assert it.num_skipped == sum(len(x["skipped"]) for x in a) >= 2 * len(corrupt)


# ------------------------------------------------------------------ evaluation


@pytest.mark.parametrize("n_proc, batch", [(2, 1), (4, 1), (4, 2)])
def test_eval_every_example_once_with_masked_padding(n_proc, batch):
    source = FakeSource(7)
    steps = pl.eval_steps(len(source), n_proc, batch)
    seen = []
    for p in range(n_proc):
        batches = list(
            pl.eval_batches(source, CFG, batch_size=batch, process_index=p, process_count=n_proc)
        )
        assert len(batches) == steps  # equal step counts on every process
        for b in batches:
            assert len(b["image"]) == batch and b["valid"].shape == (batch,)
            for image, label, index, valid in zip(
                b["image"], b["label"], b["index"], b["valid"], strict=True
            ):
                if not valid:
                    assert index == -1 and np.all(label == AUG.ignore_index)
                    continue
                seen.append(int(index))
                record = source[int(index)]
                np.testing.assert_array_equal(label, record["label"])  # original label kept
                h, w = record["label"].shape
                assert image.shape == (*T.rescale_size(w, h, CFG.test_scale)[::-1], 3)
                assert image.dtype == np.float32
    assert sorted(seen) == list(range(7))
    assert steps * n_proc * batch > 7  # the tail really was padded


def test_eval_multi_scale_images():
    source = FakeSource(3)
    ratios = (0.5, 1.0, 1.75)
    cfg = dataclasses.replace(CFG, eval_scales=ratios)
    batches = list(pl.eval_batches(source, cfg, batch_size=2, process_index=0, process_count=1))
    for b in batches:
        for image, scaled, index in zip(b["image"], b["scaled"], b["index"], strict=True):
            assert len(scaled) == len(ratios)
            if index < 0:
                continue
            h, w = source[int(index)]["label"].shape
            for ratio, im in zip(ratios, scaled, strict=True):
                scale = (int(CFG.test_scale[0] * ratio), int(CFG.test_scale[1] * ratio))
                assert im.shape == (*T.rescale_size(w, h, scale)[::-1], 3)
            np.testing.assert_array_equal(scaled[1], image)
    assert "scaled" not in next(pl.eval_batches(source, CFG, process_index=0, process_count=1))


def test_eval_skip_corrupt_pads_and_counts():
    source = FakeSource(5, corrupt=(2,))
    with pytest.raises(CorruptDataError, match="record 2"):
        list(pl.eval_batches(source, CFG, process_index=0, process_count=1))
    cfg = dataclasses.replace(CFG, skip_corrupt=True)
    batches = list(pl.eval_batches(source, cfg, process_index=0, process_count=1))
    assert [bool(b["valid"][0]) for b in batches] == [True, True, False, True, True]
    assert sum(len(b["skipped"]) for b in batches) == 1


# ------------------------------------------------------------------ device arrays


def test_device_batches_match_host_batches():
    jax = pytest.importorskip("jax")
    from rankseg_jax import sharding as shd

    mesh = shd.make_mesh(-1, 1)
    cfg = dataclasses.replace(CFG, global_batch=mesh.size * 2)
    source = FakeSource(3 * cfg.global_batch)
    sharding = shd.batch_sharding(mesh)
    dev = pl.TrainIterator(source, cfg, sharding=sharding)
    host = pl.TrainIterator(source, cfg, process_index=0, process_count=1)
    for _ in range(2):
        d, h = next(dev), next(host)
        assert isinstance(d["image"], jax.Array) and d["image"].sharding.is_equivalent_to(
            sharding, 4
        )
        assert d["image"].dtype == np.float32 and d["label"].dtype == np.int32
        np.testing.assert_array_equal(np.asarray(d["image"]), h["image"])  # bit-exact
        np.testing.assert_array_equal(np.asarray(d["label"]), h["label"])


@pytest.mark.parametrize("ahead", [1, 2])
def test_device_prefetch_keeps_stream_and_resume_position(ahead):
    """Batches sent ahead to the devices are not counted as consumed: a state saved mid-way
    resumes with the first batch not yet returned, the stream is the unbuffered one, and a
    finite run returns its buffered batches before it stops."""
    pytest.importorskip("jax")
    from rankseg_jax import sharding as shd

    sharding = shd.batch_sharding(shd.make_mesh(-1, 1))
    source = FakeSource(12)
    plain = pl.TrainIterator(source, dataclasses.replace(CFG, device_prefetch=0), sharding=sharding)
    expected = take(plain, 6)
    cfg = dataclasses.replace(CFG, device_prefetch=ahead)
    it = pl.TrainIterator(source, cfg, sharding=sharding)
    first = take(it, 2)
    assert len(it._buffer) == ahead  # sent ahead, not returned
    state = it.get_state()
    assert state["step"] == 2
    it.close()
    resumed = pl.TrainIterator(source, cfg, sharding=sharding)
    resumed.set_state(state)
    assert_same_stream(first + take(resumed, 4), expected)
    finite = pl.TrainIterator(source, cfg, sharding=sharding, num_steps=3)
    assert_same_stream(take(finite, 3), expected[:3])
    with pytest.raises(StopIteration):
        next(finite)
