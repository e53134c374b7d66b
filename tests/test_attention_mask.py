"""attention_mask, the one builder of a sequence's self-attention mask, against its definition
written out entry by entry."""

from __future__ import annotations

import itertools

import jax.numpy as jnp
import numpy as np

from gemma_kit.attention import attention_mask, image_blocks


def _by_definition(positions, valid, blocks, segments):
    """[B, T, T] from the rule each entry follows, one entry at a time."""
    B, T = positions.shape
    out = np.zeros((B, T, T), bool)
    for b, t, s in itertools.product(range(B), range(T), range(T)):
        sees = positions[b, s] <= positions[b, t] or (
            blocks[b, t] > 0 and blocks[b, t] == blocks[b, s]
        )
        sees = sees and valid[b, s]
        out[b, t, s] = sees and segments[b, t] == segments[b, s] and segments[b, s] > 0
    return out


def _packed_rows():
    """Two rows of 12 tokens: packed examples (segments 1, 2, 3, then padding), positions that
    restart at each example, image slots inside examples, and a left-padded row."""
    segments = np.array(
        [[1, 1, 1, 1, 2, 2, 2, 2, 2, 3, 3, 0], [0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1]]
    )
    positions = np.array(
        [[0, 1, 2, 3, 0, 1, 2, 3, 4, 0, 1, 0], [0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8]]
    )
    is_image = np.zeros((2, 12), bool)
    is_image[0, 1:3] = True  # an image in example 1
    is_image[0, 5:8] = True  # another in example 2
    is_image[1, 5:7] = True
    return positions, segments, is_image


def test_every_combination_matches_the_definition():
    positions, segments, is_image = _packed_rows()
    blocks = np.asarray(image_blocks(jnp.asarray(is_image)))
    assert blocks[0].tolist() == [0, 1, 1, 0, 0, 2, 2, 2, 0, 0, 0, 0]
    valid = segments > 0
    # What the definition means by an argument left out: every key valid, no images, one
    # example per row.
    all_valid, no_blocks, one_example = (
        np.ones_like(valid),
        np.zeros_like(blocks),
        np.ones_like(segments),
    )
    for use_valid, use_blocks, use_segments in itertools.product([False, True], repeat=3):
        got = attention_mask(
            jnp.asarray(positions),
            valid=jnp.asarray(valid) if use_valid else None,
            blocks=jnp.asarray(blocks) if use_blocks else None,
            segments=jnp.asarray(segments) if use_segments else None,
        )
        want = _by_definition(
            positions,
            valid if use_valid else all_valid,
            blocks if use_blocks else no_blocks,
            segments if use_segments else one_example,
        )
        np.testing.assert_array_equal(
            np.asarray(got),
            want,
            err_msg=f"valid={use_valid} blocks={use_blocks} segments={use_segments}",
        )


def test_packed_examples_never_see_each_other():
    positions, segments, is_image = _packed_rows()
    blocks = image_blocks(jnp.asarray(is_image))
    mask = np.asarray(
        attention_mask(jnp.asarray(positions), blocks=blocks, segments=jnp.asarray(segments))
    )
    row = mask[0]
    assert not row[4:9, :4].any() and not row[:4, 4:].any()  # examples 1 and 2 apart
    assert row[5, 7] and not row[4, 5]  # image slots see ahead within their image only
    assert not row[:, 11].any()  # no query sees the padding
