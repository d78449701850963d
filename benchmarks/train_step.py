"""Steady-state training-step and forward benchmark of a Segmenter config, JAX (and PyTorch).

Prints one JSON line per measurement: compile time, step time (median over the timed steps),
images/s, peak memory where the backend reports it, model FLOPs by the spec arithmetic
(performance.md section 3; `rankseg_jax.flops`) with XLA's cost-analysis count beside it, and
MFU where the device peak is known (H100/H200: 989 TFLOP/s bf16 dense, or --peak-tflops).
Batches are synthetic and device-resident: this measures the step, not the input pipeline
(benchmarks/input_pipeline.py measures that).

    # the CPU target of issue 9 (ViT-S/16 mask head, 256², batch 2, float32, 2 pinned threads),
    # JAX and PyTorch (eager, SDPA) in one run, outputs asserted equal before timing:
    python benchmarks/train_step.py --compare-torch
    # GPU rows:
    python benchmarks/train_step.py --variant B/16 --head rankseg --resolution 512 --batch 8 \
        --dtype bfloat16 --attention cudnn

The forward measured is inference: `encode_decode` (logits at the input size), no gradient.

Conv families through their config (the real train step of rankseg_jax.train, BN statistics
in the state; model FLOPs = XLA's cost analysis of the compiled step, as no spec arithmetic
exists for them), e.g. DeepLabV3 R101-d8 + RankSeg beside Segmenter:

    python benchmarks/train_step.py --config configs/deeplabv3.py --batch 2 --resolution 256

UperNet rows (issue #18), `--family upernet_swin|upernet_beit`: the full-size models of
models/uper.py (Swin-B 512 / BEiT-L 640 by default, batch 16, `--uper-head rankseg|base`) with
the recipe's optimiser (rankseg_jax.recipes) in one jitted step (forward with BN statistics,
the decode + auxiliary losses, backward, AdamW update). `--remat none` keeps every block's
activations, any other value checkpoints each backbone block (nn.remat). Where the step cannot
be run (a CPU), `--lower-only` reports XLA's cost-analysis FLOPs of the lowered step and
`--memory-only` compiles it and reports XLA's memory analysis (argument / output / temp /
alias bytes; peak ≈ argument + output + temp − alias) without running it:

    python benchmarks/train_step.py --family upernet_beit --remat full --memory-only
"""

from __future__ import annotations

import argparse
import time

from common import (  # type: ignore[import-not-found]
    BenchmarkError,
    add_model_flags,
    apply_cpu_target,
    cost_analysis_flops,
    device_info,
    device_peak_memory,
    emit,
    load_config,
    peak_flops,
    pin_cores,
    versions,
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_flags(parser)
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps after compiling")
    parser.add_argument("--skip-forward", action="store_true")
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--family", default="segmenter", choices=("segmenter", "upernet_swin", "upernet_beit")
    )
    parser.add_argument("--uper-head", default="rankseg", choices=("rankseg", "base"))
    parser.add_argument("--lower-only", action="store_true", help="UperNet: FLOPs, no compile")
    parser.add_argument("--memory-only", action="store_true", help="UperNet: compile, no run")
    args = parser.parse_args(argv)
    apply_cpu_target(args)
    return args


def synthetic_batch(config, seed: int):
    """Normalised images (B, H, W, 3) float32 in [-1, 1] and labels (B, H, W) int32 with ~5 %
    ignore pixels, as numpy (the same arrays feed both frameworks)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    b, (h, w) = config.batch_size, tuple(config.model.img_size)
    images = rng.uniform(-1, 1, (b, h, w, 3)).astype(np.float32)
    labels = rng.integers(0, config.model.n_cls, (b, h, w)).astype(np.int32)
    labels[rng.random((b, h, w)) < 0.05] = config.data.ignore_index
    return images, labels


# --------------------------------------------------------------------------------- JAX side


class JaxBench:
    """The model, optimizer, state and compiled functions of one config (single device)."""

    def __init__(self, config, params=None):
        import jax

        from rankseg_jax import optim, train
        from rankseg_jax import sharding as shd
        from rankseg_jax.models.segmenter import create_model

        self.config = config
        self.model = create_model(config.model)
        self.tx = optim.make_optimizer(config)
        if params is None:
            size = tuple(config.model.img_size)
            images = jax.numpy.zeros((1, *size, 3))
            labels = jax.numpy.zeros((1, *size), jax.numpy.int32)
            variables = jax.jit(self.model.init)(
                jax.random.PRNGKey(config.seed), images, gt_labels=labels
            )
            params = variables.pop("params")
            self.model_state = dict(variables)  # BN batch_stats of the conv families
        else:
            self.model_state = {}
        self.params = params
        self.mesh = shd.make_mesh(1, 1, jax.devices()[:1])
        self.state_sharding = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
        self.batch_sharding = shd.batch_sharding(self.mesh)
        self._train = train

    def new_state(self):
        import jax

        return jax.device_put(
            self._train.new_state(self.params, self.tx, self.config.seed, self.model_state),
            self.state_sharding,
        )

    def compile_train(self, batch):
        """(compiled step, compile seconds, XLA FLOPs) for the training step."""
        step = self._train.compile_train_step(
            self.model, self.tx, self.config, self.state_sharding, self.batch_sharding
        )
        t0 = time.perf_counter()
        compiled = step.lower(self.new_state(), batch).compile()
        return compiled, time.perf_counter() - t0, cost_analysis_flops(compiled)

    def compile_forward(self, images):
        import jax

        def forward(params, x):
            variables = {"params": params, **self.model_state}
            return self.model.apply(variables, x, method=self.model.encode_decode)

        t0 = time.perf_counter()
        compiled = jax.jit(forward).lower(self.params, images).compile()
        return compiled, time.perf_counter() - t0, cost_analysis_flops(compiled)

    def loss_and_grads(self, images, labels):
        """The training loss and its gradient (deterministic: the dropout key is fixed)."""
        import jax

        from rankseg_jax import losses

        c = self.config

        def loss_fn(params):
            out = self.model.apply(
                {"params": params}, images, train=True, rngs={"dropout": jax.random.PRNGKey(0)}
            )
            total, _ = losses.segmentation_losses(
                out, labels, c.loss, c.model.n_cls, c.data.ignore_index
            )
            return total

        return jax.jit(jax.value_and_grad(loss_fn))(self.params)


# ------------------------------------------------------------------------------- torch side


def torch_model(config, seed: int):
    """The reference architecture of `config` with SDPA attention and seeded weights."""
    from rankseg_jax.models import segmenter
    from rankseg_testing import torch_reference as tr
    from rankseg_testing.torch_sdpa import count_sdpa_modules, use_sdpa_

    m, dims = config.model, segmenter.vit_dims(config.model)
    head = "mask" if m.classifier == "full" else m.classifier  # the reference's names
    if m.oce or m.classifier == "gt":
        raise BenchmarkError("--compare-torch supports the mask and rankseg heads without OCE")
    ref = tr.build_segmenter(
        tr.SegmenterConfig(
            head=head, img_size=tuple(m.img_size), patch_size=m.patch_size,
            embed_dims=dims["width"], num_layers=dims["depth"], num_heads=dims["num_heads"],
            mlp_ratio=dims["mlp_dim"] // dims["width"], drop_path_rate=m.drop_path_rate,
            n_cls=m.n_cls, d_model=dims["dec_width"], head_layers=dims["dec_layers"],
            head_heads=dims["dec_heads"], d_ff=dims["dec_mlp_dim"], dropout=m.dropout,
            head_drop_path_rate=m.dec_drop_path_rate, topk_cls=m.k, downsample=m.downsample,
            img_loss=config.loss.img_loss, img_loss_weight=config.loss.img_loss_weight,
        )
    )  # fmt: skip
    tr.randomize_parameters_(ref, seed)
    use_sdpa_(ref)
    expected = dims["depth"] + dims["dec_layers"]
    if count_sdpa_modules(ref) != expected:
        raise BenchmarkError(f"SDPA swap reached {count_sdpa_modules(ref)} of {expected} modules")
    return ref


def params_from_torch(tensors: dict, model, config):
    """Map a torch name → tensor dict (a state dict, or gradients) onto the JAX param tree."""
    import numpy as np

    from rankseg_jax.convert import mmseg
    from rankseg_jax.convert.loading import expected_params

    numpy = {k: np.asarray(v.detach().numpy(), np.float32) for k, v in tensors.items()}
    expected = expected_params(model, config)
    return mmseg.state_dict_to_params(numpy, expected, gt_head=False)


def torch_optimizer(ref, config):
    """SGD with the config's lr, momentum and weight decay (the update is elementwise and cheap;
    the schedule and per-parameter decay multipliers do not change the cost)."""
    import torch

    o = config.optimizer
    if o.name != "sgd":
        return torch.optim.AdamW(ref.parameters(), lr=o.lr, weight_decay=o.weight_decay)
    return torch.optim.SGD(
        ref.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay
    )


def relative_error(a, b) -> float:
    import numpy as np

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def assert_equal_outputs(bench: JaxBench, ref, images, labels) -> dict:
    """Forward logits, training loss and every gradient agree before anything is timed.

    Tolerances (float32, random weights): logits 1e-4 absolute (as tests/test_models_torch.py
    at ViT-B/16 512), loss 1e-4 relative, each gradient tensor 1e-3 relative (norm).
    """
    import jax
    import numpy as np
    import torch

    x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
    y = torch.from_numpy(labels.astype(np.int64))
    ref.eval()
    with torch.no_grad():
        want = ref.encode_decode(x).numpy().transpose(0, 2, 3, 1)
    got = np.asarray(
        bench.model.apply({"params": bench.params}, images, method=bench.model.encode_decode)
    )
    logit_err = float(np.max(np.abs(got - want)))
    if logit_err > 1e-4:
        raise BenchmarkError(f"forward logits differ from torch by {logit_err:.2e} (> 1e-4)")
    ref.train()
    ref.zero_grad(set_to_none=True)
    loss_t = ref.forward_train(x, y)["loss"]
    loss_t.backward()
    loss_j, grads_j = bench.loss_and_grads(images, labels)
    loss_t, loss_j = loss_t.item(), float(loss_j)
    loss_err = abs(loss_j - loss_t) / abs(loss_t)
    if loss_err > 1e-4:
        raise BenchmarkError(f"loss {loss_j} vs torch {loss_t} (rel {loss_err:.1e})")
    grads_t = params_from_torch(
        {n: p.grad if p.grad is not None else torch.zeros_like(p) for n, p in
         ref.named_parameters()}, bench.model, bench.config,
    )  # fmt: skip
    errs = jax.tree.map(relative_error, jax.device_get(grads_j), grads_t)
    worst = max(jax.tree.leaves(errs))
    if worst > 1e-3:
        flat = jax.tree_util.tree_flatten_with_path(errs)[0]
        name = max(flat, key=lambda kv: kv[1])[0]
        raise BenchmarkError(f"gradient {jax.tree_util.keystr(name)} differs by {worst:.1e}")
    ref.zero_grad(set_to_none=True)
    return dict(max_logit_abs_err=logit_err, loss_rel_err=loss_err, max_grad_rel_err=worst)


# ---------------------------------------------------------------------------------- records


def base_record(args, config, kind: str, framework: str) -> dict:
    m = config.model
    return dict(
        benchmark=kind,
        framework=framework,
        variant=_variant(m),
        head=m.classifier,
        resolution=list(m.img_size),
        batch=config.batch_size,
        dtype=m.compute_dtype if framework == "jax" else "float32",
        attention=m.attention_impl if framework == "jax" else "sdpa",
        remat=m.remat if framework == "jax" else "none",
        threads=args.threads,
    )


def with_throughput(record: dict, timing: dict, batch: int, flops: float, peak) -> dict:
    step = timing["median_s"]
    achieved = flops * batch / step
    record.update(
        step_time_s=step,
        step_time_mean_s=timing["mean_s"],
        step_time_min_s=timing["min_s"],
        images_per_s=batch / step,
        model_tflops_per_step=flops * batch / 1e12,
        achieved_tflops_per_s=achieved / 1e12,
        mfu=None if peak is None else achieved / peak,
        timed_steps=timing["steps"],
    )
    return record


def jax_calls(args, config, bench: JaxBench, images, labels) -> dict:
    """{'train_step' / 'forward': (blocking callable, partial record)} of the JAX side."""
    import jax

    out = {}
    if not args.skip_train:
        batch = jax.device_put(dict(image=images, label=labels), bench.batch_sharding)
        step, compile_s, xla_flops = bench.compile_train(batch)
        holder = [bench.new_state()]

        def one():
            holder[0], metrics = step(holder[0], batch)
            jax.block_until_ready(metrics["loss"])

        rec = base_record(args, config, "train_step", "jax")
        rec.update(compile_s=compile_s, xla_cost_tflops_per_step=_tf(xla_flops))
        out["train_step"] = (one, rec)
    if not args.skip_forward:
        x = jax.device_put(images)
        fwd, compile_s, xla_flops = bench.compile_forward(x)
        rec = base_record(args, config, "forward", "jax")
        rec.update(compile_s=compile_s, xla_cost_tflops_per_step=_tf(xla_flops))
        out["forward"] = (lambda: jax.block_until_ready(fwd(bench.params, x)), rec)
    return out


def torch_calls(args, config, ref, images, labels) -> dict:
    """{'train_step' / 'forward': (callable, partial record)} of the PyTorch side."""
    import numpy as np
    import torch

    x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
    y = torch.from_numpy(labels.astype(np.int64))
    out = {}
    if not args.skip_train:
        opt = torch_optimizer(ref, config)

        def one():
            ref.train()
            opt.zero_grad(set_to_none=True)
            ref.forward_train(x, y)["loss"].backward()
            opt.step()

        out["train_step"] = (one, base_record(args, config, "train_step", "torch"))
    if not args.skip_forward:

        def fwd():
            ref.eval()
            with torch.no_grad():
                ref.encode_decode(x)

        out["forward"] = (fwd, base_record(args, config, "forward", "torch"))
    return out


def time_interleaved(fns: list, steps: int, warmup: int) -> list[dict]:
    """Time several callables in alternation (a, b, a, b, ...): on a shared, noisy machine
    both see the same background load, so their ratio is steadier than back-to-back runs."""
    import statistics

    for fn in fns:
        for _ in range(warmup):
            fn()
    times = [[] for _ in fns]
    for _ in range(steps):
        for fn, acc in zip(fns, times, strict=True):
            t0 = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - t0)
    return [
        dict(median_s=statistics.median(t), mean_s=statistics.fmean(t), min_s=min(t),
             steps=steps, warmup=warmup)
        for t in times
    ]  # fmt: skip


def _variant(m) -> str:
    """The ViT variant, or e.g. 'resnet101+aspp' for a conv family."""
    from rankseg_jax.models import registry

    if registry.is_multi_level(m):
        depth = m[m.encoder].get("depth", "") if m.encoder in m else ""
        return f"{m.encoder}{depth}+{m.decode_head}"
    return m.variant


def _xla_flops_per_image(mine: dict, batch: int) -> dict:
    """{'train_step' / 'forward': FLOPs per image} from XLA's cost analysis (conv families)."""
    return {
        kind: None if rec.get("xla_cost_tflops_per_step") is None
        else rec["xla_cost_tflops_per_step"] * 1e12 / batch
        for kind, (_, rec) in mine.items()
    }  # fmt: skip


def _tf(flops):
    return None if flops is None else flops / 1e12


# ------------------------------------------------------------------------------ UperNet rows


def uper_setup(args):
    """(model, optimizer config, loss settings, batch size, side) of a full-size UperNet row."""
    import jax.numpy as jnp

    from rankseg_jax import config as config_lib
    from rankseg_jax import recipes
    from rankseg_jax.models import uper

    swin = args.family == "upernet_swin"
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    remat = (args.remat or "none") != "none"
    build = uper.upernet_swin if swin else uper.upernet_beit
    model = build(150, args.uper_head, remat=remat, dtype=dtype)
    optimizer = dict(recipes.SWIN_OPTIMIZER if swin else recipes.BEIT_OPTIMIZER)
    if swin and args.uper_head == "rankseg":
        optimizer["lr_mult"] = recipes.SWIN_RANKSEG_LR_MULT
    iters, batch = recipes.UPERNET_LENGTH[("swin" if swin else "beit", "ade20k")]
    config = config_lib.with_defaults(
        dict(
            total_steps=iters,
            optimizer=optimizer,
            schedule=recipes.SWIN_SCHEDULE if swin else recipes.BEIT_SCHEDULE,
        )
    )
    with config.unlocked():
        config.model.decode_head = "uper"  # mmseg-layout param names (optim.py)
    loss = uper.SWIN_RANKSEG_LOSS if swin else uper.BEIT_RANKSEG_LOSS
    # The recipe's batch per update is 16 (BEiT: 8 per iteration × update_interval 2).
    batch = args.batch or 16
    side = args.resolution or (512 if swin else 640)
    return model, config, loss, batch, side


def uper_main(args) -> None:
    """Lower / compile / time the full UperNet training step; one JSON line."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from rankseg_jax import optim
    from rankseg_jax.models.deeplab import deeplab_loss_terms

    model, config, loss_config, batch, side = uper_setup(args)
    tx = optim.make_optimizer(config)
    images = jax.ShapeDtypeStruct((batch, side, side, 3), jnp.float32)
    labels = jax.ShapeDtypeStruct((batch, side, side), jnp.int32)
    variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, side, side, 3)))
    opt_state = jax.eval_shape(tx.init, variables["params"])
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables["params"]))

    def step(params, batch_stats, opt_state, images, labels, rng):
        def loss_fn(p):
            out, updated = model.apply(
                {"params": p, "batch_stats": batch_stats},
                images,
                True,
                mutable=["batch_stats"],
                rngs={"dropout": rng},
            )
            terms = deeplab_loss_terms(out, labels, 150, loss_config)
            return terms.total, updated["batch_stats"]

        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), stats, opt_state, loss

    jitted = jax.jit(step, donate_argnums=(0, 1, 2))
    rng = jax.ShapeDtypeStruct((2,), jnp.uint32)
    args_shapes = (variables["params"], variables["batch_stats"], opt_state, images, labels, rng)
    record = dict(
        benchmark="train_step",
        framework="jax",
        family=args.family,
        head=args.uper_head,
        resolution=[side, side],
        batch=batch,
        dtype=args.dtype or "float32",
        remat=args.remat or "none",
        params=n_params,
        **device_info(),
        **versions(),
    )
    t0 = time.perf_counter()
    lowered = jitted.lower(*args_shapes)
    record.update(
        lower_s=time.perf_counter() - t0, lowered_cost_tflops=_tf(cost_analysis_flops(lowered))
    )
    if args.lower_only:
        emit(record)
        return
    t0 = time.perf_counter()
    compiled = lowered.compile()
    record.update(
        compile_s=time.perf_counter() - t0,
        xla_cost_tflops_per_step=_tf(cost_analysis_flops(compiled)),
        **memory_analysis(compiled),
    )
    if args.memory_only:
        emit(dict(record, **device_peak_memory()))
        return
    rng_key = jax.random.key_data(jax.random.key(args.seed))
    data = np.random.default_rng(args.seed)
    x = jnp.asarray(data.uniform(-1, 1, images.shape), jnp.float32)
    y = jnp.asarray(data.integers(0, 150, labels.shape), jnp.int32)
    real = jax.jit(model.init)(jax.random.key(args.seed), jnp.zeros((1, side, side, 3)))
    holder = [real["params"], real["batch_stats"], jax.jit(tx.init)(real["params"])]

    def one():
        out = compiled(*holder, x, y, rng_key)
        holder[:] = out[:3]
        jax.block_until_ready(out[3])

    timing = time_interleaved([one], args.steps, args.warmup)[0]
    record.update(step_time_s=timing["median_s"], images_per_s=batch / timing["median_s"])
    if record["xla_cost_tflops_per_step"]:
        record["achieved_tflops_per_s"] = record["xla_cost_tflops_per_step"] / timing["median_s"]
    emit(dict(record, **device_peak_memory()))


def memory_analysis(compiled) -> dict:
    """XLA's buffer assignment of a compiled executable, GiB (None where not reported)."""
    try:
        mem = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - some backends raise instead of returning nothing
        mem = None
    if mem is None:
        return dict(hlo_peak_gb=None)
    gib = 2.0**30
    fields = dict(
        hlo_argument_gb=mem.argument_size_in_bytes / gib,
        hlo_output_gb=mem.output_size_in_bytes / gib,
        hlo_temp_gb=mem.temp_size_in_bytes / gib,
        hlo_alias_gb=mem.alias_size_in_bytes / gib,
        hlo_generated_code_gb=mem.generated_code_size_in_bytes / gib,
    )
    fields["hlo_peak_gb"] = (
        fields["hlo_argument_gb"]
        + fields["hlo_output_gb"]
        + fields["hlo_temp_gb"]
        - fields["hlo_alias_gb"]
    )
    return fields


def main(argv=None) -> None:
    args = parse_args(argv)
    cores = pin_cores(args.threads) if args.threads else None
    import jax  # noqa: F401 - after pinning, so XLA's pool sees the affinity mask

    if args.family != "segmenter":
        uper_main(args)
        return

    from rankseg_jax.flops import forward_flops
    from rankseg_jax.models import registry

    config = load_config(args)
    images, labels = synthetic_batch(config, args.seed)
    ref, check = None, None
    if args.compare_torch:
        import torch

        from rankseg_jax.models.segmenter import create_model

        torch.set_num_threads(args.threads or len(cores or [1]))
        torch.set_num_interop_threads(1)
        ref = torch_model(config, args.seed)
        params = params_from_torch(ref.state_dict(), create_model(config.model), config)
        bench = JaxBench(config, params)
        check = assert_equal_outputs(bench, ref, images, labels)
    else:
        bench = JaxBench(config)
    env = dict(cores=cores, **device_info(), **versions())
    peak = peak_flops(args)
    mine = jax_calls(args, config, bench, images, labels)
    if registry.is_multi_level(config.model):
        flops = _xla_flops_per_image(mine, config.batch_size)
    else:
        flops = forward_flops(config.model, tuple(config.model.img_size))
    theirs = {} if ref is None else torch_calls(args, config, ref, images, labels)
    for kind, (fn, rec) in mine.items():
        pair = [fn] + ([theirs[kind][0]] if kind in theirs else [])
        timings = time_interleaved(pair, args.steps, args.warmup)
        rec = with_throughput(rec, timings[0], config.batch_size, flops[kind], peak)
        emit(dict(rec, **device_peak_memory(), **env))
        if kind in theirs:
            other = with_throughput(theirs[kind][1], timings[1], config.batch_size, flops[kind],
                                    None)  # fmt: skip
            emit(dict(other, torch_threads=torch.get_num_threads(), **env))
            ratio = rec["images_per_s"] / other["images_per_s"]
            target = 1.0 if kind == "train_step" else 1.2
            emit(dict(benchmark=kind, comparison="jax_over_torch_images_per_s", ratio=ratio,
                      target=target, met=ratio >= target, equality_check=check))  # fmt: skip


if __name__ == "__main__":
    main()
