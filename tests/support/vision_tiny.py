"""Tiny multimodal Gemma 3 models and a small tokenizer with image markers, for the vision tests.

The tiny encoder keeps every structural feature of SigLIP (patch embedding, learned positions,
pre-LN blocks, pooling of a patch grid) at toy sizes: 28x28 images, 7x7 patches (a 4x4 grid)
pooled 2x2 to M = 4 soft tokens of width 16.
"""

from __future__ import annotations

import functools
import io

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gemma_kit.config import Config, GlobalAttention, LocalAttention, VisionConfig
from gemma_kit.tokenizer import Tokenizer
from gemma_kit.transformer import Transformer
from tests.support.tiny import SMALL_TEXT, tiny_gemma3

TINY_VISION = VisionConfig(
    width=16, depth=2, mlp_dim=24, num_heads=2, patch_size=7, image_size=28, num_soft_tokens=4
)
VOCAB = 384


def tiny_vision_config(vocab_size: int = VOCAB) -> Config:
    """Gemma 3 text layers as tests/support/tiny.py (window 6 > 4 soft tokens, shorter than the
    test prompts) with the tiny encoder."""
    return tiny_gemma3().replace(
        name="tiny-gemma3-vision",
        vocab_size=vocab_size,
        has_vision=True,
        vision_config=TINY_VISION,
        max_context=2048,
        layers=(LocalAttention(6), LocalAttention(6), GlobalAttention(rope_base=1_000_000.0)),
    )


def random_vision_model(config: Config, *, seed: int = 0, param_dtype=jnp.float32) -> Transformer:
    """A Transformer with an image encoder, every parameter (norms included) drawn at random."""
    abstract = nnx.eval_shape(
        lambda: Transformer(config, param_dtype=param_dtype, with_vision=True)
    )
    graphdef, state = nnx.split(abstract)
    rng = np.random.default_rng(seed)
    device = jax.devices()[0]
    params = jax.tree.map(
        lambda p: jax.device_put(rng.normal(0.0, 0.3, p.shape).astype(p.dtype), device),
        nnx.to_pure_dict(state),
    )
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


@functools.cache
def _tokenizer_bytes() -> bytes:
    """A real SentencePiece model laid out like Gemma 3's: <start_of_turn> 105, <end_of_turn>
    106, then <start_of_image> 107, <end_of_image> 108 and "\\n\\n" 109 as single pieces."""
    import sentencepiece as spm

    symbols = [f"<unused{i}>" for i in range(101)] + [
        "<start_of_turn>",
        "<end_of_turn>",
        "<start_of_image>",
        "<end_of_image>",
        "\n\n",
    ]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SMALL_TEXT.splitlines()),
        model_writer=model,
        vocab_size=VOCAB,
        model_type="bpe",
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        user_defined_symbols=symbols,
        character_coverage=1.0,
        num_threads=1,
        minloglevel=2,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
    )
    return model.getvalue()


def image_tokenizer() -> Tokenizer:
    return Tokenizer.from_bytes(_tokenizer_bytes(), name="small-image-tokenizer")


def random_pixels(n: int, seed: int = 0) -> np.ndarray:
    """n preprocessed-looking images [n, 28, 28, 3] in [-1, 1]."""
    return np.random.default_rng(seed).uniform(-1, 1, (n, 28, 28, 3)).astype(np.float32)


def drawn_image(width: int, height: int, seed: int = 0, mode: str = "RGB"):
    """A Pillow image with shapes and lines on it (structure at every scale, unlike noise)."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (width, height), tuple(int(c) for c in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x0, x1 = sorted(rng.integers(0, width, 2))
        y0, y1 = sorted(rng.integers(0, height, 2))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            draw.ellipse((x0, y0, x1, y1), fill=colour)
        else:
            draw.line((x0, y0, x1, y1), fill=colour, width=int(rng.integers(1, 6)))
    return image if mode == "RGB" else image.convert(mode)
