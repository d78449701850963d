"""Deterministic grain (Dataset API) input pipelines for training and evaluation.

Source interface (the dataset readers): random access, `len(source)`, `source[i] ->
dict(image=uint8 (H, W, 3) RGB, label=int32 (H, W), name=str)`, attributes `n_cls`,
`ignore_index`. The source must pickle (it is sent to the worker processes).

Training order (independent of process and worker counts):
- Global batch k (B = global batch size) is examples perm_e[j*B : (j+1)*B] of the epoch
  permutation perm_e = shuffle(seed, e) of the whole index space, with e = k // S, j = k % S and
  S = len(source) // B steps per epoch (the remainder of each epoch is dropped, as the reference
  `drop_last=True`).
- Process p of P feeds the contiguous slots [p*B/P, (p+1)*B/P) of each global batch, so the
  global array (rows in process order) is identical for 1, 2 or 4 processes, row for row: the
  per-row dropout and drop-path masks, and hence the trained params, do not depend on the
  process count.
- The example in slot s of batch k has global position g = k*B + s; its augmentation uses
  `np.random.default_rng([seed, 1, g])`: a pure function of (seed, position).
- Grain sees a MapDataset of *step numbers*; one element is one process-local batch, built by
  one worker. `mp_prefetch` hands whole batches round-robin to workers and interleaves them back
  in order, so the stream does not depend on the worker count.

Device format: workers ship the uint8 crop zero-padded to the crop size, the label padded with
`ignore_index`, and the crop's (h, w) `size`. `TrainIterator` builds global jax.Arrays and
normalises on device with a (256, 3) lookup table of mmcv's `imnormalize` values
(`transforms.normalize_lut`), so the float32 images are bit-identical to the reference's
normalise-then-pad (4x less inter-process traffic than float32).

Checkpointing: the data position is the number of batches consumed. `TrainIterator.get_state()`
returns it with a fingerprint (seed, batch size, dataset size); `set_state` restarts the grain
pipeline at that step, so a resume yields exactly the batches the old run would have, with any
worker count.

Corrupt records: any exception from `source[i]` (or a malformed record) raises
`CorruptDataError` naming the index. With `skip_corrupt`, a training slot whose example is
corrupt takes the next example of the epoch permutation (positions pos+1, pos+2, ... mod N, up to
`MAX_REPLACEMENTS`), augmented with the slot's own seed, so batches stay full and deterministic;
the skips are counted in `TrainIterator.num_skipped` and logged. In evaluation a corrupt example
becomes a padding entry (valid=False) and its error is listed in the batch's `skipped`.

Evaluation format (per process, per step; `eval_batches`): a dict with
  image: list of B float32 (h_i, w_i, 3), normalised, keep-ratio resized to `test_scale`;
  label: list of B int32 (H_i, W_i), the original label;
  name: list of B str; index: int64 (B,) dataset index (-1 for padding); valid: bool (B,);
  skipped: list of error strings of corrupt records replaced by padding (skip_corrupt);
  scaled: only with multi-scale `eval_scales` (mmseg aug_test): list of B tuples of float32
    images, one per ratio r, each the original keep-ratio resized to (int(long*r), int(short*r))
    of `test_scale` (so ratio 1.0 equals `image`); flips are left to the evaluator.
Process p at step s gets dataset indices (s*P + p)*B + b; every process runs the same
`eval_steps(N, P, B)` steps and entries past N are padding (valid False, a zero image of
(short, short) of `test_scale` and an all-ignore label) that must be masked out.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import math
import sys
from collections.abc import Iterator, Mapping
from typing import Any, Protocol

import cv2
import grain
import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from rankseg_jax import sharding as shd
from rankseg_jax.data import transforms
from rankseg_jax.errors import CheckpointError, CorruptDataError, DatasetError

MAX_REPLACEMENTS = 16
STATE_VERSION = 1
_SHUFFLE, _AUGMENT = 0, 1  # seed-sequence domains, so shuffles and augmentations never collide

log = logging.getLogger(__name__)


class Source(Protocol):
    """What the pipeline needs from a dataset reader."""

    n_cls: int
    ignore_index: int

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict[str, Any]: ...


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """Everything the pipelines need, read from a config by `from_config`."""

    seed: int = 0
    global_batch: int = 8
    augment: transforms.TrainAugment = transforms.TrainAugment()
    mean: tuple[float, ...] = (127.5, 127.5, 127.5)
    std: tuple[float, ...] = (127.5, 127.5, 127.5)
    test_scale: tuple[int, int] = (2048, 512)
    eval_scales: tuple[float, ...] = (1.0,)
    num_workers: int = 0
    prefetch: int = 2
    device_prefetch: int = 2
    skip_corrupt: bool = False

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> PipelineConfig:
        """From a full config (rankseg_jax.config schema: `seed`, `batch_size`, `data.*`)."""
        d = config["data"]
        augment = transforms.TrainAugment(
            crop_size=tuple(d["crop_size"]),
            img_scale=tuple(d["img_scale"]),
            ratio_range=tuple(d["ratio_range"]),
            cat_max_ratio=float(d["cat_max_ratio"]),
            flip_prob=float(d["flip_prob"]),
            photometric=bool(d["photometric"]),
            ignore_index=int(d["ignore_index"]),
        )
        return cls(
            seed=int(config["seed"]),
            global_batch=int(config["batch_size"]),
            augment=augment,
            mean=tuple(d["mean"]),
            std=tuple(d["std"]),
            test_scale=tuple(d["test_scale"]),
            eval_scales=tuple(float(r) for r in config["eval"]["scales"]),
            num_workers=int(d["num_workers"]),
            prefetch=int(d["prefetch"]),
            device_prefetch=int(d["device_prefetch"]),
            skip_corrupt=bool(d["skip_corrupt"]),
        )


# ---------------------------------------------------------------- reading records


def read_record(source: Source, index: int) -> dict[str, Any]:
    """`source[index]` checked for shape and dtype; any failure is a CorruptDataError."""
    try:
        record = source[index]
        image, label = record["image"], np.asarray(record["label"])
    except Exception as err:  # noqa: BLE001 - any reader failure is a corrupt record
        raise CorruptDataError(f"record {index} of {type(source).__name__}: {err}") from err
    name = record.get("name", str(index))
    if not (
        isinstance(image, np.ndarray)
        and image.dtype == np.uint8
        and image.ndim == 3
        and image.shape[2] == 3
    ):
        got = getattr(image, "shape", type(image).__name__), getattr(image, "dtype", "")
        raise CorruptDataError(f"record {index} ({name}): image must be uint8 (H, W, 3), got {got}")
    if label.shape != image.shape[:2]:
        raise CorruptDataError(
            f"record {index} ({name}): label shape {label.shape} != image shape {image.shape[:2]}"
        )
    return dict(image=image, label=label.astype(np.int32, copy=False), name=name)


def _grain_flags_readable() -> None:
    """grain reads its own absl flags (`grain_*`) when it starts and runs worker processes;
    outside an absl app they are unparsed. Only those are marked present, at their defaults (as
    grain itself does in its workers); the application's flags are never touched."""
    if flags.FLAGS.is_parsed():
        return
    for name in list(flags.FLAGS):
        if name.startswith("grain_"):
            flags.FLAGS[name].present = True


def _init_worker(worker_index: int, worker_count: int) -> None:
    """Runs in each grain worker: one cv2 thread per process (the workers are the parallelism).

    grain imports jax in the workers; pin it to the CPU so that a stray JAX call there can never
    open the accelerator (the workers do no JAX work).
    """
    del worker_index, worker_count
    _grain_flags_readable()
    cv2.setNumThreads(1)
    jax = sys.modules.get("jax")
    if jax is not None:
        jax.config.update("jax_platforms", "cpu")


def _prefetched(ds: grain.MapDataset, num_workers: int, prefetch: int) -> grain.IterDataset:
    """Iterate `ds` in order, in `num_workers` processes (0: in this process, grain's threads).

    Each worker reads with one thread (one core per worker; cv2 is single-threaded there too),
    so `num_workers` is the number of cores the pipeline uses.
    """
    if num_workers <= 0:
        return ds.to_iter_dataset()
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=1))
    _grain_flags_readable()
    options = grain.MultiprocessingOptions(
        num_workers=num_workers, per_worker_buffer_size=max(prefetch, 1)
    )
    return it_ds.mp_prefetch(options, worker_init_fn=_init_worker)


# ---------------------------------------------------------------- training


def steps_per_epoch(num_examples: int, global_batch: int) -> int:
    """Full global batches per epoch (the remainder is dropped)."""
    if global_batch < 1:
        raise ValueError(f"batch_size={global_batch} must be at least 1")
    if num_examples < global_batch:
        raise DatasetError(
            f"the dataset has {num_examples} examples, fewer than one batch of {global_batch} "
            "(lower the config key batch_size or add examples)"
        )
    return num_examples // global_batch


def epoch_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
    """The shuffled global index space of one epoch, int64 (N,)."""
    rng = np.random.default_rng([seed, _SHUFFLE, epoch])
    return rng.permutation(num_examples)


def augment_rng(seed: int, position: int) -> np.random.Generator:
    """The generator of the example at global stream position `position`."""
    return np.random.default_rng([seed, _AUGMENT, position])


def process_slots(global_batch: int, process_index: int, process_count: int) -> np.ndarray:
    """Slots of a global batch that process p feeds: the block [p*B/P, (p+1)*B/P), int64 (B/P,).

    Contiguous so that `jax.make_array_from_process_local_data` (rows in process order) builds
    the same global batch, row for row, whatever the process count.
    """
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} not in [0, {process_count})")
    if global_batch % process_count:
        raise ValueError(
            f"batch_size={global_batch} is not divisible by the {process_count} processes"
        )
    local = global_batch // process_count
    return np.arange(process_index * local, (process_index + 1) * local)


class TrainBatchFn:
    """step -> this process's augmented local batch (numpy). Runs in grain workers; no JAX.

    Output: image uint8 (L, ch, cw, 3) zero-padded; label int32 (L, ch, cw) ignore-padded;
    size int32 (L, 2) crop (h, w); index int64 (L,) source index; position int64 (L,) global
    stream position; skipped: list of "index (reason)" strings for replaced corrupt records.
    """

    def __init__(self, source: Source, cfg: PipelineConfig, process_index: int, process_count: int):
        self.source = source
        self.cfg = cfg
        self.num_examples = len(source)
        self.steps_per_epoch = steps_per_epoch(self.num_examples, cfg.global_batch)
        self.slots = process_slots(cfg.global_batch, process_index, process_count)
        self._perm_epoch, self._perm = -1, np.zeros(0, np.int64)

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            self._perm = epoch_permutation(self.cfg.seed, epoch, self.num_examples)
            self._perm_epoch = epoch
        return self._perm

    def _read_or_replace(
        self, perm: np.ndarray, pos_in_epoch: int, skipped: list[str]
    ) -> tuple[int, dict[str, Any]]:
        """The slot's record, or with skip_corrupt the next readable one of the permutation."""
        for attempt in range(MAX_REPLACEMENTS + 1):
            index = int(perm[(pos_in_epoch + attempt) % self.num_examples])
            try:
                return index, read_record(self.source, index)
            except CorruptDataError as err:
                if not self.cfg.skip_corrupt:
                    raise
                skipped.append(str(err))
                log.warning("skipping corrupt record: %s", err)
        raise CorruptDataError(
            f"{MAX_REPLACEMENTS + 1} consecutive corrupt records from permutation position "
            f"{pos_in_epoch}: {skipped[-1]}"
        )

    def __call__(self, step: int) -> dict[str, Any]:
        cfg, aug = self.cfg, self.cfg.augment
        epoch, j = divmod(int(step), self.steps_per_epoch)
        perm = self._permutation(epoch)
        n, (ch, cw) = len(self.slots), aug.crop_size
        image = np.zeros((n, ch, cw, 3), np.uint8)
        label = np.full((n, ch, cw), aug.ignore_index, np.int32)
        size = np.zeros((n, 2), np.int32)
        index = np.zeros(n, np.int64)
        position = int(step) * cfg.global_batch + self.slots
        skipped: list[str] = []
        for i, slot in enumerate(self.slots):
            index[i], record = self._read_or_replace(perm, j * cfg.global_batch + slot, skipped)
            rng = augment_rng(cfg.seed, int(position[i]))
            img, lab = aug(record["image"], record["label"], rng)
            h, w = lab.shape
            image[i, :h, :w], label[i, :h, :w], size[i] = img, lab, (h, w)
        return dict(
            image=image,
            label=label,
            size=size,
            index=index,
            position=position.astype(np.int64),
            skipped=skipped,
        )


def train_dataset(
    source: Source,
    cfg: PipelineConfig,
    *,
    process_index: int,
    process_count: int,
    start_step: int = 0,
    num_steps: int | None = None,
) -> grain.IterDataset:
    """Process-local training batches for steps [start_step, num_steps) (numpy dicts).

    `num_steps=None` means practically endless. See `TrainBatchFn` for the element format.
    """
    stop = num_steps if num_steps is not None else 2**62 // max(cfg.global_batch, 1)
    batch_fn = TrainBatchFn(source, cfg, process_index, process_count)
    steps = grain.MapDataset.range(int(start_step), int(stop))
    return _prefetched(steps.map(batch_fn), cfg.num_workers, cfg.prefetch)


class TrainIterator:
    """Checkpointable training batches; global jax.Arrays when given a sharding.

    Yields dict(image=float32 (B, ch, cw, 3) normalised and zero-padded, label=int32
    (B, ch, cw) ignore-padded): global arrays on `sharding` (B = global batch), or process-local
    numpy arrays when `sharding` is None. `positions` holds the last batch's local global
    positions (int64 (L,)); `num_skipped` counts replaced corrupt records.

    With a sharding, `cfg.device_prefetch` batches beyond the one returned are already sent to
    the devices (transfers and normalisation are asynchronous, so they overlap the running
    step). `step` and `get_state()` count only the batches returned: a checkpoint never skips
    the buffered ones, which are sent again after a resume.
    """

    def __init__(
        self,
        source: Source,
        cfg: PipelineConfig,
        *,
        sharding: Any = None,
        start_step: int = 0,
        num_steps: int | None = None,
        process_index: int | None = None,
        process_count: int | None = None,
    ):
        if process_index is None or process_count is None:
            process_index, process_count = jax.process_index(), jax.process_count()
        self.source, self.cfg, self.sharding = source, cfg, sharding
        self.process_index, self.process_count = process_index, process_count
        self.num_steps = num_steps
        self.step = int(start_step)
        self.num_skipped = 0
        self.positions = np.zeros(0, np.int64)
        self._lut = transforms.normalize_lut(cfg.mean, cfg.std)
        self._normalize_fn = None
        self._iter: Any = None
        self._buffer: collections.deque = collections.deque()
        steps_per_epoch(len(source), cfg.global_batch)  # fail early on a too-small dataset
        process_slots(cfg.global_batch, process_index, process_count)
        if sharding is not None:
            shd.local_batch_size(cfg.global_batch, sharding.mesh)  # ConfigError if it won't split

    def _ensure_iter(self) -> Any:
        if self._iter is None:
            ds = train_dataset(
                self.source,
                self.cfg,
                process_index=self.process_index,
                process_count=self.process_count,
                start_step=self.step,
                num_steps=self.num_steps,
            )
            self._iter = iter(ds)
        return self._iter

    def __iter__(self) -> TrainIterator:
        return self

    def __next__(self) -> dict[str, Any]:
        ahead = self.cfg.device_prefetch if self.sharding is not None else 0
        while len(self._buffer) <= ahead and self._produce():
            pass
        if not self._buffer:
            raise StopIteration
        batch, local = self._buffer.popleft()
        self.step += 1
        if local["skipped"]:
            self.num_skipped += len(local["skipped"])
            for reason in local["skipped"]:
                log.warning("step %d: replaced corrupt record: %s", self.step - 1, reason)
        self.positions = local["position"]
        return batch

    def _produce(self) -> bool:
        """Read the next host batch and queue it (sent to the devices); False when exhausted."""
        try:
            local = next(self._ensure_iter())
        except StopIteration:
            return False
        if self.sharding is None:
            batch = dict(image=self._normalize_host(local), label=local["label"])
        else:
            batch = self._to_device(local)
        info = dict(skipped=local["skipped"], position=local["position"])
        self._buffer.append((batch, info))
        return True

    def _normalize_host(self, local: Mapping[str, np.ndarray]) -> np.ndarray:
        image = self._lut[local["image"], np.arange(3)]
        h, w = image.shape[1:3]
        valid = (np.arange(h)[None, :, None] < local["size"][:, 0, None, None]) & (
            np.arange(w)[None, None, :] < local["size"][:, 1, None, None]
        )
        return np.where(valid[..., None], image, np.float32(0))

    def _to_device(self, local: Mapping[str, np.ndarray]) -> dict[str, Any]:

        arrays = shd.make_global_batch(
            {k: local[k] for k in ("image", "label", "size")}, self.sharding
        )
        if self._normalize_fn is None:
            self._normalize_fn = make_device_normalizer(self._lut, self.sharding)
        image = self._normalize_fn(arrays["image"], arrays["size"])
        return dict(image=image, label=arrays["label"])

    def get_state(self) -> dict[str, int]:
        """The data position (batches consumed) and the fingerprint it is valid for."""
        return dict(
            version=STATE_VERSION,
            step=self.step,
            seed=self.cfg.seed,
            global_batch=self.cfg.global_batch,
            num_examples=len(self.source),
        )

    def set_state(self, state: Mapping[str, int] | str | bytes) -> None:
        """Continue from a `get_state()` result (or its JSON); any worker count works.

        The state is the same on every process, so it can be saved once and restored with a
        different process count too (the positions do not depend on it).
        """
        if isinstance(state, str | bytes):
            state = json.loads(state)
        expected = self.get_state()
        for key in ("version", "seed", "global_batch", "num_examples"):
            if key not in state:
                raise CheckpointError(f"data iterator state lacks {key!r}: {dict(state)}")
            if int(state[key]) != expected[key]:
                raise CheckpointError(
                    f"data iterator state has {key}={state[key]} but this pipeline has "
                    f"{key}={expected[key]}; the saved data position does not apply"
                )
        self.close()
        self.step = int(state["step"])

    def __enter__(self) -> TrainIterator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the worker processes (a later `next` restarts them at the current step)."""
        self._buffer.clear()  # not yet returned: re-read from `step` on the next `next`
        if self._iter is not None:
            close = getattr(self._iter, "close", None)
            if close is not None:
                close()
            self._iter = None


def make_device_normalizer(lut: np.ndarray, sharding: Any) -> Any:
    """jit fn (uint8 (B, h, w, 3), int32 (B, 2) sizes) -> float32 (B, h, w, 3) on `sharding`.

    A gather from the (256, 3) `transforms.normalize_lut` table (bit-identical to mmcv), zeroed
    outside each crop's (h, w) like mmseg's Pad after Normalize.
    """

    table = np.asarray(lut, np.float32)

    def normalize(image: jax.Array, size: jax.Array) -> jax.Array:
        values = jnp.asarray(table)[image.astype(jnp.int32), jnp.arange(3)]
        rows = jnp.arange(image.shape[1])[None, :, None] < size[:, 0, None, None]
        cols = jnp.arange(image.shape[2])[None, None, :] < size[:, 1, None, None]
        return jnp.where((rows & cols)[..., None], values, jnp.float32(0))

    return jax.jit(normalize, out_shardings=sharding)


# ---------------------------------------------------------------- evaluation


def eval_steps(num_examples: int, process_count: int, batch_size: int = 1) -> int:
    """Steps every process runs so that all `num_examples` are seen once (same on all)."""
    return max(math.ceil(num_examples / (process_count * batch_size)), 0)


class EvalBatchFn:
    """step -> this process's eval batch (see the module docstring). Runs in workers; no JAX."""

    def __init__(
        self,
        source: Source,
        cfg: PipelineConfig,
        process_index: int,
        process_count: int,
        batch_size: int,
    ):
        self.source, self.cfg = source, cfg
        self.process_index, self.process_count = process_index, process_count
        self.batch_size = batch_size
        self.num_examples = len(source)

    def _padding(self) -> tuple[np.ndarray, np.ndarray]:
        short = min(self.cfg.test_scale)
        image = np.zeros((short, short, 3), np.float32)
        return image, np.full((short, short), self.cfg.augment.ignore_index, np.int32)

    def _scaled(self, image: np.ndarray, ratio: float) -> np.ndarray:
        """mmseg MultiScaleFlipAug: scale (int(long * r), int(short * r)), then keep-ratio."""
        long, short = self.cfg.test_scale
        scale = (int(long * ratio), int(short * ratio))
        return transforms.eval_transform(image, scale, self.cfg.mean, self.cfg.std)

    def __call__(self, step: int) -> dict[str, Any]:
        first = (int(step) * self.process_count + self.process_index) * self.batch_size
        multi_scale = tuple(self.cfg.eval_scales) != (1.0,)
        out: dict[str, Any] = dict(image=[], label=[], name=[], index=[], valid=[], skipped=[])
        if multi_scale:
            out["scaled"] = []
        for index in range(first, first + self.batch_size):
            record = None
            if index < self.num_examples:
                try:
                    record = read_record(self.source, index)
                except CorruptDataError as err:
                    if not self.cfg.skip_corrupt:
                        raise
                    out["skipped"].append(str(err))
                    log.warning("skipping corrupt eval record: %s", err)
            if record is None:
                image, label = self._padding()
                out["name"].append("")
                out["index"].append(-1)
                scaled = tuple(image for _ in self.cfg.eval_scales)  # padding at every scale
            else:
                image = transforms.eval_transform(
                    record["image"], self.cfg.test_scale, self.cfg.mean, self.cfg.std
                )
                label = record["label"]
                if multi_scale:
                    scaled = tuple(self._scaled(record["image"], r) for r in self.cfg.eval_scales)
                out["name"].append(record["name"])
                out["index"].append(index)
            out["image"].append(image)
            out["label"].append(label)
            out["valid"].append(record is not None)
            if multi_scale:
                out["scaled"].append(scaled)
        out["index"] = np.asarray(out["index"], np.int64)
        out["valid"] = np.asarray(out["valid"], bool)
        return out


def eval_dataset(
    source: Source,
    cfg: PipelineConfig,
    *,
    process_index: int,
    process_count: int,
    batch_size: int = 1,
    max_examples: int = 0,
) -> grain.IterDataset:
    """Per-process eval batches; `max_examples` > 0 evaluates only the first that many."""
    batch_fn = EvalBatchFn(source, cfg, process_index, process_count, batch_size)
    if max_examples > 0:
        batch_fn.num_examples = min(batch_fn.num_examples, max_examples)
    steps = eval_steps(batch_fn.num_examples, process_count, batch_size)
    ds = grain.MapDataset.range(0, steps).map(batch_fn)
    return _prefetched(ds, cfg.num_workers, cfg.prefetch)


def eval_batches(
    source: Source,
    cfg: PipelineConfig,
    *,
    batch_size: int = 1,
    max_examples: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
) -> Iterator[dict[str, Any]]:
    """Iterate this process's eval batches, closing the workers at the end (or on break)."""
    if process_index is None or process_count is None:
        process_index, process_count = jax.process_index(), jax.process_count()
    ds = eval_dataset(
        source,
        cfg,
        process_index=process_index,
        process_count=process_count,
        batch_size=batch_size,
        max_examples=max_examples,
    )
    it = iter(ds)
    try:
        yield from it
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()
