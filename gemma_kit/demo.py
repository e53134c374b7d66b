"""The chat page of `gemma-kit demo`: a Gradio app over ChatSession.

    from gemma_kit.demo import ChatApp
    app = ChatApp(model, tokenizer)          # any gemma_kit Transformer and its Tokenizer
    app.launch(port=7860)                    # http://127.0.0.1:7860, until Ctrl-C

Every browser tab (and every gradio_client Client) has its own conversation, keyed by Gradio's
session hash; all of them share one copy of the weights. Replies stream through Gradio's queue,
up to `concurrency` at once; each conversation keeps its KV cache between turns and, when it
outgrows `cache_length`, forgets its oldest exchanges (ChatSession's "drop_oldest" policy), which
the page reports. Bad input (an empty message, an image the model cannot take, a file that is
not an image or is too large, sampling settings out of range) is refused with a message in the
page; the server keeps running.

Besides the page, two API endpoints serve programs (gradio_client): `/chat` (a message and the
sampling settings -> the reply, streamed) and `/clear` (forget the conversation).
"""

from __future__ import annotations

import collections
import dataclasses
import os
import pathlib
import secrets
import socket
import threading
import time
from typing import Iterator

import jax
import numpy as np
from flax import nnx

from gemma_kit.chat import ChatSession
from gemma_kit.errors import DemoError, GemmaKitError, InputError
from gemma_kit.layers import to_matvec_layout
from gemma_kit.sampling import SamplingParams

try:
    import gradio as gr
except ImportError:  # the [demo] extra is not installed
    gr = None


# Image files the page accepts (Pillow format names), and their upload filter.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp")
MAX_IMAGE_PIXELS = 40_000_000  # a 40-megapixel photo; larger ones are refused before decoding

# Gemma's recommended sampling settings (the official generation config of the Gemma 3 models).
DEFAULT_SAMPLING = dict(temperature=1.0, top_p=0.95, top_k=64, max_new_tokens=256, seed=-1)

FINISH_REASONS = {
    "stop": "end of turn",
    "length": "max new tokens reached",
    "cache_full": "the conversation filled the cache",
    "interrupted": "stopped",
}


def _require_gradio():
    if gr is None:
        raise DemoError("the demo needs Gradio 6: pip install 'gemma-kit[demo]'")


def preflight(host: str, port: int, lora: str | os.PathLike | None = None) -> None:
    """Raises a GemmaKitError if the page could not be served (no Gradio, the port taken, an
    adapter folder that is not one): the checks that take no time, before loading a model."""
    _require_gradio()
    if lora is not None:
        from gemma_kit.lora import read_adapter_config

        read_adapter_config(lora)
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((host, port))
    except OSError as err:
        raise DemoError(f"cannot serve on {host}:{port} ({err.strerror or err}); pass another "
                        "--port (or --host)") from None


def load_lora(model, path: str | os.PathLike):
    """Applies the LoRA adapter saved at `path`; returns (model, a description for the page).

    The adapter is folded into the weights where it can be, so replies cost what they cost
    without one.
    """
    from gemma_kit import lora

    lora.load_adapter(model, path)
    info = lora.adapter_info(model)
    description = (f"`{pathlib.Path(path).name}` (rank {info['rank']}, alpha "
                   f"{info['alpha']:g}, on {', '.join(info['targets'])})")
    try:
        model = lora.merge(model)
    except GemmaKitError:  # an int8 base keeps the adapter beside its weights
        pass
    return model, description


# --------------------------------------------------------------------------------------------
# What the page shows about the model.


@dataclasses.dataclass(frozen=True)
class ModelCard:
    name: str
    parameters: int
    dtypes: tuple[str, ...]
    vision: bool
    lora: str | None  # the adapter's description, None without one
    cache_length: int
    backend: str

    @classmethod
    def of(cls, model, *, lora: str | None, cache_length: int) -> "ModelCard":
        leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
        return cls(
            name=model.config.name,
            parameters=int(sum(int(np.prod(x.shape)) for x in leaves)),
            dtypes=tuple(sorted({str(x.dtype) for x in leaves})),
            vision=bool(getattr(model, "has_vision", False)),
            lora=lora,
            cache_length=cache_length,
            backend=_device_name(),
        )

    def markdown(self) -> str:
        vision = ("yes: attach images to a message" if self.vision else
                  "no, text only: images need a Gemma 3 4B, 12B or 27B checkpoint "
                  "(`gemma-kit demo --ckpt DIR`)")
        rows = [
            ("Model", f"`{self.name}`"),
            ("Parameters", f"{self.parameters / 1e6:,.0f} M" if self.parameters >= 1e6
             else f"{self.parameters:,}"),
            ("Weights", ", ".join(self.dtypes)),
            ("Vision", vision),
            ("LoRA adapter", self.lora or "none"),
            ("Memory", f"{self.cache_length:,} tokens per conversation"),
            ("Runs on", self.backend),
        ]
        text = "\n".join(f"- **{k}:** {v}" for k, v in rows)
        if self.name == "gemma3-270m":
            text += ("\n\nThe embedded 270M is pretrained, not instruction-tuned: expect "
                     "continuations rather than answers.")
        return text


# --------------------------------------------------------------------------------------------
# Input checks (pure functions of the files and settings, tested without a browser).


def sampling_settings(temperature, top_p, top_k, max_new_tokens, seed) -> dict:
    """The page's controls -> ChatSession.stream keyword arguments (the seed drawn if < 0).

    top_p 1 and top_k 0 switch those filters off. Raises SamplingError for values out of range.
    """
    top_p = None if top_p is None or float(top_p) >= 1.0 else float(top_p)
    top_k = None if top_k is None or int(top_k) <= 0 else int(top_k)
    SamplingParams(float(temperature), top_k, top_p, None)
    if max_new_tokens is None or int(max_new_tokens) < 1:
        raise InputError("max new tokens must be at least 1")
    seed = -1 if seed is None else int(seed)
    if seed < 0:
        seed = secrets.randbelow(2**31)
    return dict(temperature=float(temperature), top_p=top_p, top_k=top_k,
                max_new_tokens=int(max_new_tokens), seed=seed)


def load_image(path: str | os.PathLike, max_bytes: int):
    """Opens an uploaded image file, refusing what the model should not see.

    Returns a decoded PIL image. Raises InputError naming the file and the cause: too many
    bytes or pixels, not an image, or a format outside IMAGE_FORMATS.
    """
    from PIL import Image, UnidentifiedImageError

    path = pathlib.Path(path)
    name = path.name
    size = path.stat().st_size
    if size > max_bytes:
        raise InputError(f"{name} is {size / 2**20:.1f} MB; images up to "
                         f"{max_bytes / 2**20:.0f} MB are accepted")
    try:
        image = Image.open(path)
    except (UnidentifiedImageError, OSError):
        raise InputError(f"{name} is not an image (accepted: "
                         f"{', '.join(IMAGE_FORMATS)})") from None
    if image.format not in IMAGE_FORMATS:
        raise InputError(f"{name} is a {image.format} image; accepted: "
                         f"{', '.join(IMAGE_FORMATS)}")
    if image.width * image.height > MAX_IMAGE_PIXELS:
        raise InputError(f"{name} is {image.width}x{image.height} pixels; images up to "
                         f"{MAX_IMAGE_PIXELS / 1e6:.0f} megapixels are accepted")
    try:
        image.load()
    except (OSError, SyntaxError, ValueError):  # what Pillow raises for truncated data
        raise InputError(f"{name} is damaged: its image data cannot be decoded") from None
    return image


def with_image_markers(text: str, count: int) -> str:
    """The message for ChatSession: one <start_of_image> per attached image, before the text
    (as Gemma 3's chat template places images), unless the text already places them all."""
    from gemma_kit.vision.prompt import IMAGE_MARKER, count_markers

    if count_markers(text) == count:
        return text
    return IMAGE_MARKER * count + text


# --------------------------------------------------------------------------------------------


class _Conversation:
    """One tab's chat: its ChatSession, its stop flag, what the page shows about it."""

    def __init__(self, chat: ChatSession):
        self.chat = chat
        self.stop = threading.Event()  # set by Stop and Clear; checked between pieces
        self.busy = threading.Lock()  # one reply at a time
        self.pending: tuple | None = None  # (text, images, sampling) of the message to answer
        self.forgotten = False  # Clear or a closed tab replaced this conversation
        self.last_images: list = []  # images of the last user turn (for Regenerate)
        self.stats = ""
        self.replies = 0  # replies finished, numbered on the page
        self.used = time.monotonic()


@dataclasses.dataclass
class _Reply:
    text: str
    stats: str
    notice: str | None = None  # something the user should know (turns dropped, cache full)


class ChatApp:
    """The chat page and its conversations.

    Args:
      model, tokenizer: a gemma_kit Transformer and its Tokenizer (any size; with an image
        encoder, the page takes images).
      lora: a description of the LoRA adapter already applied to `model`, for the model panel.
      cache_length: tokens each conversation can hold.
      concurrency: replies generated at once (more wait in Gradio's queue).
      max_image_mb: the largest image file accepted.
      max_conversations: conversations kept; the least recently used beyond it are forgotten
        (a closed tab's is forgotten at once).
    """

    def __init__(self, model, tokenizer, *, lora: str | None = None, cache_length: int = 4096,
                 concurrency: int = 8, max_image_mb: float = 20, max_conversations: int = 64):
        _require_gradio()
        self.card = ModelCard.of(model, lora=lora,
                                 cache_length=min(cache_length, model.config.max_context))
        # One copy of the weights for all conversations, in the layout the sampler decodes
        # fastest from (ChatSession would otherwise make one per conversation on CPU).
        self.model = to_matvec_layout(model) if jax.default_backend() == "cpu" else model
        self.tokenizer = tokenizer
        self.cache_length = self.card.cache_length
        self.concurrency = concurrency
        self.max_image_bytes = int(max_image_mb * 2**20)
        self.max_conversations = max_conversations
        self._conversations: collections.OrderedDict[str, _Conversation] = (
            collections.OrderedDict())
        self._lock = threading.Lock()
        self.blocks = self._build()

    # -- conversations --------------------------------------------------------------------
    def _new_chat(self, system: str | None) -> ChatSession:
        return ChatSession(self.model, self.tokenizer, system=(system or "").strip() or None,
                           cache_length=self.cache_length, matvec_layout=False)

    def conversation(self, session: str, system: str | None = None) -> _Conversation:
        """The conversation of one browser tab or client (created on first use)."""
        with self._lock:
            conv = self._conversations.get(session)
            if conv is None:
                conv = self._conversations[session] = _Conversation(self._new_chat(system))
                while len(self._conversations) > self.max_conversations:
                    self._conversations.popitem(last=False)
            self._conversations.move_to_end(session)
            conv.used = time.monotonic()
            return conv

    def forget(self, session: str) -> None:
        with self._lock:
            conv = self._conversations.pop(session, None)
        if conv is not None:
            conv.forgotten = True
            conv.stop.set()

    def clear(self, session: str, system: str | None = None) -> _Conversation:
        """Stops the tab's reply, if any, and starts it a new conversation."""
        self.forget(session)
        return self.conversation(session, system)

    # -- the core: one reply, streamed ------------------------------------------------------
    def check_message(self, text: str | None, files) -> tuple[str, list]:
        """(text, decoded images) of a message, or InputError saying why it is refused."""
        text = (text or "").strip()
        files = list(files or [])
        if files and not self.card.vision:
            raise InputError(
                f"this model ({self.card.name}) reads text only, so it cannot look at images. "
                "Images need a Gemma 3 4B, 12B or 27B checkpoint: start the demo with "
                "`gemma-kit demo --ckpt DIR`. Remove the image to send the text alone.")
        if not text:
            raise InputError("the message is empty: type some text"
                             + (" to go with the image" if files else ""))
        images = [load_image(_file_path(f), self.max_image_bytes) for f in files]
        return text, images

    def reply(self, conv: _Conversation, text: str, images: list, sampling: dict
              ) -> Iterator[_Reply]:
        """Streams the reply to one message of a conversation (the text so far each time)."""
        if not conv.busy.acquire(blocking=False):
            raise InputError("a reply is still being written in this conversation: wait for "
                             "it or press Stop")
        try:
            chat = conv.chat
            dropped = chat.dropped_turns
            extra = {}
            if images:
                text, extra = with_image_markers(text, len(images)), {"images": images}
            start = time.perf_counter()
            first = None
            text_so_far = ""
            stream = chat.stream(text, **extra, **sampling)
            try:
                for piece in stream:
                    if conv.stop.is_set():
                        break
                    first = first or time.perf_counter()
                    text_so_far += piece
                    yield _Reply(text_so_far, conv.stats)
            finally:
                stream.close()  # a stopped reply is kept as far as it was shown
            elapsed = time.perf_counter() - start
            result = chat.last_result
            conv.last_images = images
            n = len(result.tokens)
            conv.replies += 1
            conv.stats = (
                f"**Reply {conv.replies}:** {n} tokens in {elapsed:.2f} s "
                f"({n / elapsed:.1f} tokens/s), first token after "
                f"{(first or time.perf_counter()) - start:.2f} s · "
                f"{FINISH_REASONS.get(result.finish_reason, result.finish_reason)} · "
                f"seed {sampling['seed']}")
            notice = None
            if chat.dropped_turns > dropped:
                notice = (f"The conversation outgrew the {self.cache_length:,}-token memory: "
                          f"its {chat.dropped_turns - dropped} oldest exchange(s) were "
                          "forgotten (they stay on the page). Clear starts afresh.")
            elif result.finish_reason == "cache_full":
                notice = (f"The reply stopped because the {self.cache_length:,}-token memory "
                          "is full; the next message will forget the oldest exchanges.")
            if notice:
                conv.stats += f"  \n{notice}"
            yield _Reply(result.text, conv.stats, notice)
        finally:
            conv.busy.release()

    # -- the page ---------------------------------------------------------------------------
    def _build(self):
        theme = gr.themes.Soft(
            # System fonts: the page must not fetch fonts from the internet.
            font=["ui-sans-serif", "system-ui", "sans-serif"],
            font_mono=["ui-monospace", "monospace"],
        )
        self.theme = theme
        placeholder = ("Type a message" + (" and attach images" if self.card.vision else
                                          " (text only: this model has no image encoder)"))
        with gr.Blocks(title=f"gemma_kit chat: {self.card.name}", analytics_enabled=False,
                       fill_height=True) as blocks:
            gr.Markdown(f"## gemma_kit chat · {self.card.name}")
            with gr.Row(equal_height=False):
                with gr.Column(scale=3):
                    chatbot = gr.Chatbot(label="Conversation", height=560, elem_id="chatbot",
                                         buttons=["copy"], feedback_options=None)
                    box = gr.MultimodalTextbox(
                        placeholder=placeholder, show_label=False, elem_id="message",
                        file_count="multiple", file_types=list(IMAGE_SUFFIXES),
                        sources=["upload"], autofocus=True)
                    with gr.Row():
                        stop = gr.Button("Stop", variant="stop", elem_id="stop", size="sm")
                        regenerate = gr.Button("Regenerate", elem_id="regenerate", size="sm")
                        clear = gr.Button("Clear", elem_id="clear", size="sm")
                    stats = gr.Markdown("", elem_id="stats")
                with gr.Column(scale=1, min_width=280):
                    gr.Markdown(self.card.markdown(), elem_id="model-card")
                    system = gr.Textbox(label="System prompt", lines=3, elem_id="system",
                                        info="Used from the start of a conversation "
                                             "(Clear starts a new one).")
                    with gr.Accordion("Sampling", open=True):
                        temperature = gr.Slider(0, 2, DEFAULT_SAMPLING["temperature"],
                                                step=0.05, label="Temperature (0: greedy)",
                                                elem_id="temperature")
                        top_p = gr.Slider(0.01, 1, DEFAULT_SAMPLING["top_p"], step=0.01,
                                          label="Top-p (1: off)", elem_id="top-p")
                        top_k = gr.Slider(0, 256, DEFAULT_SAMPLING["top_k"], step=1,
                                          label="Top-k (0: off)", elem_id="top-k")
                        # Half the memory at most: a reply must leave room for its prompt.
                        most = min(1024, self.cache_length // 2)
                        max_new = gr.Slider(1, most, min(DEFAULT_SAMPLING["max_new_tokens"], most),
                                            step=1, label="Max new tokens", elem_id="max-new")
                        seed = gr.Number(DEFAULT_SAMPLING["seed"], precision=0,
                                         label="Seed (-1: a new one each reply)",
                                         elem_id="seed")
            controls = [temperature, top_p, top_k, max_new, seed]

            # Sending: take the message (quick, never queued behind replies), then answer it.
            gen = dict(concurrency_id="generate", concurrency_limit=self.concurrency)
            quick = dict(concurrency_limit=None, api_visibility="private")
            sent = box.submit(self._ui_add, [box, chatbot, system, *controls], [box, chatbot],
                              **quick)
            answered = sent.success(self._ui_respond, [chatbot], [chatbot, stats],
                                    api_visibility="private", show_progress_on=[chatbot], **gen)
            answered.then(lambda: gr.MultimodalTextbox(interactive=True), None, [box],
                          **quick)
            again = regenerate.click(self._ui_regenerate, [chatbot, *controls], [chatbot],
                                     **quick)
            again.success(self._ui_respond, [chatbot], [chatbot, stats],
                          api_visibility="private", show_progress_on=[chatbot], **gen)
            stop.click(self._ui_stop, None, None, **quick)
            clear.click(self._ui_clear, [system], [chatbot, stats, box], **quick)
            chatbot.clear(self._ui_clear, [system], [chatbot, stats, box], **quick)
            blocks.unload(self._ui_unload)

            gr.api(self._api_chat, api_name="chat", **gen)
            gr.api(self._api_clear, api_name="clear", concurrency_limit=None)
        return blocks

    @staticmethod
    def _session(request) -> str:
        return request.session_hash

    def _ui_add(self, value, history, system, temperature, top_p, top_k, max_new, seed,
                request: gr.Request):
        value = value or {}
        conv = self.conversation(self._session(request), system)
        try:
            text, images = self.check_message(value.get("text"), value.get("files"))
            sampling = sampling_settings(temperature, top_p, top_k, max_new, seed)
        except GemmaKitError as err:
            raise gr.Error(_sentence(err), title="Not sent", print_exception=False) from None
        if conv.busy.locked():
            raise gr.Error("A reply is still being written: wait for it or press Stop.",
                           title="Not sent", print_exception=False)
        if not conv.chat.messages and (system or "").strip() != (conv.chat.system or ""):
            conv.chat = self._new_chat(system)
        conv.stop.clear()
        conv.pending = (text, images, sampling)
        files = [{"path": _file_path(f)} for f in value.get("files") or []]
        history = list(history or []) + [{"role": "user", "content": [*files, text]}]
        return gr.MultimodalTextbox(value=None, interactive=False), history

    def _ui_respond(self, history, request: gr.Request):
        conv = self.conversation(self._session(request))
        pending, conv.pending = conv.pending, None
        if pending is None:
            return
        history = list(history) + [{"role": "assistant", "content": ""}]
        try:
            for part in self.reply(conv, *pending):
                if conv.forgotten:  # cleared meanwhile: leave the page as Clear left it
                    return
                history[-1] = {"role": "assistant",
                               "content": part.text or "*(no text: the model ended its turn)*"}
                if part.notice:
                    gr.Info(part.notice, title="Memory")
                yield history, part.stats
        except GemmaKitError as err:
            # The turn failed (an image the encoder refuses, a message that cannot fit): say
            # so where the reply would have been; the conversation stays as it was.
            if not conv.forgotten:
                history[-1] = {"role": "assistant",
                               "content": f"*Not answered: {_sentence(err)}*"}
                yield history, conv.stats

    def _ui_regenerate(self, history, temperature, top_p, top_k, max_new, seed,
                       request: gr.Request):
        conv = self.conversation(self._session(request))
        try:
            sampling = sampling_settings(temperature, top_p, top_k, max_new, seed)
        except GemmaKitError as err:
            raise gr.Error(_sentence(err), title="Regenerate", print_exception=False) from None
        if conv.busy.locked():
            raise gr.Error("A reply is still being written: wait for it or press Stop.",
                           title="Regenerate", print_exception=False)
        user = conv.chat.undo()
        if user is None:
            raise gr.Error("There is no reply to regenerate yet.", title="Regenerate",
                           print_exception=False)
        conv.stop.clear()
        conv.pending = (user["content"], conv.last_images, sampling)
        history = list(history or [])
        while history and history[-1]["role"] == "assistant":
            history.pop()
        return history

    def _ui_stop(self, request: gr.Request):
        self.conversation(self._session(request)).stop.set()

    def _ui_clear(self, system, request: gr.Request):
        self.clear(self._session(request), system)
        return [], "", gr.MultimodalTextbox(value=None, interactive=True)

    def _ui_unload(self, request: gr.Request):
        self.forget(self._session(request))

    # -- API for programs (gradio_client) ----------------------------------------------------
    def _api_chat(self, message: str, system: str = "", temperature: float = 1.0,
                  top_p: float = 0.95, top_k: int = 64, max_new_tokens: int = 256,
                  seed: int = -1, request: gr.Request = None) -> Iterator[str]:
        """Sends a message in this client's conversation; yields the reply as it grows.

        temperature 0 is greedy; top_p 1 and top_k 0 switch those filters off; seed -1 draws
        a new seed. The system prompt applies when the conversation starts.
        """
        conv = self.conversation(self._session(request), system)
        try:
            text, images = self.check_message(message, [])
            sampling = sampling_settings(temperature, top_p, top_k, max_new_tokens, seed)
            conv.stop.clear()
            for part in self.reply(conv, text, images, sampling):
                yield part.text
        except GemmaKitError as err:
            raise gr.Error(str(err)) from None

    def _api_clear(self, system: str = "", request: gr.Request = None) -> str:
        """Forgets this client's conversation."""
        self.clear(self._session(request), system)
        return "cleared"

    # -- serving ------------------------------------------------------------------------------
    def warm_up(self, **sampling) -> None:
        """Compiles what the first replies with the page's default settings (or `sampling`)
        need, a first turn and a later one, so that the first visitor does not wait for it."""
        chat = self._new_chat(None)
        settings = sampling_settings(**{**DEFAULT_SAMPLING, "seed": 0, **sampling})
        settings["max_new_tokens"] = min(settings["max_new_tokens"], self.cache_length // 2)
        # The later turn is long enough to be fed in a chunk and then token by token.
        for message in ("Hello.", "Hello again, " * 12):
            stream = chat.stream(message, **settings)
            for _, _ in zip(range(2), stream):  # two pieces: the prefill and a decode step
                pass
            stream.close()

    def launch(self, host: str = "127.0.0.1", port: int = 7860, *, block: bool = True,
               quiet: bool = False) -> str:
        """Serves the page at http://host:port; returns its URL (block=False) or runs until
        Ctrl-C (block=True)."""
        self.blocks.queue(default_concurrency_limit=self.concurrency)
        try:
            _, url, _ = self.blocks.launch(
                server_name=host, server_port=port, prevent_thread_lock=not block,
                quiet=quiet, theme=self.theme, max_file_size=self.max_image_bytes,
                footer_links=["api"], show_error=True, ssr_mode=False, share=False)
        except OSError as err:
            raise DemoError(f"cannot serve on {host}:{port} ({err}); pass another --port or "
                            "--host") from None
        return url

    def close(self) -> None:
        self.blocks.close()


def _device_name() -> str:
    backend, kind = jax.default_backend(), jax.devices()[0].device_kind
    return backend if kind.lower() == backend else f"{backend} ({kind})"


def _sentence(err: Exception) -> str:
    """An error message as a sentence (a leading file name keeps its case)."""
    text = str(err)
    if text.split(" ", 1)[0].isalpha():
        text = text[:1].upper() + text[1:]
    return text + ("" if text.endswith(".") else ".")


def _file_path(f) -> str:
    """An uploaded file as Gradio hands it over (a path, or a dict or FileData with one)."""
    if isinstance(f, (str, os.PathLike)):
        return str(f)
    if isinstance(f, dict):
        return f["path"]
    return f.path


def serve(model, tokenizer, host: str = "127.0.0.1", port: int = 7860, *,
          warm_up: bool = True, **options) -> None:
    """Serves the chat page until Ctrl-C (what `gemma-kit demo` runs)."""
    app = ChatApp(model, tokenizer, **options)
    if warm_up:
        print("Compiling the model's programs for the default settings (once)...", flush=True)
        app.warm_up()
    print(f"Chat page for {app.card.name} at http://{host}:{port} (Ctrl-C stops it)",
          flush=True)
    try:
        app.launch(host, port, block=True, quiet=True)
    finally:
        app.close()
