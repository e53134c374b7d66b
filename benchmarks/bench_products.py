#!/usr/bin/env python
"""Why batch-16 decode on a small CPU is compute-bound: the logits product's rate by rows.

    python benchmarks/bench_products.py             # rows 1, 16, 64, 256 (~1 min)

Times the 270M's logits projection (hidden [M, 640] against the bf16 [262144, 640] table, the
compiled form gemma_kit picks for M rows) and prints GFLOP/s and the table bytes streamed per
second, next to the same-run bandwidth probe. Then the floor this puts under a batch-16 decode
step, had every weight product run at the logits product's 16-row rate, against the bandwidth
roofline of bench_sampler (every weight read once per step). Best of 10 calls each.
"""

from __future__ import annotations

import argparse
import time

from _common import BandwidthProbe, core_count, cpu_model

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--rows", default="1,16,64,256", help="row counts M (default 1,16,64,256)")
ARGS = p.parse_args()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import gemma_kit  # noqa: E402
from gemma_kit import quant  # noqa: E402


def best_of(fn, *args, n: int = 10) -> float:
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(n):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t)
    return best


def main():
    model, _ = gemma_kit.default_model()
    V, D = model.config.vocab_size, model.config.embed_dim
    weights = quant.weight_bytes(model)
    params = weights // 2  # bf16
    probe = BandwidthProbe()
    print(f"{cpu_model()}, {core_count()} cores; jax {jax.__version__}")
    logits = jax.jit(lambda h: model.logits(h))
    rates = {}
    print(f"\nlogits product [M, {D}] x [{D}, {V}] bf16{'':8} ms   GFLOP/s   table GiB/s")
    for M in (int(r) for r in ARGS.rows.split(",")):
        h = jax.random.normal(jax.random.key(0), (1, M, D), jnp.float32)
        s = best_of(logits, h)
        rates[M] = 2 * M * V * D / s
        print(
            f"  M = {M:<4d}{'':37} {s * 1e3:6.2f} {rates[M] / 1e9:9.0f} "
            f"{V * D * 2 / s / 2**30:12.1f}"
        )
    probe.warm()
    for _ in range(3):
        probe.measure()
    bandwidth = probe.bandwidth
    roof = weights / bandwidth
    print(
        f"\nsame-run bandwidth {bandwidth / 2**30:.1f} GiB/s: batch-16 roofline "
        f"{roof * 1e3:.1f} ms a step ({weights / 2**20:.0f} MB of weights read once), 60% of it = "
        f"{roof / 0.6 * 1e3:.1f} ms"
    )
    if 16 in rates:
        floor = 2 * 16 * params / rates[16]
        print(
            f"compute floor at the 16-row rate ({rates[16] / 1e9:.0f} GFLOP/s): "
            f"{floor * 1e3:.1f} ms a step = {roof / floor:.0%} of the roofline at best"
        )
    fastest = max(rates.values())
    print(
        f"compute floor at the fastest rate measured ({fastest / 1e9:.0f} GFLOP/s): "
        f"{2 * 16 * params / fastest * 1e3:.1f} ms a step"
    )


if __name__ == "__main__":
    main()
