"""The chat page in a real browser: Debian's chromium driven by Playwright, against the server
of `gemma-kit demo` on 127.0.0.1, with the real Gemma 3 270M and with a tiny random vision model.

What a person would do: type a message and watch the reply stream in; set the seed and see it
make a sampled reply reproducible; get a clear message for an empty message or an image the
model cannot read; stop a long reply; regenerate one; attach two images for a vision model and
get a reply about them. Screenshots land in test-artifacts/demo/.
"""

from __future__ import annotations

import os
import pathlib
import re
import socket
import time

import numpy as np
import pytest

pytest.importorskip("gradio", reason="the demo needs the [demo] extra")
playwright = pytest.importorskip("playwright.sync_api",
                                 reason="the browser tests need playwright (the [test] extra)")

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = pathlib.Path(__file__).resolve().parent.parent / "test-artifacts" / "demo"
TIMEOUT_MS = 180_000  # the first reply compiles the model's programs (tens of seconds)
# Compiling is most of the time here. Every reply is the first turn of its conversation (Clear in
# between) and all but the stopped one sample with the page's default settings and at most 16 new
# tokens, so one prefill and one decode program serve them all (the sampling settings and the
# bucketed max_new_tokens are static in the compiled programs; a second turn would compile the
# cache-extending one).
SAMPLING = dict(temperature=1.0, top_p=0.95, top_k=64)

pytestmark = pytest.mark.skipif(
    not os.access(CHROMIUM, os.X_OK),
    reason="needs Debian's chromium: apt-get install chromium (.ci/run does)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served():
    import gemma_kit
    from gemma_kit.demo import ChatApp

    model, tokenizer = gemma_kit.default_model()
    app = ChatApp(model, tokenizer, cache_length=512)
    url = app.launch("127.0.0.1", _free_port(), block=False, quiet=True)
    yield app, url, model, tokenizer
    app.close()


@pytest.fixture(scope="module")
def browser():
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM, headless=True,
            args=["--no-sandbox", "--disable-background-networking"])
        yield browser
        browser.close()


def _open(browser, url: str):
    """A fresh tab on the chat page (its own conversation) that may only talk to the server;
    yields the page, then checks that it tried nothing else."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    outside = []

    def only_local(route):
        if route.request.url.startswith(url.rstrip("/")) or route.request.url.startswith("data:"):
            return route.continue_()
        outside.append(route.request.url)
        return route.abort()

    context.route("**/*", only_local)
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(url)
    page.wait_for_selector("#message textarea")
    yield page
    context.close()
    assert not outside, f"the page tried to reach {outside}"


@pytest.fixture
def page(browser, served):
    yield from _open(browser, served[1])


def _set(page, elem_id: str, value) -> None:
    """Types a value into a slider's or number's box, as a person would."""
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")


def _settings(page, **values) -> None:
    for name, value in values.items():
        _set(page, name.replace("_", "-"), value)


def _bot_texts(page) -> list[str]:
    return page.locator('[data-testid="bot"]').all_inner_texts()


def _finished(page, number: int) -> bool:
    return f"Reply {number}:" in page.inner_text("#stats")


def _wait_finished(page, number: int) -> None:
    """Waits for the stats line of the conversation's reply `number` (the end of that reply)."""
    page.wait_for_selector(f"#stats:has-text('Reply {number}:')")


def _send(page, text: str, number: int = 1, *, watch: bool = False) -> tuple[str, list[str]]:
    """Sends a message, the conversation's reply `number`; waits for the reply to finish.
    Returns (reply, the partial replies seen while it streamed, if watch)."""
    replies = len(_bot_texts(page))
    page.fill("#message textarea", text)
    page.press("#message textarea", "Enter")
    seen = []
    deadline = time.monotonic() + TIMEOUT_MS / 1000
    while watch and not _finished(page, number) and time.monotonic() < deadline:
        texts = _bot_texts(page)
        if len(texts) > replies and texts[-1].strip() and (not seen or texts[-1] != seen[-1]):
            seen.append(texts[-1])
        time.sleep(0.02)
    _wait_finished(page, number)
    page.wait_for_selector("#message textarea:not([disabled])")
    return _bot_texts(page)[-1], seen


def _clear(page) -> None:
    page.click("#clear")
    page.wait_for_function("() => !document.querySelector('[data-testid=\"bot\"]')"
                           " && !document.querySelector('#stats').innerText.includes('Reply')")


def _words(text: str) -> str:
    """Letters and digits only: the page renders the reply as Markdown."""
    return re.sub(r"[\W_]", "", text)


def _reference(served, message: str, **sampling) -> str:
    from gemma_kit.chat import ChatSession

    app, _, model, tokenizer = served
    return ChatSession(model, tokenizer, cache_length=app.cache_length).send(message, **sampling)


@pytest.mark.real_model
def test_reply_streams_into_the_page(page, served):
    _settings(page, max_new=16, seed=42)
    reply, seen = _send(page, "The capital of France is", watch=True)
    want = _reference(served, "The capital of France is", **SAMPLING, max_new_tokens=16,
                      seed=42)
    assert _words(reply) == _words(want) and _words(want)
    # Streamed: the reply grew in several steps, each a prefix of the next.
    partial = [_words(s) for s in seen]
    assert len(set(partial)) >= 3, seen
    assert all(b.startswith(a) for a, b in zip(partial, partial[1:]))
    stats = page.inner_text("#stats")
    assert re.search(r"Reply 1: \d+ tokens in [\d.]+ s \([\d.]+ tokens/s\)", stats), stats
    card = page.inner_text("#model-card")
    assert "gemma3-270m" in card and "text only" in card and "Gemma 3 4B" in card
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=ARTIFACTS / "chat.png")
    assert (ARTIFACTS / "chat.png").stat().st_size > 10_000


@pytest.mark.real_model
def test_the_seed_makes_a_sampled_reply_reproducible(page, served):
    message = "Write one sentence about the sea."
    _settings(page, **SAMPLING, max_new=12, seed=1234)
    first, _ = _send(page, message)
    want = _reference(served, message, **SAMPLING, max_new_tokens=12, seed=1234)
    assert _words(first) == _words(want)
    assert "seed 1234" in page.inner_text("#stats")
    _clear(page)
    again, _ = _send(page, message)
    assert again == first
    _settings(page, seed=4321)
    _clear(page)
    other, _ = _send(page, message)
    assert _words(other) != _words(first)


@pytest.mark.real_model
def test_bad_input_stop_and_regenerate(page, served, tmp_path):
    from PIL import Image

    # An empty message: refused in the page, nothing sent.
    page.press("#message textarea", "Enter")
    page.wait_for_selector(".toast-body:has-text('The message is empty')")
    # An image for a text-only model: refused kindly, the typed text kept.
    picture = tmp_path / "red.png"
    Image.new("RGB", (64, 64), "red").save(picture)
    page.fill("#message textarea", "What colour is this?")
    page.set_input_files("#message input[type=file]", str(picture))
    page.wait_for_selector("#message img, #message .thumbnail-item")
    page.press("#message textarea", "Enter")
    page.wait_for_selector(".toast-body:has-text('reads text only')")
    assert "Gemma 3 4B, 12B or 27B checkpoint" in page.inner_text(".toast-body")
    assert page.input_value("#message textarea") == "What colour is this?"
    assert not _bot_texts(page)
    _clear(page)

    # Stop: a long reply ends where it was stopped.
    _settings(page, max_new=256, seed=7)
    page.fill("#message textarea", "Tell me a long story about a dragon.")
    page.press("#message textarea", "Enter")
    page.wait_for_function(
        "() => { const b = document.querySelectorAll('[data-testid=\"bot\"]');"
        " return b.length && b[b.length - 1].innerText.trim().length > 0; }")
    page.click("#stop")
    page.wait_for_selector("#stats:has-text('stopped')")
    tokens = int(re.search(r"Reply 1: (\d+) tokens", page.inner_text("#stats")).group(1))
    assert 1 <= tokens < 256
    stopped = _bot_texts(page)[-1]
    assert stopped.strip()

    # Regenerate with a fixed seed: the same reply again, in place of the last one.
    _clear(page)
    _settings(page, max_new=8, seed=5)
    reply, _ = _send(page, "Hello!")
    page.click("#regenerate")
    _wait_finished(page, 2)
    assert _bot_texts(page) == [reply]
    assert len(page.locator('[data-testid="user"]').all()) == 1
    page.screenshot(path=ARTIFACTS / "after-stop-and-regenerate.png")


def test_images_for_a_vision_model(browser, tmp_path):
    """Two images attached to one message reach a (tiny, random) vision model: the reply is the
    one ChatSession gives for the same images and text. A file that is not an image, and one
    over the size limit, are refused in the page."""
    _vision_tiny = pytest.importorskip("_vision_tiny")
    from PIL import Image

    from gemma_kit.demo import ChatApp
    from gemma_kit.chat import ChatSession

    model = _vision_tiny.random_vision_model(_vision_tiny.tiny_vision_config(), seed=3)
    tokenizer = _vision_tiny.image_tokenizer()
    app = ChatApp(model, tokenizer, cache_length=256, max_image_mb=0.05)  # 50 kB at most
    url = app.launch("127.0.0.1", _free_port(), block=False, quiet=True)
    paths = []
    for seed, (w, h) in enumerate([(60, 40), (32, 48)]):
        paths.append(tmp_path / f"drawing-{seed}.png")
        _vision_tiny.drawn_image(w, h, seed=seed).save(paths[-1])
    message = "Compare the two pictures."
    try:
        tab = _open(browser, url)
        page = next(tab)
        assert "Vision: yes" in page.inner_text("#model-card")
        _settings(page, **SAMPLING, max_new=12, seed=9)
        page.fill("#message textarea", message)
        page.set_input_files("#message input[type=file]", [str(p) for p in paths])
        page.wait_for_function(
            "() => document.querySelectorAll('#message .thumbnail-item').length == 2")
        page.press("#message textarea", "Enter")
        _wait_finished(page, 1)
        reply = _bot_texts(page)[-1]
        assert len(page.locator('[data-testid="user"] img').all()) == 2
        page.screenshot(path=ARTIFACTS / "vision.png", full_page=True)
        page.click("#regenerate")  # the same images again, re-read with the conversation
        _wait_finished(page, 2)
        assert _bot_texts(page) == [reply]

        fake = tmp_path / "notes.png"
        fake.write_text("these are notes, not a picture")
        page.fill("#message textarea", "And this one?")
        page.set_input_files("#message input[type=file]", str(fake))
        page.wait_for_selector("#message .thumbnail-item")
        page.press("#message textarea", "Enter")
        page.wait_for_selector(".toast-body:has-text('notes.png is not an image')")

        _clear(page)
        big = tmp_path / "big.png"
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (160, 160, 3), np.uint8)
                        ).save(big)  # noise does not compress: about 77 kB
        page.set_input_files("#message input[type=file]", str(big))
        page.wait_for_selector(".toast-body:has-text('exceed the maximum allowed size')")
        assert len(_bot_texts(page)) == 0
        next(tab, None)
    finally:
        app.close()
    images = [Image.open(p) for p in paths]
    want = ChatSession(model, tokenizer, cache_length=256).send(
        "<start_of_image><start_of_image>" + message, images=images, **SAMPLING,
        max_new_tokens=12, seed=9)
    assert _words(reply) == _words(want) and _words(want)
    without = ChatSession(model, tokenizer, cache_length=256).send(
        "<start_of_image><start_of_image>" + message, images=images[::-1], **SAMPLING,
        max_new_tokens=12, seed=9)
    assert _words(without) != _words(want)  # the images, and their order, matter
