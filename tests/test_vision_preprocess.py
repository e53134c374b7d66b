"""Image preprocessing against transformers' Gemma 3 image processor (its Pillow backend), Pan &
Scan crops, EXIF orientation, every kind of input; prompt expansion, the embedding merge and the
image-block mask; bad input.

The reference is `Gemma3ImageProcessorPil` at 896x896 with Gemma 3's settings, on images drawn
with Pillow (shapes and lines: structure at every scale, unlike noise). Tolerance 1e-6 on
values in [-1, 1] (observed: 0, both resize with Pillow and differ at most by float rounding of
the normalisation).
"""

from __future__ import annotations

import io

import jax.numpy as jnp
import numpy as np
import pytest

PIL = pytest.importorskip("PIL", reason="preprocessing needs Pillow (the [vision] extra)")
from PIL import Image, ImageOps  # noqa: E402

from gemma_kit.attention import image_block_mask, image_blocks  # noqa: E402
from gemma_kit.errors import ImageError  # noqa: E402
from gemma_kit.vision import prompt as image_prompt  # noqa: E402
from gemma_kit.vision.preprocess import (  # noqa: E402
    load_image,
    pan_and_scan_crops,
    prepare_images,
    preprocess_image,
)
from tests.support.vision_tiny import drawn_image, image_tokenizer  # noqa: E402

ATOL = 1e-6
S = 896


@pytest.fixture(scope="module")
def hf():
    pytest.importorskip("transformers", reason="the reference needs transformers")
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    processor = Gemma3ImageProcessorPil(size={"height": S, "width": S})

    def run(image, pan_and_scan=False):
        out = processor(
            image,
            return_tensors="np",
            do_pan_and_scan=pan_and_scan,
            pan_and_scan_min_crop_size=256,
            pan_and_scan_max_num_crops=4,
            pan_and_scan_min_ratio_to_activate=1.2,
        )
        return out["pixel_values"].transpose(0, 2, 3, 1), list(out["num_crops"])

    return run


def _transparent(image: Image.Image) -> Image.Image:
    rgba = image.convert("RGBA")
    alpha = np.tile(np.linspace(0, 255, rgba.width, dtype=np.uint8), (rgba.height, 1))
    rgba.putalpha(Image.fromarray(alpha))
    return rgba


CASES = {
    "rgb-small-wide": lambda: drawn_image(50, 30, seed=1),
    "rgb-large": lambda: drawn_image(1000, 700, seed=2),
    "rgb-exact-size": lambda: drawn_image(896, 896, seed=3),
    "rgb-thin-tall": lambda: drawn_image(17, 300, seed=4),
    "rgba-gradient-alpha": lambda: _transparent(drawn_image(120, 80, seed=5)),
    "greyscale-L": lambda: drawn_image(200, 150, seed=6, mode="L"),
    "greyscale-alpha-LA": lambda: _transparent(drawn_image(64, 64, seed=7)).convert("LA"),
    "palette-P": lambda: drawn_image(300, 100, seed=8).convert("P", palette=Image.Palette.ADAPTIVE),
    "palette-transparency": lambda: _palette_with_transparency(),
    "cmyk": lambda: drawn_image(90, 90, seed=9, mode="CMYK"),
    "bilevel-1": lambda: drawn_image(77, 55, seed=10, mode="1"),
    "one-pixel": lambda: drawn_image(1, 1, seed=11),
}


def _palette_with_transparency() -> Image.Image:
    image = drawn_image(100, 60, seed=12).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    image.info["transparency"] = 3  # palette index 3 is see-through, as in a GIF
    return image


@pytest.mark.parametrize("case", sorted(CASES))
def test_preprocessing_matches_transformers(hf, case):
    image = CASES[case]()
    ours = preprocess_image(image)
    ref, _ = hf(image)
    assert ours.shape == (S, S, 3) and ours.dtype == np.float32
    assert -1.0 <= ours.min() and ours.max() <= 1.0
    np.testing.assert_allclose(ours, ref[0], rtol=0, atol=ATOL)


def test_transparency_goes_onto_white(hf):
    clear = Image.new("RGBA", (40, 40), (10, 20, 30, 0))
    assert np.all(preprocess_image(clear) == 1.0)  # fully transparent: white everywhere


def test_16_bit_images_are_scaled_not_clipped(hf):
    # A 16-bit greyscale PNG: values up to 65535. Pillow's own RGB conversion clips them at 255
    # (nearly everything turns white); gemma_kit scales by 1/257, i.e. exactly the 8-bit image
    # with the same relative brightness, which is what the reference gets here.
    ramp = (np.arange(64 * 48).reshape(48, 64) * 21).astype(np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(ramp).save(buffer, "PNG")
    eight_bit = Image.fromarray(np.round(ramp / 257.0).astype(np.uint8))
    ref, _ = hf(eight_bit)
    np.testing.assert_allclose(preprocess_image(buffer.getvalue()), ref[0], rtol=0, atol=ATOL)
    np.testing.assert_allclose(preprocess_image(ramp), ref[0], rtol=0, atol=ATOL)


def test_exif_orientation_is_applied(hf, tmp_path):
    # A photo stored sideways with EXIF orientation 6 ("rotate 90 clockwise to view").
    image = drawn_image(120, 60, seed=13)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "photo.jpg"
    image.save(path, "JPEG", exif=exif.tobytes(), quality=95)
    upright = ImageOps.exif_transpose(Image.open(path))
    assert upright.size == (60, 120)
    ref, _ = hf(upright)
    np.testing.assert_allclose(preprocess_image(path), ref[0], rtol=0, atol=ATOL)
    assert load_image(path).size == (60, 120)


def test_every_kind_of_input_reads_the_same(tmp_path):
    image = drawn_image(80, 50, seed=14)
    path = tmp_path / "image.png"
    image.save(path)
    array = np.asarray(image)
    want = preprocess_image(image)
    for source in (
        path,
        str(path),
        path.read_bytes(),
        array,
        array.astype(np.uint16) * 257,
        array.astype(np.float32) / 255.0,
        jnp.asarray(array),
    ):
        np.testing.assert_array_equal(preprocess_image(source), want)
    grey = np.asarray(image.convert("L"))
    np.testing.assert_array_equal(preprocess_image(grey), preprocess_image(grey[..., None]))


@pytest.mark.parametrize(
    "size, crops",
    [
        ((1200, 500), 2),  # landscape, 2.4:1
        ((500, 1200), 2),  # portrait
        ((2400, 500), 4),  # 4.8:1 -> 5 crops wanted, capped at 4
        ((1500, 280), 4),  # 5.4:1, capped at 4 crops of 375x280
        ((700, 200), 0),  # crops would be 200 px high: under the 256 minimum
        ((600, 520), 0),  # 1.15:1, under the 1.2 ratio that activates Pan & Scan
        ((1000, 333), 3),  # 3:1 -> 3 crops of 334 px, the last one cut at the edge
    ],
)
def test_pan_and_scan_crops_equal_transformers(hf, size, crops):
    image = drawn_image(*size, seed=15)
    ours, counts = prepare_images([image], S, pan_and_scan=True)
    ref, ref_counts = hf(image, pan_and_scan=True)
    assert counts == ref_counts == [crops]
    assert ours.shape == ref.shape == (1 + crops, S, S, 3)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=ATOL)
    assert len(pan_and_scan_crops(image)) == crops


def test_prepare_images_without_pan_and_scan():
    images = [drawn_image(2400, 500, seed=16), drawn_image(30, 30, seed=17)]
    pixels, crops = prepare_images(images, 28)
    assert pixels.shape == (2, 28, 28, 3) and crops == [0, 0]
    assert prepare_images([], 28)[0].shape == (0, 28, 28, 3)


# --------------------------------------------------------------------------------------------
# Prompt expansion, merge and mask


def test_expand_markers_and_crops_text():
    tok = image_tokenizer()
    ids = tok.encode("See <start_of_image> and <start_of_image>.")
    expanded = image_prompt.expand_markers(ids, tok, 4)
    block = [109, tok.start_of_image_id, *[image_prompt.SOFT_TOKEN] * 4, tok.end_of_image_id, 109]
    first = ids.index(tok.start_of_image_id)
    assert expanded[:first] == ids[:first]
    assert expanded[first : first + len(block)] == block
    assert expanded.count(image_prompt.SOFT_TOKEN) == 8 and len(expanded) == len(ids) + 2 * 7
    text = image_prompt.with_crops("A <start_of_image> B <start_of_image> C", [2, 0])
    assert text == (
        "A Here is the original image <start_of_image> and here are some crops to "
        "help you see better <start_of_image> <start_of_image> B <start_of_image> C"
    )


def test_merge_embeddings_places_each_image_in_its_row():
    D, M = 3, 2
    soft = np.array([[0, 1, 1, 0, 1, 1, 0], [0, 0, 0, 1, 1, 0, 0]], bool)
    x = np.zeros((2, 7, D), np.float32)
    images = np.arange(2 * 2 * M * D, dtype=np.float32).reshape(2, 2, M, D) + 1
    merged = np.asarray(
        image_prompt.merge_embeddings(jnp.asarray(x), jnp.asarray(images), jnp.asarray(soft))
    )
    np.testing.assert_array_equal(merged[0, 1:3], images[0, 0])
    np.testing.assert_array_equal(merged[0, 4:6], images[0, 1])
    np.testing.assert_array_equal(merged[1, 3:5], images[1, 0])  # its second image is padding
    assert not merged[~soft].any()  # text positions untouched


def test_image_block_mask():
    soft = jnp.asarray([[0, 1, 1, 0, 1, 1, 1, 0]], bool)
    blocks = image_blocks(soft)
    np.testing.assert_array_equal(blocks, [[0, 1, 1, 0, 2, 2, 2, 0]])
    mask = np.asarray(image_block_mask(blocks, blocks))[0]
    want = np.zeros((8, 8), bool)
    want[1:3, 1:3] = True
    want[4:7, 4:7] = True
    np.testing.assert_array_equal(mask, want)


# --------------------------------------------------------------------------------------------
# Bad input: one clear ImageError each


def test_corrupt_and_unsupported_files(tmp_path):
    png = io.BytesIO()
    drawn_image(64, 64, seed=18).save(png, "PNG")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(png.getvalue()[: len(png.getvalue()) // 2])
    with pytest.raises(ImageError, match="truncated.png.*damaged or truncated"):
        load_image(truncated)
    with pytest.raises(ImageError, match="not an image file Pillow can read.*PNG, JPEG"):
        load_image(b"this is not an image at all")
    notes = tmp_path / "notes.pdf"
    notes.write_bytes(b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\n%%EOF\n")
    with pytest.raises(ImageError, match="notes.pdf.*not an image file"):
        load_image(notes)
    with pytest.raises(ImageError, match="no image file at"):
        load_image(tmp_path / "missing.jpg")
    with pytest.raises(ImageError, match="is not a file"):
        load_image(tmp_path)


@pytest.mark.parametrize(
    "image, words",
    [
        (Image.new("RGB", (0, 5)), "empty (0x5 pixels)"),
        (np.zeros((0, 4, 3), np.uint8), "empty (4x0 pixels)"),
        (np.zeros((4, 4, 2), np.uint8), "[height, width, 1|3|4]"),
        (np.zeros((4, 4, 3), np.int64), "uint8, uint16 or float"),
        (np.full((4, 4, 3), 2.0, np.float32), "values in [0, 1]"),
        (12345, "cannot read an image from a int"),
    ],
)
def test_bad_images(image, words):
    with pytest.raises(ImageError) as err:
        load_image(image)
    assert words in str(err.value)


def test_count_check_messages():
    with pytest.raises(
        ImageError, match="the prompt has 2 <start_of_image> markers but 1 image was given"
    ):
        image_prompt.check_image_count("<start_of_image><start_of_image>", 1)
    image_prompt.check_image_count("no markers", 0)
