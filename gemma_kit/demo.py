"""The page of `gemma-kit demo` (Gradio): a chat, or text completion for a pretrained model.

    from gemma_kit.demo import ChatApp
    app = ChatApp(model, tokenizer)                        # an instruction-tuned model: a chat
    app = ChatApp(model, tokenizer, mode="completion", kind="pretrained")  # the embedded 270M
    app.launch(port=7860)                                  # http://127.0.0.1:7860, until Ctrl-C

A pretrained model continues text; asked a question in the chat format it answers with loops
and echoes. So it is offered as text completion: a box of text that the model continues,
streamed, which the user can edit and continue again. An instruction-tuned model gets the chat
page. Both sample with Gemma's recommended settings and the DRY penalty against loops
(gemma_kit.chat.CHAT_SAMPLING), adjustable on the page.

Every browser tab (and every gradio_client Client) has its own conversation or text, keyed by
Gradio's session hash; all of them share one copy of the weights. Replies stream through
Gradio's queue, up to `concurrency` at once; each conversation keeps its KV cache between turns
and, when it outgrows `cache_length`, forgets its oldest exchanges (ChatSession's "drop_oldest"
policy), which the page reports; a text longer than the cache is continued from its end. Bad
input (an empty message, an image the model cannot take, a file that is not an image or is too
large, sampling settings out of range) is refused with a message in the page; the server keeps
running.

Besides the page, API endpoints serve programs (gradio_client): `/complete` (a text and the
sampling settings -> its continuation, streamed), and on the chat page `/chat` (a message ->
the reply, streamed) and `/clear` (forget the conversation).
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
from collections.abc import Generator, Iterator
from typing import Any

import jax
import numpy as np
from flax import nnx

from gemma_kit.chat import CHAT_SAMPLING, ChatSession
from gemma_kit.errors import DemoError, GemmaKitError, InputError
from gemma_kit.layers import to_matvec_layout
from gemma_kit.sampler import GenerationResult, Sampler
from gemma_kit.sampling import DryPenalty, SamplingParams

try:
    import gradio as gr
except ImportError:  # the [demo] extra is not installed
    gr = None  # type: ignore[assignment]  # _require_gradio says so before any use


# Image files the page accepts (Pillow format names), and their upload filter.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp")
MAX_IMAGE_PIXELS = 40_000_000  # a 40-megapixel photo; larger ones are refused before decoding

MODES = ("chat", "completion")
# What is known about the model: its kind -> what the model panel says.
KINDS = {
    "pretrained": "pretrained: it continues text, it does not follow instructions",
    "instruction-tuned": "instruction-tuned: it chats",
    "fine-tuned": "fine-tuned with the LoRA adapter below",
    None: "not stated by the checkpoint's name",
}

# The page's sampling controls start at Gemma's recommended settings (the generation config of
# the official instruction-tuned Gemma 3 checkpoints) with the DRY penalty: CHAT_SAMPLING.
# max_new_tokens: per mode; a continuation is shorter, the user continues again.
DEFAULT_SAMPLING = dict(
    temperature=CHAT_SAMPLING["temperature"],
    top_p=CHAT_SAMPLING["top_p"],
    top_k=CHAT_SAMPLING["top_k"],
    dry=CHAT_SAMPLING["dry"].multiplier,
    seed=-1,
)
MAX_NEW_TOKENS = {"chat": 256, "completion": 128}

# Beginnings offered under the completion box.
EXAMPLES = (
    "Once upon a time, in a small village by the sea,",
    "The three most important inventions of the 20th century are",
    "def fibonacci(n):",
)

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
        raise DemoError(
            f"cannot serve on {host}:{port} ({err.strerror or err}); pass another "
            "--port (or --host)"
        ) from None


def load_lora(model, path: str | os.PathLike):
    """Applies the LoRA adapter saved at `path`; returns (model, a description for the page).

    The adapter is folded into the weights where it can be, so replies cost what they cost
    without one.
    """
    from gemma_kit import lora

    lora.load_adapter(model, path)
    info = lora.adapter_info(model)
    description = (
        f"`{pathlib.Path(path).name}` (rank {info['rank']}, alpha "
        f"{info['alpha']:g}, on {', '.join(info['targets'])})"
    )
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
    kind: str | None = None  # a key of KINDS
    mode: str = "chat"

    @classmethod
    def of(
        cls,
        model,
        *,
        lora: str | None,
        cache_length: int,
        kind: str | None = None,
        mode: str = "chat",
    ) -> ModelCard:
        leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
        return cls(
            name=model.config.name,
            parameters=int(sum(int(np.prod(x.shape)) for x in leaves)),
            dtypes=tuple(sorted({str(x.dtype) for x in leaves})),
            vision=bool(getattr(model, "has_vision", False)),
            lora=lora,
            cache_length=cache_length,
            backend=_device_name(),
            kind=kind,
            mode=mode,
        )

    def markdown(self) -> str:
        vision = (
            "yes: attach images to a message"
            if self.vision
            else "no, text only: images need a Gemma 3 4B, 12B or 27B checkpoint "
            "(`gemma-kit demo --ckpt DIR`)"
        )
        rows = [
            ("Model", f"`{self.name}`"),
            ("Kind", KINDS[self.kind]),
            (
                "Parameters",
                f"{self.parameters / 1e6:,.0f} M"
                if self.parameters >= 1e6
                else f"{self.parameters:,}",
            ),
            ("Weights", ", ".join(self.dtypes)),
            ("Vision", vision),
            ("LoRA adapter", self.lora or "none"),
            (
                "Memory",
                f"{self.cache_length:,} tokens per "
                + ("conversation" if self.mode == "chat" else "text"),
            ),
            ("Runs on", self.backend),
        ]
        text = "\n".join(f"- **{k}:** {v}" for k, v in rows)
        if self.mode == "chat" and self.kind == "pretrained":
            text += (
                "\n\nA pretrained model continues text rather than answering: expect "
                "wandering replies. `gemma-kit demo --mode completion` offers it as text "
                "completion."
            )
        elif self.mode == "chat" and self.kind is None:
            text += (
                "\n\nIf this model is pretrained rather than instruction-tuned, "
                "`gemma-kit demo --mode completion` offers it as text completion."
            )
        return text

    def notice(self) -> str:
        """What the completion page says first, above the text box."""
        what = (
            "a pretrained model"
            if self.kind == "pretrained"
            else "offered here as a pretrained model"
        )
        return (
            f"**Text completion.** `{self.name}` is {what}: it continues text, it does not "
            "answer questions or follow instructions. Write the beginning of a text (a story, "
            "an article, a list, code) and press **Continue** (or Shift+Enter): the model "
            "writes what could come next, in the same box. Edit it and continue again as you "
            "like. For a chat, start the demo with an instruction-tuned checkpoint, e.g. "
            "`gemma-kit demo --ckpt gemma-3-1b-it/`."
        )


# --------------------------------------------------------------------------------------------
# Input checks (pure functions of the files and settings, tested without a browser).


def sampling_settings(temperature, top_p, top_k, max_new_tokens, seed, dry=0.0) -> dict:
    """The page's controls -> ChatSession.stream keyword arguments (the seed drawn if < 0).

    top_p 1, top_k 0 and dry 0 switch those off; dry is the DRY penalty's multiplier (its
    other settings are DryPenalty's defaults). Raises SamplingError for values out of range.
    """
    top_p = None if top_p is None or float(top_p) >= 1.0 else float(top_p)
    top_k = None if top_k is None or int(top_k) <= 0 else int(top_k)
    if dry is not None and not float(dry) >= 0:
        raise InputError(f"the DRY penalty must be at least 0 (0 switches it off), got {dry}")
    penalty = DryPenalty(multiplier=float(dry)) if dry else None
    SamplingParams(float(temperature), top_k, top_p, None, penalty)
    if max_new_tokens is None or int(max_new_tokens) < 1:
        raise InputError("max new tokens must be at least 1")
    seed = -1 if seed is None else int(seed)
    if seed < 0:
        seed = secrets.randbelow(2**31)
    return dict(
        temperature=float(temperature),
        top_p=top_p,
        top_k=top_k,
        max_new_tokens=int(max_new_tokens),
        seed=seed,
        dry=penalty,
    )


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
        raise InputError(
            f"{name} is {size / 2**20:.1f} MB; images up to {max_bytes / 2**20:.0f} MB are accepted"
        )
    try:
        image = Image.open(path)
    except (UnidentifiedImageError, OSError):
        raise InputError(f"{name} is not an image (accepted: {', '.join(IMAGE_FORMATS)})") from None
    if image.format not in IMAGE_FORMATS:
        raise InputError(f"{name} is a {image.format} image; accepted: {', '.join(IMAGE_FORMATS)}")
    if image.width * image.height > MAX_IMAGE_PIXELS:
        raise InputError(
            f"{name} is {image.width}x{image.height} pixels; images up to "
            f"{MAX_IMAGE_PIXELS / 1e6:.0f} megapixels are accepted"
        )
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


class _Session:
    """One tab's conversation (chat page) or text (completion page): its ChatSession (None on
    the completion page), its stop flag, what the page shows about it."""

    def __init__(self, chat: ChatSession | None):
        self.chat = chat
        self.stop = threading.Event()  # set by Stop and Clear; checked between pieces
        self.busy = threading.Lock()  # one reply or continuation at a time
        self.pending: tuple | None = None  # what to answer or continue, and the settings
        self.forgotten = False  # Clear or a closed tab replaced this session
        self.last_images: list = []  # images of the last user turn (for Regenerate)
        self.before: str | None = None  # the text before the last continuation (for Undo)
        self.stats = ""
        self.replies = 0  # replies or continuations finished, numbered on the page
        self.used = time.monotonic()


@dataclasses.dataclass
class _Reply:
    text: str  # the reply, or the continuation, so far
    stats: str
    notice: str | None = None  # something the user should know (turns dropped, cache full)


class ChatApp:
    """The demo page and its sessions: a chat, or text completion.

    Args:
      model, tokenizer: a gemma_kit Transformer and its Tokenizer (any size; with an image
        encoder, the chat page takes images).
      mode: "chat", or "completion": a text box the model continues, the page for a pretrained
        model (which continues text and does not follow instructions).
      kind: what is known about the model, for the model panel: "pretrained",
        "instruction-tuned", "fine-tuned" (a LoRA adapter) or None (not known).
      lora: a description of the LoRA adapter already applied to `model`, for the model panel.
      cache_length: tokens each conversation or text can hold.
      concurrency: replies generated at once (more wait in Gradio's queue).
      max_image_mb: the largest image file accepted.
      max_conversations: sessions kept; the least recently used beyond it are forgotten (a
        closed tab's is forgotten at once).
    """

    def __init__(
        self,
        model,
        tokenizer,
        *,
        mode: str = "chat",
        kind: str | None = None,
        lora: str | None = None,
        cache_length: int = 4096,
        concurrency: int = 8,
        max_image_mb: float = 20,
        max_conversations: int = 64,
    ):
        _require_gradio()
        if mode not in MODES:
            raise DemoError(f"mode must be 'chat' or 'completion', got {mode!r}")
        if kind not in KINDS:
            raise DemoError(f"kind must be one of {', '.join(map(repr, KINDS))}, got {kind!r}")
        self.mode = mode
        self.card = ModelCard.of(
            model,
            lora=lora,
            kind=kind,
            mode=mode,
            cache_length=min(cache_length, model.config.max_context),
        )
        # One copy of the weights for all sessions, in the layout the sampler decodes fastest
        # from (each ChatSession would otherwise make one on CPU).
        self.model = to_matvec_layout(model) if jax.default_backend() == "cpu" else model
        self.tokenizer = tokenizer
        self.cache_length = self.card.cache_length
        # Continuations (the completion page and the /complete endpoint) share one Sampler.
        self.sampler = Sampler(
            self.model, tokenizer, cache_length=self.cache_length, matvec_layout=False
        )
        self.max_new_tokens = min(MAX_NEW_TOKENS[mode], self.cache_length // 2)
        self.concurrency = concurrency
        self.max_image_bytes = int(max_image_mb * 2**20)
        self.max_conversations = max_conversations
        self._conversations: collections.OrderedDict[str, _Session] = collections.OrderedDict()
        self._lock = threading.Lock()
        self.blocks = self._build()

    # -- sessions -----------------------------------------------------------------------------
    def _new_chat(self, system: str | None) -> ChatSession:
        return ChatSession(
            self.model,
            self.tokenizer,
            system=(system or "").strip() or None,
            cache_length=self.cache_length,
            matvec_layout=False,
        )

    def conversation(self, session: str, system: str | None = None) -> _Session:
        """The session of one browser tab or client (created on first use)."""
        with self._lock:
            conv = self._conversations.get(session)
            if conv is None:
                chat = self._new_chat(system) if self.mode == "chat" else None
                conv = self._conversations[session] = _Session(chat)
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

    def clear(self, session: str, system: str | None = None) -> _Session:
        """Stops the tab's reply, if any, and starts it a new conversation or text."""
        self.forget(session)
        return self.conversation(session, system)

    # -- the core: one reply or continuation, streamed ---------------------------------------
    def check_message(self, text: str | None, files) -> tuple[str, list]:
        """(text, decoded images) of a message, or InputError saying why it is refused."""
        text = (text or "").strip()
        files = list(files or [])
        if files and not self.card.vision:
            raise InputError(
                f"this model ({self.card.name}) reads text only, so it cannot look at images. "
                "Images need a Gemma 3 4B, 12B or 27B checkpoint: start the demo with "
                "`gemma-kit demo --ckpt DIR`. Remove the image to send the text alone."
            )
        if not text:
            raise InputError(
                "the message is empty: type some text" + (" to go with the image" if files else "")
            )
        images = [load_image(_file_path(f), self.max_image_bytes) for f in files]
        return text, images

    def _pieces(
        self, conv: _Session, pieces: Iterator[str]
    ) -> Generator[_Reply, None, tuple[float, float]]:
        """Yields the text so far after each piece, until the end or Stop; returns (seconds
        it took, seconds to the first piece)."""
        start = time.perf_counter()
        first = None
        so_far = ""
        try:
            for piece in pieces:
                if conv.stop.is_set():
                    break
                first = first or time.perf_counter()
                so_far += piece
                yield _Reply(so_far, conv.stats)
        finally:
            pieces.close()  # type: ignore[attr-defined]  # a stopped reply is kept as shown
        end = time.perf_counter()
        return end - start, (first or end) - start

    def _finish(
        self,
        conv: _Session,
        what: str,
        result: GenerationResult,
        timing: tuple[float, float],
        seed: int,
        notice: str | None,
    ) -> _Reply:
        """The last _Reply of a reply or continuation, with its stats line."""
        elapsed, first = timing
        n = len(result.tokens)
        conv.replies += 1
        conv.stats = (
            f"**{what} {conv.replies}:** {n} tokens in {elapsed:.2f} s "
            f"({n / elapsed:.1f} tokens/s), first token after {first:.2f} s · "
            f"{FINISH_REASONS.get(result.finish_reason, result.finish_reason)} · seed {seed}"
        )
        if notice:
            conv.stats += f"  \n{notice}"
        return _Reply(result.text, conv.stats, notice)

    def reply(
        self, conv: _Session, text: str, images: list, sampling: dict
    ) -> Generator[_Reply, None, None]:
        """Streams the reply to one message of a conversation (the text so far each time)."""
        if not conv.busy.acquire(blocking=False):
            raise InputError(
                "a reply is still being written in this conversation: wait for it or press Stop"
            )
        try:
            chat = conv.chat
            if chat is None:
                raise InputError("this page continues text; it holds no conversation")
            dropped = chat.dropped_turns
            extra: dict[str, Any] = {}
            if images:
                text, extra = with_image_markers(text, len(images)), {"images": images}
            timing = yield from self._pieces(conv, chat.stream(text, **extra, **sampling))
            result = chat.last_result
            assert result is not None  # set when the stream ends, however it ends
            conv.last_images = images
            notice = None
            if chat.dropped_turns > dropped:
                notice = (
                    f"The conversation outgrew the {self.cache_length:,}-token memory: "
                    f"its {chat.dropped_turns - dropped} oldest exchange(s) were "
                    "forgotten (they stay on the page). Clear starts afresh."
                )
            elif result.finish_reason == "cache_full":
                notice = (
                    f"The reply stopped because the {self.cache_length:,}-token memory "
                    "is full; the next message will forget the oldest exchanges."
                )
            yield self._finish(conv, "Reply", result, timing, sampling["seed"], notice)
        finally:
            conv.busy.release()

    def complete(self, conv: _Session, text: str, sampling: dict) -> Generator[_Reply, None, None]:
        """Streams the continuation of `text` (`_Reply.text`: the continuation so far).

        A text longer than the cache allows (with max_new_tokens) is continued from its end:
        <bos> and as many of its last tokens as fit.
        """
        if not conv.busy.acquire(blocking=False):
            raise InputError("a continuation is still being written: wait for it or press Stop")
        try:
            sampler, max_new = self.sampler, sampling["max_new_tokens"]
            settings = sampler.settings(
                max_new,
                sampling["temperature"],
                sampling["top_k"],
                sampling["top_p"],
                dry=sampling["dry"],
            )
            ids = sampler.encode([text])[0]
            room = self.cache_length - settings.max_new  # prompt slots left by the new tokens
            notice = None
            if len(ids) > room:
                ids = ids[:1] + ids[len(ids) - room + 1 :]
                notice = (
                    f"The text is longer than the {self.cache_length:,}-token memory "
                    f"holds with {max_new} new tokens: it was continued from its last "
                    f"{room - 1:,} tokens."
                )
            results: list[GenerationResult] = []
            state = sampler.start([ids], settings, sampling["seed"])
            pieces = sampler.stream_state(
                state, settings, max_new, finished=lambda _, result: results.append(result)
            )
            timing = yield from self._pieces(conv, pieces)
            yield self._finish(conv, "Continuation", results[-1], timing, sampling["seed"], notice)
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
        title = "chat" if self.mode == "chat" else "text completion"
        with gr.Blocks(
            title=f"gemma_kit {title}: {self.card.name}", analytics_enabled=False, fill_height=True
        ) as blocks:
            gr.Markdown(f"## gemma_kit {title} · {self.card.name}")
            with gr.Row(equal_height=False):
                with gr.Column(scale=3):
                    if self.mode == "chat":
                        main = self._chat_column()
                    else:
                        main = self._completion_column()
                with gr.Column(scale=1, min_width=280):
                    gr.Markdown(self.card.markdown(), elem_id="model-card")
                    system = None
                    if self.mode == "chat":
                        system = gr.Textbox(
                            label="System prompt",
                            lines=3,
                            elem_id="system",
                            info="Used from the start of a conversation (Clear starts a new one).",
                        )
                    controls = self._sampling_controls()
            gen = dict(concurrency_id="generate", concurrency_limit=self.concurrency)
            if self.mode == "chat":
                self._wire_chat(main, system, controls, gen)
            else:
                self._wire_completion(main, controls, gen)
            blocks.unload(self._ui_unload)
            gr.api(self._api_complete, api_name="complete", **gen)
            if self.mode == "chat":
                gr.api(self._api_chat, api_name="chat", **gen)
                gr.api(self._api_clear, api_name="clear", concurrency_limit=None)
        return blocks

    def _sampling_controls(self) -> list:
        with gr.Accordion("Sampling", open=True):
            temperature = gr.Slider(
                0,
                2,
                DEFAULT_SAMPLING["temperature"],
                step=0.05,
                label="Temperature (0: greedy)",
                elem_id="temperature",
            )
            top_p = gr.Slider(
                0.01,
                1,
                DEFAULT_SAMPLING["top_p"],
                step=0.01,
                label="Top-p (1: off)",
                elem_id="top-p",
            )
            top_k = gr.Slider(
                0, 256, DEFAULT_SAMPLING["top_k"], step=1, label="Top-k (0: off)", elem_id="top-k"
            )
            dry = gr.Slider(
                0,
                3,
                DEFAULT_SAMPLING["dry"],
                step=0.05,
                label="Repetition penalty (DRY, 0: off)",
                elem_id="dry",
                info="Penalises going on with a stretch already written, more "
                "with every token: it breaks loops.",
            )
            # Half the memory at most: a reply must leave room for its prompt.
            most = min(1024, self.cache_length // 2)
            max_new = gr.Slider(
                1, most, self.max_new_tokens, step=1, label="Max new tokens", elem_id="max-new"
            )
            seed = gr.Number(
                DEFAULT_SAMPLING["seed"],
                precision=0,
                label="Seed (-1: a new one each time)",
                elem_id="seed",
            )
        return [temperature, top_p, top_k, dry, max_new, seed]

    @staticmethod
    def _sampling(temperature, top_p, top_k, dry, max_new, seed) -> dict:
        return sampling_settings(temperature, top_p, top_k, max_new, seed, dry)

    # -- the chat page ------------------------------------------------------------------------
    def _chat_column(self) -> dict:
        placeholder = "Type a message" + (
            " and attach images"
            if self.card.vision
            else " (text only: this model has no image encoder)"
        )
        chatbot = gr.Chatbot(
            label="Conversation",
            height=560,
            elem_id="chatbot",
            buttons=["copy"],
            feedback_options=None,
        )
        box = gr.MultimodalTextbox(
            placeholder=placeholder,
            show_label=False,
            elem_id="message",
            file_count="multiple",
            file_types=list(IMAGE_SUFFIXES),
            sources=["upload"],
            autofocus=True,
        )
        with gr.Row():
            stop = gr.Button("Stop", variant="stop", elem_id="stop", size="sm")
            regenerate = gr.Button("Regenerate", elem_id="regenerate", size="sm")
            clear = gr.Button("Clear", elem_id="clear", size="sm")
        stats = gr.Markdown("", elem_id="stats")
        return dict(
            chatbot=chatbot, box=box, stop=stop, regenerate=regenerate, clear=clear, stats=stats
        )

    def _wire_chat(self, parts: dict, system, controls: list, gen: dict) -> None:
        chatbot, box, stats = parts["chatbot"], parts["box"], parts["stats"]
        # Sending: take the message (quick, never queued behind replies), then answer it.
        quick = dict(concurrency_limit=None, api_visibility="private")
        sent = box.submit(self._ui_add, [box, chatbot, system, *controls], [box, chatbot], **quick)
        answered = sent.success(
            self._ui_respond,
            [chatbot],
            [chatbot, stats],
            api_visibility="private",
            show_progress_on=[chatbot],
            **gen,
        )
        answered.then(lambda: gr.MultimodalTextbox(interactive=True), None, [box], **quick)
        again = parts["regenerate"].click(
            self._ui_regenerate, [chatbot, *controls], [chatbot], **quick
        )
        again.success(
            self._ui_respond,
            [chatbot],
            [chatbot, stats],
            api_visibility="private",
            show_progress_on=[chatbot],
            **gen,
        )
        parts["stop"].click(self._ui_stop, None, None, **quick)
        parts["clear"].click(self._ui_clear, [system], [chatbot, stats, box], **quick)
        chatbot.clear(self._ui_clear, [system], [chatbot, stats, box], **quick)

    @staticmethod
    def _session(request) -> str:
        return request.session_hash

    def _ui_add(
        self,
        value,
        history,
        system,
        temperature,
        top_p,
        top_k,
        dry,
        max_new,
        seed,
        request: gr.Request,
    ):
        value = value or {}
        conv = self.conversation(self._session(request), system)
        try:
            text, images = self.check_message(value.get("text"), value.get("files"))
            sampling = self._sampling(temperature, top_p, top_k, dry, max_new, seed)
        except GemmaKitError as err:
            raise gr.Error(_sentence(err), title="Not sent", print_exception=False) from None
        if conv.busy.locked():
            raise gr.Error(
                "A reply is still being written: wait for it or press Stop.",
                title="Not sent",
                print_exception=False,
            )
        assert conv.chat is not None  # the chat page's sessions have one
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
                history[-1] = {
                    "role": "assistant",
                    "content": part.text or "*(no text: the model ended its turn)*",
                }
                if part.notice:
                    gr.Info(part.notice, title="Memory")
                yield history, part.stats
        except GemmaKitError as err:
            # The turn failed (an image the encoder refuses, a message that cannot fit): say
            # so where the reply would have been; the conversation stays as it was.
            if not conv.forgotten:
                history[-1] = {"role": "assistant", "content": f"*Not answered: {_sentence(err)}*"}
                yield history, conv.stats

    def _ui_regenerate(
        self, history, temperature, top_p, top_k, dry, max_new, seed, request: gr.Request
    ):
        conv = self.conversation(self._session(request))
        try:
            sampling = self._sampling(temperature, top_p, top_k, dry, max_new, seed)
        except GemmaKitError as err:
            raise gr.Error(_sentence(err), title="Regenerate", print_exception=False) from None
        if conv.busy.locked():
            raise gr.Error(
                "A reply is still being written: wait for it or press Stop.",
                title="Regenerate",
                print_exception=False,
            )
        assert conv.chat is not None  # the chat page's sessions have one
        user = conv.chat.undo()
        if user is None:
            raise gr.Error(
                "There is no reply to regenerate yet.", title="Regenerate", print_exception=False
            )
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

    # -- the completion page ------------------------------------------------------------------
    def _completion_column(self) -> dict:
        gr.Markdown(self.card.notice(), elem_id="mode-notice")
        box = gr.Textbox(
            label="Text",
            lines=14,
            max_lines=40,
            elem_id="text",
            placeholder=f"{EXAMPLES[0]} ...",
            autofocus=True,
            info="The model continues it here. Shift+Enter continues too.",
        )
        with gr.Row():
            go = gr.Button("Continue", variant="primary", elem_id="continue", size="sm")
            stop = gr.Button("Stop", variant="stop", elem_id="stop", size="sm")
            undo = gr.Button("Undo", elem_id="undo", size="sm")
            clear = gr.Button("Clear", elem_id="clear", size="sm")
        stats = gr.Markdown("", elem_id="stats")
        gr.Examples(
            [[e] for e in EXAMPLES],
            inputs=[box],
            label="Or start from one of these",
            elem_id="examples",
        )
        return dict(box=box, go=go, stop=stop, undo=undo, clear=clear, stats=stats)

    def _wire_completion(self, parts: dict, controls: list, gen: dict) -> None:
        box, stats = parts["box"], parts["stats"]
        quick = dict(concurrency_limit=None, api_visibility="private")
        for trigger in (parts["go"].click, box.submit):
            taken = trigger(self._ui_take, [box, *controls], [box], **quick)
            continued = taken.success(
                self._ui_continue,
                None,
                [box, stats],
                api_visibility="private",
                show_progress="hidden",
                **gen,
            )
            continued.then(lambda: gr.Textbox(interactive=True), None, [box], **quick)
        parts["stop"].click(self._ui_stop, None, None, **quick)
        parts["undo"].click(self._ui_undo, None, [box], **quick)
        parts["clear"].click(self._ui_clear_text, None, [box, stats], **quick)

    def _ui_take(self, text, temperature, top_p, top_k, dry, max_new, seed, request: gr.Request):
        conv = self.conversation(self._session(request))
        try:
            if not (text or "").strip():
                raise InputError(
                    "the text is empty: write the beginning of a text for the model to continue"
                )
            sampling = self._sampling(temperature, top_p, top_k, dry, max_new, seed)
        except GemmaKitError as err:
            raise gr.Error(_sentence(err), title="Not continued", print_exception=False) from None
        if conv.busy.locked():
            raise gr.Error(
                "A continuation is still being written: wait for it or press Stop.",
                title="Not continued",
                print_exception=False,
            )
        conv.stop.clear()
        conv.pending = (text, sampling)
        return gr.Textbox(interactive=False)

    def _ui_continue(self, request: gr.Request):
        conv = self.conversation(self._session(request))
        pending, conv.pending = conv.pending, None
        if pending is None:
            return
        text, sampling = pending
        conv.before = text
        try:
            for part in self.complete(conv, text, sampling):
                if conv.forgotten:  # cleared meanwhile: leave the page as Clear left it
                    return
                if part.notice:
                    gr.Info(part.notice, title="Memory")
                yield text + part.text, part.stats
        except GemmaKitError as err:
            raise gr.Error(_sentence(err), title="Not continued", print_exception=False) from None

    def _ui_undo(self, request: gr.Request):
        conv = self.conversation(self._session(request))
        if conv.busy.locked():
            raise gr.Error(
                "A continuation is still being written: wait for it or press Stop.",
                title="Undo",
                print_exception=False,
            )
        if conv.before is None:
            raise gr.Error("There is no continuation to undo.", title="Undo", print_exception=False)
        text, conv.before = conv.before, None
        return text

    def _ui_clear_text(self, request: gr.Request):
        self.clear(self._session(request))
        return gr.Textbox(value="", interactive=True), ""

    # -- API for programs (gradio_client) ----------------------------------------------------
    def _api_chat(
        self,
        message: str,
        system: str = "",
        temperature: float = DEFAULT_SAMPLING["temperature"],
        top_p: float = DEFAULT_SAMPLING["top_p"],
        top_k: int = DEFAULT_SAMPLING["top_k"],
        max_new_tokens: int = MAX_NEW_TOKENS["chat"],
        seed: int = -1,
        dry: float = DEFAULT_SAMPLING["dry"],
        request: gr.Request | None = None,
    ) -> Iterator[str]:
        """Sends a message in this client's conversation; yields the reply as it grows.

        temperature 0 is greedy; top_p 1, top_k 0 and dry 0 switch those off; seed -1 draws
        a new seed. The system prompt applies when the conversation starts.
        """
        conv = self.conversation(self._session(request), system)
        try:
            text, images = self.check_message(message, [])
            sampling = sampling_settings(temperature, top_p, top_k, max_new_tokens, seed, dry)
            conv.stop.clear()
            for part in self.reply(conv, text, images, sampling):
                yield part.text
        except GemmaKitError as err:
            raise gr.Error(str(err)) from None

    def _api_clear(self, system: str = "", request: gr.Request | None = None) -> str:
        """Forgets this client's conversation."""
        self.clear(self._session(request), system)
        return "cleared"

    def _api_complete(
        self,
        text: str,
        temperature: float = DEFAULT_SAMPLING["temperature"],
        top_p: float = DEFAULT_SAMPLING["top_p"],
        top_k: int = DEFAULT_SAMPLING["top_k"],
        max_new_tokens: int = MAX_NEW_TOKENS["completion"],
        seed: int = -1,
        dry: float = DEFAULT_SAMPLING["dry"],
        request: gr.Request | None = None,
    ) -> Iterator[str]:
        """Continues `text`; yields the continuation (without the text) as it grows.

        temperature 0 is greedy; top_p 1, top_k 0 and dry 0 switch those off; seed -1 draws
        a new seed.
        """
        conv = self.conversation(self._session(request))
        try:
            if not (text or "").strip():
                raise InputError("the text is empty: give the beginning of a text to continue")
            sampling = sampling_settings(temperature, top_p, top_k, max_new_tokens, seed, dry)
            conv.stop.clear()
            for part in self.complete(conv, text, sampling):
                yield part.text
        except GemmaKitError as err:
            raise gr.Error(str(err)) from None

    # -- serving ------------------------------------------------------------------------------
    def warm_up(self, **sampling) -> None:
        """Compiles what the first replies (or continuations) with the page's default settings
        (or `sampling`) need, so that the first visitor does not wait for it."""
        settings = sampling_settings(
            **{**DEFAULT_SAMPLING, "seed": 0, "max_new_tokens": self.max_new_tokens, **sampling}
        )
        settings["max_new_tokens"] = min(settings["max_new_tokens"], self.cache_length // 2)
        if self.mode == "completion":
            streams = [self.complete(_Session(None), "Once upon a time", settings)]
        else:
            # A first turn and a later one, long enough to be fed in a chunk and then token by
            # token (each generator starts when the one before it is closed).
            conv = _Session(self._new_chat(None))
            streams = [
                self.reply(conv, message, [], settings)
                for message in ("Hello.", "Hello again, " * 12)
            ]
        for stream in streams:
            for _, _ in zip(range(2), stream):  # two pieces: the prefill and a decode step
                pass
            stream.close()

    def launch(
        self, host: str = "127.0.0.1", port: int = 7860, *, block: bool = True, quiet: bool = False
    ) -> str:
        """Serves the page at http://host:port; returns its URL (block=False) or runs until
        Ctrl-C (block=True)."""
        self.blocks.queue(default_concurrency_limit=self.concurrency)
        try:
            _, url, _ = self.blocks.launch(
                server_name=host,
                server_port=port,
                prevent_thread_lock=not block,
                quiet=quiet,
                theme=self.theme,
                max_file_size=self.max_image_bytes,
                footer_links=["api"],
                show_error=True,
                ssr_mode=False,
                share=False,
            )
        except OSError as err:
            raise DemoError(
                f"cannot serve on {host}:{port} ({err}); pass another --port or --host"
            ) from None
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


def serve(
    model, tokenizer, host: str = "127.0.0.1", port: int = 7860, *, warm_up: bool = True, **options
) -> None:
    """Serves the page until Ctrl-C (what `gemma-kit demo` runs); options as ChatApp's."""
    app = ChatApp(model, tokenizer, **options)
    if warm_up:
        print("Compiling the model's programs for the default settings (once)...", flush=True)
        app.warm_up()
    if app.mode == "chat":
        print(
            f"Chat page for {app.card.name} at http://{host}:{port} (Ctrl-C stops it)", flush=True
        )
    else:
        print(
            f"Text completion page for {app.card.name} at http://{host}:{port} (Ctrl-C "
            "stops it): a pretrained model continues text; --mode chat gives the chat page",
            flush=True,
        )
    try:
        app.launch(host, port, block=True, quiet=True)
    finally:
        app.close()
