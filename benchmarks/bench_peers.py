#!/usr/bin/env python
"""Batch-1 greedy decode of Gemma 3 270M, format for format: gemma_kit against llama.cpp.

    python benchmarks/bench_peers.py               # 3 interleaved rounds, best of each
    python benchmarks/bench_peers.py --markdown    # the table as markdown (docs/speed.md)
    python benchmarks/bench_peers.py --quick       # one round, 16 steps (a smoke test)

Needs the [bench] extra (llama-cpp-python, built from source on install: ~10-25 minutes on 2
cores) for the llama.cpp rows; without it only gemma_kit is measured.

Same weights: the packaged Q4_K_M GGUF is what gemma_kit's embedded model was converted from.
The llama.cpp files in F16, Q8_0 and Q4_0 are made from that same file with llama.cpp's own
quantize function (allow_requantize), once, and kept in $GEMMA_KIT_CACHE/gguf/ (they only serve
speed: their weights went through Q4_K_M first). Pairs: gemma_kit bf16 / llama.cpp F16,
int8 / Q8_0, int4 / Q4_0; the shipped Q4_K_M is listed too.

Same prompt and steps: llama.cpp is fed gemma_kit's token ids (one vocabulary). Each engine is
timed at generate(1) (prefill and the first token) and generate(1 + D), and the difference is D
decode steps; llama.cpp runs with as many threads as this process has cores (2 on the dev
machines), gemma_kit through Sampler.generate's compiled loop. Every round visits every
configuration and the bandwidth probe once; each number is the best over the rounds.
"""

from __future__ import annotations

import argparse
import json
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
from _log import log  # noqa: E402  (benchmarks/ is on sys.path)

PROMPT = "The quick brown fox jumps over the lazy dog. Once upon a time, in a land far away,"
CACHE_LEN = 256
# gemma_kit weight format -> (quantize_model arguments, the llama.cpp file type it is paired with)
FORMATS = {
    "bf16": (None, "F16"),
    "int8": (dict(embedding=True), "Q8_0"),
    # llama.cpp's Q4_0 files keep the tied table in Q8_0: "int4" is the same split (int4
    # layers, an int8 table); "int4-all" quantizes the table to int4 too (no llama.cpp twin).
    "int4": (dict(embedding=True, bits=4, embedding_bits=8), "Q4_0"),
    "int4-all": (dict(embedding=True, bits=4), "Q4_0"),
}
SHIPPED = "Q4_K_M"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="one round of 16 decode steps")
    p.add_argument("--markdown", action="store_true", help="print the tables as markdown")
    p.add_argument("--formats", default=",".join(FORMATS), help="gemma_kit formats to measure")
    p.add_argument("--decode-steps", type=int, default=None, help="D (default 48, quick 16)")
    p.add_argument("--rounds", type=int, default=None, help="rounds (default 3, quick 1)")
    p.add_argument("--no-llama", action="store_true", help="skip llama.cpp")
    p.add_argument(
        "--llama-threads",
        type=int,
        default=None,
        help="llama.cpp threads (default: the cores of this process)",
    )
    args = p.parse_args(argv)
    args.formats = [f for f in args.formats.split(",") if f]
    bad = [f for f in args.formats if f not in FORMATS]
    if bad or not args.formats:
        p.error(f"--formats: unknown {bad or 'empty list'}; choose from {', '.join(FORMATS)}")
    args.decode_steps = args.decode_steps or (16 if args.quick else 48)
    args.rounds = args.rounds or (1 if args.quick else 3)
    return args


ARGS = parse_args()

import jax  # noqa: E402

import gemma_kit  # noqa: E402
from gemma_kit import Sampler, cpu_paths, quant  # noqa: E402
from gemma_kit.paths import cache_dir, default_gguf_path  # noqa: E402

# ----------------------------------------------------------------------------------------------
# llama.cpp


def made_gguf(kind: str):
    """The shipped Q4_K_M requantized to `kind` by llama.cpp (made once, cached)."""
    import llama_cpp

    source = default_gguf_path()
    if kind == SHIPPED:
        return source
    target = cache_dir() / "gguf" / f"{source.stem.replace('q4_k_m', kind.lower())}.gguf"
    if target.exists():
        return target
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{kind}")
    params.allow_requantize = True
    params.nthread = core_count()
    tmp = target.with_name(f"{target.name}.{os.getpid()}.partial")
    log(f"making {target.name} with llama.cpp's quantize (once)")
    try:
        rc = llama_cpp.llama_model_quantize(str(source).encode(), str(tmp).encode(), params)
        if rc != 0:
            raise RuntimeError(f"llama_model_quantize({kind}) returned {rc}")
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()
    return target


def gguf_summary(path) -> str:
    """The tensor types of a GGUF by count, and the type of its (tied) token embedding."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    counts: dict[str, int] = {}
    embedding = "?"
    for t in reader.tensors:
        name = t.tensor_type.name
        counts[name] = counts.get(name, 0) + 1
        if t.name == "token_embd.weight":
            embedding = name
    big = ", ".join(f"{k} x{v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))
    return f"table {embedding}; {big}"


def llama_generate(path, ids: list[int], threads: int):
    import llama_cpp
    import numpy as np

    llm = llama_cpp.Llama(
        model_path=str(path),
        n_ctx=CACHE_LEN,
        n_batch=CACHE_LEN,
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )
    vocab = llm.n_vocab()

    def next_token():
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(vocab,))
        return int(logits.argmax())

    def generate(n):
        llm.reset()
        llm.eval(ids)
        out = [next_token()]
        while len(out) < n:
            llm.eval([out[-1]])
            out.append(next_token())
        return [out]

    return llm, generate


# ----------------------------------------------------------------------------------------------


def main():
    args = ARGS
    D = args.decode_steps
    load_start = os.getloadavg()
    log(f"{cpu_model()}, {core_count()} cores; jax {jax.__version__}; load {load_start[0]:.1f}")

    base, tok = gemma_kit.default_model()
    ids = tok.encode(PROMPT, add_bos=True)
    probe = BandwidthProbe()
    configs, weight_bytes = [probe], {}
    for name in args.formats:
        quantize, _ = FORMATS[name]
        model = quant.quantize_model(base, **quantize) if quantize else base
        weight_bytes[name] = quant.weight_bytes(model)
        sampler = Sampler(model, tok, cache_length=CACHE_LEN)
        configs.append(Decode("gemma_kit", name, 1, jax_generate(sampler, PROMPT, 1), D))

    llama_version, files = None, {}
    threads = args.llama_threads or core_count()
    if not args.no_llama:
        try:
            import llama_cpp
        except ImportError:
            log(
                "llama-cpp-python is not installed (pip install 'gemma-kit[bench]'): gemma_kit "
                "rows only"
            )
        else:
            llama_version = llama_cpp.__version__
            kinds = list(dict.fromkeys([FORMATS[f][1] for f in args.formats] + [SHIPPED]))
            for kind in kinds:
                files[kind] = made_gguf(kind)
                _, gen = llama_generate(files[kind], ids, threads)
                configs.append(Decode("llama.cpp", kind, 1, gen, D))

    official = None
    try:  # the official library, where installed (not a dependency of anything here)
        import gemma as official

        log("the official gemma library is installed but not wired into this benchmark yet")
    except ImportError:
        pass

    for c in configs:
        t = time.perf_counter()
        c.warm()
        log(f"warm-up (compile) {c.label}: {time.perf_counter() - t:.1f} s")
    for r in range(args.rounds):
        t = time.perf_counter()
        for c in configs:
            c.measure()
        log(f"round {r + 1} done in {time.perf_counter() - t:.1f} s")

    # ------------------------------------------------------------------------------------------
    md = args.markdown
    load_end = os.getloadavg()
    bw = probe.bandwidth
    by = {(c.engine, c.dtype): c for c in configs if isinstance(c, Decode)}
    title = "Batch-1 greedy decode, Gemma 3 270M: gemma_kit vs llama.cpp, format for format"
    print(f"\n## {title}\n" if md else f"\n{title}\n")
    bullets = [
        f"machine: {cpu_model()}, {core_count()} cores; load average {load_start[0]:.1f} at "
        f"start, {load_end[0]:.1f} at end",
        f"python {platform.python_version()}, jax {jax.__version__}, llama-cpp-python "
        f"{llama_version or 'not installed'} ({threads} threads); official gemma library: "
        f"{'installed, not measured' if official else 'not installed'}",
        f"{args.rounds} interleaved round(s), best of each; prompt {len(ids)} tokens; "
        f"D = {D} steps = generate(1 + D) - generate(1); gemma_kit cache {CACHE_LEN} slots",
        f"same-run bandwidth: {bw / 2**30:.1f} GiB/s (XLA f32 matrix-vector product over "
        f"[262144, 640], {probe.best * 1e3:.1f} ms)",
    ]
    print("\n".join(("- " if md else "  ") + b for b in bullets) + "\n")
    rows = []
    for name in args.formats:
        ours = by.get(("gemma_kit", name))
        kind = FORMATS[name][1]
        peer = by.get(("llama.cpp", kind))
        roof = weight_bytes[name] / bw
        rows.append(
            [
                name,
                fmt_rate(ours.rate),
                f"{ours.step_time * 1e3:.1f}",
                f"{weight_bytes[name] / 1e6:.0f}",
                f"{roof / ours.step_time:.0%}",
                kind,
                fmt_rate(peer.rate) if peer else "n/a",
                f"{peer.step_time * 1e3:.1f}" if peer else "n/a",
                fmt_ratio(ours.rate / peer.rate) if peer else "n/a",
            ]
        )
    shipped = by.get(("llama.cpp", SHIPPED))
    if shipped:
        rows.append(
            [
                "",
                "",
                "",
                "",
                "",
                f"{SHIPPED} (shipped)",
                fmt_rate(shipped.rate),
                f"{shipped.step_time * 1e3:.1f}",
                "",
            ]
        )
    print(
        table(
            [
                "gemma_kit",
                "tokens/s",
                "ms/step",
                "MB weights",
                "of bandwidth roofline",
                "llama.cpp",
                "tokens/s",
                "ms/step",
                "gemma_kit / llama.cpp",
            ],
            rows,
            md,
        )
    )
    if files:
        print()
        print(
            "\n".join(
                ("- " if md else "  ") + f"{kind}: {path.name} ({gguf_summary(path)})"
                for kind, path in files.items()
            )
        )
    paths = cpu_paths.read_cache()
    mine = {k: v for k, v in paths.items() if k.startswith(cpu_paths.cpu_signature())}
    if mine:
        print(
            "\nCompiled forms chosen on this CPU (gemma_kit.cpu_paths; probe seconds per "
            "call of each option):\n"
        )
        rows = [
            [
                k.split(" | ", 2)[2].replace(" | ", ", "),
                v["choice"],
                " / ".join(f"{o}: {t * 1e3:.2f} ms" for o, t in v["seconds"].items()),
            ]
            for k, v in sorted(mine.items())
        ]
        header = ["question (dtype, rows, size; or vector width)", "choice", "probe"]
        print(table(header, rows, md))
    agree = []
    for name in args.formats:
        ours, peer = by.get(("gemma_kit", name)), by.get(("llama.cpp", FORMATS[name][1]))
        if ours and peer and ours.first_row and peer.first_row:
            same = next(
                (i for i, (a, b) in enumerate(zip(ours.first_row, peer.first_row)) if a != b),
                len(ours.first_row),
            )
            agree.append(
                f"{name} vs {FORMATS[name][1]}: first {same} of "
                f"{len(ours.first_row)} greedy tokens equal"
            )
    if agree:
        print("\n" + "\n".join(("- " if md else "  ") + a for a in agree))
    json.dump(
        {"bandwidth": bw, "rates": {f"{e} {d}": c.rate for (e, d), c in by.items()}}, sys.stderr
    )
    print(file=sys.stderr)
    log("done")


if __name__ == "__main__":
    main()
