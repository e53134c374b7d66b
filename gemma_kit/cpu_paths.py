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

A second question has the same machinery (`VectorWidth`): the vector width LLVM may use in
the decode programs (XLA's xla_cpu_prefer_vector_width; gemma_kit.tuned_jit applies it). XLA
emits 256-bit loops by default. On CPUs with AVX-512 the int8 and int4 "upcast" loops are
limited by instructions rather than by memory, and 512-bit ones ran them ~1.3x faster on the
AMD EPYC (Zen 4) host (docs/speed.md). Where 512-bit code lowers the clock (some Intel parts)
it may not pay, so it is probed too, and only on CPUs that have avx512f.
GEMMA_KIT_VECTOR_WIDTH=256|512 forces it.

This module only keeps the answers and runs the timing loop; the forms themselves and the code
that times them live in gemma_kit.layers (matmul_t, probe_product, probe_vector_width).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import platform
import threading
import time
import warnings
from collections.abc import Callable
from typing import ClassVar

import jax

from gemma_kit.errors import ConfigError

PATHS = ("dot", "upcast")
REFERENCE = "dot"
ENV_VAR = "GEMMA_KIT_MATMUL_PATH"
WIDTHS = ("256", "512")  # bits; "256" is XLA's default
WIDTH_REFERENCE = "256"
WIDTH_ENV_VAR = "GEMMA_KIT_VECTOR_WIDTH"
WIDTH_OPTION = "xla_cpu_prefer_vector_width"  # the XLA debug option it sets
CACHE_FILE = "cpu_paths.json"
CACHE_FORMAT = 2  # 2: entries name their answer "choice" (format 1 said "path"; re-probed)
# A form must be this much faster than the reference to be chosen: ties (and noise on a busy
# machine) keep the reference form.
MARGIN = 0.9
# Matrices with at least this many weights are "table" sized (the logits projection); below,
# "layer" sized. The two are probed apart: threading and caching differ between them.
TABLE_WEIGHTS = 1 << 24

# Reentrant: the vector-width probe asks for its product's form from inside its own choose().
_lock = threading.RLock()
_memory: dict[str, str] = {}
# compiler_options' answers by the GEMMA_KIT_VECTOR_WIDTH value they were given: the decode
# programs ask on every call, and building the question's key takes ~40 us.
_options_memory: dict[str, dict[str, int]] = {}


@dataclasses.dataclass(frozen=True)
class ProductClass:
    """The products that share one answer: stored dtype name ("bfloat16", "int8", "int4"),
    rows ("one" activation row, or "few": 2 to MIN_ROWS - 1) and size ("layer" or "table")."""

    stored: str
    rows: str
    size: str
    options: ClassVar[tuple[str, ...]] = PATHS
    reference: ClassVar[str] = REFERENCE
    env_var: ClassVar[str] = ENV_VAR

    def key(self) -> str:
        fields = (cpu_signature(), f"jax {jax.__version__}", self.stored, self.rows, self.size)
        return " | ".join(fields)


@dataclasses.dataclass(frozen=True)
class VectorWidth:
    """The vector width of the decode programs (module docstring): one answer per CPU."""

    options: ClassVar[tuple[str, ...]] = WIDTHS
    reference: ClassVar[str] = WIDTH_REFERENCE
    env_var: ClassVar[str] = WIDTH_ENV_VAR

    def key(self) -> str:
        return " | ".join((cpu_signature(), f"jax {jax.__version__}", "vector width"))


Question = ProductClass | VectorWidth


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


@functools.cache
def _first_processor() -> dict[str, str]:
    """The fields of /proc/cpuinfo's first processor ({} where there is none)."""
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
    return fields


def cpu_flags() -> frozenset[str]:
    """The CPU's ISA flags (from /proc/cpuinfo; empty elsewhere)."""
    return frozenset(_first_processor().get("flags", "").split())


def cpu_signature() -> str:
    """The CPU model, its family/model numbers, the ISA flags above and the usable cores: a
    virtual machine often names only "AMD EPYC", and threading depends on the core count."""
    fields = _first_processor()
    flags = cpu_flags()
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
    """The answers on disk ({key: {"choice": ..., "seconds": {...}}}); {} with a warning when
    the file is unreadable or not ours (it is then rewritten on the next answer), and quietly
    when it is an older format of ours (its questions are probed again)."""
    path = cache_path()
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
        if isinstance(data, dict) and data.get("format") == 1:
            return {}
        if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT:
            raise ValueError(f"not a format-{CACHE_FORMAT} cache")
        entries = data["entries"]
        if not isinstance(entries, dict) or not all(
            isinstance(v, dict) and isinstance(v.get("choice"), str) for v in entries.values()
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


def forced_path(question: Question) -> str | None:
    """The answer the question's environment variable forces, if set (ConfigError if it names
    none of its options)."""
    value = os.environ.get(question.env_var, "").strip()
    if not value:
        return None
    if value not in question.options:
        raise ConfigError(
            f"{question.env_var}={value!r}: choose one of {', '.join(question.options)} or unset it"
        )
    return value


def choose(question: Question, measure: Callable[[str], float], *, rounds: int = 5) -> str:
    """The answer to `question` on this machine: the form for products of a ProductClass, or
    the VectorWidth.

    measure(option) runs one timed call of the question's probe with that option and returns
    seconds (it compiles on its first call, which is not timed). Off CPU: the reference.
    """
    forced = forced_path(question)
    if forced is not None:
        return forced
    if jax.default_backend() != "cpu":
        return question.reference
    key = question.key()
    with _lock:
        if key in _memory:
            return _memory[key]
        entry = read_cache().get(key)
        if entry is None or entry["choice"] not in question.options:
            entry = probe(measure, rounds, question.options, question.reference)
            _write_cache(key, entry)
        _memory[key] = entry["choice"]
        return entry["choice"]


def probe(
    measure: Callable[[str], float],
    rounds: int,
    options: tuple[str, ...] = PATHS,
    reference: str = REFERENCE,
) -> dict:
    """Times every option in interleaved rounds (best of each) and picks the fastest, keeping
    the reference unless another is at least 1 / MARGIN times as fast. An option other than
    the reference that fails to compile or run is left out, with a warning (its time is
    recorded as infinite); the reference's failure is raised."""
    start = time.perf_counter()
    usable = []
    for option in options:
        try:
            measure(option)  # compile
        except Exception as e:
            if option == reference:
                raise
            warnings.warn(
                f"the compiled form {option!r} failed on this machine ({type(e).__name__}: "
                f"{e}); it is left out and {reference!r} kept",
                RuntimeWarning,
                stacklevel=4,
            )
            continue
        usable.append(option)
    best = {option: math.inf for option in options}
    best.update({option: measure(option) for option in usable})
    # An option more than twice as slow as the fastest after one round is out (the int8 and
    # int4 dot forms at one row dequantize the whole weight each call: 10-100x slower).
    alive = [o for o in usable if best[o] <= 2 * min(best.values())]
    for _ in range(rounds - 1):
        for option in alive:
            best[option] = min(best[option], measure(option))
    fastest = min(best, key=lambda option: best[option])
    chosen = fastest if best[fastest] < MARGIN * best[reference] else reference
    return {
        "choice": chosen,
        "seconds": best,
        "probe_seconds": time.perf_counter() - start,
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def compiler_options(measure: Callable[[str], float]) -> dict[str, int]:
    """The XLA compiler options of the decode programs on this machine: the VectorWidth answer
    ({} for XLA's default; measure(width) as in choose). Only CPUs with AVX-512 are probed:
    elsewhere LLVM has no wider vectors to use."""
    forced = os.environ.get(WIDTH_ENV_VAR, "")
    options = _options_memory.get(forced)
    if options is None:
        options = {}
        question = VectorWidth()
        probed = forced_path(question) is not None or "avx512f" in cpu_flags()
        if jax.default_backend() == "cpu" and probed:
            width = choose(question, measure)
            if width != question.reference:
                options = {WIDTH_OPTION: int(width)}
        _options_memory[forced] = options
    return dict(options)


def forget() -> None:
    """Drops the answers held in memory (the disk cache stays): for tests."""
    with _lock:
        _memory.clear()
        _options_memory.clear()
