"""Pieces shared by the benchmark scripts: the machine, tables, the bandwidth probe, and the
decode timing by difference (generate(1 + D) - generate(1)) in interleaved rounds."""

from __future__ import annotations

import dataclasses
import math
import os
import platform
import time


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def core_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def table(headers, rows, markdown: bool) -> str:
    rows = [[str(c) for c in r] for r in rows]
    if markdown:
        out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        out += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(out)
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]

    def fmt(r):
        return "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))

    return "\n".join([fmt(headers), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows])


def fmt_rate(x):
    return "n/a" if x is None or not math.isfinite(x) else (f"{x:.1f}" if x < 100 else f"{x:.0f}")


def fmt_ratio(x):
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.2f}x"


class BandwidthProbe:
    """f32 matrix-vector product with a [262144, 640] matrix (the 270M's logits projection)."""

    label = "bandwidth probe"

    def __init__(self, calls: int = 10):
        import jax
        import jax.numpy as jnp
        import numpy as np

        rng = np.random.default_rng(0)
        self.E = jnp.asarray(rng.standard_normal((262144, 640), dtype=np.float32) * 0.02)
        self.x = jnp.ones((1, 640), jnp.float32)
        self.f = jax.jit(lambda x, E: jnp.einsum("bd,vd->bv", x, E))
        self.calls = calls
        self.best = math.inf  # seconds per product

    def warm(self):
        self.f(self.x, self.E).block_until_ready()

    def measure(self):
        t = time.perf_counter()
        for _ in range(self.calls):
            y = self.f(self.x, self.E)
        y.block_until_ready()
        self.best = min(self.best, (time.perf_counter() - t) / self.calls)

    @property
    def bandwidth(self) -> float:
        return self.E.nbytes / self.best


@dataclasses.dataclass
class Decode:
    """Decode throughput of one engine/dtype/batch from two generate lengths (1 and 1 + D)."""

    engine: str
    dtype: str
    batch: int
    generate: object  # n -> list of token-id lists, one per row (blocks until done)
    steps: int
    t1: float = math.inf
    t2: float = math.inf
    first_row: list | None = None
    compiled: bool = True  # warm-up must run both lengths (each compiles its program)

    @property
    def label(self):
        return f"{self.engine} {self.dtype} decode B={self.batch}"

    def _call(self, n):
        t = time.perf_counter()
        rows = self.generate(n)
        dt = time.perf_counter() - t
        bad = [len(r) for r in rows if len(r) != n]
        if bad:
            raise RuntimeError(f"{self.label}: asked for {n} tokens, got {bad[0]} (early stop?)")
        return dt, rows

    def warm(self):
        self._call(1)
        self._call(1 + self.steps if self.compiled else min(4, 1 + self.steps))

    def measure(self):
        dt, _ = self._call(1)
        self.t1 = min(self.t1, dt)
        dt, rows = self._call(1 + self.steps)
        self.t2 = min(self.t2, dt)
        self.first_row = list(rows[0])

    @property
    def step_time(self) -> float:
        return (self.t2 - self.t1) / self.steps

    @property
    def rate(self) -> float:
        s = self.step_time
        return self.batch / s if s > 0 else math.nan


def jax_generate(sampler, prompt: str, batch: int):
    prompts = [prompt] * batch

    def generate(n):
        out = sampler.generate(prompts, max_new_tokens=n, stop_token_ids=())
        return [r.tokens for r in out]

    return generate
