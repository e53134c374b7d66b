"""The demo page in a real browser: Debian's chromium driven by Playwright, against the server
of `gemma-kit demo` on 127.0.0.1: the real Gemma 3 270M on its text-completion page (a
pretrained model), and tiny random models on the chat page.

What a person would do: write the beginning of a text, press Continue and watch the
continuation stream in, and see that it reads as text, not a loop; set the seed and see it make
a continuation reproducible; undo, stop a long continuation, clear. On the chat page: send a
message and watch the reply stream in, get a clear message for an empty message or an image the
model cannot read, regenerate a reply; attach two images for a vision model and get a reply
about them. Screenshots land in test-artifacts/demo/.
"""

from __future__ import annotations

import collections
import os
import pathlib
import re
import time
from typing import Any

import numpy as np
import pytest

from tests.support.ports import free_port

pytest.importorskip("gradio", reason="the demo needs the [demo] extra")
playwright = pytest.importorskip(
    "playwright.sync_api", reason="the browser tests need playwright (the [test] extra)"
)

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = pathlib.Path(__file__).resolve().parent.parent / "test-artifacts" / "demo"
TIMEOUT_MS = 180_000  # the first continuation compiles the model's programs (tens of seconds)
# Compiling is most of the time here. Every continuation of the real model samples with the
# page's default settings and MAX_NEW new tokens from a short text, so one prefill and one decode
# program serve them all (the sampling settings and the bucketed max_new_tokens are static in
# the compiled programs).
SAMPLING: dict[str, Any] = dict(temperature=1.0, top_p=0.95, top_k=64)  # + DRY 0.8: the page's
MAX_NEW = 96

pytestmark = pytest.mark.skipif(
    not os.access(CHROMIUM, os.X_OK),
    reason="needs Debian's chromium: apt-get install chromium (.ci/run does)",
)


@pytest.fixture(scope="module")
def served():
    """The embedded 270M as `gemma-kit demo` serves it: a pretrained model, on the text
    completion page (tests/test_demo.py checks that the CLI picks that page for it)."""
    import gemma_kit
    from gemma_kit.demo import ChatApp

    model, tokenizer = gemma_kit.default_model()
    app = ChatApp(model, tokenizer, mode="completion", kind="pretrained", cache_length=512)
    url = app.launch("127.0.0.1", free_port(), block=False, quiet=True)
    yield app, url, model, tokenizer
    app.close()


@pytest.fixture(scope="module")
def chat_served():
    """A tiny random text model on the chat page (what an instruction-tuned model gets)."""
    from gemma_kit.config import GlobalAttention, LocalAttention
    from gemma_kit.demo import ChatApp
    from tests.support import tiny

    config = tiny.tiny_gemma3().replace(
        name="tiny-chat",
        vocab_size=tiny.SMALL_VOCAB,
        max_context=512,
        layers=(LocalAttention(8), LocalAttention(8), GlobalAttention(rope_base=1e6)),
    )
    model, tokenizer = tiny.random_model(config, seed=5), tiny.small_tokenizer()
    app = ChatApp(model, tokenizer, kind="instruction-tuned", cache_length=256)
    url = app.launch("127.0.0.1", free_port(), block=False, quiet=True)
    yield app, url, model, tokenizer
    app.close()


@pytest.fixture(scope="module")
def browser():
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=["--no-sandbox", "--disable-background-networking"],
        )
        yield browser
        browser.close()


def _open(browser, url: str, ready: str):
    """A fresh tab on the page (its own session) that may only talk to the server; yields the
    page once `ready` is there, then checks that it tried nothing else."""
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
    page.wait_for_selector(ready)
    yield page
    context.close()
    assert not outside, f"the page tried to reach {outside}"


@pytest.fixture
def page(browser, served):
    yield from _open(browser, served[1], "#text textarea")


@pytest.fixture
def chat_page(browser, chat_served):
    yield from _open(browser, chat_served[1], "#message textarea")


def _set(page, elem_id: str, value) -> None:
    """Types a value into a slider's or number's box, as a person would."""
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")


def _settings(page, **values) -> None:
    for name, value in values.items():
        _set(page, name.replace("_", "-"), value)


def _words(text: str) -> str:
    """Letters and digits only: the chat page renders a reply as Markdown."""
    return re.sub(r"[\W_]", "", text)


# --------------------------------------------------------------------------------------------
# The text-completion page, with the real 270M.


def _text(page) -> str:
    return page.input_value("#text textarea")


def _continue(page, number: int, *, watch: bool = False) -> list[str]:
    """Presses Continue and waits for the tab's continuation `number` to finish; returns the
    texts seen in the box while it streamed (if watch)."""
    page.click("#continue")
    seen: list[str] = []
    deadline = time.monotonic() + TIMEOUT_MS / 1000
    while (
        watch
        and f"Continuation {number}:" not in page.inner_text("#stats")
        and (time.monotonic() < deadline)
    ):
        text = _text(page)
        if not seen or text != seen[-1]:
            seen.append(text)
        time.sleep(0.02)
    page.wait_for_selector(f"#stats:has-text('Continuation {number}:')")
    page.wait_for_selector("#text textarea:not([disabled])")
    return seen


def _undo(page, back_to: str) -> None:
    page.click("#undo")
    page.wait_for_function(f"() => document.querySelector('#text textarea').value == {back_to!r}")


def _reference(served, text: str, seed: int) -> tuple[str, list[int]]:
    """(continuation, its tokens) from a Sampler of the same model and cache length, with the
    page's default sampling (temperature 1, top-k 64, top-p 0.95, DRY 0.8); the tokens are the
    continuation's text encoded again."""
    from gemma_kit.sampler import Sampler
    from gemma_kit.sampling import DryPenalty

    app, _, model, tokenizer = served
    sampler = Sampler(model, tokenizer, cache_length=app.cache_length)
    continuation = "".join(
        sampler.stream(text, max_new_tokens=MAX_NEW, seed=seed, dry=DryPenalty(), **SAMPLING)
    )
    return continuation, tokenizer.encode(continuation, add_bos=False)


def _repeated_4grams(tokens: list[int]) -> float:
    """The share of the 4-grams that occurred earlier in the sequence (a loop tends to 1)."""
    grams = [tuple(tokens[i : i + 4]) for i in range(len(tokens) - 3)]
    return sum(g in set(grams[:i]) for i, g in enumerate(grams)) / max(len(grams), 1)


@pytest.mark.real_model
def test_completion_page_continues_the_text_without_a_loop(page, served):
    """The page of the pretrained 270M says it continues text, and continues "The capital of
    France is" (whose greedy continuation is one sentence over and over: 89% of the 4-grams of
    its first 96 tokens repeat) as the Sampler does with the page's default settings, streamed.

    Not a loop: the most frequent token is at most 20% of the continuation (a loop of one token
    would be most of it; measured 5%) and at most 10% of its 4-grams repeat an earlier one (a
    looping sentence tends to 100%; measured 1%)."""
    notice = page.inner_text("#mode-notice")
    assert "Text completion." in notice and "is a pretrained model: it continues text" in notice
    assert "Kind: pretrained: it continues text" in page.inner_text("#model-card")
    assert page.locator("#chatbot").count() == 0 and page.locator("#message").count() == 0
    beginning = "The capital of France is"
    _settings(page, max_new=MAX_NEW, seed=42)
    page.fill("#text textarea", beginning)
    seen = _continue(page, 1, watch=True)
    want, tokens = _reference(served, beginning, 42)
    assert _text(page) == beginning + want and want.strip()
    # Streamed: the text grew in several steps, each a prefix of the next, from the beginning.
    grown = [t for t in seen if t.startswith(beginning) and len(t) > len(beginning)]
    assert len(grown) >= 3, seen
    assert all(b.startswith(a) for a, b in zip(grown, grown[1:]))
    stats = page.inner_text("#stats")
    assert re.search(r"Continuation 1: \d+ tokens in [\d.]+ s \([\d.]+ tokens/s\)", stats), stats
    assert "seed 42" in stats

    top = max(collections.Counter(tokens).values()) / len(tokens)
    assert len(tokens) >= 48 and top <= 0.2, (top, want)
    assert _repeated_4grams(tokens) <= 0.1, want
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=ARTIFACTS / "completion.png", full_page=True)
    assert (ARTIFACTS / "completion.png").stat().st_size > 10_000


@pytest.mark.real_model
def test_completion_seed_undo_stop_clear(page, served):
    beginning = "Once upon a time, in a small village by the sea,"
    # An empty text: refused in the page, nothing continued.
    page.click("#continue")
    page.wait_for_selector(".toast-body:has-text('The text is empty')")

    # A fixed seed makes a continuation reproducible; Undo puts the text back as it was.
    _settings(page, max_new=MAX_NEW, seed=1234)
    page.fill("#text textarea", beginning)
    _continue(page, 1)
    first = _text(page)
    assert first.startswith(beginning) and len(first) > len(beginning)
    assert first == beginning + _reference(served, beginning, 1234)[0]
    _undo(page, beginning)
    _continue(page, 2)
    assert _text(page) == first
    _undo(page, beginning)
    _settings(page, seed=4321)
    _continue(page, 3)
    assert _text(page) != first and _text(page).startswith(beginning)

    # Stop: a continuation ends where it was stopped, and stays in the box.
    _undo(page, beginning)
    page.click("#continue")
    page.wait_for_function(
        f"() => document.querySelector('#text textarea').value.length > {len(beginning) + 5}"
    )
    page.click("#stop")
    page.wait_for_selector("#stats:has-text('stopped')")
    tokens = int(re.search(r"Continuation 4: (\d+) tokens", page.inner_text("#stats")).group(1))
    assert 1 <= tokens < MAX_NEW
    page.wait_for_selector("#text textarea:not([disabled])")
    assert _text(page).startswith(beginning) and len(_text(page)) > len(beginning)
    page.screenshot(path=ARTIFACTS / "completion-stopped.png", full_page=True)

    # Clear: an empty box and no stats.
    page.click("#clear")
    page.wait_for_function(
        "() => document.querySelector('#text textarea').value == '' && "
        "!document.querySelector('#stats').innerText.includes('Continuation')"
    )


# --------------------------------------------------------------------------------------------
# The chat page, with a tiny random model.


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
    seen: list[str] = []
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
    page.wait_for_function(
        "() => !document.querySelector('[data-testid=\"bot\"]')"
        " && !document.querySelector('#stats').innerText.includes('Reply')"
    )


def test_chat_page(chat_page, chat_served, tmp_path):
    """A reply streams in and is the one ChatSession gives with the page's settings; a fixed
    seed makes it reproducible; an empty message and an image for a text-only model are
    refused kindly; Regenerate replaces the last reply."""
    from PIL import Image

    from gemma_kit.chat import ChatSession

    app, _, model, tokenizer = chat_served
    page = chat_page
    assert "Kind: instruction-tuned: it chats" in page.inner_text("#model-card")
    assert page.locator("#mode-notice").count() == 0
    message = "Tell me about the sea."
    _settings(page, max_new=32, seed=42)
    reply, seen = _send(page, message, watch=True)
    want = ChatSession(model, tokenizer, cache_length=app.cache_length).send(
        message, max_new_tokens=32, seed=42
    )  # the page's defaults are ChatSession's
    assert _words(reply) == _words(want) and _words(want)
    assert len(seen) >= 2, seen
    assert re.search(r"Reply 1: \d+ tokens in [\d.]+ s", page.inner_text("#stats"))
    _clear(page)
    again, _ = _send(page, message)
    assert again == reply
    _settings(page, seed=4321)
    _clear(page)
    other, _ = _send(page, message)
    assert _words(other) != _words(reply)
    page.screenshot(path=ARTIFACTS / "chat.png", full_page=True)

    # Regenerate with a fixed seed: the same reply again, in place of the last one.
    _settings(page, seed=5)
    _clear(page)
    first, _ = _send(page, "Hello!")
    page.click("#regenerate")
    _wait_finished(page, 2)
    assert _bot_texts(page) == [first]
    assert len(page.locator('[data-testid="user"]').all()) == 1
    _clear(page)

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


def test_images_for_a_vision_model(browser, tmp_path):
    """Two images attached to one message reach a (tiny, random) vision model: the reply is the
    one ChatSession gives for the same images and text. A file that is not an image, and one
    over the size limit, are refused in the page."""
    from PIL import Image

    from gemma_kit.chat import ChatSession
    from gemma_kit.demo import ChatApp
    from tests.support import vision_tiny

    model = vision_tiny.random_vision_model(vision_tiny.tiny_vision_config(), seed=3)
    tokenizer = vision_tiny.image_tokenizer()
    app = ChatApp(model, tokenizer, cache_length=256, max_image_mb=0.05)  # 50 kB at most
    url = app.launch("127.0.0.1", free_port(), block=False, quiet=True)
    paths = []
    for seed, (w, h) in enumerate([(60, 40), (32, 48)]):
        paths.append(tmp_path / f"drawing-{seed}.png")
        vision_tiny.drawn_image(w, h, seed=seed).save(paths[-1])
    message = "Compare the two pictures."
    try:
        tab = _open(browser, url, "#message textarea")
        page = next(tab)
        assert "Vision: yes" in page.inner_text("#model-card")
        _settings(page, **SAMPLING, max_new=12, seed=9)
        page.fill("#message textarea", message)
        page.set_input_files("#message input[type=file]", [str(p) for p in paths])
        page.wait_for_function(
            "() => document.querySelectorAll('#message .thumbnail-item').length == 2"
        )
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
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (160, 160, 3), np.uint8)).save(
            big
        )  # noise does not compress: about 77 kB
        page.set_input_files("#message input[type=file]", str(big))
        page.wait_for_selector(".toast-body:has-text('exceed the maximum allowed size')")
        assert len(_bot_texts(page)) == 0
        next(tab, None)
    finally:
        app.close()
    images = [Image.open(p) for p in paths]
    want = ChatSession(model, tokenizer, cache_length=256).send(
        "<start_of_image><start_of_image>" + message,
        images=images,
        **SAMPLING,
        max_new_tokens=12,
        seed=9,
    )
    assert _words(reply) == _words(want) and _words(want)
    without = ChatSession(model, tokenizer, cache_length=256).send(
        "<start_of_image><start_of_image>" + message,
        images=images[::-1],
        **SAMPLING,
        max_new_tokens=12,
        seed=9,
    )
    assert _words(without) != _words(want)  # the images, and their order, matter
