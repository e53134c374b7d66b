"""Sampling with images: Sampler.generate / stream and ChatSession with images, against full
forward passes; cached multimodal decoding against the full forward pass; bad input.

A tiny random multimodal model (tests/support/vision_tiny.py: 28x28 images -> 4 soft tokens, a
sliding window of 6 shorter than the prompts) and a real small SentencePiece tokenizer with
Gemma 3's image markers. The reference for every generated token is a greedy argmax of full
forward passes (no cache) over the prompt with its images; caches are float32 here, so
log-probabilities agree to <= 1e-4 (observed ~1e-6).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

pytest.importorskip("PIL", reason="image tests need Pillow (the [vision] extra)")

from gemma_kit import sampler as sampler_module  # noqa: E402
from gemma_kit.cache import init_cache  # noqa: E402
from gemma_kit.chat import ChatSession  # noqa: E402
from gemma_kit.errors import ImageError  # noqa: E402
from gemma_kit.sampler import Sampler  # noqa: E402
from gemma_kit.vision import prompt as image_prompt  # noqa: E402
from gemma_kit.vision.preprocess import prepare_images  # noqa: E402
from tests.support.vision_tiny import (  # noqa: E402
    drawn_image,
    image_tokenizer,
    random_pixels,
    random_vision_model,
    tiny_vision_config,
)

ATOL = 1e-4
NEW = 6  # tokens generated per test: few compiled shapes, enough to see the decode loop work
BUFFER = 160  # the reference's fixed forward length (one compiled shape)


@pytest.fixture(scope="module")
def setup():
    config = tiny_vision_config()
    model = random_vision_model(config, seed=3)
    tok = image_tokenizer()
    return model, tok, Sampler(model, tok, cache_dtype=jnp.float32)


IMAGES = [drawn_image(60, 40, seed=1), drawn_image(30, 90, seed=2), drawn_image(50, 50, seed=3)]


@functools.partial(jax.jit, static_argnames="graphdef")
def _forward(state, tokens, images, *, graphdef):
    return nnx.merge(graphdef, state)(tokens, images=images)


def _full_logits(model, ids: list[int], pixels: np.ndarray) -> np.ndarray:
    """Logits of a full forward pass over `ids` with up to 4 images: the sequence sits
    right-padded in a fixed buffer (later positions never change earlier logits: text is causal
    and every image complete), so one compiled shape serves every call of this file."""
    graphdef, state = nnx.split(model)
    images = np.zeros((1, 4, 28, 28, 3), np.float32)
    images[0, : len(pixels)] = pixels
    buffer = np.zeros((1, BUFFER), np.int32)
    buffer[0, : len(ids)] = ids
    logits = _forward(state, jnp.asarray(buffer), jnp.asarray(images), graphdef=graphdef)
    return np.array(logits[0, : len(ids)], np.float32)  # a writable copy


def _reference(model, ids: list[int], pixels: np.ndarray, n: int = NEW):
    """Greedy continuation of `ids` by full forward passes, and each chosen token's log-prob."""
    seq, logprobs = list(ids), []
    for _ in range(n):
        row = np.asarray(jax.nn.log_softmax(_full_logits(model, seq, pixels)[-1]))
        seq.append(int(np.argmax(row)))
        logprobs.append(float(row[seq[-1]]))
    return seq[len(ids) :], logprobs


def _prompt_ids(sampler, text: str) -> list[int]:
    return sampler.expand_images(sampler.tokenizer.encode(text))


def _check(result, model, ids, pixels):
    tokens, logprobs = _reference(model, ids, pixels, len(result.tokens))
    assert result.tokens == tokens
    np.testing.assert_allclose(result.logprobs, logprobs, rtol=0, atol=ATOL)


PROMPT_2 = "Compare <start_of_image> with <start_of_image> for me."
PROMPT_1 = "What is in <start_of_image> here?"


class _CountEncodings:
    """Wraps the sampler's compiled encoder call and counts the images it encodes."""

    def __init__(self, monkeypatch):
        self.images = 0
        real = sampler_module.encode_images

        def counting(params, pixels, **kw):
            self.images += pixels.shape[0]
            return real(params, pixels, **kw)

        monkeypatch.setattr(sampler_module, "encode_images", counting)


def test_generate_batch_with_images_equals_full_forward(setup, monkeypatch):
    """Rows with two, one and no images (left-padded together): every token and log-prob is
    the full forward pass's; each image is encoded once; other images give other outputs."""
    model, tok, sampler = setup
    count = _CountEncodings(monkeypatch)
    prompts = [PROMPT_2, PROMPT_1, "No picture in this one at all.", PROMPT_2]
    images = [IMAGES[:2], [IMAGES[2]], [], IMAGES[1::-1]]
    results = sampler.generate(prompts, images=images, max_new_tokens=NEW, stop_token_ids=[])
    assert count.images == 2 + 1 + 0 + 2
    for prompt, row_images, result in zip(prompts, images, results):
        ids = _prompt_ids(sampler, prompt)
        assert ids.count(image_prompt.SOFT_TOKEN) == 4 * len(row_images)
        assert result.prompt_tokens == len(ids) and len(result.tokens) == NEW
        pixels, _ = prepare_images(row_images, 28)
        _check(result, model, ids, pixels)
    # The images matter: the same prompt with its two images swapped reads differently.
    assert (
        results[3].tokens != results[0].tokens
        or np.abs(np.subtract(results[3].logprobs, results[0].logprobs)).max() > 1e-3
    )


def test_stream_with_an_image_equals_full_forward(setup):
    model, tok, sampler = setup
    pieces = list(sampler.stream(PROMPT_1, images=IMAGES[2], max_new_tokens=NEW, stop_token_ids=[]))
    pixels, _ = prepare_images([IMAGES[2]], 28)
    tokens, _ = _reference(model, _prompt_ids(sampler, PROMPT_1), pixels)
    assert "".join(pieces) == tok.decode(tokens)


def test_pan_and_scan_adds_crops(setup):
    model, tok, sampler = setup
    wide = drawn_image(1200, 500, seed=4)  # 2.4:1 -> 2 crops of 600x500
    result = sampler.generate(
        PROMPT_1, images=[wide], pan_and_scan=True, max_new_tokens=NEW, stop_token_ids=[]
    )
    pixels, crops = prepare_images([wide], 28, pan_and_scan=True)
    assert crops == [2] and len(pixels) == 3
    text = image_prompt.with_crops(PROMPT_1, crops)
    assert text.count(image_prompt.IMAGE_MARKER) == 3 and "crops" in text
    _check(result, model, _prompt_ids(sampler, text), pixels)


def test_chat_with_images_across_turns(setup, monkeypatch):
    model, tok, _ = setup
    count = _CountEncodings(monkeypatch)
    chat = ChatSession(model, tok, cache_length=256, cache_dtype=jnp.float32)
    greedy = dict(max_new_tokens=NEW, temperature=0.0, dry=None)  # ChatSession samples
    chat.send("Look at <start_of_image> please", images=[IMAGES[0]], **greedy)
    chat.send("And now <start_of_image> and <start_of_image>?", images=IMAGES[1:], **greedy)
    chat.send("Which one was first?", **greedy)
    assert count.images == 3  # each image once, the text-only turn none
    # Every reply token is the greedy choice of a full forward pass over the conversation so
    # far with all its images in order, although each turn only fed the new tokens.
    pixels, _ = prepare_images(IMAGES, 28)
    ids = chat.token_ids
    assert ids.count(image_prompt.SOFT_TOKEN) == 3 * 4
    logits = _full_logits(model, ids, pixels)
    logits[:, [tok.start_of_image_id, tok.end_of_image_id]] = -np.inf  # never drawn
    greedy = np.argmax(logits, axis=-1)
    opener = tok.encode("<start_of_turn>model\n", add_bos=False)
    starts = [i + len(opener) for i in range(len(ids)) if ids[i : i + len(opener)] == opener]
    assert len(starts) == 3
    for start, end in zip(starts, starts[1:] + [len(ids)]):
        reply_end = (
            ids.index(tok.end_of_turn_id, start) if tok.end_of_turn_id in ids[start:end] else end
        )
        assert reply_end > start
        for i in range(start, reply_end):
            assert ids[i] == greedy[i - 1], f"token {i} of a reply is not the greedy choice"
    # Re-reading the conversation (after undo) re-uses the stored embeddings.
    chat.undo()
    chat.send("Which one was first, again?", max_new_tokens=2)
    assert count.images == 3
    # A reply that spelled out the marker would, re-read, become a fourth marker for three
    # images: refused with a clear error rather than misplacing the images.
    chat.messages[-1]["content"] += " <start_of_image>"
    chat._state = None  # the next turn re-reads the conversation (as after an interrupted turn)
    with pytest.raises(ImageError, match="4 <start_of_image> markers for 3 images.*reset"):
        chat.send("Go on.", max_new_tokens=2)


@functools.partial(jax.jit, static_argnames=("graphdef", "fresh"))
def _extend(state, tokens, positions, cache, images, *, graphdef, fresh=False):
    model = nnx.merge(graphdef, state)
    embeddings = None
    if images is not None:
        flat = model.encode_images(images.reshape(-1, *images.shape[2:]))
        embeddings = flat.reshape(*images.shape[:2], *flat.shape[1:])
    hidden, cache = model.extend(tokens, positions, cache, fresh=fresh, image_embeddings=embeddings)
    return model.logits(hidden), cache


def test_cached_multimodal_decoding_equals_full_forward(setup):
    """Prefill with one image, add a chunk with another (its slots in one non-fresh call), then
    single tokens: every logit equals the full forward pass's, long past the sliding window (6)
    and through the wrapped ring buffers of the local layers, in a left-padded batch of two."""
    model, tok, _ = setup
    graphdef, state = nnx.split(model)
    M = 4

    def block():
        return [
            109,
            tok.start_of_image_id,
            *[image_prompt.SOFT_TOKEN] * M,
            tok.end_of_image_id,
            109,
        ]

    rng = np.random.default_rng(0)
    text = lambda n: [int(t) for t in rng.integers(110, 384, n)]  # noqa: E731
    rows = [[2, *text(3), *block(), *text(5)], [2, *text(9)]]  # row 1: no image, shorter
    chunks = [[*text(2), *block(), *text(3)], [*text(3), *block(), *text(2)]]
    steps = [text(7), text(7)]
    pixels = random_pixels(3, seed=5)
    # Row 1 has no image in its prompt: its slot in the prefill's image batch is padding.
    prefill_images = np.stack([pixels[:1], np.zeros_like(pixels[:1])])
    chunk_images = np.stack([pixels[1:2], pixels[2:3]])

    P = max(map(len, rows))
    tokens = np.zeros((2, P), np.int32)
    positions = np.full((2, P), -1, np.int32)
    for r, ids in enumerate(rows):
        tokens[r, P - len(ids) :] = ids
        positions[r, P - len(ids) :] = np.arange(len(ids))
    cache = init_cache(model.config, 2, 64, jnp.float32)
    logits0, cache = _extend(
        state,
        jnp.asarray(tokens),
        jnp.asarray(positions),
        cache,
        jnp.asarray(prefill_images),
        graphdef=graphdef,
        fresh=True,
    )
    pos = positions.max(axis=1, keepdims=True) + 1 + np.arange(len(chunks[0]))
    logits1, cache = _extend(
        state,
        jnp.asarray(chunks),
        jnp.asarray(pos),
        cache,
        jnp.asarray(chunk_images),
        graphdef=graphdef,
    )
    outs = [logits0, logits1]
    for s in range(7):
        step = np.asarray([[steps[0][s]], [steps[1][s]]], np.int32)
        out, cache = _extend(
            state,
            jnp.asarray(step),
            jnp.asarray(pos[:, -1:] + 1 + s),
            cache,
            None,
            graphdef=graphdef,
        )
        outs.append(out)
    cached = np.concatenate([np.asarray(o) for o in outs], axis=1)
    assert len(rows[0]) + len(chunks[0]) + 7 > 3 * 6  # the window of 6 slid, the rings wrapped

    for r in range(2):
        full = rows[r] + chunks[r] + steps[r]
        row_pixels = pixels[[0, 1]] if r == 0 else pixels[[2]]
        ref = _full_logits(model, full, row_pixels)
        np.testing.assert_allclose(cached[r, P - len(rows[r]) :], ref, rtol=0, atol=ATOL)


def test_text_only_prompts_take_the_text_path(setup):
    """Without images a multimodal model samples exactly as its text-only self: same tokens,
    same log-probabilities (no image work, the text-only compiled programs)."""
    from gemma_kit.loading import model_from_params

    model, tok, sampler = setup
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    text_params = {k: v for k, v in params.items() if k != "vision_encoder"}
    text_params["embedder"] = {"input_embedding": params["embedder"]["input_embedding"]}
    text_model = model_from_params(model.config, text_params)
    assert not text_model.has_vision
    prompt = "A plain text prompt, long enough to pass the window."
    ours = sampler.generate(prompt, max_new_tokens=NEW, stop_token_ids=[])
    theirs = Sampler(text_model, tok, cache_dtype=jnp.float32).generate(
        prompt, max_new_tokens=NEW, stop_token_ids=[]
    )
    assert ours.tokens == theirs.tokens and ours.logprobs == theirs.logprobs


# --------------------------------------------------------------------------------------------
# Bad input


def test_text_only_model_rejects_images(setup):
    model, tok, _ = setup
    from tests.support.tiny import random_model

    text_model = random_model(model.config)
    with pytest.raises(ImageError, match="no image encoder.*text only"):
        Sampler(text_model, tok).generate(PROMPT_1, images=[IMAGES[0]])
    with pytest.raises(ImageError, match="no image encoder"):
        ChatSession(text_model, tok).send(PROMPT_1, images=[IMAGES[0]])


@pytest.mark.parametrize(
    "prompt, images, words",
    [
        (PROMPT_1, IMAGES[:2], ["1 <start_of_image> marker but 2 images"]),
        (PROMPT_2, IMAGES[:1], ["2 <start_of_image> markers but 1 image was given"]),
        ("No marker here.", IMAGES[:1], ["0 <start_of_image> markers but 1 image"]),
        (PROMPT_1, None, ["1 <start_of_image> marker but 0 images"]),
    ],
)
def test_marker_and_image_counts_must_match(setup, prompt, images, words):
    model, tok, sampler = setup
    with pytest.raises(ImageError) as err:
        sampler.generate(prompt, images=images, max_new_tokens=2)
    for word in words:
        assert word in str(err.value)
    assert "one <start_of_image> in the text where each image goes" in str(err.value)
    chat = ChatSession(model, tok, cache_length=128)
    with pytest.raises(ImageError, match="the message has"):
        chat.send(prompt, images=images, max_new_tokens=2)
    assert chat.messages == [] and chat.token_ids == []  # nothing half-recorded


def test_batch_needs_one_image_list_per_prompt(setup):
    model, tok, sampler = setup
    with pytest.raises(ImageError, match="2 prompts but 1 image lists"):
        sampler.generate([PROMPT_1, PROMPT_1], images=[[IMAGES[0]]], max_new_tokens=2)
    with pytest.raises(ImageError, match="prompt 1 has 1 <start_of_image> marker but 0 images"):
        sampler.generate([PROMPT_1, PROMPT_1], images=[[IMAGES[0]], []], max_new_tokens=2)


def test_unreadable_image_in_a_prompt(setup, tmp_path):
    model, tok, sampler = setup
    bad = tmp_path / "photo.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    with pytest.raises(ImageError, match="photo.png.*damaged|photo.png.*not an image"):
        sampler.generate(PROMPT_1, images=[bad], max_new_tokens=2)
