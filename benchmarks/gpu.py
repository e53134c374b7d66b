#!/usr/bin/env python
"""Decode and prefill throughput of a Gemma-2-2B-sized model on one GPU, against the HBM roofline.

    python benchmarks/gpu.py            # on a machine with one NVIDIA GPU and jax[cuda]
    python benchmarks/gpu.py --smoke    # a tiny config on CPU: checks the script end to end

The weights are random bf16 (the speed of a model does not depend on its values), created on the
device by one jitted function from the abstract shapes: nothing of model size is built on the
host. Activations and the KV cache are bf16. Generation goes through the public
`Sampler.generate` (greedy, stop_token_ids=() so nothing ends early) with a stand-in tokenizer
that maps whitespace-separated words to ids, so a prompt of n-1 words is n tokens with <bos>.

Decode tokens/s: two generate calls whose max_new_tokens share one length bucket (hence one
compiled program) and a fixed cache length, timed after a warm-up call; the difference of their
times is (N2 - N1) decode steps, so the prefill and the per-call overhead cancel.
Prefill tokens/s: generate(max_new_tokens=1) on a 1024-token prompt (prefill plus the first
token; a zero-iteration decode loop).

Roofline: bytes read per decode step = all weights (the tied embedding included) + the whole
allocated KV cache (the step attends over every slot, masked), divided by the HBM bandwidth,
taken both from a table by device kind and from a device-to-device copy measured in this run.
"""

from __future__ import annotations

import argparse
import functools
import math
import time

from _log import log  # noqa: E402  (benchmarks/ is on sys.path)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--smoke",
        action="store_true",
        help="tiny config on CPU, to check that the script runs end to end",
    )
    p.add_argument("--reps", type=int, default=3, help="timed repetitions (the minimum is kept)")
    return p.parse_args(argv)


ARGS = parse_args()
import jax  # noqa: E402

if ARGS.smoke:
    jax.config.update("jax_platforms", "cpu")

import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from gemma_kit import cache as kv_cache  # noqa: E402
from gemma_kit.config import gemma2_layers, get_preset  # noqa: E402
from gemma_kit.sampler import Sampler  # noqa: E402
from gemma_kit.transformer import Transformer  # noqa: E402

# HBM bandwidth by device kind, bytes/s (vendor figures). First matching row wins.
HBM_TABLE = [
    (("H200",), 4.8e12, "H200 (4.8 TB/s)"),
    (("H100", "PCIE"), 2.0e12, "H100 PCIe (2.0 TB/s)"),
    (("H100",), 3.35e12, "H100 SXM (3.35 TB/s)"),
    (("A100", "80GB"), 2.0e12, "A100 80GB (2.0 TB/s)"),
    (("A100",), 1.555e12, "A100 40GB (1.555 TB/s)"),
]


def table_bandwidth(kind: str):
    k = kind.upper()
    for needles, bw, label in HBM_TABLE:
        if all(n in k for n in needles):
            return bw, label
    return None, "not in table"


class FakeTokenizer:
    """What Sampler uses of a tokenizer: encode(text, add_bos), decode(ids), eos_id,
    end_of_turn_id (the image markers are absent, so nothing is forbidden)."""

    bos_id, eos_id, end_of_turn_id = 2, 1, 107
    start_of_image_id = end_of_image_id = None

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        # Deterministic ids in [200, vocab): one per word, clear of the special ids above.
        ids = [
            200 + (sum(map(ord, w)) * 7919 + i * 104729) % (self.vocab_size - 200)
            for i, w in enumerate(text.split())
        ]
        return [self.bos_id, *ids] if add_bos else ids

    def decode(self, ids) -> str:
        return " ".join(map(str, ids))


def prompt_of(n_tokens: int) -> str:
    """A prompt that FakeTokenizer encodes to exactly n_tokens ids (<bos> included)."""
    return " ".join(f"w{i}" for i in range(n_tokens - 1))


@functools.partial(jax.jit, static_argnames=("shape", "dtype"))
def _random_leaf(key, shape, dtype):
    return jax.random.normal(key, shape, dtype) * jnp.asarray(0.02, dtype)


def random_model(config, key, dtype=jnp.bfloat16) -> Transformer:
    """The model with random weights made on the default device: no host-side initialisation.

    One small jitted program per distinct weight shape (a single program with every leaf as an
    output took two minutes to compile for the 2B on an H200).
    """
    abstract = nnx.eval_shape(
        lambda: Transformer(config, param_dtype=dtype, dtype=dtype, rngs=nnx.Rngs(0))
    )
    graphdef, state = nnx.split(abstract)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(key, len(leaves))
    arrays = [
        _random_leaf(k, tuple(leaf.shape), jnp.dtype(leaf.dtype)) for k, leaf in zip(keys, leaves)
    ]
    arrays = jax.block_until_ready(arrays)
    return nnx.merge(graphdef, jax.tree.unflatten(treedef, arrays))


def timed(fn, reps: int) -> float:
    """Minimum wall time of fn() over reps calls (fn must block until its result is ready)."""
    best = math.inf
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def measure_bandwidth(nbytes: int, reps: int):
    """Device-to-device copy (read + write counted) and a read-only sum, in bytes/s."""
    n = nbytes // 4
    x = jax.jit(lambda: jnp.ones((n,), jnp.float32))()
    copy = jax.jit(lambda a: a + 1.0)  # one read and one write of every element
    total = jax.jit(jnp.sum)  # one read
    jax.block_until_ready(copy(x))
    jax.block_until_ready(total(x))
    inner = 10

    def run(f):
        def go():
            for _ in range(inner):
                y = f(x)
            jax.block_until_ready(y)

        return timed(go, reps) / inner

    t_copy, t_sum = run(copy), run(total)
    return 2 * n * 4 / t_copy, n * 4 / t_sum


def main():
    smoke = ARGS.smoke
    reps = ARGS.reps
    dev = jax.devices()[0]
    kind = dev.device_kind
    log(f"jax {jax.__version__}, device {dev.platform}: {kind}")

    if smoke:
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
        decode_batches, prefill_batches, prefill_len = (1, 4), (1, 2), 128
        n1, n2 = 33, 48  # one bucket (48): one compiled program per batch size
        probe_bytes = 64 << 20
    else:
        config = get_preset("gemma2-2b")
        decode_batches, prefill_batches, prefill_len = (1, 64), (1, 8), 1024
        n1, n2 = 129, 192  # both in the 192 bucket
        probe_bytes = 4 << 30
    decode_prompt = 32
    cache_len = 256  # fixed: >= decode_prompt + n2, and the same for both timed calls
    assert decode_prompt + n2 <= cache_len

    log(f"building {config.name} with random bf16 weights on the device")
    model = random_model(config, jax.random.key(0))
    params = nnx.state(model)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    embed_params = config.vocab_size * config.embed_dim
    log(f"model ready: {n_params / 1e6:.1f} M parameters, {weight_bytes / 1e6:.1f} MB")

    log("measuring HBM bandwidth (device-to-device copy, read-only sum)")
    bw_copy, bw_read = measure_bandwidth(probe_bytes, reps)
    bw_table, bw_label = table_bandwidth(kind)
    log(f"copy {bw_copy / 1e9:.0f} GB/s (read+write), sum {bw_read / 1e9:.0f} GB/s (read)")

    tok = FakeTokenizer(config.vocab_size)
    rows = []

    # Decode.
    dec = Sampler(model, tok, cache_dtype=jnp.bfloat16, cache_length=cache_len)
    prompt = prompt_of(decode_prompt)
    steps = n2 - n1
    for B in decode_batches:
        prompts = [prompt] * B

        def call(n, prompts=prompts):
            out = dec.generate(prompts, max_new_tokens=n, stop_token_ids=())
            assert len(out[0].tokens) == n, (len(out[0].tokens), n)

        t = time.perf_counter()
        call(n1)
        log(f"decode B={B}: compile + first call {time.perf_counter() - t:.1f} s")
        call(n2)  # warm-up of the longer call (same program)
        t1, t2 = timed(lambda: call(n1), reps), timed(lambda: call(n2), reps)
        step = (t2 - t1) / steps
        cache_shapes = jax.eval_shape(
            lambda B=B: kv_cache.init_cache(config, B, cache_len, jnp.bfloat16)
        )
        cache_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache_shapes))
        read = weight_bytes + cache_bytes
        rows.append(
            dict(
                kind="decode",
                B=B,
                step=step,
                tps=B / step if step > 0 else math.nan,
                read=read,
                cache_bytes=cache_bytes,
            )
        )
        log(
            f"decode B={B}: {steps} steps in {t2 - t1:.3f} s -> {step * 1e3:.2f} ms/step, "
            f"{B / step:.1f} tokens/s"
        )

    # Prefill.
    pre = Sampler(model, tok, cache_dtype=jnp.bfloat16)
    long_prompt = prompt_of(prefill_len)
    for B in prefill_batches:
        prompts = [long_prompt] * B

        def prefill_call(prompts=prompts):
            out = pre.generate(prompts, max_new_tokens=1, stop_token_ids=())
            assert out[0].prompt_tokens == prefill_len

        t = time.perf_counter()
        prefill_call()
        log(f"prefill B={B}: compile + first call {time.perf_counter() - t:.1f} s")
        dt = timed(prefill_call, reps)
        rows.append(dict(kind="prefill", B=B, time=dt, tps=B * prefill_len / dt))
        log(
            f"prefill B={B}x{prefill_len}: {dt * 1e3:.1f} ms -> {B * prefill_len / dt:.0f} tokens/s"
        )

    # Report.
    def bw_cells(read, step):
        cells = []
        for bw in (bw_table, bw_copy):
            if bw is None:
                cells += ["n/a", "n/a"]
            else:
                roof = read / bw
                cells += [f"{roof * 1e3:.2f}", f"{roof / step:.0%}"]
        return cells

    print(
        f"\n### gemma_kit on {kind} ({config.name}, random bf16 weights, bf16 compute and "
        f"KV cache)\n"
    )
    print(
        f"- jax {jax.__version__}; {n_params / 1e9:.3f} B parameters "
        f"({embed_params / 1e9:.3f} B in the tied embedding), {weight_bytes / 1e9:.2f} GB of "
        "weights read per decode step"
    )
    print(
        f"- HBM bandwidth: table {bw_label}; measured in this run: copy "
        f"{bw_copy / 1e9:.0f} GB/s (bytes read + written), read-only sum "
        f"{bw_read / 1e9:.0f} GB/s"
    )
    print(
        f"- decode: prompt {decode_prompt} tokens, cache {cache_len} slots, "
        f"tokens/s from generate({n2}) - generate({n1}) = {steps} steps, min of {reps} "
        "after a warm-up"
    )
    print(
        f"- prefill: generate(max_new_tokens=1) on a {prefill_len}-token prompt, min of "
        f"{reps} after a warm-up\n"
    )
    print(
        "| phase | batch | tokens/s | ms/step | bytes read/step (GB) | roofline ms (table BW)"
        " | of roofline | roofline ms (copy BW) | of roofline |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r["kind"] == "decode":
            print(
                f"| decode | {r['B']} | {r['tps']:.1f} | {r['step'] * 1e3:.2f} | "
                f"{r['read'] / 1e9:.2f} (KV {r['cache_bytes'] / 1e9:.2f}) | "
                + " | ".join(bw_cells(r["read"], r["step"]))
                + " |"
            )
    for r in rows:
        if r["kind"] == "prefill":
            B, P = r["B"], prefill_len
            # Model FLOPs: 2 per weight per token (the logits of the last token only) plus the
            # attention as computed (full PxP scores and values per layer, masked).
            dense = n_params - embed_params
            flops = 2 * dense * B * P + 2 * embed_params * B
            flops += 4 * B * P * P * config.num_heads * config.head_dim * config.num_layers
            print(
                f"| prefill {P} | {B} | {r['tps']:.0f} | {r['time'] * 1e3:.1f} ms total | "
                f"{flops / r['time'] / 1e12:.3g} TFLOP/s (model FLOPs) | | | | |"
            )
    log("done")


if __name__ == "__main__":
    main()
