"""Which compiled form a weight product takes on this CPU: probed once, cached on disk.

XLA's CPU backend runs the same product x [M, I] @ W^T at very different speeds depending on
the form it is written in, and the fastest form differs between CPUs (measured in
docs/speed.md). For a narrow weight (bf16, int8, int4) against few activation rows there are two
forms, both with the same numerics (activations rounded to bf16, float32 accumulation):

    "dot"     a narrow x narrow dot_general with float32 accumulation, padded to MIN_ROWS rows:
              XLA's GEMM library. The reference form, and the only one used off CPU;
    "upcast"  the weight converted to float32 inside the jit, one matrix-vector product per
              activation row: XLA fuses the conversion into a loop that reads the narrow bytes
              once. On an AMD EPYC (Zen 4) host this streams bf16 ~2.2x faster than "dot"; on
              the Intel host of earlier measurements it was the slower one.

`choose` answers per product class (stored dtype, one row or a few, a layer-sized matrix or the
embedding table) by timing both forms on random weights of that class, best of interleaved
rounds, the first time the class is seen on this CPU (cpu_signature: model, family, ISA flags,
cores) and jax version. The answer is kept in
$GEMMA_KIT_CACHE/cpu_paths.json (a corrupt or foreign file is ignored with a warning and
rewritten) and in memory. GEMMA_KIT_MATMUL_PATH=dot|upcast forces one form everywhere (for
debugging and tests); nothing else needs setting.

This module only keeps the answers and runs the timing loop; the forms themselves and the code
that times them live in gemma_kit.layers (matmul_t, probe_product).
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import threading
import time
import warnings
from collections.abc import Callable

import jax

from gemma_kit.errors import ConfigError

PATHS = ("dot", "upcast")
REFERENCE = "dot"
ENV_VAR = "GEMMA_KIT_MATMUL_PATH"
CACHE_FILE = "cpu_paths.json"
CACHE_FORMAT = 1
# A form must be this much faster than the reference to be chosen: ties (and noise on a busy
# machine) keep the reference form.
MARGIN = 0.9
# Matrices with at least this many weights are "table" sized (the logits projection); below,
# "layer" sized. The two are probed apart: threading and caching differ between them.
TABLE_WEIGHTS = 1 << 24

_lock = threading.Lock()
_memory: dict[str, str] = {}


@dataclasses.dataclass(frozen=True)
class ProductClass:
    """The products that share one answer: stored dtype name ("bfloat16", "int8", "int4"),
    rows ("one" activation row, or "few": 2 to MIN_ROWS - 1) and size ("layer" or "table")."""

    stored: str
    rows: str
    size: str

    def key(self) -> str:
        fields = (cpu_signature(), f"jax {jax.__version__}", self.stored, self.rows, self.size)
        return " | ".join(fields)


def product_class(stored: str, rows: int, out_features: int, in_features: int) -> ProductClass:
    size = "table" if out_features * in_features >= TABLE_WEIGHTS else "layer"
    return ProductClass(stored, "one" if rows == 1 else "few", size)


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), the first key of every answer."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


# ISA extensions that change which form wins (bf16 and int8 dot units, AMX tiles).
_FLAGS = ("avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8")


def cpu_signature() -> str:
    """The CPU model, its family/model numbers, the ISA flags above and the usable cores: a
    virtual machine often names only "AMD EPYC", and threading depends on the core count."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break  # the first processor is enough
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        pass
    flags = set(fields.get("flags", "").split())
    isa = "+".join(f for f in _FLAGS if f in flags) or "-"
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return (
        f"{cpu_model()} (family {fields.get('cpu family', '?')} model "
        f"{fields.get('model', '?')}, {isa}, {cores} cores)"
    )


def cache_path():
    from gemma_kit.paths import cache_dir

    return cache_dir() / CACHE_FILE


def read_cache() -> dict[str, dict]:
    """The answers on disk ({key: {"path": ..., "seconds": {...}}}); {} with a warning when the
    file is unreadable or not ours (it is then rewritten on the next answer)."""
    path = cache_path()
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT:
            raise ValueError(f"not a format-{CACHE_FORMAT} cache")
        entries = data["entries"]
        if not isinstance(entries, dict) or not all(
            isinstance(v, dict) and v.get("path") in PATHS for v in entries.values()
        ):
            raise ValueError("malformed entries")
        return entries
    except (OSError, ValueError, KeyError, TypeError) as e:
        warnings.warn(
            f"ignoring the compiled-path cache {path} ({e}); the products will be "
            "probed again and the file rewritten",
            RuntimeWarning,
            stacklevel=3,
        )
        return {}


def _write_cache(key: str, entry: dict) -> None:
    entries = read_cache()
    entries[key] = entry
    path = cache_path()
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:  # written aside and renamed: a reader never sees half a file
        tmp.write_text(json.dumps({"format": CACHE_FORMAT, "entries": entries}, indent=1))
        os.replace(tmp, path)
    except OSError as e:  # a read-only cache: the answer still holds for this process
        warnings.warn(f"could not write {path} ({e})", RuntimeWarning, stacklevel=3)
    finally:
        if tmp.exists():
            tmp.unlink()


def forced_path() -> str | None:
    """The form GEMMA_KIT_MATMUL_PATH forces, if set (ConfigError if it names no form)."""
    value = os.environ.get(ENV_VAR, "").strip()
    if not value:
        return None
    if value not in PATHS:
        raise ConfigError(f"{ENV_VAR}={value!r}: choose one of {', '.join(PATHS)} or unset it")
    return value


def choose(cls: ProductClass, measure: Callable[[str], float], *, rounds: int = 5) -> str:
    """The form for products of class `cls` on this machine.

    measure(path) runs one timed call of the class's probe in that form and returns seconds
    (it compiles on its first call, which is not timed). Off CPU: always REFERENCE.
    """
    forced = forced_path()
    if forced is not None:
        return forced
    if jax.default_backend() != "cpu":
        return REFERENCE
    key = cls.key()
    with _lock:
        if key in _memory:
            return _memory[key]
        entry = read_cache().get(key)
        if entry is None:
            entry = probe(measure, rounds)
            _write_cache(key, entry)
        _memory[key] = entry["path"]
        return entry["path"]


def probe(measure: Callable[[str], float], rounds: int) -> dict:
    """Times every form in interleaved rounds (best of each) and picks the fastest, keeping
    REFERENCE unless another is at least 1 / MARGIN times as fast."""
    start = time.perf_counter()
    for path in PATHS:
        measure(path)  # compile
    best = {path: measure(path) for path in PATHS}
    # A form more than twice as slow as the fastest after one round is out (the int8 and int4
    # dot forms at one row dequantize the whole weight each call: 10-100x slower).
    alive = [p for p in PATHS if best[p] <= 2 * min(best.values())]
    for _ in range(rounds - 1):
        for path in alive:
            best[path] = min(best[path], measure(path))
    fastest = min(best, key=lambda path: best[path])
    chosen = fastest if best[fastest] < MARGIN * best[REFERENCE] else REFERENCE
    return {
        "path": chosen,
        "seconds": best,
        "probe_seconds": time.perf_counter() - start,
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def forget() -> None:
    """Drops the answers held in memory (the disk cache stays): for tests."""
    with _lock:
        _memory.clear()
