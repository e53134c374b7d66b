"""Image markers in prompts: expansion into soft-token slots, and merging the image embeddings.

A prompt shows where each image goes with the marker `<start_of_image>` (IMAGE_MARKER), one per
image, in the order the images are given:

    "Compare <start_of_image> with <start_of_image>. Which one is brighter?"

The tokenizer reads the marker as one token. Each marker token then becomes the sequence the
model was trained on (google-deepmind/gemma `gemma/gm/vision/_token_utils.py`
add_extra_tokens_for_images):

    "\\n\\n" <start_of_image> SOFT_TOKEN x M <end_of_image> "\\n\\n"      (M = 256)

SOFT_TOKEN is a placeholder id (-2, as in the official code), never a vocabulary id: the model
looks up no embedding for it but puts the image's M soft embeddings there, and the slots of one
image attend to each other in both directions (gemma_kit.attention.image_block_mask).

Nothing here needs Pillow; the functions are plain Python and jax.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from gemma_kit.errors import ImageError

IMAGE_MARKER = "<start_of_image>"
SOFT_TOKEN = -2

# Pan & Scan puts the whole image first and its crops after it, with this text around them
# (transformers' Gemma3Processor; the official library has no Pan & Scan).
_PAN_AND_SCAN = (
    "Here is the original image {marker} and here are some crops to help you see better {crops}"
)


def count_markers(text: str) -> int:
    return text.count(IMAGE_MARKER)


def check_image_count(text: str, num_images: int, where: str = "the prompt") -> None:
    """Raises ImageError unless `text` holds exactly one marker per image."""
    markers = count_markers(text)
    if markers != num_images:
        raise ImageError(
            f"{where} has {markers} {IMAGE_MARKER} marker{'s' if markers != 1 else ''} but "
            f"{num_images} image{'s were' if num_images != 1 else ' was'} given: put one "
            f"{IMAGE_MARKER} in the text where each image goes, in the order of the images"
        )


def with_crops(text: str, crops_per_image: Sequence[int]) -> str:
    """Rewrites the k-th marker of `text` for an image cut into crops_per_image[k] crops.

    An image with crops becomes "Here is the original image <marker> and here are some crops
    to help you see better <marker> <marker> ..." (one marker for the whole image, then one per
    crop), so that afterwards every marker stands for exactly one encoded picture.
    """
    check_image_count(text, len(crops_per_image))
    pieces = text.split(IMAGE_MARKER)
    out = [pieces[0]]
    for crops, after in zip(crops_per_image, pieces[1:]):
        if crops:
            out.append(
                _PAN_AND_SCAN.format(marker=IMAGE_MARKER, crops=" ".join([IMAGE_MARKER] * crops))
            )
        else:
            out.append(IMAGE_MARKER)
        out.append(after)
    return "".join(out)


def image_tokens(tokenizer, num_soft_tokens: int) -> list[int]:
    """The ids one marker expands to.

    "\\n\\n" <start_of_image> SOFT_TOKEN*M <end_of_image> "\\n\\n"
    """
    start, end = tokenizer.start_of_image_id, tokenizer.end_of_image_id
    if start is None or end is None:
        raise ImageError(
            f"the tokenizer {tokenizer!r} has no <start_of_image>/<end_of_image> tokens: images "
            "need a Gemma 3 tokenizer (the tokenizer.model shipped with a Gemma 3 checkpoint)"
        )
    newlines = tokenizer.encode("\n\n", add_bos=False)
    return [*newlines, start, *([SOFT_TOKEN] * num_soft_tokens), end, *newlines]


def expand_markers(ids: Sequence[int], tokenizer, num_soft_tokens: int) -> list[int]:
    """Token ids with every <start_of_image> id expanded into its image's soft-token slots."""
    start = tokenizer.start_of_image_id
    block = image_tokens(tokenizer, num_soft_tokens)
    out: list[int] = []
    for token in ids:
        if token == start:
            out.extend(block)
        else:
            out.append(int(token))
    return out


def soft_token_mask(tokens: jax.Array) -> jax.Array:
    """[B, T] ids -> [B, T] bool: True at soft-token slots."""
    return tokens == SOFT_TOKEN


def merge_embeddings(x: jax.Array, image_embeddings: jax.Array, soft: jax.Array) -> jax.Array:
    """Puts the image embeddings at the soft-token slots of each row.

    Args:
      x: [B, T, D] token embeddings (whatever sits at the slots is replaced).
      image_embeddings: [B, I, M, D], the images of each row in order; rows with fewer images
        than I are padded with anything (their extra embeddings are never placed).
      soft: [B, T] bool, the slots; a row's k-th slot receives its k-th embedding counted over
        images then soft tokens.
    Returns:
      [B, T, D] in the dtype of x.
    """
    B, I, M, D = image_embeddings.shape
    flat = image_embeddings.reshape(B, I * M, D).astype(x.dtype)
    # The k-th slot of a row takes flat embedding k: a gather by running count, no scatter.
    index = jnp.clip(jnp.cumsum(soft.astype(jnp.int32), axis=1) - 1, 0, I * M - 1)
    placed = jnp.take_along_axis(flat, index[..., None], axis=1)
    return jnp.where(soft[..., None], placed, x)
