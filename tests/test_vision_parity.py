"""Gemma 3 with images against transformers, on a tiny random Gemma3ForConditionalGeneration.

The model is built from configs (nothing is downloaded; tiny SigLIP with vision_use_head=False:
28x28 images, 7x7 patches, 4 soft tokens), every weight randomised (norm scales included), and
converted with gemma_kit.checkpoint.hf_vision. Float32 throughout. Tolerance: max abs diff
<= 1e-4 on logits of magnitude ~1-10 (observed ~5e-6: float32 rounding of two summation
orders).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch", reason="the parity tests need the [test] extra (torch)")
transformers = pytest.importorskip("transformers", reason="the parity tests need transformers")

from gemma_kit.checkpoint import hf_vision  # noqa: E402
from gemma_kit.errors import ConversionError  # noqa: E402
from gemma_kit.loading import model_from_params  # noqa: E402
from gemma_kit.vision.prompt import SOFT_TOKEN  # noqa: E402
from tests.support.vision_tiny import random_pixels  # noqa: E402

ATOL = 1e-4
IMAGE_ID, BOI, EOI, NL2 = 255, 253, 254, 108  # HF ids of the tiny config (vocabulary of 256)
M = 4
T = 40  # every prompt is left-padded to this length, so one compiled forward pass serves all


@functools.partial(jax.jit, static_argnames="graphdef")
def _forward(state, tokens, valid, images, *, graphdef):
    return nnx.merge(graphdef, state)(tokens, mask=valid, images=images)


def _logits(model, rows: list[np.ndarray], pixels: list[np.ndarray]) -> list[np.ndarray]:
    """gemma_kit logits of each row (HF ids), run as one left-padded [B, T] batch with up to
    two images per row."""
    B = len(rows)
    tokens, valid = np.zeros((B, T), np.int32), np.zeros((B, T), bool)
    images = np.zeros((B, 2, 28, 28, 3), np.float32)
    for r, ids in enumerate(rows):
        tokens[r, T - len(ids) :] = np.where(ids == IMAGE_ID, SOFT_TOKEN, ids)
        valid[r, T - len(ids) :] = True
        images[r, : len(pixels[r])] = pixels[r]
    graphdef, state = nnx.split(model)
    out = np.asarray(
        _forward(
            state, jnp.asarray(tokens), jnp.asarray(valid), jnp.asarray(images), graphdef=graphdef
        )
    )
    return [out[r, T - len(ids) :] for r, ids in enumerate(rows)]


@pytest.fixture(scope="module")
def models():
    text = transformers.Gemma3TextConfig(
        vocab_size=256,
        hidden_size=32,
        intermediate_size=40,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        sliding_window=6,
        query_pre_attn_scalar=16,
        layer_types=[
            "sliding_attention",
            "sliding_attention",
            "sliding_attention",
            "full_attention",
        ],
    )
    vision = transformers.SiglipVisionConfig(
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=28,
        patch_size=7,
        vision_use_head=False,
    )
    config = transformers.Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=M,
        image_token_index=IMAGE_ID,
        boi_token_index=BOI,
        eoi_token_index=EOI,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    hf_model = transformers.Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in hf_model.named_parameters():
            # Large enough that logits are O(1..10) and every mask and norm matters.
            p.normal_(0.0, 0.5 if "norm" in name else 0.15)
    ours = hf_vision.config_from_hf(hf_model.config, name="tiny")
    model = model_from_params(ours, hf_vision.params_from_hf(hf_model.state_dict(), ours))
    return hf_model, model


def _image_block() -> list[int]:
    return [NL2, BOI, *[IMAGE_ID] * M, EOI, NL2]


def _prompt(num_images: int, seed: int) -> np.ndarray:
    """bos, text, (image, text) * num_images: longer than the window of 6, so layers slide."""
    rng = np.random.default_rng(seed)

    def text(n: int) -> list[int]:  # ids clear of the image ids
        return rng.integers(3, 100, n).tolist()

    ids = [2, *text(5)]
    for _ in range(num_images):
        ids += _image_block() + text(7)
    return np.asarray(ids)


def _hf_logits(hf_model, ids: np.ndarray, pixels: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out = hf_model(
            input_ids=torch.tensor(ids[None]),
            pixel_values=torch.tensor(pixels.transpose(0, 3, 1, 2)),
            token_type_ids=torch.tensor((ids == IMAGE_ID)[None].astype(np.int64)),
        )
    return out.logits[0].float().numpy()


def test_config_conversion(models):
    hf_model, model = models
    vision = model.config.vision
    assert (vision.width, vision.depth, vision.mlp_dim, vision.num_heads) == (16, 2, 24, 2)
    assert (vision.patch_size, vision.image_size, vision.num_soft_tokens) == (7, 28, M)
    assert vision.pool_window == 2 and model.has_vision


def test_encoder_matches_siglip_vision_model(models):
    hf_model, model = models
    tower = hf_model.model.vision_tower
    assert isinstance(tower, transformers.SiglipVisionModel)
    pixels = random_pixels(3, seed=1)
    with torch.no_grad():
        ref = tower(pixel_values=torch.tensor(pixels.transpose(0, 3, 1, 2))).last_hidden_state
        ref_soft = hf_model.model.get_image_features(
            torch.tensor(pixels.transpose(0, 3, 1, 2))
        ).pooler_output
    ours = np.asarray(model.vision_encoder.siglip_encoder(jnp.asarray(pixels)))
    assert ours.shape == tuple(ref.shape) == (3, 16, 16)
    np.testing.assert_allclose(ours, ref.numpy(), rtol=0, atol=ATOL)
    # Pooling 2x2, the RMS norm and the projection into the text embedding space.
    soft = np.asarray(model.encode_images(jnp.asarray(pixels)))
    assert soft.shape == tuple(ref_soft.shape) == (3, M, 32)
    assert np.abs(ref_soft.numpy()).max() > 0.5
    np.testing.assert_allclose(soft, ref_soft.numpy(), rtol=0, atol=ATOL)


@pytest.mark.parametrize("num_images", [1, 2])
def test_logits_match_transformers(models, num_images):
    hf_model, model = models
    ids, pixels = _prompt(num_images, seed=num_images), random_pixels(num_images, seed=7)
    ref = _hf_logits(hf_model, ids, pixels)
    (ours,) = _logits(model, [ids], [pixels])
    assert ours.shape == ref.shape == (len(ids), 256)
    assert np.abs(ref).max() > 1.0, "weights too small for the comparison to mean anything"
    np.testing.assert_allclose(ours, ref, rtol=0, atol=ATOL)


def test_images_matter_and_attend_both_ways(models):
    """Guards the comparison above against passing vacuously: other pixels change the logits,
    and so does a causal-only mask over the image (transformers without token_type_ids)."""
    hf_model, model = models
    ids, pixels = _prompt(2, seed=2), random_pixels(2, seed=7)
    (ours,) = _logits(model, [ids], [pixels])
    (other,) = _logits(model, [ids], [random_pixels(2, seed=8)])
    assert np.abs(ours - other).max() > 0.1
    with torch.no_grad():
        causal_only = hf_model(
            input_ids=torch.tensor(ids[None]),
            pixel_values=torch.tensor(pixels.transpose(0, 3, 1, 2)),
        ).logits[0]
    first_slot = int(np.argmax(ids == IMAGE_ID))
    # The first soft token sees the whole image only with the bidirectional mask.
    assert np.abs(ours[first_slot] - causal_only[first_slot].numpy()).max() > 0.1


def test_left_padded_batch_with_different_numbers_of_images(models):
    hf_model, model = models
    # Row 1 pads its second image (zeros, never placed), row 2 has none; all are left-padded.
    rows = [_prompt(2, seed=3), _prompt(1, seed=4), _prompt(0, seed=5)]
    pixels = [random_pixels(2, seed=11), random_pixels(1, seed=12), random_pixels(0, seed=13)]
    batched = _logits(model, rows, pixels)
    for r, ids in enumerate(rows):
        if len(pixels[r]):
            ref = _hf_logits(hf_model, ids, pixels[r])
        else:
            with torch.no_grad():
                ref = hf_model(input_ids=torch.tensor(ids[None])).logits[0].numpy()
        np.testing.assert_allclose(batched[r], ref, rtol=0, atol=ATOL)


def test_conversion_consumes_every_vision_tensor(models):
    hf_model, model = models
    state = dict(hf_model.state_dict())
    state["model.vision_tower.encoder.layers.0.mlp.extra.weight"] = torch.zeros(3)
    with pytest.raises(ConversionError, match="not consumed"):
        hf_vision.vision_params_from_hf(state, model.config)
    del state["model.vision_tower.encoder.layers.0.mlp.extra.weight"]
    del state["model.vision_tower.encoder.layers.1.self_attn.k_proj.bias"]
    with pytest.raises(ConversionError, match="k_proj.bias.*missing"):
        hf_vision.vision_params_from_hf(state, model.config)
