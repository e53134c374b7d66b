"""Shared tiny configurations, a tiny-model factory and a small real tokenizer (fixtures over
tests/support/tiny.py).

The tiny configs keep every structural feature of their family (so every code path and every
parameter name of a real checkpoint is exercised) at sizes that build and run in milliseconds.
"""

from __future__ import annotations

import gc

import jax
import pytest

from gemma_kit.config import Config
from gemma_kit.tokenizer import Tokenizer
from tests.support import tiny


@pytest.fixture
def tiny_gemma3_config() -> Config:
    return tiny.tiny_gemma3()


@pytest.fixture
def tiny_gemma2_config() -> Config:
    return tiny.tiny_gemma2()


@pytest.fixture
def tiny_model():
    """Factory: tiny_model(config, seed=0, param_dtype=float32) -> Transformer with every
    parameter random (see tiny.random_model)."""
    return tiny.random_model


@pytest.fixture(scope="session")
def small_tokenizer() -> Tokenizer:
    """A real 384-piece SentencePiece model with Gemma 3's special ids (tests/support/tiny.py)."""
    tok = tiny.small_tokenizer()
    assert (tok.version, tok.vocab_size, tok.start_of_turn_id, tok.end_of_turn_id) == (
        3,
        tiny.SMALL_VOCAB,
        105,
        106,
    )
    return tok


@pytest.fixture(scope="module", autouse=True)
def _release_compiled_programs():
    """After each test module, drop JAX's compiled programs. Each XLA:CPU executable holds a few
    memory mappings of its own, and the whole suite compiles enough of them in one process to
    reach the kernel's limit (vm.max_map_count, 65530 by default), after which LLVM crashes
    inside a compile (SIGSEGV or abort). Module-scoped fixtures are torn down by then."""
    yield
    jax.clear_caches()
    gc.collect()
