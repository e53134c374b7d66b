"""Tiny models and a small real tokenizer, as plain functions.

conftest.py wraps these as fixtures; subprocess workers (tests run on 8 fake devices need a fresh
process) call them directly, so a child rebuilds exactly the parent's model from a seed instead of
receiving arrays.
"""

from __future__ import annotations

import functools
import io
import pydoc_data.topics

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gemma_kit.config import Config, GlobalAttention, LocalAttention, get_preset
from gemma_kit.tokenizer import Tokenizer
from gemma_kit.transformer import Transformer

SMALL_VOCAB = 384
# CPython's own reference text (pydoc_data, PSF licence): real prose and code, always installed.
SMALL_TEXT = "\n".join(
    pydoc_data.topics.topics[k] for k in ("for", "while", "if", "try", "with", "function")
)


def tiny_gemma3() -> Config:
    """Gemma 3 style: GQA (N=4, K=2), QK-norm, [2, F, D] gating, two local layers + one global.

    The window (4) is shorter than the test sequences, so the sliding window actually cuts.
    """
    return get_preset("gemma3-270m").replace(
        name="tiny-gemma3",
        vocab_size=256,
        embed_dim=32,
        hidden_dim=48,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        layers=(LocalAttention(4), LocalAttention(4), GlobalAttention(rope_base=1_000_000.0)),
        query_pre_attn_scalar=16,
        max_context=64,
    )


def tiny_gemma2() -> Config:
    """Gemma 2 style: MHA (N == K, so one fused qkv_einsum), [2, D, F] gating, soft-caps."""
    return get_preset("gemma2-2b").replace(
        name="tiny-gemma2",
        vocab_size=256,
        embed_dim=32,
        hidden_dim=48,
        num_heads=4,
        num_kv_heads=4,
        head_dim=16,
        layers=(LocalAttention(4), GlobalAttention()),
        query_pre_attn_scalar=16,
        transpose_gating=False,
        max_context=64,
    )


def random_params(config: Config, *, seed: int = 0, param_dtype=jnp.float32) -> dict:
    """Every parameter, norm scales included, drawn from N(0, 0.3^2) as numpy arrays.

    Random norm scales matter: the zero-initialised scales of a fresh model would make a dropped
    or swapped norm invisible to a comparison. Shapes come from eval_shape and values from
    numpy: initialising eagerly would compile one random-number kernel per shape (seconds).
    """
    abstract = nnx.eval_shape(lambda: Transformer(config, param_dtype=param_dtype))
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda p: rng.normal(0.0, 0.3, p.shape).astype(p.dtype),
        nnx.to_pure_dict(nnx.state(abstract, nnx.Param)),
    )


def random_model(config: Config, *, seed: int = 0, param_dtype=jnp.float32) -> Transformer:
    """A Transformer holding random_params(config, seed), committed to the first device."""
    abstract = nnx.eval_shape(lambda: Transformer(config, param_dtype=param_dtype))
    graphdef, state = nnx.split(abstract)
    device = jax.devices()[0]
    # Committed to the device, as restored checkpoints are, so that a jitted forward pass
    # compiled for one model is reused for the other side of a comparison.
    params = jax.tree.map(
        lambda x: jax.device_put(x, device),
        random_params(config, seed=seed, param_dtype=param_dtype),
    )
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


@functools.cache
def small_tokenizer_bytes(vocab: int = SMALL_VOCAB) -> bytes:
    """A real SentencePiece BPE model trained on SMALL_TEXT, laid out like Gemma 3's vocabulary.

    pad 0, eos 1, bos 2, unk 3, and 101 placeholders so that <start_of_turn> is 105 and
    <end_of_turn> 106, where Gemma 3 has them (the Tokenizer tells Gemma versions apart by that
    id). Training is deterministic (one thread), so every process gets the same bytes.
    """
    import sentencepiece as spm

    symbols = [f"<unused{i}>" for i in range(101)] + ["<start_of_turn>", "<end_of_turn>"]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SMALL_TEXT.splitlines()),
        model_writer=model,
        vocab_size=vocab,
        model_type="bpe",
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        user_defined_symbols=symbols,
        character_coverage=1.0,
        num_threads=1,
        minloglevel=2,
    )
    return model.getvalue()


def small_tokenizer(vocab: int = SMALL_VOCAB) -> Tokenizer:
    return Tokenizer.from_bytes(small_tokenizer_bytes(vocab), name="small-test-tokenizer")
