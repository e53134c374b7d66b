#!/usr/bin/env python
"""Training tokens/s of LoRA on the embedded Gemma 3 270M on this CPU, at sequence length 512.

    python benchmarks/bench_finetune.py                 # ~5 min on 2 busy cores
    python benchmarks/bench_finetune.py --quick         # seq 128, 2 timed steps (~2 min)
    python benchmarks/bench_finetune.py --method qlora --compute bf16 --batch 2

What is timed is gemma_kit.finetune's own compiled optimizer step (Trainer.step: forward, loss in
chunks, gradients of the LoRA factors, AdamW), on full rows of random tokens (one example per
row, every position in the loss), after one warm-up step that compiles it. Each figure is the
best of --steps timed steps.

Same-run baselines, so that the ratios stay meaningful on a shared machine:
  * forward: the held-out loss of the same rows (Trainer.evaluate's compiled function), i.e. the
    forward pass alone. LoRA's step does the forward and the input gradients (no weight
    gradients for the frozen base), so about 2x the forward's matmul work: a train/forward time
    ratio near 2 means the backward pass costs what it should.
  * matmul: an f32 [T, 640] x [640, 16384] product timed in the same run, the machine's
    practical FLOP rate for this model's shapes; "of matmul" = model FLOP/s / that rate.
Model FLOPs per token (LoRA): 2 x (2 x weights read per token + attention as computed), the
output projection (640 x 262144) included; LoRA's own factors add < 2%.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time

from _log import log  # noqa: E402  (benchmarks/ is on sys.path)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq", type=int, default=512, help="tokens per row")
    p.add_argument("--batch", type=int, default=1, help="rows per step")
    p.add_argument("--steps", type=int, default=3, help="timed steps (the best is kept)")
    p.add_argument("--method", default="lora", choices=["lora", "qlora"])
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--compute", default="f32", choices=["f32", "bf16"], help="activation dtype")
    p.add_argument(
        "--weights",
        default="bf16",
        choices=["f32", "bf16"],
        help="dtype the frozen base is held in (bf16 as stored, or upcast once)",
    )
    p.add_argument("--quick", action="store_true", help="seq 128, 2 timed steps")
    return p.parse_args(argv)


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def synthetic_rows(batch: int, seq: int, vocab: int, seed: int = 0):
    """Full rows of random tokens, one example per row, every target in the loss."""
    import numpy as np

    from gemma_kit.finetune.data import Rows

    rng = np.random.default_rng(seed)
    tokens = rng.integers(1000, vocab, (batch, seq + 1)).astype(np.int32)
    return Rows(
        tokens[:, :-1],
        tokens[:, 1:],
        np.ones((batch, seq), np.float32),
        np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy(),
        np.ones((batch, seq), np.int32),
    )


def model_flops_per_token(config, seq: int) -> float:
    """Forward matmul FLOPs per token: 2 per weight read (embedding lookup excluded, output
    projection included) plus the attention as computed (T x T scores and values)."""
    D, F, N, K, H = (
        config.embed_dim,
        config.hidden_dim,
        config.num_heads,
        config.num_kv_heads,
        config.head_dim,
    )
    per_layer = N * D * H + 2 * K * D * H + N * H * D + 3 * D * F
    weights = config.num_layers * per_layer + config.vocab_size * D
    attention = config.num_layers * 2 * 2 * N * H * seq
    return 2 * weights + attention


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.quick:
        args.seq, args.steps = 128, 2
    import jax
    import jax.numpy as jnp

    import gemma_kit
    from gemma_kit.finetune import TrainConfig
    from gemma_kit.finetune.data import Dataset
    from gemma_kit.finetune.train import Trainer, build_model

    load_start = os.getloadavg()[0]
    log(f"jax {jax.__version__} on {cpu_name()}, {os.cpu_count()} cores, load {load_start:.1f}")
    config = TrainConfig(
        train_file="-",
        out_dir="-",
        steps=1000,
        method=args.method,
        lora_rank=args.rank,
        batch_size=args.batch,
        max_length=args.seq,
        compute_dtype=args.compute,
        param_dtype=args.weights,
        progress=False,
    ).validate()
    base, tokenizer = gemma_kit.default_model(jnp.float32 if args.weights == "f32" else None)
    model, _, _ = build_model(config, base, tokenizer)
    trainer = Trainer(config, model, steps=1000)
    rows = synthetic_rows(args.batch, args.seq, model.config.vocab_size)
    data = Dataset(train=rows, eval=rows, stats={}, fingerprint="synthetic")
    batch = trainer.place(trainer.host_batch(data, 0), batch_axis=1)
    tokens = args.batch * args.seq

    t = time.perf_counter()
    trainer.step(batch)
    log(f"training step: compile + first call {time.perf_counter() - t:.1f} s")
    best_train = math.inf
    for i in range(args.steps):
        t = time.perf_counter()
        trainer.step(batch)
        best_train = min(best_train, time.perf_counter() - t)
        log(f"training step {i + 1}: {time.perf_counter() - t:.2f} s")

    t = time.perf_counter()
    trainer.evaluate(data)
    log(f"forward: compile + first call {time.perf_counter() - t:.1f} s")
    best_fwd = math.inf
    for _ in range(args.steps):
        t = time.perf_counter()
        trainer.evaluate(data)
        best_fwd = min(best_fwd, time.perf_counter() - t)

    a = jnp.ones((args.seq, 640), jnp.float32)
    b = jnp.ones((640, 16384), jnp.float32)
    mm = jax.jit(lambda x, y: x @ y)
    mm(a, b).block_until_ready()
    best_mm = math.inf
    for _ in range(5):
        t = time.perf_counter()
        mm(a, b).block_until_ready()
        best_mm = min(best_mm, time.perf_counter() - t)
    mm_rate = 2 * args.seq * 640 * 16384 / best_mm

    fwd_flops = model_flops_per_token(model.config, args.seq) * tokens
    train_flops = 2 * fwd_flops  # forward + input gradients; the base gets no weight gradients
    load_end = os.getloadavg()[0]
    print(f"\n### LoRA fine-tuning on {cpu_name()} ({os.cpu_count()} cores)\n")
    print(
        f"- gemma3-270m, {args.weights} weights ({args.method}, rank {args.rank}, every "
        "projection), "
        f"{args.compute} activations; {args.batch} x {args.seq} tokens per step; jax "
        f"{jax.__version__}; load average {load_start:.1f} at start, {load_end:.1f} at end"
    )
    print(
        f"- {trainer.trainable_count:,} trainable parameters; best of {args.steps} steps after "
        "a warm-up\n"
    )
    print("| what | time per step | tokens/s | model GFLOP/s | of matmul rate |")
    print("|---|---|---|---|---|")
    print(
        f"| training step (LoRA) | {best_train:.2f} s | {tokens / best_train:.1f} | "
        f"{train_flops / best_train / 1e9:.1f} | {train_flops / best_train / mm_rate:.0%} |"
    )
    print(
        f"| forward only (same rows) | {best_fwd:.2f} s | {tokens / best_fwd:.1f} | "
        f"{fwd_flops / best_fwd / 1e9:.1f} | {fwd_flops / best_fwd / mm_rate:.0%} |"
    )
    print(
        f"| f32 matmul [{args.seq},640]x[640,16384] | {best_mm * 1e3:.1f} ms | | "
        f"{mm_rate / 1e9:.1f} | 100% |"
    )
    print(
        f"\ntrain / forward time: {best_train / best_fwd:.2f} (about 2 expected: the forward "
        "plus the input gradients)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
