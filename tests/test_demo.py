"""The demo's server side: input checks, the CLI and the page it picks for a model, 8
conversations at once through gradio_client against a real server on 127.0.0.1, and text
completion (a tiny random model keeps it cheap).

The browser tests are in test_demo_browser.py.
"""

from __future__ import annotations

import concurrent.futures
import socket

import pytest

pytest.importorskip(
    "gradio", reason="the demo needs the [demo] extra (pip install 'gemma-kit[demo]')"
)

from gemma_kit.chat import ChatSession
from gemma_kit.cli import main
from gemma_kit.config import GlobalAttention, LocalAttention
from gemma_kit.demo import (
    ChatApp,
    DemoError,
    InputError,
    ModelCard,
    load_image,
    preflight,
    sampling_settings,
)
from gemma_kit.sampler import Sampler
from gemma_kit.sampling import DryPenalty, SamplingError
from tests.support import tiny
from tests.support.ports import free_port


@pytest.fixture(scope="module")
def tiny_chat_model():
    """A random text model over the small real tokenizer (384 pieces, Gemma 3 chat ids)."""
    config = tiny.tiny_gemma3().replace(
        name="tiny-chat",
        vocab_size=tiny.SMALL_VOCAB,
        max_context=512,
        layers=(LocalAttention(8), LocalAttention(8), GlobalAttention(rope_base=1e6)),
    )
    return tiny.random_model(config, seed=5), tiny.small_tokenizer()


def test_sampling_settings_map_the_controls():
    got = sampling_settings(0.7, 1.0, 0, 32, 123)
    assert got == dict(
        temperature=0.7, top_p=None, top_k=None, max_new_tokens=32, seed=123, dry=None
    )
    assert sampling_settings(1.0, 0.9, 40, 8, 5)["top_p"] == 0.9
    assert sampling_settings(1.0, 0.9, 40, 8, 5, 0.8)["dry"] == DryPenalty()
    assert sampling_settings(1.0, 0.9, 40, 8, 5, 1.5)["dry"] == DryPenalty(multiplier=1.5)
    with pytest.raises(InputError, match="the DRY penalty must be at least 0"):
        sampling_settings(1.0, 1.0, 0, 8, 0, -0.1)
    drawn = {sampling_settings(1.0, 0.9, 40, 8, -1)["seed"] for _ in range(4)}
    assert all(0 <= s < 2**31 for s in drawn) and len(drawn) > 1
    with pytest.raises(SamplingError, match="temperature"):
        sampling_settings(-0.5, 1.0, 0, 8, 0)
    with pytest.raises(InputError, match="at least 1"):
        sampling_settings(1.0, 1.0, 0, 0, 0)


def test_load_image_refuses_bad_files(tmp_path):
    from PIL import Image

    good = tmp_path / "photo.png"
    Image.new("RGBA", (40, 30), (255, 0, 0, 128)).save(good)
    image = load_image(good, max_bytes=2**20)
    assert image.size == (40, 30)

    with pytest.raises(InputError, match=r"photo.png is 0\.0 MB; images up to 0 MB"):
        load_image(good, max_bytes=10)
    text = tmp_path / "notes.png"
    text.write_text("not an image at all")
    with pytest.raises(InputError, match="notes.png is not an image"):
        load_image(text, max_bytes=2**20)
    tiff = tmp_path / "scan.tiff"
    Image.new("RGB", (8, 8)).save(tiff)
    with pytest.raises(InputError, match="scan.tiff is a TIFF image; accepted: PNG, JPEG"):
        load_image(tiff, max_bytes=2**20)
    cut = tmp_path / "cut.png"
    cut.write_bytes(good.read_bytes()[:-40])
    with pytest.raises(InputError, match="cut.png is damaged"):
        load_image(cut, max_bytes=2**20)
    huge = tmp_path / "huge.png"
    Image.new("1", (8000, 6000)).save(huge)  # 48 megapixels, a few kB on disk
    with pytest.raises(InputError, match="8000x6000 pixels; images up to 40 megapixels"):
        load_image(huge, max_bytes=2**20)


def test_text_only_model_refuses_images_kindly(tiny_chat_model, tmp_path):
    from PIL import Image

    app = ChatApp(*tiny_chat_model, cache_length=256)
    picture = tmp_path / "cat.png"
    Image.new("RGB", (16, 16)).save(picture)
    assert not app.card.vision
    assert "images need a Gemma 3 4B, 12B or 27B checkpoint" in app.card.markdown()
    with pytest.raises(InputError, match="reads text only.*Gemma 3 4B, 12B or 27B checkpoint"):
        app.check_message("What is this?", [str(picture)])
    with pytest.raises(InputError, match="the message is empty"):
        app.check_message("   ", [])
    assert app.check_message("  hi  ", []) == ("hi", [])


def test_image_markers_go_before_the_text_unless_placed():
    from gemma_kit.demo import with_image_markers

    assert with_image_markers("Compare them.", 2) == (
        "<start_of_image><start_of_image>Compare them."
    )
    placed = "Is <start_of_image> brighter than <start_of_image>?"
    assert with_image_markers(placed, 2) == placed


def test_cli_reports_what_stops_the_demo(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(DemoError, match=f"cannot serve on 127.0.0.1:{port}"):
            preflight("127.0.0.1", port)
        assert main(["demo", "--port", str(port)]) == 2
        assert f"error: cannot serve on 127.0.0.1:{port}" in capsys.readouterr().err
    assert main(["demo", "--ckpt", "/no/such/checkpoint", "--port", str(free_port())]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "/no/such/checkpoint" in err and len(err.splitlines()) == 1


def test_eight_parallel_conversations(tiny_chat_model):
    """8 clients chat at once, two turns each; each gets exactly the replies its conversation
    alone would get (sampled, each with its own seed), so no state leaks between them."""
    from gradio_client import Client

    model, tokenizer = tiny_chat_model
    app = ChatApp(model, tokenizer, cache_length=256, concurrency=8)
    turns = [(f"Hello, this is client {i}.", f"Say more about {i}, please.") for i in range(8)]
    sampling = dict(temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=12)
    app.warm_up(**sampling)  # what `gemma-kit demo` does before serving
    assert not app._conversations
    url = app.launch("127.0.0.1", free_port(), block=False, quiet=True)

    def converse(i):
        client = Client(url, verbose=False)
        return [
            client.predict(message=m, seed=100 + i, api_name="/chat", **sampling) for m in turns[i]
        ]

    try:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            got = list(pool.map(converse, range(8)))
    finally:
        app.close()
    for i in range(8):
        alone = ChatSession(model, tokenizer, cache_length=256)
        # The API's default DRY penalty is ChatSession's (0.8); top-p 1 and top-k 0 are off.
        want = [
            alone.send(m, temperature=1.0, top_k=None, top_p=None, max_new_tokens=12, seed=100 + i)
            for m in turns[i]
        ]
        assert got[i] == want, f"client {i}"
    assert len({reply for replies in got for reply in replies}) == 16


def test_lora_adapter_is_applied_and_shown(tiny_chat_model, tmp_path, capsys):
    import jax
    import numpy as np
    from flax import nnx

    from gemma_kit import lora
    from gemma_kit.demo import ModelCard, load_lora

    model, tokenizer = tiny_chat_model
    config = model.config
    adapted = lora.apply_lora(tiny.random_model(config, seed=5), rank=2, alpha=4.0, targets="attn")
    state = lora.lora_state(adapted)
    rng = np.random.default_rng(0)  # B starts at zero: make the adapter change something
    nnx.update(adapted, jax.tree.map(lambda x: rng.normal(0, 0.5, x.shape).astype(x.dtype), state))
    folder = lora.save_adapter(adapted, tmp_path / "adapter")

    served, description = load_lora(tiny.random_model(config, seed=5), folder)
    assert not lora.has_lora(served)  # folded into the weights
    assert description == "`adapter` (rank 2, alpha 4, on attn_vec_einsum, kv_einsum, q_einsum)"
    assert (
        "**LoRA adapter:** `adapter` (rank 2"
        in ModelCard.of(served, lora=description, cache_length=256).markdown()
    )
    # Folded into the weights, the adapter computes what it computes beside them (f32).
    tokens = jax.numpy.asarray([tokenizer.encode("Hi there, how are you?")])
    want = np.asarray(adapted(tokens))
    assert np.abs(np.asarray(served(tokens)) - want).max() <= 1e-5 * np.abs(want).max()
    assert np.abs(np.asarray(model(tokens)) - want).max() > 1e-2 * np.abs(want).max()

    assert main(["demo", "--lora", str(tmp_path / "missing"), "--port", str(free_port())]) == 2
    assert "adapter folder" in capsys.readouterr().err


def test_a_long_conversation_forgets_its_oldest_turns_and_says_so(tiny_chat_model):
    app = ChatApp(*tiny_chat_model, cache_length=256)
    conv = app.conversation("tab-1")
    sampling = dict(temperature=1.0, top_p=None, top_k=None, max_new_tokens=12, seed=0)
    message = "Tell me about the for statement and the while statement. " * 4
    notices = []
    for turn in range(6):
        *_, last = app.reply(conv, f"{turn}: {message}", [], sampling)
        notices.append(last.notice)
        assert last.text == conv.chat.last_result.text
    first = next(i for i, n in enumerate(notices) if n)
    assert first >= 1 and conv.chat.dropped_turns >= 1
    assert notices[first].startswith("The conversation outgrew the 256-token memory: its ")
    assert "oldest exchange(s) were forgotten" in notices[first]
    assert "Reply 6:" in conv.stats
    assert conv.chat.messages[-2]["content"].startswith("5: ")  # the newest turns are kept
    assert app.conversation("tab-2") is not conv  # another tab, another conversation


# --------------------------------------------------------------------------------------------
# The page a model gets, and text completion.


def test_model_card_says_what_kind_of_model_it_is(tiny_chat_model):
    model, _ = tiny_chat_model

    def card(kind, mode):
        return ModelCard.of(model, lora=None, cache_length=256, kind=kind, mode=mode).markdown()

    assert "**Kind:** pretrained: it continues text" in card("pretrained", "completion")
    assert "--mode completion" not in card("pretrained", "completion")
    assert "**Memory:** 256 tokens per text" in card("pretrained", "completion")
    # A pretrained model on the chat page (--mode chat): the page says what to expect.
    assert "expect wandering replies" in card("pretrained", "chat")
    assert "**Kind:** instruction-tuned: it chats" in card("instruction-tuned", "chat")
    assert "--mode completion" not in card("instruction-tuned", "chat")
    unknown = card(None, "chat")
    assert "not stated by the checkpoint's name" in unknown and "--mode completion" in unknown
    with pytest.raises(DemoError, match="mode must be 'chat' or 'completion'"):
        ChatApp(*tiny_chat_model, mode="story")


def test_cli_picks_completion_for_a_pretrained_model(tiny_chat_model, monkeypatch, tmp_path):
    """`gemma-kit demo` offers the embedded (pretrained) model as text completion, a model
    with a LoRA adapter as a chat, and --mode overrides either."""
    from gemma_kit import lora

    model, tokenizer = tiny_chat_model
    served = []
    monkeypatch.setattr(
        "gemma_kit.embedded.default_model",
        lambda dtype=None: (tiny.random_model(model.config, seed=5), tokenizer),
    )
    monkeypatch.setattr(
        "gemma_kit.demo.serve",
        lambda model, tokenizer, host, port, **options: served.append(options),
    )
    port = str(free_port())
    folder = lora.save_adapter(
        lora.apply_lora(tiny.random_model(model.config, seed=5), rank=2, alpha=4.0, targets="attn"),
        tmp_path / "adapter",
    )
    for argv, mode, kind in [
        ([], "completion", "pretrained"),
        (["--mode", "chat"], "chat", "pretrained"),
        (["--lora", str(folder)], "chat", "fine-tuned"),
        (["--lora", str(folder), "--mode", "completion"], "completion", "fine-tuned"),
    ]:
        assert main(["demo", "--port", port, *argv]) == 0
        assert (served[-1]["mode"], served[-1]["kind"]) == (mode, kind), argv


def test_completion_continues_the_text(tiny_chat_model):
    """A continuation is what the Sampler gives for the text with the same settings, streamed
    in growing pieces; a text too long for the cache is continued from its end, and says so;
    an empty text is refused."""
    from gradio_client import Client

    model, tokenizer = tiny_chat_model
    app = ChatApp(model, tokenizer, mode="completion", kind="pretrained", cache_length=256)
    assert app.max_new_tokens == 128  # the completion page's default
    sampling = sampling_settings(1.0, 0.95, 64, 16, 7, 0.8)
    text = "Once upon a time, in a small village by the sea,"
    parts = list(app.complete(app.conversation("tab"), text, sampling))
    want = Sampler(model, tokenizer, cache_length=256).generate(
        text, max_new_tokens=16, temperature=1.0, top_p=0.95, top_k=64, seed=7, dry=DryPenalty()
    )
    assert parts[-1].text == want.text and want.text
    assert all(b.text.startswith(a.text) for a, b in zip(parts, parts[1:]))
    assert len(parts) >= 3
    assert parts[-1].stats.startswith("**Continuation 1:** 16 tokens in ")
    assert parts[-1].notice is None

    long = "the story of the sea and the ship, " * 40  # ~400 tokens for a 256-token cache
    *_, last = app.complete(app.conversation("tab"), long, sampling)
    assert last.notice == (
        "The text is longer than the 256-token memory holds with 16 new "
        "tokens: it was continued from its last 239 tokens."
    )
    assert "**Continuation 2:** 16 tokens" in last.stats

    url = app.launch("127.0.0.1", free_port(), block=False, quiet=True)
    try:
        client = Client(url, verbose=False)
        got = client.predict(
            text=text,
            temperature=1.0,
            top_p=0.95,
            top_k=64,
            max_new_tokens=16,
            seed=7,
            api_name="/complete",
        )
        assert got == want.text  # the API's default DRY penalty is the page's, 0.8
        with pytest.raises(Exception, match="the text is empty"):
            client.predict(text="  ", api_name="/complete")
        assert (
            "/chat"
            not in client.view_api(print_info=False, return_format="dict")["named_endpoints"]
        )  # the completion page holds no conversation
    finally:
        app.close()
