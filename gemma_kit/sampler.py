"""KV-cached sampling: Sampler.generate (batches) and Sampler.stream (one prompt, piece by piece).

The path of a request: prompts -> token ids, left-padded to a length bucket (pads carry
position -1 and are never attended to) -> one prefill over the padded batch that writes the
cache and draws the first token -> decode steps that each feed one token per row. The
non-streaming path runs the steps in `jax.lax.while_loop` (no host round trip per token); the
streaming path calls the same compiled step from Python and detokenises as it goes. The decode
state and the compiled pieces live in gemma_kit.decode; multi-turn chat (gemma_kit.chat) and
training rollouts (gemma_kit.posttrain.rollout) drive them through this class's public methods.

Shapes are static and bucketed (prompt length, cache length, number of new tokens), parameters
and the decode state are arguments of the compiled functions (the state's buffers donated), and
sampling settings are static values: steady-state decoding never recompiles.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gemma_kit import speculative as spec
from gemma_kit.decode import (
    PAD_ID,
    DecodeSettings,
    DecodeState,
    bucket,
    can_continue,
    decode_loop,
    decode_step,
    extend_chunk,
    prefill,
)
from gemma_kit.errors import ImageError
from gemma_kit.layers import Einsum, matvec_layout_of, to_matvec_layout
from gemma_kit.sampling import DryPenalty, SamplingError, SamplingParams
from gemma_kit.vision import prompt as image_prompt


@dataclasses.dataclass
class GenerationResult:
    """One completion.

    text: the decoded new tokens (cut right before a stop string, if one was hit).
    tokens: ids of the new tokens (a stop token id is not included).
    logprobs: log-probability of each new token under the model (before temperature/filters).
    finish_reason: "stop" (stop token or string), "length" (max_new_tokens), "cache_full", or
      "interrupted" (a stream whose reader stopped early; text is what it was given).
    speculative: with speculative decoding, its rounds, drafted and accepted tokens (not part
      of equality: the completion is what counts).
    """

    text: str
    tokens: list[int]
    logprobs: list[float]
    finish_reason: str
    prompt_tokens: int = 0
    speculative: spec.SpeculativeStats | None = dataclasses.field(default=None, compare=False)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def encode_images(state_params, pixels, *, graphdef):
    """Preprocessed images [I, S, S, 3] -> their soft-token embeddings [I, M, D] (the compiled
    image encoder every Sampler shares: one compile per image count and model structure)."""
    return nnx.merge(graphdef, state_params).encode_images(pixels)


def _image_list(images) -> list:
    """None, one image, or a list/tuple of images -> a list of images."""
    if images is None:
        return []
    return list(images) if isinstance(images, (list, tuple)) else [images]


def _any_image(images) -> bool:
    """Whether an images argument (an image, a list of them, or one list per prompt) holds
    any image."""
    if isinstance(images, (list, tuple)):
        return any(_any_image(x) for x in images)
    return images is not None


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


def _committed(x: jax.Array) -> jax.Array:
    """x committed to the device(s) it lives on (jit keys compiled programs on placement)."""
    return jax.device_put(x, x.sharding)


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

    Besides generate and stream, the building blocks other decoders use (ChatSession, training
    rollouts) are public: `settings` (the static decode settings), `encode`, `start` (prefill a
    batch), `feed` (continue a cache with more tokens), `stream_state`, and the image helpers.
    """

    def __init__(
        self,
        model,
        tokenizer,
        *,
        cache_dtype=jnp.bfloat16,
        cache_length=None,
        matvec_layout: bool | None = None,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.config = model.config
        self.cache_dtype = jnp.dtype(cache_dtype)
        self.cache_length = cache_length
        if matvec_layout is None:
            matvec_layout = jax.default_backend() == "cpu"
        self.matvec_layout = matvec_layout
        self.graphdef, params = nnx.split(to_matvec_layout(model) if matvec_layout else model)
        # Every leaf committed to where it lives, as update_params places new values: jit keys
        # its compiled programs on placement, committed or not.
        # A model built from host arrays (model_from_params on numpy values) has numpy leaves:
        # they go to the default device first.
        self.params = jax.tree.map(lambda x: _committed(jnp.asarray(x)), params)
        # Where the sampler stores a weight in the matvec layout: its path -> (the Einsum's
        # static settings, variable name, official shape), which update_params uses to move
        # new values into that layout (gemma_kit.layers.to_matvec_value).
        self._layouts = {}
        self._drafts: dict[int, tuple] = {}  # id(draft model) -> (model, its Sampler)
        if matvec_layout:
            for path, module in nnx.merge(self.graphdef, self.params).iter_modules():
                if isinstance(module, Einsum) and module.matvec and not module.is_int4:
                    self._layouts[(*path, "w")] = matvec_layout_of(module, "w")
                    if module.w_scale is not None:
                        self._layouts[(*path, "w_scale")] = matvec_layout_of(module, "w_scale")

    @property
    def params(self) -> nnx.State:
        """The model's variables as the Sampler stores them (matvec layout on CPU)."""
        return self._params

    @params.setter
    def params(self, state: nnx.State) -> None:
        self._params = state
        # The same arrays as plain nested dicts: what the compiled programs are given. jit
        # flattens an nnx.State's ~300 Variables in 0.2-0.4 ms per call, ~5% of a streamed
        # token's step on CPU; plain dicts flatten in C++.
        self.arrays = state.to_pure_dict()

    def update_params(self, params) -> None:
        """Swaps in new values of some of the model's variables, keeping the compiled programs.

        params: an nnx.State (e.g. gemma_kit.lora.lora_state(model) after a training step) or
        a model whose state is taken, in the model's own layout. Every leaf must name a
        variable the Sampler's model has, with its shape and dtype: the decode programs are
        then reused as they are (no recompilation, no rebuilt Sampler).

        LoRA factors are stored as they are in any layout, so swapping them copies nothing.
        Base weights the Sampler keeps in the matvec layout (CPU) are transposed into it: one
        copy of each new weight per call (for full fine-tuning, a Sampler made with
        matvec_layout=False swaps them without a copy and decodes from the model's layout).
        """
        new = nnx.state(params) if isinstance(params, nnx.Module) else params
        current = dict(self.params.flat_state())
        updated = dict(current)
        for path, variable in new.flat_state():
            value = variable[...] if isinstance(variable, nnx.Variable) else variable
            old = current.get(path)
            name = "/".join(map(str, path))
            if old is None:
                raise SamplingError(
                    f"update_params: the Sampler's model has no variable {name}; pass the state "
                    "of the same model (e.g. lora_state(model) or nnx.state(model))"
                )
            want = old[...]
            layout = self._layouts.get(path)
            official = want.shape if layout is None else layout.official_shape
            if tuple(value.shape) != tuple(official) or value.dtype != want.dtype:
                raise SamplingError(
                    f"update_params: {name} is {value.dtype}{list(value.shape)} but the "
                    f"Sampler's model has {want.dtype}{list(official)}; pass values of the "
                    "same shape and dtype (cast them first), or build a new Sampler"
                )
            if layout is not None:
                value = layout.to_stored(value)
            # Placed as the old value was: the compiled programs' keys include placement.
            updated[path] = old.replace(jax.device_put(value, want.sharding))
        self.params = nnx.State.from_flat_path(updated)

    # -- settings and prompts -------------------------------------------------------------
    def settings(
        self,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        min_p: float | None = None,
        stop_token_ids: Sequence[int] | None = None,
        forbidden_token_ids: Sequence[int] | None = None,
        *,
        dry: DryPenalty | None = None,
    ) -> DecodeSettings:
        """The static settings of a decode (arguments as for `generate`), checked.

        Stop ids default to <eos> and <end_of_turn>, forbidden ids to Gemma 3's image markers.
        """
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise SamplingError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        params = SamplingParams(float(temperature), top_k, top_p, min_p, dry)
        tok = self.tokenizer
        stops = (
            tuple(stop_token_ids)
            if stop_token_ids is not None
            else tuple(i for i in (tok.eos_id, tok.end_of_turn_id) if i is not None)
        )
        forbidden = (
            tuple(forbidden_token_ids)
            if forbidden_token_ids is not None
            else tuple(
                i
                for i in (
                    getattr(tok, "start_of_image_id", None),
                    getattr(tok, "end_of_image_id", None),
                )
                if i is not None
            )
        )
        return DecodeSettings(self.graphdef, params, stops, forbidden, bucket(max_new_tokens, 16))

    def encode(self, prompts: Sequence[str]) -> list[list[int]]:
        """Prompt strings -> token ids, <bos> first; an empty or non-string prompt is refused."""
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
                + (
                    ""
                    if not self.cache_length
                    else " or create the Sampler with a larger cache_length"
                )
            )
        padded = bucket(prompt_len)
        length = self.cache_length or min(bucket(padded + max_new, 64), limit)
        padded = max(prompt_len, min(padded, length - max_new))
        return padded, length

    def start(
        self,
        ids: list[list[int]],
        settings: DecodeSettings,
        seed: int | jax.Array,
        images=None,
        *,
        ring_slack: int = 0,
    ) -> DecodeState:
        """Prefills a batch of prompts (token ids, left-padded here) and draws the first token.

        seed: an int, or a PRNG key (jax.random.key) the draws are split from.
        images: per row, None or embeddings [n, M, D] for the row's soft-token slots.
        ring_slack: extra ring slots of the sliding-window layers (speculative decoding).
        """
        P, length = self._shapes(max(map(len, ids)), settings.max_new)
        B = len(ids)
        tokens = np.full((B, P), PAD_ID, np.int32)
        positions = np.full((B, P), -1, np.int32)
        for row, seq in enumerate(ids):
            tokens[row, P - len(seq) :] = seq
            positions[row, P - len(seq) :] = np.arange(len(seq))
        key = jax.random.key(seed) if isinstance(seed, (int, np.integer)) else seed
        return prefill(
            self.arrays,
            jnp.asarray(tokens),
            jnp.asarray(positions),
            key,
            self._batch_images(images),
            settings=settings,
            length=length,
            cache_dtype=self.cache_dtype,
            ring_slack=ring_slack,
        )

    # `feed` writes text in chunks of this many tokens, the remainder one by one, so that
    # every chunk shape recurs (few compiled programs).
    FEED_CHUNK = 32

    def feed(
        self,
        cache: dict,
        position: int,
        ids: list[int],
        settings: DecodeSettings,
        seed: int | jax.Array,
        images=None,
    ) -> DecodeState:
        """Continues row 0 of a filled cache with `ids` and draws the token after them.

        All but the last id are written into the cache (positions position, position + 1,
        ...), the last is fed by a decode step, which draws the next token: the returned state
        is as `start` leaves one. Text goes in chunks of FEED_CHUNK tokens, then one by one;
        each image's soft-token slots go in one chunk of their own with the image's embeddings
        (images [n, M, D], in slot order), so that they see each other.
        """
        body = ids[:-1]
        soft = [i for i, t in enumerate(body) if t == image_prompt.SOFT_TOKEN]
        start, image = 0, 0
        while start < len(body):
            embeddings = None
            if body[start] == image_prompt.SOFT_TOKEN:
                size = self.config.vision.num_soft_tokens
                embeddings = images[None, image : image + 1]
                image += 1
            else:
                run = next((i for i in soft if i > start), len(body)) - start  # text up to an image
                size = self.FEED_CHUNK if run >= self.FEED_CHUNK else 1
            chunk = np.asarray([body[start : start + size]], np.int32)
            pos = np.arange(position + start, position + start + size, dtype=np.int32)[None]
            _, cache = extend_chunk(
                self.arrays,
                jnp.asarray(chunk),
                jnp.asarray(pos),
                cache,
                embeddings,
                graphdef=self.graphdef,
            )
            start += size
        key = jax.random.key(seed) if isinstance(seed, (int, np.integer)) else seed
        state = DecodeState.create(
            cache,
            jnp.asarray([ids[-1]], jnp.int32),
            jnp.asarray([position + len(body)], jnp.int32),
            key,
            settings.max_new,
        )
        return decode_step(self.arrays, state, settings=settings)

    # -- speculative decoding -------------------------------------------------------------
    def speculative_settings(
        self, settings: DecodeSettings, drafter, max_new_tokens: int
    ) -> DecodeSettings:
        """`settings` with output buffers long enough for a round to write k + 1 tokens."""
        if settings.params.dry is not None:
            raise SamplingError(
                "speculative decoding does not apply the DRY repetition "
                "penalty: pass dry=None with it (on the command line, --dry 0)"
            )
        return dataclasses.replace(settings, max_new=bucket(max_new_tokens + drafter.k + 1, 16))

    def speculate(
        self,
        state: DecodeState,
        settings: DecodeSettings,
        drafter,
        limit: int,
        history: Sequence[int],
        seed: int | jax.Array,
        stats: spec.SpeculativeStats,
    ) -> Iterator[DecodeState]:
        """Continues a one-row state by speculative rounds (gemma_kit.speculative), yielding
        the state after each, until it stopped, `limit` tokens were drawn or the cache is full.

        The state comes from `start` or `feed` on a cache made with ring_slack=drafter.k and
        settings from `speculative_settings`; `history` is every token id its cache holds (the
        prompt, or a whole conversation). A DraftModel prefills its own cache with `history`.
        """
        draft_state = draft_settings = draft_params = None
        if isinstance(drafter, spec.DraftModel):
            draft = self._draft_sampler(drafter.model)
            # The same buffer length, hence the same cache length as the target's.
            draft_settings = DecodeSettings(
                draft.graphdef, settings.params, (), settings.forbidden_ids, settings.max_new
            )
            key = jax.random.key(seed) if isinstance(seed, (int, np.integer)) else seed
            draft_state = draft.start(
                [list(history)], draft_settings, jax.random.fold_in(key, 1), ring_slack=drafter.k
            )
            # The draft feeds the target's drawn token, not its own first draw.
            draft_state = draft_state.replace(
                token=jnp.copy(state.token), position=jnp.copy(state.position)
            )
            draft_params = draft.arrays
        yield from spec.rounds(
            self,
            state,
            settings,
            drafter,
            limit,
            list(history),
            stats,
            draft_state,
            draft_settings,
            draft_params,
        )

    def _draft_sampler(self, model) -> Sampler:
        """The Sampler of a draft model (made once per model), checked against this one."""
        if model.config.vocab_size != self.config.vocab_size:
            raise SamplingError(
                f"the draft model ({model.config.name}) has a vocabulary of "
                f"{model.config.vocab_size} tokens but the target ({self.config.name}) has "
                f"{self.config.vocab_size}: a draft model must share the target's vocabulary"
            )
        cached = self._drafts.get(id(model))
        if cached is None or cached[0] is not model:
            draft = Sampler(
                model,
                self.tokenizer,
                cache_dtype=self.cache_dtype,
                cache_length=self.cache_length,
                matvec_layout=self.matvec_layout,
            )
            cached = self._drafts[id(model)] = (model, draft)
        return cached[1]

    def _speculative_one(
        self,
        ids: list[int],
        settings: DecodeSettings,
        drafter,
        seed,
        max_new_tokens: int,
        stops: Sequence[str],
    ) -> GenerationResult:
        """One prompt decoded speculatively (generate's path)."""
        stats = spec.SpeculativeStats()
        first = self.start([ids], settings, seed, ring_slack=drafter.k)
        state = first
        for state in self.speculate(first, settings, drafter, max_new_tokens, ids, seed, stats):
            if stops:  # stop strings are found in text, on the host, after each round
                step, tokens = jax.device_get((state.step, state.tokens[0]))
                if _find_stop(self.tokenizer.decode(tokens[: int(step)].tolist()), stops) >= 0:
                    break
        tokens, logprobs, step, stopped_at = jax.device_get(
            (state.tokens[0], state.logprobs[0], state.step, state.stopped_at[0])
        )
        row = dict(
            tokens=tokens,
            logprobs=logprobs,
            step=int(step),
            stopped_at=int(stopped_at),
            max_new=max_new_tokens,
        )
        return dataclasses.replace(self._result(row, len(ids), stops), speculative=stats)

    # -- images ---------------------------------------------------------------------------
    def encode_images(self, images, *, pan_and_scan: bool = False) -> tuple[jax.Array, list[int]]:
        """Reads, preprocesses and encodes images (PIL images, arrays, paths or bytes).

        Returns (embeddings [n, M, D] for the soft-token slots, crops per image); with Pan &
        Scan each image is followed by its crops, so n may exceed len(images). Each image is
        encoded once, one at a time (a single compiled shape).
        """
        from gemma_kit.vision.preprocess import prepare_images

        self.model.require_vision()
        pixels, crops = prepare_images(
            _image_list(images), self.config.vision.image_size, pan_and_scan=pan_and_scan
        )
        embeddings = [
            encode_images(self.arrays, jnp.asarray(p[None]), graphdef=self.graphdef) for p in pixels
        ]
        return jnp.concatenate(embeddings), crops

    def read_images(self, text: str, images, pan_and_scan: bool = False, where: str = "the prompt"):
        """(text, its images) -> (text with Pan & Scan markers, embeddings [n, M, D] or None).

        Checks that the text holds one <start_of_image> per image (`where` names the text in
        the error).
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

    def expand_images(self, ids: list[int]) -> list[int]:
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
        speculative=None,
        dry: DryPenalty | None = None,
    ) -> GenerationResult | list[GenerationResult]:
        """Completes one prompt (-> a GenerationResult) or a batch (-> a list of them).

        temperature 0 is greedy; top_k / top_p / min_p filter before drawing; dry (a
        gemma_kit.sampling.DryPenalty, default off) penalises tokens that would go on repeating
        an earlier stretch of the completion, before temperature and filters. `stop` strings end
        a completion where they first appear (the text stops right before them). Generation also
        stops at <eos> and <end_of_turn> unless `stop_token_ids` says otherwise; Gemma 3's image
        markers are never drawn unless `forbidden_token_ids` says otherwise.

        images (models with an image encoder): for one prompt, a list of images (PIL images,
        [H, W, C] arrays, file paths or encoded bytes) or one image; for a batch, one such list
        per prompt. Each prompt holds one `<start_of_image>` per image, where the image goes.
        pan_and_scan: also show the model 2-4 crops of each elongated image (see
        gemma_kit.vision.preprocess).

        speculative: "ngram" (prompt lookup), a draft model sharing the vocabulary, or an
        NgramDrafter / DraftModel of gemma_kit.speculative: several tokens per pass of this
        model, the output distributed as without it (greedy: the same tokens). Text prompts
        only, without `dry`; a batch is decoded one prompt after another.
        """
        single = isinstance(prompts, str)
        batch = [prompts] if isinstance(prompts, str) else list(prompts)
        if not batch:
            raise SamplingError("no prompts given")
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if any(not s for s in stops):
            raise SamplingError("stop strings must be non-empty")
        settings = self.settings(
            max_new_tokens,
            temperature,
            top_k,
            top_p,
            min_p,
            stop_token_ids,
            forbidden_token_ids,
            dry=dry,
        )
        if images is not None and not single:
            images = list(images)
            if len(images) != len(batch):
                raise ImageError(
                    f"{len(batch)} prompts but {len(images)} image lists: for a batch give one "
                    "list of images per prompt (an empty list for a prompt without images)"
                )
        drafter = None
        if speculative is not None:
            drafter = self.resolve_drafter(speculative, images)
            settings = self.speculative_settings(settings, drafter, max_new_tokens)
        ids, row_images = self._prepare(batch, [images] if single else images, pan_and_scan)
        if drafter is not None:
            results = [
                self._speculative_one(seq, settings, drafter, seed, max_new_tokens, stops)
                for seq in ids
            ]
            return results[0] if single else results
        state = self.start(ids, settings, seed, row_images)
        if not stops:
            state = decode_loop(self.arrays, state, jnp.int32(max_new_tokens), settings=settings)
        else:
            # Stop strings are found in text, on the host: decode in chunks and look after each.
            chunk = 16
            while True:
                limit = min(int(state.step) + chunk, max_new_tokens)
                state = decode_loop(self.arrays, state, jnp.int32(limit), settings=settings)
                host = jax.device_get({k: getattr(state, k) for k in ("tokens", "step", "done")})
                steps = int(host["step"])
                texts = [
                    self.tokenizer.decode([t for t in row[:steps] if t != PAD_ID])
                    for row in host["tokens"]
                ]
                finished = host["done"] | np.array([_find_stop(t, stops) >= 0 for t in texts])
                if (
                    finished.all()
                    or steps >= max_new_tokens
                    or not bool(can_continue(state, max_new_tokens))
                ):
                    break
        host = jax.device_get(
            {k: getattr(state, k) for k in ("tokens", "logprobs", "step", "stopped_at")}
        )
        results = []
        for row, seq in enumerate(ids):
            row_state = dict(
                tokens=host["tokens"][row],
                logprobs=host["logprobs"][row],
                step=int(host["step"]),
                stopped_at=int(host["stopped_at"][row]),
                max_new=max_new_tokens,
            )
            results.append(self._result(row_state, len(seq), stops))
        return results[0] if single else results

    def best_of_n(self, prompts: str | Sequence[str], n: int, reward, **sampling):
        """Best-of-N: the n candidates of each prompt drawn in one batched `generate`, scored by
        `reward` and sorted best first (ties keep generation order); see
        gemma_kit.posttrain.bon.best_of_n for the arguments. One prompt string gives one sorted
        list of candidates (`.text`, `.tokens`, `.reward`), a list of prompts a list of lists.
        """
        from gemma_kit.posttrain.bon import best_of_n  # post-training code loads on first use

        return best_of_n(self, prompts, n, reward, **sampling)

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
        speculative=None,
        dry: DryPenalty | None = None,
    ) -> Iterator[str]:
        """Yields the completion of one prompt piece by piece; the pieces join to the text
        `generate` returns with the same arguments (images and speculative as there, for the
        one prompt)."""
        if not isinstance(prompt, str):
            raise SamplingError("stream() takes one prompt string")
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        settings = self.settings(
            max_new_tokens,
            temperature,
            top_k,
            top_p,
            min_p,
            stop_token_ids,
            forbidden_token_ids,
            dry=dry,
        )
        drafter = None
        if speculative is not None:
            drafter = self.resolve_drafter(speculative, images)
            settings = self.speculative_settings(settings, drafter, max_new_tokens)
        ids, row_images = self._prepare([prompt], [images], pan_and_scan)
        if drafter is None:
            state = self.start(ids, settings, seed, row_images)
            yield from self.stream_state(state, settings, max_new_tokens, stops)
            return
        state = self.start(ids, settings, seed, ring_slack=drafter.k)
        rounds = self.speculate(
            state, settings, drafter, max_new_tokens, ids[0], seed, spec.SpeculativeStats()
        )
        yield from self.stream_state(next(rounds), settings, max_new_tokens, stops, rounds=rounds)

    def resolve_drafter(self, speculative, images=None):
        """The drafter a `speculative` argument names, checked against this Sampler."""
        drafter = spec.resolve(speculative)
        if _any_image(images):
            raise SamplingError(
                "speculative decoding takes text prompts only; leave images out or speculative=None"
            )
        if isinstance(drafter, spec.DraftModel):
            self._draft_sampler(drafter.model)  # checks the vocabulary now
        return drafter

    def _prepare(self, prompts: list[str], images, pan_and_scan: bool):
        """Prompts and their images (one entry per prompt, or None) -> (token ids with
        soft-token slots, per-row embeddings [n, M, D] or None)."""
        per_row = [None] * len(prompts) if images is None else images
        wheres = (
            ["the prompt"] if len(prompts) == 1 else [f"prompt {i}" for i in range(len(prompts))]
        )
        for p, row, where in zip(prompts, per_row, wheres):  # every check before any encoding
            if not isinstance(p, str):
                raise SamplingError(f"prompts must be strings, got {type(p).__name__}")
            if _image_list(row) or self.model.has_vision:
                if _image_list(row):
                    self.model.require_vision()
                image_prompt.check_image_count(p, len(_image_list(row)), where)
        texts, embeddings = [], []
        for p, row, where in zip(prompts, per_row, wheres):
            text, emb = self.read_images(p, row, pan_and_scan, where)
            texts.append(text)
            embeddings.append(emb)
        ids = self.encode(texts)
        if all(e is None for e in embeddings):
            return ids, None  # text only: no expansion, the text-only compiled programs
        return [self.expand_images(seq) for seq in ids], embeddings

    def stream_state(
        self,
        state: DecodeState,
        settings: DecodeSettings,
        max_new_tokens: int,
        stops: Sequence[str] = (),
        finished=None,
        rounds: Iterator[DecodeState] | None = None,
    ) -> Iterator[str]:
        """Streams row 0 of a decode state (as `start` or `feed` leave one) piece by piece.

        The pieces join to the text: the drawn tokens up to a stop token, `max_new_tokens` or a
        full cache, cut right before the first of the `stops` strings. `finished(state,
        result)` is called at the end, also when the reader stops early, with the final state
        (whose cache holds every token fed so far; its last drawn token is not fed yet) and the
        GenerationResult of the streamed text. rounds: the states that follow `state`
        (`speculate`), instead of one plain decode step at a time.
        """
        tokens: list[int] = []
        logprobs: list[float] = []
        emitted, reason, cut = 0, "length", -1
        capacity = state.capacity  # from shapes: no device work
        result = None
        seen = 0  # tokens of the state's buffer read so far (rounds)
        try:
            while True:
                # One transfer per step or round: everything the host decides on below.
                if rounds is None:
                    token, logprob, done, index = jax.device_get(
                        (
                            state.token[0],
                            state.logprobs[0, state.step - 1],
                            state.done[0],
                            state.cache["index"],
                        )
                    )
                    new = [] if done else [(token, logprob)]
                else:
                    step, drawn, probs, stopped_at, index = jax.device_get(
                        (
                            state.step,
                            state.tokens[0],
                            state.logprobs[0],
                            state.stopped_at[0],
                            state.cache["index"],
                        )
                    )
                    done = stopped_at >= 0
                    end = int(stopped_at) if done else int(step)  # the stop token is not text
                    new = list(zip(drawn[seen:end], probs[seen:end]))
                    seen = int(step)
                ended = False
                for token, logprob in new:
                    tokens.append(int(token))
                    logprobs.append(float(logprob))
                    text = self.tokenizer.decode(tokens)
                    cut = _find_stop(text, stops) if stops else -1
                    if cut >= 0:
                        if cut > emitted:
                            piece, emitted = text[emitted:cut], cut
                            yield piece
                        reason, ended = "stop", True
                        break
                    safe = len(text) - (_held_back(text, stops) if stops else 0)
                    # A trailing U+FFFD is an unfinished multi-byte character: wait for its
                    # other bytes.
                    while safe > emitted and text[safe - 1] == "\ufffd":
                        safe -= 1
                    if safe > emitted:
                        piece, emitted = text[emitted:safe], safe
                        yield piece
                    if len(tokens) >= max_new_tokens:
                        ended = True
                        break
                if ended:
                    break
                if done:
                    reason = "stop"
                    break
                if index >= capacity:  # the rest of can_continue was checked above
                    reason = "cache_full"
                    break
                if rounds is None:
                    state = decode_step(self.arrays, state, settings=settings)
                else:
                    following = next(rounds, None)
                    if following is None:  # cannot happen: the rounds end where this loop does
                        break
                    state = following
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
