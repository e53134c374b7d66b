"""The per-CPU product forms (gemma_kit.cpu_paths, layers.matmul_t): every form computes the same
products as a float64 reference, and the probe's answer is cached, read back, and survives a
corrupt cache file."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

from gemma_kit import cpu_paths, int4, layers
from gemma_kit.errors import ConfigError
from gemma_kit.layers import matmul_t


def _bf16(x):
    return np.asarray(
        jnp.asarray(x, jnp.float32).astype(jnp.bfloat16).astype(jnp.float32), np.float64
    )


@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("stored", ["bfloat16", "int8", "int4"])
def test_every_form_gives_the_reference_products(stored, rows):
    """x [rows, I] @ W^T in the dot and upcast forms against float64 (x rounded to bf16, the
    numerics every form promises). Tolerance: float32 accumulation over I = 256 terms, 1e-5 of
    sum |x| |w| per output; the dot form rounds int4 weights q s + m to bf16, so there 2^-8 of
    it (bf16's relative step is 2^-8 at most)."""
    rng = np.random.default_rng(rows)
    O, I = 96, 256
    x = rng.normal(0, 1, (rows, I)).astype(np.float32)
    w = rng.normal(0, 0.05, (O, I)).astype(np.float32)
    scale = None
    if stored == "int4":
        m = int4.quantize(jnp.asarray(w))
        dense = np.asarray(int4.dequantize(m), np.float64)
        args = (m, None)
    elif stored == "int8":
        q = np.clip(np.round(w / 0.05 * 40), -127, 127).astype(np.int8)
        scale = np.full((O,), 0.05 / 40, np.float32)
        dense = q.astype(np.float64) * scale[:, None]
        args = (jnp.asarray(q).astype, jnp.int8)
    else:
        dense = _bf16(w)
        args = (jnp.asarray(w, jnp.bfloat16).astype, jnp.bfloat16)
    xr = _bf16(x)
    reference = xr @ dense.T
    magnitude = np.abs(xr) @ np.abs(dense).T
    for path in cpu_paths.PATHS:
        got = np.asarray(
            matmul_t(
                jnp.asarray(x), *args, None if scale is None else jnp.asarray(scale), path=path
            )
        )
        assert got.shape == (rows, O) and got.dtype == np.float32
        tol = (2.0**-8 if (stored, path) == ("int4", "dot") else 1e-5) * magnitude + 1e-30
        assert (np.abs(got - reference) <= tol).all(), (path, np.abs(got - reference).max())


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """An empty $GEMMA_KIT_CACHE, nothing remembered in memory, no forced form."""
    monkeypatch.setenv("GEMMA_KIT_CACHE", str(tmp_path))
    monkeypatch.delenv(cpu_paths.ENV_VAR, raising=False)
    cpu_paths.forget()
    yield tmp_path
    cpu_paths.forget()


def test_probe_answer_is_cached_and_read_back(fresh_cache, monkeypatch):
    """A real probe (small shapes) writes its answer; a new process (memory forgotten) reads it
    back without timing anything."""
    monkeypatch.setattr(layers, "PROBE_SHAPES", {"layer": (2, 64, 256), "table": (1, 128, 256)})
    cls = cpu_paths.ProductClass("bfloat16", "one", "layer")
    calls = []

    def measure(path):
        calls.append(path)
        return layers.probe_product(cls, path)

    chosen = cpu_paths.choose(cls, measure)
    assert chosen in cpu_paths.PATHS and set(calls) == set(cpu_paths.PATHS)
    entry = json.loads((fresh_cache / cpu_paths.CACHE_FILE).read_text())["entries"][cls.key()]
    assert entry["path"] == chosen and set(entry["seconds"]) == set(cpu_paths.PATHS)

    cpu_paths.forget()

    def never(path):
        raise AssertionError("the cached answer should have been used")

    assert cpu_paths.choose(cls, never) == chosen


def test_the_faster_form_wins_and_ties_keep_the_reference(fresh_cache):
    fast_upcast = {"dot": 2e-3, "upcast": 1e-3}
    cls = cpu_paths.ProductClass("int8", "one", "table")
    assert cpu_paths.choose(cls, fast_upcast.get) == "upcast"
    tie = {"dot": 1.0e-3, "upcast": 0.95e-3}  # within MARGIN: not worth leaving the reference
    assert cpu_paths.choose(cpu_paths.ProductClass("int8", "few", "table"), tie.get) == "dot"


def test_corrupt_cache_file_is_ignored_with_a_warning(fresh_cache):
    path = fresh_cache / cpu_paths.CACHE_FILE
    for junk in (
        "{not json",
        json.dumps({"format": 1, "entries": {"k": {"path": "gpu"}}}),
        json.dumps([1, 2]),
    ):
        path.write_text(junk)
        cpu_paths.forget()
        cls = cpu_paths.ProductClass("bfloat16", "few", "layer")
        with pytest.warns(RuntimeWarning, match="ignoring the compiled-path cache"):
            assert cpu_paths.choose(cls, {"dot": 1e-3, "upcast": 3e-3}.get) == "dot"
        # rewritten whole, with the new answer
        assert json.loads(path.read_text())["entries"][cls.key()]["path"] == "dot"


def test_environment_variable_forces_a_form(fresh_cache, monkeypatch):
    cls = cpu_paths.ProductClass("bfloat16", "one", "table")
    monkeypatch.setenv(cpu_paths.ENV_VAR, "upcast")
    assert cpu_paths.choose(cls, lambda p: 1 / 0) == "upcast"
    monkeypatch.setenv(cpu_paths.ENV_VAR, "fastest")
    with pytest.raises(ConfigError, match="GEMMA_KIT_MATMUL_PATH"):
        cpu_paths.choose(cls, lambda p: 1.0)
    assert not (fresh_cache / cpu_paths.CACHE_FILE).exists()
