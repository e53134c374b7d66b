"""Multi-turn chat that keeps its KV cache between turns: ChatSession.

Each turn prefills only the new tokens (the cache already holds the conversation) through the
Sampler's public building blocks (settings, start, feed, stream_state; gemma_kit.sampler) and
the one decode state of gemma_kit.decode.
"""

from __future__ import annotations

import os
import pathlib
import re
import types
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax.numpy as jnp

from gemma_kit import speculative as spec
from gemma_kit.decode import DecodeState
from gemma_kit.errors import ImageError
from gemma_kit.sampler import GenerationResult, Sampler
from gemma_kit.sampling import DryPenalty, SamplingError

# Gemma's recommended sampling (the generation config of the official instruction-tuned Gemma 3
# checkpoints), with the DRY penalty against loops: ChatSession's defaults, and those of
# `gemma-kit chat` and the demo page.
CHAT_SAMPLING: Mapping[str, Any] = types.MappingProxyType(
    dict(temperature=1.0, top_k=64, top_p=0.95, dry=DryPenalty())
)


def instruction_tuned(checkpoint: str | os.PathLike) -> bool | None:
    """Whether a checkpoint is an instruction-tuned (chat) model, as far as its name tells.

    The official names mark instruction-tuned checkpoints with "it" (gemma-3-1b-it, Kaggle's
    gemma3-4b-it) and pretrained ones with "pt" or with no mark at all (gemma-3-270m,
    gemma-2-2b, the embedded gemma3-270m). The folder's name is read, or its parent's when the
    folder is the `checkpoint/` inside a model folder. Returns True ("it", "instruct", "chat"),
    False ("pt", "pretrained", "base", or an official name and size with no mark), or None: a
    name that says nothing (a fine-tuned model in a folder of its own name, say).
    """
    path = pathlib.Path(checkpoint).expanduser()
    name = path.name if path.name not in ("checkpoint", "") else path.parent.name
    words = set(re.split(r"[^a-z0-9]+", name.lower()))
    if words & {"it", "instruct", "instruction", "chat"}:
        return True
    official = re.fullmatch(
        r"gemma-?[0-9]?-[0-9]+(\.[0-9]+)?[mb]",
        "-".join(w for w in re.split(r"[^a-z0-9.]+", name.lower()) if w),
    )
    if words & {"pt", "pretrained", "base"} or official:
        return False
    return None


class ChatOverflowError(SamplingError):
    """A conversation no longer fits in the chat session's cache (overflow="error")."""


class ChatSession:
    """A multi-turn conversation that keeps its KV cache between turns.

    Each `send` prefills only the new turn (the cache already holds the conversation so far)
    and decodes the reply until <end_of_turn>. Gemma has no system role: `system` is folded
    into the first user turn, as in the official chat template.

    When a turn (plus max_new_tokens) no longer fits in `cache_length` tokens, the `overflow`
    policy applies: "drop_oldest" (default) forgets the oldest exchanges, keeping the system
    prompt, and re-reads what remains into a fresh cache; "error" raises ChatOverflowError and
    leaves the conversation as it was. A reply cut short by a full cache ends with
    finish_reason "cache_full" (see `last_result`).

    Replies are sampled as Gemma's instruction-tuned models are meant to be (CHAT_SAMPLING:
    temperature 1.0, top-k 64, top-p 0.95) with the DRY penalty, which breaks a reply that
    starts to loop; `send(message, temperature=0.0, dry=None)` is plain greedy decoding.

    speculative: "ngram" or a draft model (as Sampler.generate's): replies are decoded
    speculatively, distributed as without it (greedy: the same replies), and without the DRY
    penalty, which speculative decoding does not apply (off by default in such a session;
    asking for it raises). A draft model re-reads the conversation into its own cache at every
    turn; images are then refused.
    """

    def __init__(
        self,
        model,
        tokenizer,
        system: str | None = None,
        *,
        cache_length: int = 4096,
        cache_dtype=jnp.bfloat16,
        overflow: str = "drop_oldest",
        matvec_layout: bool | None = None,
        speculative=None,
    ):
        if overflow not in ("drop_oldest", "error"):
            raise SamplingError(f"overflow must be 'drop_oldest' or 'error', got {overflow!r}")
        cache_length = min(cache_length, model.config.max_context)
        self.sampler = Sampler(
            model,
            tokenizer,
            cache_dtype=cache_dtype,
            cache_length=cache_length,
            matvec_layout=matvec_layout,
        )
        self.drafter = None if speculative is None else self.sampler.resolve_drafter(speculative)
        self.tokenizer = tokenizer
        self.system = system
        self.overflow = overflow
        self.cache_length = cache_length
        self.messages: list[dict] = []  # user/model turns so far (the system prompt apart)
        self.last_result: GenerationResult | None = None
        self.dropped_turns = 0  # exchanges forgotten under the drop_oldest policy
        self._state: DecodeState | None = None  # after the last reply; its cache holds the chat
        self.token_ids: list[int] = []  # the conversation as the model saw it (pads aside)

    @property
    def cached_tokens(self) -> int:
        """Cache slots the conversation occupies now (0 before the first reply, or after a
        reset or an undo, until the next turn re-reads it)."""
        return 0 if self._state is None else int(self._state.cache["index"])

    def reset(self) -> None:
        """Forgets the conversation (the system prompt stays)."""
        self.messages, self._state, self.last_result, self.token_ids = [], None, None, []

    def _history(self, messages) -> list[dict]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + messages

    def _full_ids(self, messages) -> list[int]:
        ids = self.tokenizer.encode(self.tokenizer.format_chat(self._history(messages)))
        images = self._images(messages)
        if images is None:
            return ids
        markers = ids.count(self.tokenizer.start_of_image_id)
        if markers != images.shape[0]:
            # e.g. a reply that spelled out "<start_of_image>": re-read, it would become a marker
            raise ImageError(
                f"the conversation's text holds {markers} <start_of_image> markers for "
                f"{images.shape[0]} images, so it cannot be re-read; call reset() (or undo()) to "
                "go on"
            )
        return self.sampler.expand_images(ids)

    def _images(self, messages):
        """The embeddings [n, M, D] of every image in `messages`, in order, or None."""
        found = [m["images"] for m in messages if m.get("images") is not None]
        return jnp.concatenate(found) if found else None

    def send(self, message: str, **sampling) -> str:
        """Sends a user message and returns the model's reply (sampling as Sampler.generate,
        by default CHAT_SAMPLING's).

        `images=[...]` (models with an image encoder) go with the message, which holds one
        `<start_of_image>` per image; each image is encoded once and stays in the conversation
        (`pan_and_scan=True` adds crops of elongated images, as Sampler.generate).
        """
        return "".join(self.stream(message, **sampling))

    def stream(
        self,
        message: str,
        max_new_tokens: int = 256,
        temperature: float = CHAT_SAMPLING["temperature"],
        top_k: int | None = CHAT_SAMPLING["top_k"],
        top_p: float | None = CHAT_SAMPLING["top_p"],
        min_p: float | None = None,
        seed: int = 0,
        stop: str | Sequence[str] | None = None,
        *,
        images=None,
        pan_and_scan: bool = False,
        dry: DryPenalty | None = CHAT_SAMPLING["dry"],
    ) -> Iterator[str]:
        """Like `send`, yielding the reply piece by piece."""
        if not isinstance(message, str) or not message.strip():
            raise SamplingError("the message is empty; type something to send")
        sampler, tok = self.sampler, self.tokenizer
        if self.drafter is not None and dry is CHAT_SAMPLING["dry"]:
            dry = None  # the default; speculative decoding does not apply the penalty
        settings = sampler.settings(max_new_tokens, temperature, top_k, top_p, min_p, dry=dry)
        drafter, slack = self.drafter, 0
        if drafter is not None:
            sampler.resolve_drafter(drafter, images)  # text only
            settings = sampler.speculative_settings(settings, drafter, max_new_tokens)
            slack = drafter.k
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        message, embeddings = sampler.read_images(message, images, pan_and_scan, "the message")
        user = {"role": "user", "content": message}
        if embeddings is not None:
            user["images"] = embeddings  # encoded once; re-used if the chat is re-read

        if self._state is not None:
            # Only the new turn goes in: close the model's turn, open the user's, then the
            # model's. Chat markup tokens are atomic, so this tokenizes as the full text would.
            new_ids = tok.encode("<end_of_turn>\n" + tok.format_chat([user]), add_bos=False)
            if embeddings is not None:
                new_ids = sampler.expand_images(new_ids)
            used = int(self._state.cache["index"])
            if used + len(new_ids) + max_new_tokens > self.cache_length:
                self._make_room(user, max_new_tokens)
        if self._state is None:
            ids = self._full_ids(self.messages + [user])
            if len(ids) + max_new_tokens > self.cache_length:
                self._make_room(user, max_new_tokens)
                ids = self._full_ids(self.messages + [user])

        recorded = False

        def finished(final_state, result):
            nonlocal recorded
            n = len(result.tokens)
            if int(final_state.step) == n + bool(final_state.done[0]):
                fed = int(final_state.step) - 1  # the last drawn token is not fed yet
                self.token_ids += result.tokens[:fed]
                self._state = final_state
            elif n:
                # A speculative round drew past where the reply ended (a stop string, a closed
                # stream): its cache holds tokens the reply does not. Re-read what plain
                # decoding would have fed (all but the reply's last token, which goes in with
                # the next turn) into a fresh cache.
                self.token_ids += result.tokens[:-1]
                state = sampler.start([self.token_ids], settings, seed, ring_slack=slack)
                self._state = state.replace(
                    token=jnp.asarray(result.tokens[-1:], jnp.int32), done=jnp.zeros((1,), bool)
                )
            else:
                self._state, self.token_ids = None, []
            self.last_result = result
            self.messages += [user, {"role": "model", "content": result.text}]
            recorded = True

        try:
            if self._state is None:
                self.token_ids = list(ids)
                state = sampler.start(
                    [ids], settings, seed, [self._images(self.messages + [user])], ring_slack=slack
                )
            else:
                state = self._continue(new_ids, settings, seed, embeddings)
            rounds = None
            if drafter is not None:
                rounds = sampler.speculate(
                    state,
                    settings,
                    drafter,
                    max_new_tokens,
                    self.token_ids,
                    seed,
                    spec.SpeculativeStats(),
                )
            yield from sampler.stream_state(
                state, settings, max_new_tokens, stops, finished, rounds=rounds
            )
        except BaseException:
            if not recorded:
                # Cut short inside a step (Ctrl-C, an error): the cache buffers were handed to
                # that step and may be gone. Forget this turn; the next one re-reads the
                # conversation into a fresh cache.
                self._state, self.token_ids = None, []
            raise

    def undo(self) -> dict | None:
        """Forgets the last exchange and returns its user message (to regenerate the reply or
        edit the message), or None when there is none. The next turn re-reads what remains."""
        if not self.messages:
            return None
        user = self.messages[-2]
        self.messages = self.messages[:-2]
        self._state, self.token_ids, self.last_result = None, [], None
        return user

    def _make_room(self, user: dict, max_new_tokens: int) -> None:
        """Applies the overflow policy so that the next turn fits."""
        if self.overflow == "error":
            raise ChatOverflowError(
                f"the conversation would exceed the cache of {self.cache_length} tokens; call "
                "reset(), or create the ChatSession with a larger cache_length or "
                "overflow='drop_oldest'"
            )
        messages = list(self.messages)
        while (
            messages and len(self._full_ids(messages + [user])) + max_new_tokens > self.cache_length
        ):
            messages = messages[2:]  # one user/model exchange
            self.dropped_turns += 1
        if len(self._full_ids(messages + [user])) + max_new_tokens > self.cache_length:
            raise ChatOverflowError(
                f"this message alone (with max_new_tokens={max_new_tokens}) does not fit in the "
                f"cache of {self.cache_length} tokens; shorten it or lower max_new_tokens"
            )
        self.messages, self._state = messages, None  # re-read what remains into a fresh cache
        self.token_ids = []

    def _continue(self, new_ids: list[int], settings, seed: int, images=None) -> DecodeState:
        """Feeds the new turn after the cached conversation and draws the reply's first token.

        images: the new turn's image embeddings [n, M, D], or None.
        """
        state = self._state
        assert state is not None, "_continue needs a cached conversation"
        if not bool(state.done[0]):
            # The reply ended on a length limit or a stop string: its last drawn token was
            # never fed to the model, so it goes in first. (A stop token is not fed: the new
            # turn's markup closes the model's turn itself.)
            new_ids = [int(state.token[0])] + new_ids
        self.token_ids += new_ids
        return self.sampler.feed(
            state.cache, int(state.position[0]), new_ids, settings, seed, images
        )
