#!/usr/bin/env python
"""A distillation step against the SFT step, and rollouts against Sampler.generate, same run.

    python benchmarks/bench_distill.py                     # 4 x 128 tokens, 3 rounds (~8 min)
    python benchmarks/bench_distill.py --student runs/distill_pydoc/student --rounds 2
    python benchmarks/bench_distill.py --chunk 256         # every variant at one chunk size

Everything is timed in one process, in interleaved rounds (every other one in reverse order;
the best of each), so the ratios hold on a shared machine:

- training steps (gemma_kit.training.Trainer.step, whole compiled optimizer steps on the same
  rows of CPython's reference text, LoRA rank 16 on every projection of the student):
  SFT (the fine-tuning loss, CrossEntropy), KD (DistillLoss, forward KL and JSD(0.5) over
  the full vocabulary: the student's forward and backward plus the teacher's forward, both
  chunked), and KD from offline sampled top-K targets (K = 256 read from the batch: no
  teacher); tokens/s = rows x length / seconds. Target: the KD step <= 1.5x the SFT step
  at the same chunk size; also shown against SFT at finetune's own chunk size.
- rollouts (gemma_kit.posttrain.rollout, what an on-policy step draws) against
  Sampler.generate at temperature 1 on the same batch, stop ids off (every row runs to the
  end); tokens/s = rows x new tokens / seconds. Target: within 10% of generate.

The teacher is the embedded Gemma 3 270M; the student is the 270M itself (default) or a
checkpoint folder (e.g. one `gemma-kit shrink` wrote).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "posttrain"))

from _log import log  # noqa: E402  (benchmarks/ is on sys.path)

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--student", default=None, help="student checkpoint folder (default: the 270M)")
p.add_argument("--rows", type=int, default=4, help="rows per training step (default 4)")
p.add_argument("--length", type=int, default=128, help="tokens per row (default 128)")
p.add_argument("--prompts", type=int, default=8, help="rollout rows (default 8)")
p.add_argument("--new", type=int, default=32, help="new tokens per rollout row (default 32)")
p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
p.add_argument(
    "--chunk",
    type=int,
    default=None,
    help="positions per logits chunk of every variant (default: each config's own, "
    "distill 128, finetune 1024; SFT is then timed at both)",
)
ARGS = p.parse_args()

import jax  # noqa: E402
import numpy as np  # noqa: E402
from distill_common import machine  # noqa: E402

import gemma_kit  # noqa: E402
from gemma_kit.finetune.data import Example, pack  # noqa: E402
from gemma_kit.lora import apply_lora  # noqa: E402
from gemma_kit.posttrain import losses  # noqa: E402
from gemma_kit.posttrain.distill import DistillLoss, reduction_weights, same_rows  # noqa: E402
from gemma_kit.posttrain.distill_config import DistillConfig  # noqa: E402
from gemma_kit.posttrain.rollout import rollout  # noqa: E402
from gemma_kit.training import CrossEntropy, Trainer, micro_batches  # noqa: E402
from gemma_kit.training.config import TrainConfig  # noqa: E402

PROMPTS = [
    "The for statement is used to",
    "A class definition",
    "The try statement",
    "Assignment statements are used to",
    "The with statement",
    "Function definitions",
    "The while statement",
    "An if statement",
]


def text_rows(tokenizer, rows: int, length: int) -> dict[str, np.ndarray]:
    """`rows` full rows of `length` tokens of CPython's reference text (every target counts)."""
    import pydoc_data.topics

    text = "\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))
    ids = tokenizer.encode(text[:200_000], add_bos=False)
    examples = [
        Example(
            np.asarray([tokenizer.bos_id] + ids[i * length : (i + 1) * length], np.int32),
            np.ones(length + 1, bool),
            "pydoc",
        )
        for i in range(rows)
    ]
    packed = pack(examples, length, packing=False)
    return packed.take(np.arange(rows))


def main():
    args = ARGS
    load = os.getloadavg()[0]
    teacher, tok = gemma_kit.default_model()
    student = gemma_kit.load_model(args.student) if args.student else gemma_kit.default_model()[0]
    apply_lora(student, rank=16, alpha=32.0)
    kd_chunk = args.chunk or DistillConfig.loss_chunk
    sft_chunks = [kd_chunk]
    if args.chunk is None and TrainConfig.loss_chunk != kd_chunk:
        sft_chunks.append(TrainConfig.loss_chunk)
    config = DistillConfig(
        teacher="default",
        train_file="-",
        out_dir="-",
        steps=100,
        batch_size=args.rows,
        learning_rate=1e-4,
        loss_chunk=kd_chunk,
        lmbda=0.0,
    ).validate()
    rows = same_rows(text_rows(tok, args.rows, args.length), args.length, args.length)
    rows["loss_weights"], rows["normaliser"] = reduction_weights(
        rows["weights"], rows["segments"], "token-mean"
    )
    K = 256
    rng = np.random.default_rng(0)
    topk_ids = rng.integers(
        0, teacher.config.vocab_size, (args.rows, args.length, K), dtype=np.int32
    )
    topk_probs = rng.dirichlet(np.ones(K), (args.rows, args.length)).astype(np.float32)
    from flax import nnx

    t_graphdef, t_state = nnx.split(teacher)
    teacher_values = {"teacher": nnx.to_pure_dict(t_state)}
    variants = {f"SFT (CrossEntropy), chunk {c}": (CrossEntropy(c), None, {}) for c in sft_chunks}
    for name, div in (
        ("forward KL", losses.Divergence("forward_kl")),
        ("JSD(0.5)", losses.Divergence("jsd", beta=0.5)),
    ):
        variants[f"KD, {name} (full vocabulary)"] = (
            DistillLoss(div, teacher=t_graphdef, chunk=kd_chunk),
            teacher_values,
            {},
        )
    variants[f"KD, offline sampled top-{K} (no teacher)"] = (
        DistillLoss(topk=K, offline=True, chunk=kd_chunk),
        None,
        dict(topk_ids=topk_ids, topk_probs=topk_probs),
    )
    trainers = {}
    for name, (loss, frozen, extra) in variants.items():
        trainer = Trainer(config, student, 100, loss)
        batch = micro_batches({**rows, **extra}, 1)
        placed = trainer.place(batch, batch_axis=1)
        frozen = trainer.place_frozen(frozen)
        t = time.perf_counter()
        trainer.step(placed, frozen)
        log(f"compile + first step, {name}: {time.perf_counter() - t:.1f} s")
        trainers[name] = (trainer, placed, frozen)

    sampler = gemma_kit.Sampler(student, tok)
    batch_prompts = (PROMPTS * (args.prompts // len(PROMPTS) + 1))[: args.prompts]

    def do_rollout():
        out = rollout(sampler, batch_prompts, 1, args.new, seed=0, step=0, stop_token_ids=())
        assert out.completion_mask.all()

    def do_generate():
        out = sampler.generate(
            batch_prompts, max_new_tokens=args.new, temperature=1.0, stop_token_ids=()
        )
        assert all(len(r.tokens) == args.new for r in out)

    pieces = {name: (lambda t=t: t[0].step(t[1], t[2])) for name, t in trainers.items()}
    pieces.update(
        {"rollout (temperature 1)": do_rollout, "Sampler.generate (temperature 1)": do_generate}
    )
    for name in ("rollout (temperature 1)", "Sampler.generate (temperature 1)"):
        pieces[name]()  # compiles
    best: dict[str, float] = {}
    for r in range(args.rounds):
        for name, fn in list(pieces.items()) if r % 2 == 0 else list(pieces.items())[::-1]:
            t = time.perf_counter()
            fn()
            best[name] = min(best.get(name, math.inf), time.perf_counter() - t)
        log(f"round {r + 1} done")

    print(
        f"\nDistillation benchmark: {machine()}, {jax.default_backend()}; load {load:.1f} at "
        f"start, {os.getloadavg()[0]:.1f} at end (a shared machine); {args.rounds} "
        "interleaved rounds, best of each"
    )
    print(
        f"student {student.config.name} + LoRA r16 (all projections), teacher "
        f"{teacher.config.name}; weights bf16, compute f32; KD logits chunks of {kd_chunk}\n"
    )
    tokens = args.rows * args.length
    sft = best[f"SFT (CrossEntropy), chunk {kd_chunk}"]
    sft_own = best[f"SFT (CrossEntropy), chunk {sft_chunks[-1]}"]
    print(
        f"training step, {args.rows} rows x {args.length} tokens "
        f"{'seconds':>22} {'tokens/s':>9} {'vs SFT step':>12}"
    )
    for name in trainers:
        print(f"  {name:52} {best[name]:8.2f} {tokens / best[name]:9.1f} {best[name] / sft:11.2f}x")
    gen = best["Sampler.generate (temperature 1)"]
    new = args.prompts * args.new
    print(
        f"\nsampling, {args.prompts} rows x {args.new} new tokens{'':17} {'seconds':>8} "
        f"{'tokens/s':>9} {'vs generate':>12}"
    )
    for name in ("rollout (temperature 1)", "Sampler.generate (temperature 1)"):
        print(f"  {name:52} {best[name]:8.2f} {new / best[name]:9.1f} {gen / best[name]:11.2f}x")
    kd = best["KD, forward KL (full vocabulary)"] / sft
    ro = gen / best["rollout (temperature 1)"]
    print(
        f"\ntargets: KD step <= 1.5x the SFT step (chunk {kd_chunk} both): {kd:.2f}x "
        f"({'met' if kd <= 1.5 else 'NOT met'}); rollouts within 10% of generate: "
        f"{ro:.2f}x ({'met' if ro >= 0.9 else 'NOT met'})"
    )
    if len(sft_chunks) > 1:
        print(
            f"against SFT at finetune's chunk {sft_chunks[-1]}: KD forward KL "
            f"{best['KD, forward KL (full vocabulary)'] / sft_own:.2f}x, JSD(0.5) "
            f"{best['KD, JSD(0.5) (full vocabulary)'] / sft_own:.2f}x"
        )


if __name__ == "__main__":
    main()
