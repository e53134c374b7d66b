"""Gemma 3 vision: the SigLIP image encoder, image preprocessing, image markers in prompts.

    from gemma_kit import vision
    pixels = vision.preprocess_image("photo.jpg")        # [896, 896, 3] float32 in [-1, 1] (Pillow)
    ids = vision.expand_markers(tokenizer.encode("What is in <start_of_image>?"), tokenizer, 256)

Most users never call these: `Sampler.generate(prompt, images=[...])` and
`ChatSession.send(message, images=[...])` read, preprocess, encode and place the images.

Modules: `siglip` (the encoder, official parameter names), `preprocess` (Pillow: decoding, RGB,
EXIF orientation, resize, normalisation, Pan & Scan; needs the [vision] extra), `prompt`
(marker expansion and the merge of image embeddings into the token embeddings).
"""

from gemma_kit.vision.prompt import (
    IMAGE_MARKER,
    SOFT_TOKEN,
    check_image_count,
    count_markers,
    expand_markers,
    merge_embeddings,
)

_PREPROCESS = (
    "load_image",
    "preprocess_image",
    "pan_and_scan_crops",
    "prepare_images",
    "ImageInput",
)


def __getattr__(name):
    # Pillow is an optional dependency ([vision] extra): import it only when asked for.
    if name in _PREPROCESS:
        from gemma_kit.vision import preprocess as module

        return getattr(module, name)
    raise AttributeError(f"module 'gemma_kit.vision' has no attribute {name!r}")


__all__ = [
    "IMAGE_MARKER",
    "SOFT_TOKEN",
    "check_image_count",
    "count_markers",
    "expand_markers",
    "merge_embeddings",
    *_PREPROCESS,
]
