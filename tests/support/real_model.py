"""The real Gemma 3 270M (the packaged Q4_K_M GGUF), opened once per test session.

transformers' GGUF loader is the reference the tests compare against. Loading is slow on 2 cores
(the model ~40 s, the tokenizer ~20 s, our GGUFReader ~20 s), hence the caches.
"""

from __future__ import annotations

import functools

import pytest

from gemma_kit.checkpoint.gguf import open_gguf
from gemma_kit.paths import default_gguf_path


@functools.cache
def gguf_reader():
    return open_gguf(default_gguf_path())


def _transformers():
    # The reference is the [test] extra; without it only the comparisons are skipped.
    pytest.importorskip("torch", reason="comparing with transformers needs the [test] extra")
    return pytest.importorskip("transformers", reason="comparing needs the [test] extra")


@functools.cache
def hf_gguf_tokenizer():
    path = default_gguf_path()
    return _transformers().AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@functools.cache
def hf_gguf_model():
    import torch

    transformers = _transformers()
    pytest.importorskip("accelerate", reason="transformers loads GGUF models only with accelerate")
    path = default_gguf_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    )
    return model.eval()
