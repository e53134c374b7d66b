"""The per-CPU product forms and vector width (gemma_kit.cpu_paths, layers.matmul_t,
gemma_kit.tuned_jit): every form, at either vector width, computes the same products as a float64
reference; decoding at either width gives the same tokens; the probe's answer is cached, read
back, and survives a corrupt cache file."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma_kit import Sampler, cpu_paths, decode, int4, layers, quant
from gemma_kit.errors import ConfigError
from gemma_kit.layers import matmul_t


def _bf16(x):
    return np.asarray(
        jnp.asarray(x, jnp.float32).astype(jnp.bfloat16).astype(jnp.float32), np.float64
    )


@pytest.mark.parametrize("width", cpu_paths.WIDTHS)
@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("stored", ["bfloat16", "int8", "int4"])
def test_every_form_gives_the_reference_products(stored, rows, width):
    """x [rows, I] @ W^T in the dot and upcast forms, compiled for each vector width, against
    float64 (x rounded to bf16, the numerics every form promises). Tolerance: float32
    accumulation over I = 256 terms, 1e-5 of sum |x| |w| per output; the dot form rounds int4
    weights q s + m to bf16, so there 2^-8 of it (bf16's relative step is 2^-8 at most)."""
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
    options = {cpu_paths.WIDTH_OPTION: int(width)}
    for path in cpu_paths.PATHS:
        product = jax.jit(
            lambda x, path=path: matmul_t(
                x, *args, None if scale is None else jnp.asarray(scale), path=path
            ),
            compiler_options=options,
        )
        got = np.asarray(product(jnp.asarray(x)))
        assert got.shape == (rows, O) and got.dtype == np.float32
        tol = (2.0**-8 if (stored, path) == ("int4", "dot") else 1e-5) * magnitude + 1e-30
        assert (np.abs(got - reference) <= tol).all(), (path, np.abs(got - reference).max())


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """An empty $GEMMA_KIT_CACHE, nothing remembered in memory, no forced form or width."""
    monkeypatch.setenv("GEMMA_KIT_CACHE", str(tmp_path))
    monkeypatch.delenv(cpu_paths.ENV_VAR, raising=False)
    monkeypatch.delenv(cpu_paths.WIDTH_ENV_VAR, raising=False)
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
    assert entry["choice"] == chosen and set(entry["seconds"]) == set(cpu_paths.PATHS)

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
        json.dumps({"format": cpu_paths.CACHE_FORMAT, "entries": {"k": {"choice": 5}}}),
        json.dumps([1, 2]),
    ):
        path.write_text(junk)
        cpu_paths.forget()
        cls = cpu_paths.ProductClass("bfloat16", "few", "layer")
        with pytest.warns(RuntimeWarning, match="ignoring the compiled-path cache"):
            assert cpu_paths.choose(cls, {"dot": 1e-3, "upcast": 3e-3}.get) == "dot"
        # rewritten whole, with the new answer
        assert json.loads(path.read_text())["entries"][cls.key()]["choice"] == "dot"


def test_an_older_cache_format_is_replaced_quietly(fresh_cache, recwarn):
    """A format-1 file (this module's own, before the vector width) is not corrupt: its
    questions are probed again and the file rewritten, without a warning."""
    path = fresh_cache / cpu_paths.CACHE_FILE
    path.write_text(json.dumps({"format": 1, "entries": {"k": {"path": "upcast"}}}))
    cls = cpu_paths.ProductClass("int8", "one", "layer")
    assert cpu_paths.choose(cls, {"dot": 1e-3, "upcast": 3e-3}.get) == "dot"
    data = json.loads(path.read_text())
    assert data["format"] == cpu_paths.CACHE_FORMAT and set(data["entries"]) == {cls.key()}
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


def test_environment_variable_forces_a_form(fresh_cache, monkeypatch):
    cls = cpu_paths.ProductClass("bfloat16", "one", "table")
    monkeypatch.setenv(cpu_paths.ENV_VAR, "upcast")
    assert cpu_paths.choose(cls, lambda p: 1 / 0) == "upcast"
    monkeypatch.setenv(cpu_paths.ENV_VAR, "fastest")
    with pytest.raises(ConfigError, match="GEMMA_KIT_MATMUL_PATH"):
        cpu_paths.choose(cls, lambda p: 1.0)
    assert not (fresh_cache / cpu_paths.CACHE_FILE).exists()


def test_vector_width_is_probed_cached_and_forced(fresh_cache, monkeypatch):
    """The width question: the faster width wins by MARGIN (a tie keeps XLA's 256), the answer
    becomes the decode programs' compiler options and is cached; GEMMA_KIT_VECTOR_WIDTH forces
    it; a CPU without AVX-512 is not probed at all."""
    monkeypatch.setattr(cpu_paths, "cpu_flags", lambda: frozenset({"avx512f", "fma"}))
    width = cpu_paths.VectorWidth()
    assert cpu_paths.compiler_options({"256": 2e-3, "512": 1e-3}.get) == {
        cpu_paths.WIDTH_OPTION: 512
    }
    entry = json.loads((fresh_cache / cpu_paths.CACHE_FILE).read_text())["entries"][width.key()]
    assert entry["choice"] == "512" and set(entry["seconds"]) == set(cpu_paths.WIDTHS)
    cpu_paths.forget()
    assert cpu_paths.compiler_options(lambda w: 1 / 0) == {cpu_paths.WIDTH_OPTION: 512}

    (fresh_cache / cpu_paths.CACHE_FILE).unlink()
    cpu_paths.forget()
    assert cpu_paths.compiler_options({"256": 1.0e-3, "512": 0.95e-3}.get) == {}

    monkeypatch.setenv(cpu_paths.WIDTH_ENV_VAR, "512")
    assert cpu_paths.compiler_options(lambda w: 1 / 0) == {cpu_paths.WIDTH_OPTION: 512}
    monkeypatch.setenv(cpu_paths.WIDTH_ENV_VAR, "1024")
    with pytest.raises(ConfigError, match="GEMMA_KIT_VECTOR_WIDTH"):
        cpu_paths.compiler_options(lambda w: 1.0)

    monkeypatch.delenv(cpu_paths.WIDTH_ENV_VAR)
    monkeypatch.setattr(cpu_paths, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    cpu_paths.forget()
    assert cpu_paths.compiler_options(lambda w: 1 / 0) == {}


def test_a_real_width_probe_answers(fresh_cache, monkeypatch):
    """layers.probe_vector_width times the int8 probe at both widths (small shapes here)."""
    monkeypatch.setattr(layers, "PROBE_SHAPES", {"layer": (2, 64, 256), "table": (1, 128, 256)})
    monkeypatch.setattr(cpu_paths, "cpu_flags", lambda: frozenset({"avx512f"}))
    options = layers.decode_compiler_options()
    assert options in ({}, {cpu_paths.WIDTH_OPTION: 512})
    entries = cpu_paths.read_cache()
    assert entries[cpu_paths.VectorWidth().key()]["choice"] in cpu_paths.WIDTHS
    assert layers.WIDTH_PROBE_CLASS.key() in entries  # its form was chosen first


@pytest.mark.parametrize("weights", ["bf16", "int8", "int4"])
def test_decoding_at_either_width_gives_the_same_tokens(
    fresh_cache, monkeypatch, tiny_gemma3_config, tiny_model, small_tokenizer, weights
):
    """Greedy decoding of a tiny model with the decode programs compiled for 256- and 512-bit
    vectors (forced): the same tokens, and log-probs within 1e-4 (float32 sums in another
    order). The programs carry the option: decode_loop keeps one jitted function per width."""
    # Every contracted width a multiple of 32, for int4's groups.
    config = tiny_gemma3_config.replace(
        embed_dim=64, hidden_dim=64, vocab_size=small_tokenizer.vocab_size, max_context=128
    )
    model = tiny_model(config, param_dtype=jnp.bfloat16)
    if weights != "bf16":
        model = quant.quantize_model(model, embedding=True, bits=8 if weights == "int8" else 4)
    results = {}
    for width in cpu_paths.WIDTHS:
        monkeypatch.setenv(cpu_paths.WIDTH_ENV_VAR, width)
        out = Sampler(model, small_tokenizer, cache_length=64).generate(
            ["a b c", "the cat"], max_new_tokens=12, temperature=0.0
        )
        results[width] = out
    a, b = results["256"], results["512"]
    for x, y in zip(a, b):
        assert x.tokens == y.tokens
        np.testing.assert_allclose(x.logprobs, y.logprobs, atol=1e-4)
    assert ((cpu_paths.WIDTH_OPTION, 512),) in decode.decode_loop.jitted


def test_an_option_that_fails_is_left_out_with_a_warning(fresh_cache, monkeypatch):
    """A width whose program fails to compile keeps the reference (the answer is cached, with
    an infinite time for the failed one); a failing reference is raised."""
    monkeypatch.setattr(cpu_paths, "cpu_flags", lambda: frozenset({"avx512f"}))

    def measure(width):
        if width == "512":
            raise RuntimeError("no such vector width")
        return 1e-3

    with pytest.warns(RuntimeWarning, match="'512' failed on this machine"):
        assert cpu_paths.compiler_options(measure) == {}
    entry = cpu_paths.read_cache()[cpu_paths.VectorWidth().key()]
    assert entry["choice"] == "256" and entry["seconds"]["512"] == float("inf")

    def broken_reference(path):
        raise RuntimeError("the reference form is broken")

    with pytest.raises(RuntimeError, match="reference form is broken"):
        cpu_paths.choose(cpu_paths.ProductClass("int8", "few", "layer"), broken_reference)
