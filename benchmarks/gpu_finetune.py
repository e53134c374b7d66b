#!/usr/bin/env python
"""LoRA training step time and MFU of a Gemma-2-2B-sized model on one GPU (random weights).

    python benchmarks/gpu_finetune.py           # one NVIDIA GPU with jax[cuda]; a few minutes
    python benchmarks/gpu_finetune.py --smoke   # a tiny config on CPU: checks the script runs

Not yet run on a GPU: no figures are recorded in the README.

The model is get_preset("gemma2-2b") with random bf16 weights made on the device (one small
jitted normal per distinct weight shape; nothing of model size is built on the host); bf16
activations; LoRA rank 16 (f32 factors) on every projection. What is timed is gemma_kit.
finetune's own compiled optimizer step (Trainer.step: forward, chunked loss, gradients of the
LoRA factors, AdamW) on full rows of random tokens, best of --reps after a warm-up step.

MFU = model FLOPs per step / step time / the card's dense bf16 peak (table by device kind).
Model FLOPs of a LoRA step = 2 x the forward's (the forward, then the gradients with respect to
the activations; the frozen base needs no weight gradients): per token 2 per weight read
(output projection included, embedding lookup excluded) plus the attention as computed (T x T
scores and values per layer). The conventional full-fine-tuning count (3 x forward, "6N") is
printed beside it for comparison with other reports.
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
import time

from _log import log  # noqa: E402  (benchmarks/ is on sys.path)

# Dense bf16 peak FLOP/s by device kind (vendor figures, no sparsity). First match wins.
PEAK_TABLE = [
    (("H200",), 989e12, "H200 (989 TFLOP/s)"),
    (("H100", "PCIE"), 756e12, "H100 PCIe (756 TFLOP/s)"),
    (("H100",), 989e12, "H100 SXM (989 TFLOP/s)"),
    (("A100",), 312e12, "A100 (312 TFLOP/s)"),
    (("L4",), 121e12, "L4 (121 TFLOP/s)"),
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny config on CPU, end-to-end check")
    p.add_argument("--reps", type=int, default=5, help="timed steps (the best is kept)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument(
        "--shapes", default="8x1024,16x1024,4x2048", help="rows x tokens per step, comma-separated"
    )
    return p.parse_args(argv)


def peak_flops(kind: str):
    k = kind.upper()
    for needles, peak, label in PEAK_TABLE:
        if all(n in k for n in needles):
            return peak, label
    return None, "not in table"


def main(argv=None) -> int:
    args = parse_args(argv)
    import jax

    if args.smoke:
        jax.config.update("jax_platforms", "cpu")
    import jax.numpy as jnp
    from flax import nnx

    from gemma_kit.config import gemma2_layers, get_preset
    from gemma_kit.finetune import TrainConfig
    from gemma_kit.finetune.data import Dataset
    from gemma_kit.finetune.train import Trainer
    from gemma_kit.lora import apply_lora
    from gemma_kit.transformer import Transformer

    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    from bench_finetune import model_flops_per_token, synthetic_rows

    dev = jax.devices()[0]
    log(f"jax {jax.__version__}, device {dev.platform}: {dev.device_kind}")
    if args.smoke:
        config = get_preset("gemma2-2b").replace(
            name="gemma2-tiny",
            vocab_size=4096,
            embed_dim=64,
            hidden_dim=128,
            num_heads=2,
            num_kv_heads=1,
            head_dim=16,
            layers=gemma2_layers(2),
            query_pre_attn_scalar=16,
        )
        shapes: list[tuple[int, ...]] = [(2, 64), (4, 64)]  # (rows, tokens)
        args.reps = min(args.reps, 2)
    else:
        config = get_preset("gemma2-2b")
        shapes = [tuple(int(n) for n in s.split("x")) for s in args.shapes.split(",")]

    @functools.partial(jax.jit, static_argnames=("shape", "dtype"))
    def random_leaf(key, shape, dtype):
        return jax.random.normal(key, shape, dtype) * jnp.asarray(0.02, dtype)

    log(f"building {config.name} with random bf16 weights on the device")
    abstract = nnx.eval_shape(
        lambda: Transformer(config, param_dtype=jnp.bfloat16, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    )
    graphdef, state = nnx.split(abstract)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(0), len(leaves))
    arrays = jax.block_until_ready(
        [random_leaf(k, tuple(x.shape), jnp.dtype(x.dtype)) for k, x in zip(keys, leaves)]
    )
    model = nnx.merge(graphdef, jax.tree.unflatten(treedef, arrays))
    n_params = sum(x.size for x in arrays)
    apply_lora(model, args.rank, 2.0 * args.rank, "all")

    peak, peak_label = peak_flops(dev.device_kind)
    rows_out = []
    for batch, seq in shapes:
        tc = TrainConfig(
            train_file="-",
            out_dir="-",
            steps=1000,
            batch_size=batch,
            max_length=seq,
            lora_rank=args.rank,
            compute_dtype="bfloat16",
            progress=False,
        ).validate()
        trainer = Trainer(tc, model, steps=1000)
        data = Dataset(
            train=synthetic_rows(batch, seq, config.vocab_size),
            eval=None,
            stats={},
            fingerprint="synthetic",
        )
        step_batch = trainer.place(trainer.host_batch(data, 0), batch_axis=1)
        t = time.perf_counter()
        trainer.step(step_batch)
        log(f"{batch}x{seq}: compile + first step {time.perf_counter() - t:.1f} s")
        best = math.inf
        for _ in range(args.reps):
            t = time.perf_counter()
            trainer.step(step_batch)  # returns floats: waits for the step to finish
            best = min(best, time.perf_counter() - t)
        tokens = batch * seq
        fwd = model_flops_per_token(config, seq) * tokens
        rows_out.append((batch, seq, best, tokens / best, 2 * fwd / best, 3 * fwd / best))
        log(f"{batch}x{seq}: {best * 1e3:.1f} ms/step, {tokens / best:,.0f} tokens/s")
        del trainer

    print(
        f"\n### LoRA training step on {dev.device_kind} ({config.name}, random bf16 weights, "
        f"bf16 activations, LoRA rank {args.rank} on every projection)\n"
    )
    print(
        f"- jax {jax.__version__}; {n_params / 1e9:.3f} B base parameters; peak: "
        f"{peak_label}; best of {args.reps} steps after a warm-up\n"
    )
    print(
        "| rows x tokens | ms/step | tokens/s | model TFLOP/s (LoRA: 2x fwd) | MFU | "
        "MFU if counted as full fine-tuning (3x fwd) |"
    )
    print("|---|---|---|---|---|---|")
    for batch, seq, best, tps, lora_rate, full_rate in rows_out:
        mfu = f"{lora_rate / peak:.1%}" if peak else "n/a"
        mfu_full = f"{full_rate / peak:.1%}" if peak else "n/a"
        print(
            f"| {batch} x {seq} | {best * 1e3:.1f} | {tps:,.0f} | {lora_rate / 1e12:.1f} | "
            f"{mfu} | {mfu_full} |"
        )
    log("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
