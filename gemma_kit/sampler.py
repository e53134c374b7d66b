"""KV-cached sampling: prefill, a compiled decode loop, streaming, and multi-turn chat.

The path of a request: prompts -> token ids, left-padded to a length bucket (pads carry
position -1 and are never attended to) -> one prefill over the padded batch that writes the
cache and draws the first token -> decode steps that each feed one token per row. The
non-streaming path runs the steps in `jax.lax.while_loop` (no host round trip per token); the
streaming path calls the same compiled step from Python and detokenises as it goes.

Shapes are static and bucketed (prompt length, cache length, number of new tokens), parameters
and the decode state are arguments of the compiled functions (the state's buffers donated), and
sampling settings are static values: steady-state decoding never recompiles.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gemma_kit import cache as kv_cache
from gemma_kit.errors import ImageError
from gemma_kit.layers import to_matvec_layout
from gemma_kit.vision import prompt as image_prompt
from gemma_kit.sampling import SamplingError, SamplingParams, sample

PAD_ID = 0


@dataclasses.dataclass
class GenerationResult:
    """One completion.

    text: the decoded new tokens (cut right before a stop string, if one was hit).
    tokens: ids of the new tokens (a stop token id is not included).
    logprobs: log-probability of each new token under the model (before temperature/filters).
    finish_reason: "stop" (stop token or string), "length" (max_new_tokens), "cache_full", or
      "interrupted" (a stream whose reader stopped early; text is what it was given).
    """

    text: str
    tokens: list[int]
    logprobs: list[float]
    finish_reason: str
    prompt_tokens: int = 0


def _bucket(n: int, minimum: int = 32) -> int:
    """Rounds up to 32, 48, 64, 96, 128, 192, ...: at most a third wasted, few shapes."""
    size = minimum
    while True:
        if n <= size:
            return size
        if n <= size * 3 // 2:
            return size * 3 // 2
        size *= 2


# --------------------------------------------------------------------------------------------
# Compiled pieces. Everything static is hashable: the graphdef (with its frozen Config), the
# sampling settings, and tuples of ids.


@dataclasses.dataclass(frozen=True)
class _Static:
    graphdef: nnx.GraphDef
    params: SamplingParams
    stop_ids: tuple[int, ...]
    forbidden_ids: tuple[int, ...]
    max_new: int  # bucketed size of the output buffers

    def __post_init__(self):
        # jit hashes its static arguments on every call. A model's graphdef takes milliseconds
        # to hash (3 ms for the 270M's 18 layers, measured), which a streamed token would pay
        # each step, so the hash is taken once.
        fields = (self.graphdef, self.params, self.stop_ids, self.forbidden_ids, self.max_new)
        object.__setattr__(self, "_hash", hash(fields))

    def __hash__(self) -> int:
        return self._hash


def _log_softmax_at(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    lse = jax.nn.logsumexp(logits, axis=-1)
    return jnp.take_along_axis(logits, tokens[:, None], axis=-1)[:, 0] - lse


def _choose(static: _Static, logits: jax.Array, key: jax.Array):
    """[B, V] logits -> (tokens [B], their model log-probabilities [B]).

    The log-probabilities are the model's own: taken before forbidden tokens are removed and
    before temperature and filters reshape the distribution.
    """
    logits = logits.astype(jnp.float32)
    allowed = logits
    if static.forbidden_ids:
        allowed = logits.at[:, jnp.asarray(static.forbidden_ids)].set(-jnp.inf)
    tokens = sample(key, allowed, static.params)
    return tokens, _log_softmax_at(logits, tokens)


def _record(static: _Static, state: dict, tokens, logprobs) -> dict:
    step = state["step"]
    tokens = jnp.where(state["done"], PAD_ID, tokens)
    stopped = jnp.isin(tokens, jnp.asarray(static.stop_ids or (-1,))) & ~state["done"]
    return dict(
        state,
        token=tokens,
        tokens=jax.lax.dynamic_update_slice_in_dim(state["tokens"], tokens[:, None], step, 1),
        logprobs=jax.lax.dynamic_update_slice_in_dim(
            state["logprobs"], logprobs[:, None], step, 1),
        stopped_at=jnp.where(stopped, step, state["stopped_at"]),
        done=state["done"] | stopped,
        step=step + 1,
    )


@functools.partial(jax.jit, static_argnames=("static", "length", "cache_dtype"))
def _prefill(state_params, tokens, positions, key, image_embeddings=None, *, static: _Static,
             length: int, cache_dtype):
    """Prompt batch [B, P] -> decode state holding the cache and the first drawn token.

    image_embeddings: None for text (the program is then the text-only one), else [B, I, M, D]
    for the SOFT_TOKEN slots of `tokens`.
    """
    model = nnx.merge(static.graphdef, state_params)
    B = tokens.shape[0]
    cache = kv_cache.init_cache(model.config, B, length, cache_dtype)
    hidden, cache = model.extend(tokens, positions, cache, fresh=True,
                                 image_embeddings=image_embeddings)
    key, sub = jax.random.split(key)
    first, logprob = _choose(static, model.logits(hidden[:, -1:])[:, 0], sub)
    state = dict(
        cache=cache,
        token=first,
        position=jnp.max(positions, axis=1) + 1,
        step=jnp.zeros((), jnp.int32),
        tokens=jnp.full((B, static.max_new), PAD_ID, jnp.int32),
        logprobs=jnp.zeros((B, static.max_new), jnp.float32),
        stopped_at=jnp.full((B,), -1, jnp.int32),
        done=jnp.zeros((B,), bool),
        key=key,
    )
    return _record(static, state, first, logprob)


def _step(static: _Static, model, state: dict) -> dict:
    """Feeds each row's last token, draws the next one."""
    hidden, cache = model.extend(state["token"][:, None], state["position"][:, None],
                                 state["cache"])
    key, sub = jax.random.split(state["key"])
    tokens, logprobs = _choose(static, model.logits(hidden)[:, 0], sub)
    state = dict(state, cache=cache, key=key, position=state["position"] + 1)
    return _record(static, state, tokens, logprobs)


def _can_continue(state: dict, limit) -> jax.Array:
    room = state["cache"]["index"] < kv_cache.cache_length(state["cache"])
    return (state["step"] < limit) & ~jnp.all(state["done"]) & room


@functools.partial(jax.jit, static_argnames=("static",), donate_argnames=("state",))
def _decode_loop(state_params, state, limit, *, static: _Static):
    """Decodes until every row stopped, `limit` tokens were drawn, or the cache is full."""
    def body(s):
        # Without the barrier XLA hoists every bf16 -> f32 weight cast out of the loop: each
        # call then converts all weights up front and every step reads the f32 copies (twice
        # the bytes). Tying the parameters to a value that changes per step keeps the casts
        # inside, fused into the matmuls.
        params, token = jax.lax.optimization_barrier((state_params, s["token"]))
        return _step(static, nnx.merge(static.graphdef, params), dict(s, token=token))

    return jax.lax.while_loop(lambda s: _can_continue(s, limit), body, state)


@functools.partial(jax.jit, static_argnames=("static",), donate_argnames=("state",))
def _decode_one(state_params, state, *, static: _Static):
    model = nnx.merge(static.graphdef, state_params)
    return _step(static, model, state)


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache",))
def _extend_chunk(state_params, tokens, positions, cache, image_embeddings=None, *, graphdef):
    """Adds a chunk of tokens to a filled cache (a chat turn) and returns the last logits.

    With image_embeddings [B, I, M, D] the chunk holds those images' SOFT_TOKEN slots.
    """
    model = nnx.merge(graphdef, state_params)
    hidden, cache = model.extend(tokens, positions, cache, image_embeddings=image_embeddings)
    return model.logits(hidden[:, -1:])[:, 0], cache


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _encode_images(state_params, pixels, *, graphdef):
    """Preprocessed images [I, S, S, 3] -> their soft-token embeddings [I, M, D]."""
    return nnx.merge(graphdef, state_params).encode_images(pixels)


def _image_list(images) -> list:
    """None, one image, or a list/tuple of images -> a list of images."""
    if images is None:
        return []
    return list(images) if isinstance(images, (list, tuple)) else [images]


# --------------------------------------------------------------------------------------------


def _find_stop(text: str, stops: Sequence[str]) -> int:
    """Index of the earliest stop string in text, or -1."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else -1


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest tail of text that could still grow into a stop string."""
    keep = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if s.startswith(text[-n:]):
                keep = max(keep, n)
                break
    return keep


class Sampler:
    """Generates text with a KV cache.

    Args:
      model: a gemma_kit Transformer.
      tokenizer: its gemma_kit Tokenizer.
      cache_dtype: dtype of the cached keys and values (bf16 halves their memory).
      cache_length: fixed number of tokens (prompt + new) the cache holds. Default: sized per
        call from the prompt and max_new_tokens (bucketed), up to the model's context.
      matvec_layout: keep a copy of the layer weights transposed for fast matrix-vector
        products (gemma_kit.layers.to_matvec_layout). Default: on CPU only, where it is worth
        several-fold in decode speed for one transposed copy of the layer weights.
    """

    def __init__(self, model, tokenizer, *, cache_dtype=jnp.bfloat16, cache_length=None,
                 matvec_layout: bool | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.config = model.config
        self.cache_dtype = jnp.dtype(cache_dtype)
        self.cache_length = cache_length
        if matvec_layout is None:
            matvec_layout = jax.default_backend() == "cpu"
        self.graphdef, self.params = nnx.split(to_matvec_layout(model) if matvec_layout else model)

    # -- settings -------------------------------------------------------------------------
    def _static(self, max_new_tokens, temperature, top_k, top_p, min_p, stop_token_ids,
                forbidden_token_ids) -> _Static:
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise SamplingError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        params = SamplingParams(float(temperature), top_k, top_p, min_p)
        tok = self.tokenizer
        stops = tuple(stop_token_ids) if stop_token_ids is not None else tuple(
            i for i in (tok.eos_id, tok.end_of_turn_id) if i is not None)
        forbidden = tuple(forbidden_token_ids) if forbidden_token_ids is not None else tuple(
            i for i in (getattr(tok, "start_of_image_id", None),
                        getattr(tok, "end_of_image_id", None)) if i is not None)
        return _Static(self.graphdef, params, stops, forbidden, _bucket(max_new_tokens, 16))

    def _encode(self, prompts: Sequence[str]) -> list[list[int]]:
        encoded = []
        for p in prompts:
            if not isinstance(p, str):
                raise SamplingError(f"prompts must be strings, got {type(p).__name__}")
            if not p:
                raise SamplingError("a prompt is empty; give at least one character of text")
            encoded.append(self.tokenizer.encode(p, add_bos=True))
        return encoded

    def _shapes(self, prompt_len: int, max_new: int) -> tuple[int, int]:
        """(padded prompt length, cache length) for a batch whose longest prompt is prompt_len.

        Padding occupies cache slots too, so the cache is sized from the padded length, and the
        padding is trimmed where a fixed cache would otherwise lose room for new tokens.
        """
        limit = self.cache_length or self.config.max_context
        if prompt_len >= limit:
            where = "the Sampler's cache_length" if self.cache_length else "the model's context"
            raise SamplingError(
                f"the prompt has {prompt_len} tokens but {where} is {limit}: shorten the prompt"
                + ("" if not self.cache_length else " or create the Sampler with a larger cache_length")
            )
        padded = _bucket(prompt_len)
        length = self.cache_length or min(_bucket(padded + max_new, 64), limit)
        padded = max(prompt_len, min(padded, length - max_new))
        return padded, length

    def _start(self, ids: list[list[int]], static: _Static, seed: int, images=None):
        """Prefills the left-padded batch; images: per row, None or embeddings [n, M, D]."""
        P, length = self._shapes(max(map(len, ids)), static.max_new)
        B = len(ids)
        tokens = np.full((B, P), PAD_ID, np.int32)
        positions = np.full((B, P), -1, np.int32)
        for row, seq in enumerate(ids):
            tokens[row, P - len(seq):] = seq
            positions[row, P - len(seq):] = np.arange(len(seq))
        return _prefill(self.params, jnp.asarray(tokens), jnp.asarray(positions),
                        jax.random.key(seed), self._batch_images(images), static=static,
                        length=length, cache_dtype=self.cache_dtype)

    # -- images ---------------------------------------------------------------------------
    def encode_images(self, images, *, pan_and_scan: bool = False) -> tuple[jax.Array, list[int]]:
        """Reads, preprocesses and encodes images (PIL images, arrays, paths or bytes).

        Returns (embeddings [n, M, D] for the soft-token slots, crops per image); with Pan &
        Scan each image is followed by its crops, so n may exceed len(images). Each image is
        encoded once, one at a time (a single compiled shape).
        """
        from gemma_kit.vision.preprocess import prepare_images

        self.model.require_vision()
        pixels, crops = prepare_images(_image_list(images), self.config.vision.image_size,
                                       pan_and_scan=pan_and_scan)
        embeddings = [_encode_images(self.params, jnp.asarray(p[None]), graphdef=self.graphdef)
                      for p in pixels]
        return jnp.concatenate(embeddings), crops

    def _read_images(self, text: str, images, pan_and_scan: bool, where: str = "the prompt"):
        """(text, its images) -> (text with Pan & Scan markers, embeddings [n, M, D] or None).

        Checks that the text holds one <start_of_image> per image.
        """
        images = _image_list(images)
        if not images:
            if self.model.has_vision:  # markers left without images would be filled by nothing
                image_prompt.check_image_count(text, 0, where)
            return text, None
        if not self.model.has_vision:
            self.model.require_vision()
        image_prompt.check_image_count(text, len(images), where)
        embeddings, crops = self.encode_images(images, pan_and_scan=pan_and_scan)
        return image_prompt.with_crops(text, crops), embeddings

    def _expand(self, ids: list[int]) -> list[int]:
        """Token ids with each <start_of_image> expanded into soft-token slots (vision models)."""
        if not self.model.has_vision:
            return ids
        return image_prompt.expand_markers(ids, self.tokenizer, self.config.vision.num_soft_tokens)

    def _batch_images(self, images):
        """Per-row embeddings (None or [n, M, D]) -> [B, I, M, D] zero-padded, or None."""
        if images is None or all(e is None for e in images):
            return None
        present = [e for e in images if e is not None]
        n = max(e.shape[0] for e in present)
        blank = jnp.zeros((n, *present[0].shape[1:]), present[0].dtype)
        return jnp.stack([blank if e is None else blank.at[: e.shape[0]].set(e) for e in images])

    def _result(self, state_row: dict, n_prompt: int, stops: Sequence[str]) -> GenerationResult:
        steps, stopped_at = state_row["step"], state_row["stopped_at"]
        count = stopped_at if stopped_at >= 0 else steps
        tokens = [int(t) for t in state_row["tokens"][:count]]
        logprobs = [float(x) for x in state_row["logprobs"][:count]]
        if stopped_at >= 0:
            reason = "stop"
        elif steps >= state_row["max_new"]:
            reason = "length"
        else:
            reason = "cache_full"
        text = self.tokenizer.decode(tokens)
        cut = _find_stop(text, stops) if stops else -1
        if cut >= 0:
            text, reason = text[:cut], "stop"
            # Keep the tokens up to the one that completed the stop string.
            for n in range(1, len(tokens) + 1):
                if _find_stop(self.tokenizer.decode(tokens[:n]), stops) >= 0:
                    tokens, logprobs = tokens[:n], logprobs[:n]
                    break
        return GenerationResult(text, tokens, logprobs, reason, n_prompt)

    # -- public API -----------------------------------------------------------------------
    def generate(
        self,
        prompts: str | Sequence[str],
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        min_p: float | None = None,
        seed: int = 0,
        stop: str | Sequence[str] | None = None,
        *,
        stop_token_ids: Sequence[int] | None = None,
        forbidden_token_ids: Sequence[int] | None = None,
        images=None,
        pan_and_scan: bool = False,
    ) -> GenerationResult | list[GenerationResult]:
        """Completes one prompt (-> a GenerationResult) or a batch (-> a list of them).

        temperature 0 is greedy; top_k / top_p / min_p filter before drawing. `stop` strings end
        a completion where they first appear (the text stops right before them). Generation also
        stops at <eos> and <end_of_turn> unless `stop_token_ids` says otherwise; Gemma 3's image
        markers are never drawn unless `forbidden_token_ids` says otherwise.

        images (models with an image encoder): for one prompt, a list of images (PIL images,
        [H, W, C] arrays, file paths or encoded bytes) or one image; for a batch, one such list
        per prompt. Each prompt holds one `<start_of_image>` per image, where the image goes.
        pan_and_scan: also show the model 2-4 crops of each elongated image (see
        gemma_kit.vision.preprocess).
        """
        single = isinstance(prompts, str)
        batch = [prompts] if single else list(prompts)
        if not batch:
            raise SamplingError("no prompts given")
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if any(not s for s in stops):
            raise SamplingError("stop strings must be non-empty")
        static = self._static(max_new_tokens, temperature, top_k, top_p, min_p, stop_token_ids,
                              forbidden_token_ids)
        if images is not None and not single:
            images = list(images)
            if len(images) != len(batch):
                raise ImageError(
                    f"{len(batch)} prompts but {len(images)} image lists: for a batch give one "
                    "list of images per prompt (an empty list for a prompt without images)")
        ids, row_images = self._prepare(batch, [images] if single else images, pan_and_scan)
        state = self._start(ids, static, seed, row_images)
        if not stops:
            state = _decode_loop(self.params, state, jnp.int32(max_new_tokens), static=static)
        else:
            # Stop strings are found in text, on the host: decode in chunks and look after each.
            chunk = 16
            while True:
                limit = min(int(state["step"]) + chunk, max_new_tokens)
                state = _decode_loop(self.params, state, jnp.int32(limit), static=static)
                host = jax.device_get({k: state[k] for k in ("tokens", "step", "done")})
                steps = int(host["step"])
                texts = [self.tokenizer.decode([t for t in row[:steps] if t != PAD_ID])
                         for row in host["tokens"]]
                finished = host["done"] | np.array([_find_stop(t, stops) >= 0 for t in texts])
                if finished.all() or steps >= max_new_tokens or not bool(
                        _can_continue(state, max_new_tokens)):
                    break
        host = jax.device_get({k: state[k] for k in ("tokens", "logprobs", "step", "stopped_at")})
        results = []
        for row, seq in enumerate(ids):
            row_state = dict(tokens=host["tokens"][row], logprobs=host["logprobs"][row],
                             step=int(host["step"]), stopped_at=int(host["stopped_at"][row]),
                             max_new=max_new_tokens)
            results.append(self._result(row_state, len(seq), stops))
        return results[0] if single else results

    def stream(
        self,
        prompt: str,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        min_p: float | None = None,
        seed: int = 0,
        stop: str | Sequence[str] | None = None,
        *,
        stop_token_ids: Sequence[int] | None = None,
        forbidden_token_ids: Sequence[int] | None = None,
        images=None,
        pan_and_scan: bool = False,
    ) -> Iterator[str]:
        """Yields the completion of one prompt piece by piece; the pieces join to the text
        `generate` returns with the same arguments (images as there, for the one prompt)."""
        if not isinstance(prompt, str):
            raise SamplingError("stream() takes one prompt string")
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        static = self._static(max_new_tokens, temperature, top_k, top_p, min_p, stop_token_ids,
                              forbidden_token_ids)
        ids, row_images = self._prepare([prompt], [images], pan_and_scan)
        state = self._start(ids, static, seed, row_images)
        yield from self._stream_state(state, static, max_new_tokens, stops)

    def _prepare(self, prompts: list[str], images, pan_and_scan: bool):
        """Prompts and their images (one entry per prompt, or None) -> (token ids with
        soft-token slots, per-row embeddings [n, M, D] or None)."""
        per_row = [None] * len(prompts) if images is None else images
        wheres = ["the prompt"] if len(prompts) == 1 else [f"prompt {i}" for i in range(len(prompts))]
        for p, row, where in zip(prompts, per_row, wheres):  # every check before any encoding
            if not isinstance(p, str):
                raise SamplingError(f"prompts must be strings, got {type(p).__name__}")
            if _image_list(row) or self.model.has_vision:
                if _image_list(row):
                    self.model.require_vision()
                image_prompt.check_image_count(p, len(_image_list(row)), where)
        texts, embeddings = [], []
        for p, row, where in zip(prompts, per_row, wheres):
            text, emb = self._read_images(p, row, pan_and_scan, where)
            texts.append(text)
            embeddings.append(emb)
        ids = self._encode(texts)
        if all(e is None for e in embeddings):
            return ids, None  # text only: no expansion, the text-only compiled programs
        return [self._expand(seq) for seq in ids], embeddings

    def _stream_state(self, state, static, max_new_tokens, stops, finished=None) -> Iterator[str]:
        """Streams row 0 of a decode state whose last drawn token is state["token"].

        `finished(state, result)` is called at the end with the final state (whose cache holds
        every token fed so far) and the GenerationResult of the streamed text.
        """
        tokens: list[int] = []
        logprobs: list[float] = []
        emitted, reason, cut = 0, "length", -1
        capacity = kv_cache.cache_length(state["cache"])  # from shapes: no device work
        result = None
        try:
            while True:
                # One transfer per token: everything the host decides on below.
                token, logprob, done, index = jax.device_get(
                    (state["token"][0], state["logprobs"][0, state["step"] - 1], state["done"][0],
                     state["cache"]["index"]))
                if done:
                    reason = "stop"
                    break
                tokens.append(int(token))
                logprobs.append(float(logprob))
                text = self.tokenizer.decode(tokens)
                cut = _find_stop(text, stops) if stops else -1
                if cut >= 0:
                    if cut > emitted:
                        piece, emitted = text[emitted:cut], cut
                        yield piece
                    reason = "stop"
                    break
                safe = len(text) - (_held_back(text, stops) if stops else 0)
                # A trailing U+FFFD is an unfinished multi-byte character: wait for its other
                # bytes.
                while safe > emitted and text[safe - 1] == "\ufffd":
                    safe -= 1
                if safe > emitted:
                    piece, emitted = text[emitted:safe], safe
                    yield piece
                if len(tokens) >= max_new_tokens:
                    break
                if index >= capacity:  # the rest of _can_continue was checked above
                    reason = "cache_full"
                    break
                state = _decode_one(self.params, state, static=static)
            text = self.tokenizer.decode(tokens)
            if cut >= 0:
                text = text[:cut]
            result = GenerationResult(text, tokens, logprobs, reason)
            if cut < 0 and len(text) > emitted:
                piece, emitted = text[emitted:], len(text)
                yield piece
        except GeneratorExit:
            # The reader stopped early (a stop button): the reply is what it was given, and the
            # state after its last drawn token lets a conversation go on from there.
            if result is None:
                text = self.tokenizer.decode(tokens)[:emitted]
                result = GenerationResult(text, tokens, logprobs, "interrupted")
            if finished is not None:
                finished(state, result)
            raise
        if finished is not None:
            finished(state, result)


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
    """

    _CHUNK = 32  # a new turn is fed in chunks of this many tokens, the remainder one by one

    def __init__(self, model, tokenizer, system: str | None = None, *, cache_length: int = 4096,
                 cache_dtype=jnp.bfloat16, overflow: str = "drop_oldest",
                 matvec_layout: bool | None = None):
        if overflow not in ("drop_oldest", "error"):
            raise SamplingError(f"overflow must be 'drop_oldest' or 'error', got {overflow!r}")
        cache_length = min(cache_length, model.config.max_context)
        self.sampler = Sampler(model, tokenizer, cache_dtype=cache_dtype,
                               cache_length=cache_length, matvec_layout=matvec_layout)
        self.tokenizer = tokenizer
        self.system = system
        self.overflow = overflow
        self.cache_length = cache_length
        self.messages: list[dict] = []  # user/model turns so far (the system prompt apart)
        self.last_result: GenerationResult | None = None
        self.dropped_turns = 0  # exchanges forgotten under the drop_oldest policy
        self._state = None  # decode state after the last reply; its cache holds the chat
        self.token_ids: list[int] = []  # the conversation as the model saw it (pads aside)

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
                "go on")
        return self.sampler._expand(ids)

    def _images(self, messages):
        """The embeddings [n, M, D] of every image in `messages`, in order, or None."""
        found = [m["images"] for m in messages if m.get("images") is not None]
        return jnp.concatenate(found) if found else None

    def send(self, message: str, **sampling) -> str:
        """Sends a user message and returns the model's reply (sampling as Sampler.generate).

        `images=[...]` (models with an image encoder) go with the message, which holds one
        `<start_of_image>` per image; each image is encoded once and stays in the conversation
        (`pan_and_scan=True` adds crops of elongated images, as Sampler.generate).
        """
        return "".join(self.stream(message, **sampling))

    def stream(self, message: str, max_new_tokens: int = 256, temperature: float = 0.0,
               top_k: int | None = None, top_p: float | None = None, min_p: float | None = None,
               seed: int = 0, stop: str | Sequence[str] | None = None, *, images=None,
               pan_and_scan: bool = False) -> Iterator[str]:
        """Like `send`, yielding the reply piece by piece."""
        if not isinstance(message, str) or not message.strip():
            raise SamplingError("the message is empty; type something to send")
        sampler, tok = self.sampler, self.tokenizer
        static = sampler._static(max_new_tokens, temperature, top_k, top_p, min_p, None, None)
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        message, embeddings = sampler._read_images(message, images, pan_and_scan, "the message")
        user = {"role": "user", "content": message}
        if embeddings is not None:
            user["images"] = embeddings  # encoded once; re-used if the chat is re-read

        if self._state is not None:
            # Only the new turn goes in: close the model's turn, open the user's, then the
            # model's. Chat markup tokens are atomic, so this tokenizes as the full text would.
            new_ids = tok.encode("<end_of_turn>\n" + tok.format_chat([user]), add_bos=False)
            if embeddings is not None:
                new_ids = sampler._expand(new_ids)
            used = int(self._state["cache"]["index"])
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
            fed = int(final_state["step"]) - 1  # the last drawn token is not fed yet
            self.token_ids += result.tokens[:fed]
            self._state = final_state
            self.last_result = result
            self.messages += [user, {"role": "model", "content": result.text}]
            recorded = True

        try:
            if self._state is None:
                self.token_ids = list(ids)
                state = sampler._start([ids], static, seed, [self._images(self.messages + [user])])
            else:
                state = self._feed(new_ids, static, seed, embeddings)
            yield from sampler._stream_state(state, static, max_new_tokens, stops, finished)
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
        while messages and len(self._full_ids(messages + [user])) + max_new_tokens > self.cache_length:
            messages = messages[2:]  # one user/model exchange
            self.dropped_turns += 1
        if len(self._full_ids(messages + [user])) + max_new_tokens > self.cache_length:
            raise ChatOverflowError(
                f"this message alone (with max_new_tokens={max_new_tokens}) does not fit in the "
                f"cache of {self.cache_length} tokens; shorten it or lower max_new_tokens"
            )
        self.messages, self._state = messages, None  # re-read what remains into a fresh cache
        self.token_ids = []

    def _feed(self, new_ids: list[int], static: _Static, seed: int, images=None) -> dict:
        """Writes all but the last new token into the cache; the decode step feeds the last.

        Text goes in chunks of _CHUNK tokens, then one by one; each image's soft-token slots go
        in one chunk of their own with the image's embeddings (images [n, M, D]), so that they
        see each other and every chunk shape recurs.
        """
        state = self._state
        cache, index = state["cache"], int(state["position"][0])
        if not bool(state["done"][0]):
            # The reply ended on a length limit or a stop string: its last drawn token was
            # never fed to the model, so it goes in first.
            new_ids = [int(state["token"][0])] + new_ids
        self.token_ids += new_ids
        body = new_ids[:-1]
        soft = [i for i, t in enumerate(body) if t == image_prompt.SOFT_TOKEN]
        start, image = 0, 0
        while start < len(body):
            embeddings = None
            if body[start] == image_prompt.SOFT_TOKEN:
                size = self.sampler.config.vision.num_soft_tokens
                embeddings = images[None, image:image + 1]
                image += 1
            else:
                run = next((i for i in soft if i > start), len(body)) - start  # text up to an image
                size = self._CHUNK if run >= self._CHUNK else 1
            chunk = np.asarray([body[start:start + size]], np.int32)
            pos = np.arange(index + start, index + start + size, dtype=np.int32)[None]
            _, cache = _extend_chunk(self.sampler.params, jnp.asarray(chunk), jnp.asarray(pos),
                                     cache, embeddings, graphdef=self.sampler.graphdef)
            start += size
        B = 1
        state = dict(
            cache=cache,
            token=jnp.asarray([new_ids[-1]], jnp.int32),
            position=jnp.asarray([index + len(body)], jnp.int32),
            step=jnp.zeros((), jnp.int32),
            tokens=jnp.full((B, static.max_new), PAD_ID, jnp.int32),
            logprobs=jnp.zeros((B, static.max_new), jnp.float32),
            stopped_at=jnp.full((B,), -1, jnp.int32),
            done=jnp.zeros((B,), bool),
            key=jax.random.key(seed),
        )
        return _decode_one(self.sampler.params, state, static=static)
