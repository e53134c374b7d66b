"""Image preprocessing for Gemma 3 with Pillow: decode, orient, RGB, resize, normalise; Pan & Scan.

The pipeline is the one transformers' Gemma 3 image processor runs (its Pillow backend,
`Gemma3ImageProcessorPil`), which gemma_kit's tests compare against pixel for pixel:

    any input -> RGB uint8 (transparency composited onto white) -> Pillow bilinear resize to
    S x S (Pillow's resize is antialiased when it shrinks) -> x / 127.5 - 1, in [-1, 1]

S is 896 for Gemma 3. The official library resizes with jax.image.resize (bilinear,
antialiased) and normalises the same way; the two resamplers differ by a few grey levels.

Beyond that processor, every input is read the same way: files, bytes, PIL images, numpy
arrays; the EXIF orientation of photos is applied (a portrait photo stays upright); 16-bit
images are scaled to 8 bits (x / 257) rather than clipped at 255, as Pillow's own RGB
conversion would.

Pan & Scan (optional, `pan_and_scan=True`): an image wider or taller than 1.2:1 is also cut
into 2 to 4 equal crops along its long side (each at least 256 pixels), each encoded as its own
image after the whole one, with transformers' defaults and rules.

Needs Pillow (pip install 'gemma-kit[vision]').
"""

from __future__ import annotations

import io
import itertools
import math
import os
import pathlib
from collections.abc import Sequence
from typing import Union

import numpy as np

from gemma_kit.errors import ImageError

try:
    from PIL import Image, ImageOps
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError(
        "gemma_kit.vision.preprocess needs Pillow: pip install 'gemma-kit[vision]'"
    ) from err

ImageInput = Union["Image.Image", np.ndarray, str, os.PathLike, bytes]

# transformers' Gemma3Processor defaults (processing_gemma3.py images_kwargs).
PAN_AND_SCAN_MIN_CROP = 256
PAN_AND_SCAN_MAX_CROPS = 4
PAN_AND_SCAN_MIN_RATIO = 1.2


def _describe(image) -> str:
    if isinstance(image, (str, os.PathLike)):
        return repr(str(image))
    if isinstance(image, (bytes, bytearray)):
        return f"{len(image)} bytes"
    return type(image).__name__


def _open(data: io.BytesIO | pathlib.Path, what: str) -> Image.Image:
    try:
        image = Image.open(data)
        image.load()  # decode now: a truncated or damaged file fails here, not later
    except Image.DecompressionBombError as err:
        raise ImageError(f"{what} is too large to decode safely ({err})") from None
    except Image.UnidentifiedImageError:
        raise ImageError(
            f"{what} is not an image file Pillow can read; use PNG, JPEG, WebP, GIF, BMP or TIFF"
        ) from None
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageError(f"{what} is damaged or truncated and cannot be decoded ({err})") from None
    return image


def _from_array(array: np.ndarray) -> Image.Image:
    """[H, W], [H, W, 1], [H, W, 3] or [H, W, 4] array -> PIL image (8 bits per channel).

    uint8 is taken as is, uint16 scaled by 1/257, floats must lie in [0, 1].
    """
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ImageError(
            f"an image array must be [height, width] or [height, width, 1|3|4] (channels last), "
            f"got shape {array.shape}"
        )
    if array.dtype == np.uint8:
        pass
    elif array.dtype == np.uint16:
        array = np.round(array / 257.0).astype(np.uint8)
    elif np.issubdtype(array.dtype, np.floating):
        if array.size and not (np.isfinite(array).all() and array.min() >= 0 and array.max() <= 1):
            raise ImageError(
                "a float image array must hold values in [0, 1]; pass uint8 for 0..255 values"
            )
        array = np.round(array * 255.0).astype(np.uint8)
    else:
        raise ImageError(
            f"image arrays must be uint8, uint16 or float in [0, 1], got dtype {array.dtype}"
        )
    if 0 in array.shape[:2]:
        raise ImageError(f"the image is empty ({array.shape[1]}x{array.shape[0]} pixels)")
    return Image.fromarray(np.ascontiguousarray(array))


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB, transparency composited onto white (as transformers does)."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit greyscale (PNG, TIFF): Pillow's own conversion would clip at 255.
        values = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.round(np.clip(values, 0, 65535) / 257.0).astype(np.uint8))
    elif image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        image = _from_array(values)
    if "A" in image.getbands() or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(image: ImageInput) -> Image.Image:
    """Reads a path, bytes, PIL image or array into an upright RGB PIL image.

    Raises ImageError for a missing, damaged or unsupported file and for an empty image.
    """
    what = f"the image {_describe(image)}"
    if isinstance(image, (str, os.PathLike)):
        path = pathlib.Path(image).expanduser()
        if not path.exists():
            raise ImageError(f"no image file at {str(path)!r}")
        if not path.is_file():
            raise ImageError(f"{str(path)!r} is not a file; pass the path of an image file")
        image = _open(path, what)
    elif isinstance(image, (bytes, bytearray, memoryview)):
        image = _open(io.BytesIO(bytes(image)), what)
    elif isinstance(image, Image.Image):
        pass
    elif hasattr(image, "__array__"):
        image = _from_array(np.asarray(image))
    else:
        raise ImageError(
            f"cannot read an image from a {type(image).__name__}; pass a file path, bytes, a PIL "
            "image or a [height, width, channels] array"
        )
    if image.width == 0 or image.height == 0:
        raise ImageError(f"the image is empty ({image.width}x{image.height} pixels)")
    try:
        # Photos store their rotation in EXIF; apply it so the model sees what a viewer shows.
        image = ImageOps.exif_transpose(image)
    except Exception:  # a damaged EXIF block: keep the pixels as stored
        pass
    return _to_rgb(image)


def pan_and_scan_crops(
    image: Image.Image,
    *,
    min_crop: int = PAN_AND_SCAN_MIN_CROP,
    max_crops: int = PAN_AND_SCAN_MAX_CROPS,
    min_ratio: float = PAN_AND_SCAN_MIN_RATIO,
) -> list[Image.Image]:
    """The crops Pan & Scan cuts an RGB image into ([] when it is not elongated enough).

    As transformers' Gemma 3 image processor: along the long side, round(aspect ratio) crops
    (half up), at most long side / min_crop of them, clamped to [2, max_crops]; each crop is
    ceil(side / n) long (the last one may be shorter); none if a crop would be under min_crop.
    """
    width, height = image.size
    long, short = max(width, height), min(width, height)
    if long / short < min_ratio:
        return []
    n = int(math.floor(long / short + 0.5))
    n = min(int(math.floor(long / min_crop)), n)
    n = min(max_crops, max(2, n))
    crops_w, crops_h = (n, 1) if width >= height else (1, n)
    crop_w, crop_h = int(math.ceil(width / crops_w)), int(math.ceil(height / crops_h))
    if min(crop_w, crop_h) < min_crop:
        return []
    boxes = [
        (x, y, min(x + crop_w, width), min(y + crop_h, height))
        for y, x in itertools.product(
            range(0, crops_h * crop_h, crop_h), range(0, crops_w * crop_w, crop_w)
        )
    ]
    return [image.crop(box) for box in boxes]


def _resize_normalise(rgb: Image.Image, size: int) -> np.ndarray:
    resized = rgb.resize((size, size), Image.Resampling.BILINEAR)
    pixels = np.asarray(resized, dtype=np.float32) / np.float32(127.5) - np.float32(1.0)
    return np.clip(pixels, -1.0, 1.0)


def preprocess_image(image: ImageInput, size: int = 896) -> np.ndarray:
    """One image -> [size, size, 3] float32 in [-1, 1], ready for the encoder."""
    return _resize_normalise(load_image(image), size)


def prepare_images(
    images: Sequence[ImageInput],
    size: int = 896,
    *,
    pan_and_scan: bool = False,
) -> tuple[np.ndarray, list[int]]:
    """Images -> (pixels [n, size, size, 3], crops per image).

    Without Pan & Scan n = len(images) and every crop count is 0. With it, each image is
    followed by its crops (gemma_kit.vision.prompt.with_crops writes the matching text).
    """
    pixels: list[np.ndarray] = []
    crops: list[int] = []
    for image in images:
        rgb = load_image(image)
        parts = pan_and_scan_crops(rgb) if pan_and_scan else []
        crops.append(len(parts))
        pixels.extend(_resize_normalise(p, size) for p in [rgb, *parts])
    if not pixels:
        return np.zeros((0, size, size, 3), np.float32), crops
    return np.stack(pixels), crops
