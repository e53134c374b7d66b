#!/usr/bin/env python
"""CPU throughput of gemma_kit's Sampler on the embedded Gemma 3 270M, against transformers.

    python benchmarks/bench_sampler.py              # full run (~10 min on 2 busy cores)
    python benchmarks/bench_sampler.py --quick      # smoke test: batch 1, few tokens, one round
    python benchmarks/bench_sampler.py --markdown   # tables as markdown
    python benchmarks/bench_sampler.py --breakdown  # also time the pieces of one decode step

Everything is measured in one process, in rounds: each round visits every configuration once
(gemma_kit bf16 and f32 weights, transformers f32, and the bandwidth probe), and each number is
the minimum over the rounds. On a shared machine the speed drifts; visiting everything in every
round keeps the ratios, which are what to quote, fair.

Decode tokens/s: Sampler.generate (the compiled while_loop path, greedy, stop_token_ids=() so
<eos> cannot end a row early) is timed at max_new_tokens = 1 and 1 + D after warm-up calls that
compile both; the difference is D decode steps, so prefill, host work and per-call overhead
cancel. The cache length is fixed, so both calls run the same step program and the per-step
cost does not depend on D. transformers is timed the same way, generate(do_sample=False,
min_new_tokens=N, max_new_tokens=N) with its KV cache, on the same token ids.

Prefill tokens/s: generate(max_new_tokens=1) on a 512-token prompt at batch 1 (the prefill
program and the first token's logits and sampling).

Roofline: a decode step reads every weight once (the 168M-parameter tied embedding included,
in the stored dtype) and every row's whole KV cache. Divided by the matrix-vector bandwidth
measured in the same rounds (f32 x[1, 640] @ E[262144, 640]^T under XLA, a product that does
little but read memory), that gives the fastest step this machine allows now; the table
shows each measured gemma_kit step against it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import math
import os
import platform
import sys
import time

from _common import (
    BandwidthProbe,
    Decode,
    core_count,
    cpu_model,
    fmt_rate,  # noqa: E402
    fmt_ratio,
    jax_generate,
    table,
)
from _log import T0, log  # noqa: E402  (benchmarks/ is on sys.path)

# The gemma_kit weight configurations: default_model's dtype (None: as stored, bf16) and, for
# the quantized ones, the quantize_model arguments applied to that model: int8 = every matrix
# (`gemma-kit sample --int8`), int8-emb = the tied embedding alone, int4 = int4 layers and an
# int8 table (`--int4`, llama.cpp's Q4_0 split), int4-all = every matrix int4.
WEIGHTS = {
    "bf16": (None, None),
    "f32": ("float32", None),
    "int8": (None, dict(embedding=True)),
    "int8-emb": (None, dict(embedding=True, einsums=False)),
    "int4": (None, dict(embedding=True, bits=4, embedding_bits=8)),
    "int4-all": (None, dict(embedding=True, bits=4)),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--quick", action="store_true", help="smoke test: batch 1 only, 16 decode steps, one round"
    )
    p.add_argument("--markdown", action="store_true", help="print the tables as markdown")
    p.add_argument(
        "--breakdown",
        action="store_true",
        help="also time extend / logits / sampling of one decode step",
    )
    p.add_argument("--batches", default=None, help="decode batch sizes (default 1,8,16)")
    p.add_argument(
        "--hf-batches",
        default=None,
        help="transformers batch sizes (default: the same as --batches)",
    )
    p.add_argument(
        "--dtypes",
        default="bf16,f32,int8,int8-emb",
        help="gemma_kit weights: bf16, f32, int8 (every matrix), int8-emb (the "
        "embedding alone), int4 (int4 layers, int8 table), int4-all; the quantized ones at "
        "batch 1 only, their use",
    )
    p.add_argument(
        "--decode-steps",
        type=int,
        default=None,
        help="timed decode steps D per configuration (default 48, quick 16)",
    )
    p.add_argument("--rounds", type=int, default=None, help="most rounds (default 3, quick 1)")
    p.add_argument(
        "--budget",
        type=float,
        default=540.0,
        help="seconds: no new round starts if it would end after this (>= 1 round)",
    )
    p.add_argument("--no-hf", action="store_true", help="skip transformers")
    args = p.parse_args(argv)
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    args.batches = ints(args.batches) if args.batches else ([1] if args.quick else [1, 8, 16])
    args.hf_batches = (
        []
        if args.no_hf
        else (ints(args.hf_batches) if args.hf_batches is not None else list(args.batches))
    )
    args.dtypes = [d for d in args.dtypes.split(",") if d]
    unknown = [d for d in args.dtypes if d not in WEIGHTS]
    if unknown or not args.dtypes:
        p.error(f"--dtypes: unknown {unknown or 'empty list'}; choose from {', '.join(WEIGHTS)}")
    if args.decode_steps is None:
        args.decode_steps = 16 if args.quick else 48
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    return args


ARGS = parse_args()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

import gemma_kit  # noqa: E402
from gemma_kit import Sampler, quant  # noqa: E402
from gemma_kit import cache as kv_cache  # noqa: E402
from gemma_kit.paths import default_gguf_path  # noqa: E402

PROMPT = "The quick brown fox jumps over the lazy dog. Once upon a time, in a land far away,"
PARAGRAPH = (
    "The history of computing is a story of abstraction. Early machines were programmed by "
    "rewiring panels; later ones read instructions from punched cards, then from magnetic "
    "memory. Each step let people describe what they wanted at a higher level and leave the "
    "details to the machine. "
)
PREFILL_LEN = 512
CACHE_LEN = 256  # fixed cache length of the decode samplers (prompt + 1 + D must fit)


# ----------------------------------------------------------------------------------------------
# Machine and helpers.


def exact_prompt(tok, n: int) -> str:
    """A text of whole words that encodes to n tokens, <bos> included (or just under)."""
    words = (PARAGRAPH * (n // 8 + 1)).split()
    count = lambda k: len(tok.encode(" ".join(words[:k]), add_bos=True))  # noqa: E731
    lo, hi = 1, len(words)  # largest k with count(k) <= n
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if count(mid) <= n else (lo, mid - 1)
    return " ".join(words[:lo])


# ----------------------------------------------------------------------------------------------
# Configurations. Each has warm() (compiles, run once before the rounds) and measure() (one
# round); the best times are kept.


@dataclasses.dataclass
class Prefill:
    engine: str
    dtype: str
    tokens: int
    generate: object  # () -> None (blocks)
    best: float = math.inf

    @property
    def label(self):
        return f"{self.engine} {self.dtype} prefill {self.tokens}"

    def warm(self):
        self.generate()

    def measure(self):
        t = time.perf_counter()
        self.generate()
        self.best = min(self.best, time.perf_counter() - t)

    @property
    def rate(self) -> float:
        return self.tokens / self.best


def hf_generate(model, ids: list[int], batch: int):
    import torch

    x = torch.tensor([ids] * batch, dtype=torch.long)
    mask = torch.ones_like(x)

    def generate(n):
        with torch.inference_mode():
            out = model.generate(
                input_ids=x,
                attention_mask=mask,
                do_sample=False,
                min_new_tokens=n,
                max_new_tokens=n,
                use_cache=True,
                pad_token_id=0,
            )
        return out[:, x.shape[1] :].tolist()

    return generate


def load_transformers():
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(core_count())
    path = default_gguf_path()
    captured = io.StringIO()  # the GGUF loader's progress bars; shown only if loading fails
    try:
        with contextlib.redirect_stderr(captured):
            model = transformers.AutoModelForCausalLM.from_pretrained(
                path.parent, gguf_file=path.name, dtype=torch.float32
            ).eval()
    except Exception:
        print(captured.getvalue()[-4000:], file=sys.stderr)
        raise
    gc = model.generation_config  # greedy: drop sampling settings the GGUF may carry
    gc.do_sample, gc.temperature, gc.top_k, gc.top_p = False, None, None, None
    return model


# ----------------------------------------------------------------------------------------------
# Breakdown of one decode step (optional): the pieces the while_loop body runs, each jitted
# alone (the compiled pieces of gemma_kit.decode and the Sampler's public building blocks).


def breakdown(model, tok, batch: int, rounds: int, calls: int = 5, loop_steps: int = 8):
    """Best seconds of each piece of a decode step, timed in interleaved rounds."""
    from gemma_kit import decode

    s = Sampler(model, tok, cache_length=CACHE_LEN)
    settings = s.settings(64, stop_token_ids=())
    state0 = s.start(s.encode([PROMPT] * batch), settings, 0)  # step 1: the prefill's token
    graphdef, params = s.graphdef, s.arrays
    fresh = lambda: jax.block_until_ready(jax.tree.map(jnp.copy, state0))  # noqa: E731
    tokens, positions = state0.token[:, None], state0.position[:, None]

    ext = jax.jit(lambda p, t, q, c: nnx.merge(graphdef, p).extend(t, q, c), donate_argnums=3)
    lgt = jax.jit(lambda p, h: nnx.merge(graphdef, p).logits(h)[:, 0])
    cho = jax.jit(lambda logits, key: decode.choose(settings, logits, key))
    emb = jax.jit(lambda p, t: nnx.merge(graphdef, p).embedder.encode(t, model.dtype))
    key = jax.random.key(0)
    box = dict(state=fresh(), cache=fresh().cache)

    def repeated(f):
        def run():
            t = time.perf_counter()
            for _ in range(calls):
                y = f()
            jax.block_until_ready(y)
            return (time.perf_counter() - t) / calls

        return run

    def step():
        box["state"] = decode.decode_step(params, box["state"], settings=settings)
        return box["state"].token

    def extend():
        hidden, box["cache"] = ext(params, tokens, positions, box["cache"])
        return hidden

    def loop(limit):  # one call of the compiled while_loop from a fresh copy of the state
        def run():
            st = fresh()
            t = time.perf_counter()
            jax.block_until_ready(
                decode.decode_loop(params, st, jnp.int32(limit), settings=settings).token
            )
            return time.perf_counter() - t

        return run

    hidden = extend()
    logits = lgt(params, hidden)
    pieces = {
        "step alone (decode_step, the streaming path)": repeated(step),
        "  extend (embed + 18 blocks + norm, cache write)": repeated(extend),
        "    embedding lookup only": repeated(lambda: emb(params, tokens)),
        "  logits projection": repeated(lambda: lgt(params, hidden)),
        "  greedy choice + log-prob": repeated(lambda: cho(logits, key)),
        "while_loop call, 0 steps (entry cost)": loop(1),
        f"while_loop call, {loop_steps} steps": loop(1 + loop_steps),
    }
    best = {k: math.inf for k in pieces}
    for run in pieces.values():
        run()  # compile
    for _ in range(rounds):
        for name, run in pieces.items():
            best[name] = min(best[name], run())
    entry = best["while_loop call, 0 steps (entry cost)"]
    best["while_loop, per step"] = (best.pop(f"while_loop call, {loop_steps} steps") - entry) / (
        loop_steps
    )
    return best


# ----------------------------------------------------------------------------------------------


def main():
    args = ARGS
    load_start = os.getloadavg()
    D = args.decode_steps
    log(f"{cpu_model()}, {core_count()} cores; jax {jax.__version__}; load {load_start[0]:.1f}")

    models, weight_bytes, configs = {}, {}, []
    tok = None
    for name in args.dtypes:
        dtype, quantize = WEIGHTS[name]
        model, tok = gemma_kit.default_model(dtype and jnp.dtype(dtype))
        n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
        if quantize:
            model = quant.quantize_model(model, **quantize)
        models[name] = model
        weight_bytes[name] = quant.weight_bytes(model)
    cfg = models[args.dtypes[0]].config
    prompt_ids = tok.encode(PROMPT, add_bos=True)
    assert len(prompt_ids) + 1 + D <= CACHE_LEN, "raise CACHE_LEN"
    long_prompt = exact_prompt(tok, PREFILL_LEN)
    long_ids = tok.encode(long_prompt, add_bos=True)
    log(f"prompts: decode {len(prompt_ids)} tokens, prefill {len(long_ids)} tokens")

    probe = BandwidthProbe()
    configs.append(probe)
    for name in args.dtypes:
        dec = Sampler(models[name], tok, cache_length=CACHE_LEN)
        # int8 serves one-prompt decoding: with several rows XLA's CPU backend dequantizes each
        # whole weight per step before its bf16 matrix product, slower than bf16 weights.
        for B in [b for b in args.batches if not WEIGHTS[name][1] or b == 1]:
            configs.append(Decode("gemma_kit", name, B, jax_generate(dec, PROMPT, B), D))
        pre = Sampler(models[name], tok)

        def prefill(pre=pre):
            pre.generate(long_prompt, max_new_tokens=1, stop_token_ids=())

        configs.append(Prefill("gemma_kit", name, len(long_ids), prefill))

    hf = None
    if args.hf_batches:
        log("loading transformers' model from the GGUF (f32)")
        hf = load_transformers()
        for B in args.hf_batches:
            configs.append(
                Decode("transformers", "f32", B, hf_generate(hf, prompt_ids, B), D, compiled=False)
            )
        hf_pre = hf_generate(hf, long_ids, 1)
        configs.append(Prefill("transformers", "f32", len(long_ids), lambda: hf_pre(1)))

    for c in configs:
        t = time.perf_counter()
        c.warm()
        log(f"warm-up (compile) {c.label}: {time.perf_counter() - t:.1f} s")

    rounds_done, round_time = 0, 0.0
    while rounds_done < args.rounds:
        elapsed = time.perf_counter() - T0
        if rounds_done and elapsed + round_time > args.budget:
            log(f"stopping after {rounds_done} round(s): another would pass --budget")
            break
        t = time.perf_counter()
        for c in configs:
            c.measure()
        round_time = time.perf_counter() - t
        rounds_done += 1
        log(f"round {rounds_done} done in {round_time:.1f} s")

    # ------------------------------------------------------------------------------------------
    decodes = [c for c in configs if isinstance(c, Decode)]
    prefills = [c for c in configs if isinstance(c, Prefill)]
    hf_dec = {c.batch: c for c in decodes if c.engine == "transformers"}
    hf_pre = next((c for c in prefills if c.engine == "transformers"), None)
    bw = probe.bandwidth
    md = args.markdown
    load_end = os.getloadavg()

    import flax

    versions = f"jax {jax.__version__}, flax {flax.__version__}"
    if hf is not None:
        import torch
        import transformers

        versions += (
            f", torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"transformers {transformers.__version__} "
            f"(attention: {hf.config._attn_implementation})"
        )
    title = "gemma_kit Sampler vs transformers, Gemma 3 270M, CPU"
    print(f"\n## {title}\n" if md else f"\n{title}\n")
    bullets = [
        f"machine: {cpu_model()}, {core_count()} cores (os.cpu_count {os.cpu_count()}); "
        f"load average {load_start[0]:.1f} at start, {load_end[0]:.1f} at end",
        f"python {platform.python_version()}, {versions}",
        f"{rounds_done} round(s), best of each; decode: prompt {len(prompt_ids)} tokens, "
        f"D = {D} steps = generate(1 + D) - generate(1), gemma_kit cache fixed at {CACHE_LEN} "
        "slots (bf16); greedy, no early stop",
        f"prefill: a {len(long_ids)}-token prompt at batch 1, generate(max_new_tokens=1)",
    ]
    if load_start[0] > 0.5 * core_count():  # before our own work: the others
        bullets.append(
            "WARNING: the machine was busy (load average at start above): every number is low "
            "and noisy, and the ratios are less reliable too, since torch's OpenMP threads and "
            "XLA's thread pool do not slow down alike when the cores are shared. Re-run on a "
            "quiet machine before quoting them."
        )
    print("\n".join(("- " if md else "  ") + b for b in bullets) + "\n")

    rows = []
    for c in decodes:
        base = hf_dec.get(c.batch)
        rows.append(
            [
                c.engine,
                c.dtype,
                c.batch,
                fmt_rate(c.rate),
                f"{c.step_time * 1e3:.1f}",
                f"{c.t1 * 1e3:.0f}",
                fmt_ratio(c.rate / base.rate) if base else "n/a",
            ]
        )
    print(
        table(
            [
                "decode",
                "weights",
                "batch",
                "tokens/s",
                "ms/step",
                "generate(1) ms",
                "vs transformers f32 (same batch)",
            ],
            rows,
            md,
        )
    )
    print()
    rows = [
        [
            c.engine,
            c.dtype,
            c.tokens,
            fmt_rate(c.rate),
            f"{c.best * 1e3:.0f}",
            fmt_ratio(c.rate / hf_pre.rate) if hf_pre else "n/a",
        ]
        for c in prefills
    ]
    print(
        table(
            ["prefill", "weights", "prompt tokens", "tokens/s", "ms", "vs transformers f32"],
            rows,
            md,
        )
    )
    print()

    # Every step reads all weights once and every row's whole KV cache (all slots: shapes are
    # static, so empty slots are read too).
    kv = jax.eval_shape(lambda: kv_cache.init_cache(cfg, 1, CACHE_LEN, jnp.bfloat16))
    kv_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(kv))
    rows = []
    for c in decodes:
        if c.engine == "gemma_kit":
            nbytes = weight_bytes[c.dtype] + kv_bytes * c.batch
            roof = nbytes / bw
            rows.append(
                [
                    f"gemma_kit {c.dtype} B={c.batch}",
                    f"{nbytes / 1e6:.0f}",
                    f"{roof * 1e3:.1f}",
                    f"{c.step_time * 1e3:.1f}",
                    f"{roof / c.step_time:.0%}",
                ]
            )
    print(
        f"Bandwidth roofline: {n_params / 1e6:.0f}M parameters and the KV cache "
        f"({kv_bytes / 1e6:.1f} MB per row, {CACHE_LEN} slots) read once per step; probe "
        f"bandwidth {bw / 2**30:.1f} GiB/s (f32 [1,640]x[640,262144] under XLA, "
        f"{probe.best * 1e3:.1f} ms; best of the rounds).\n"
    )
    print(
        table(
            ["config", "MB read/step", "roofline ms/step", "measured ms/step", "of roofline"],
            rows,
            md,
        )
    )

    by = {(c.engine, c.dtype, c.batch): c for c in decodes}
    ref = by.get(("transformers", "f32", 1))
    notes = []
    for name in args.dtypes:
        ours = by.get(("gemma_kit", name, 1))
        if ref and ours and ref.first_row and ours.first_row:
            same = 0
            for a, b in zip(ref.first_row, ours.first_row):
                if a != b:
                    break
                same += 1
            notes.append(
                f"greedy tokens, gemma_kit {name} vs transformers f32 (batch 1): the "
                f"first {same} of {len(ref.first_row)} agree"
            )
    if notes:
        print()
        print("\n".join(("- " if md else "  ") + n for n in notes))

    if args.breakdown:
        print()
        print(
            "Decode-step breakdown, best of 3 interleaved rounds: the step jitted alone and its "
            "pieces, then the compiled while_loop of generate() called for 0 and for 8 steps. A "
            "loop step slower than the step alone, or a large entry cost, means XLA moved work "
            "around the loop (e.g. hoisted weight casts).\n"
        )
        rows = []
        for name in args.dtypes:
            for B in args.batches:
                log(f"breakdown {name} B={B}")
                best = breakdown(models[name], tok, B, rounds=3)
                alone = best["step alone (decode_step, the streaming path)"]
                for piece, t in best.items():
                    rows.append([f"{name} B={B}", piece, f"{t * 1e3:.2f}", f"{t / alone:.0%}"])
        print(table(["config", "piece", "ms", "of step alone"], rows, md))
    log("done")


if __name__ == "__main__":
    main()
