"""Training data: JSONL rows -> token ids with a loss mask -> packed rows -> batches by step.

Each line of a JSONL file is one example, in one of three shapes:

    {"messages": [{"role": "system" | "user" | "model", "content": "..."}, ...]}
    {"prompt": "...", "completion": "..."}
    {"text": "..."}

* messages: written in the Gemma chat format (gemma_kit.tokenizer.format_chat: a system prompt
  is folded into the first user turn, "assistant" means "model"); the loss covers each model
  turn's content and its <end_of_turn>, nothing else. Each model turn is tokenised on its own,
  after the prompt that precedes it, exactly as the sampler sees a reply it generates.
* prompt / completion: plain text (no chat markup), <bos> prompt completion <eos>; the loss
  covers the completion and <eos>.
* text: <bos> text <eos>, all of it in the loss; a text longer than max_length is cut into
  pieces of max_length tokens, each starting with <bos>.

A message content may also be a list of parts, {"type": "text", "text": ...} and
{"type": "image", "path": ...} (a path relative to the JSONL file), for Gemma 3 models with an
image encoder. Each image part becomes the <start_of_image> marker at its place in the text,
expanded into the image's soft-token slots ("\n\n" <start_of_image> SOFT_TOKEN x M
<end_of_image> "\n\n", gemma_kit.vision.prompt), which are never in the loss. Images may appear
in user (and system) turns only.

A malformed row stops loading with a DataError naming the file and line; with skip_bad_rows it
is skipped and counted instead (the count and the first reasons are reported). Rows are split
into a training set and a held-out set by a seeded shuffle (or the held-out rows come from their
own file); training rows are packed several to a row of max_length tokens, each example keeping
its own positions and attention (segment ids), and batch k of the run is a pure function of k
and the seed, which is what makes a resumed run see exactly the batches it would have seen.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from gemma_kit.errors import ChatFormatError, DataError, ImageError
from gemma_kit.tokenizer import Tokenizer, format_chat
from gemma_kit.vision.prompt import IMAGE_MARKER, check_image_count, image_tokens

MODEL_ROLES = ("model", "assistant")


@dataclasses.dataclass(frozen=True)
class Example:
    """One tokenised example: ids, which of them are trained on, and where it came from."""

    tokens: np.ndarray  # int32 [n]; image soft-token slots hold SOFT_TOKEN (-2)
    loss_mask: np.ndarray  # bool [n]: True where token i is a target (predicted from tokens < i)
    source: str  # "file:line"
    images: tuple[str, ...] = ()  # image files, in the order of their slots


@dataclasses.dataclass
class Rows:
    """Packed training rows, all [R, T]: inputs, their targets, and what attends to what."""

    tokens: np.ndarray  # int32 inputs (0 = padding)
    targets: np.ndarray  # int32 next token of the same example
    weights: np.ndarray  # float32 1 where the target is in the loss
    positions: np.ndarray  # int32 position within the example
    segments: np.ndarray  # int32 example number within the row, from 1; 0 = padding
    images: list[tuple[str, ...]] | None = None  # per row, its image files in slot order

    ARRAYS = ("tokens", "targets", "weights", "positions", "segments")

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def take(self, index) -> dict[str, np.ndarray]:
        """The arrays of rows `index` (the image files: `images_of`)."""
        return {name: getattr(self, name)[index] for name in self.ARRAYS}

    def images_of(self, index) -> list[tuple[str, ...]]:
        if self.images is None:
            return [() for _ in np.atleast_1d(index)]
        return [self.images[i] for i in np.atleast_1d(index)]

    @property
    def max_images(self) -> int:
        """The most images any row holds (0 for text-only data)."""
        return max((len(i) for i in self.images), default=0) if self.images else 0

    @property
    def loss_tokens(self) -> int:
        return int(self.weights.sum())


@dataclasses.dataclass
class Dataset:
    """The training rows, the held-out rows, and what loading them found."""

    train: Rows
    eval: Rows | None
    stats: dict[str, Any]
    fingerprint: str

    def batch_index(self, step: int, batch_size: int, seed: int) -> np.ndarray:
        """The training rows of optimizer step `step` ([batch_size] indices).

        Row g of the run (g = step * batch_size + j) is row perm_e[g mod R] of epoch e = g // R,
        perm_e a permutation drawn from (seed, e): a pure function of the step, so a resumed
        run continues with the very batch the interrupted one would have taken next.
        """
        return batch_index(step, batch_size, seed, len(self.train))

    def batch(self, step: int, batch_size: int, seed: int) -> dict[str, np.ndarray]:
        """The arrays of step `step`'s rows ([batch_size, T] each)."""
        return self.train.take(self.batch_index(step, batch_size, seed))

    @property
    def max_images(self) -> int:
        return max(self.train.max_images, self.eval.max_images if self.eval is not None else 0)

    @property
    def image_files(self) -> list[str]:
        """Every distinct image file of the data, in a fixed order."""
        files: set[str] = set()
        for rows in (self.train, self.eval):
            if rows is not None and rows.images:
                files.update(f for row in rows.images for f in row)
        return sorted(files)


_ORDER_CACHE: dict[tuple[int, int, int], np.ndarray] = {}


def batch_index(step: int, batch_size: int, seed: int, n: int) -> np.ndarray:
    """Indices [batch_size] into n items of optimizer step `step`: item g = step * batch_size
    + j of the run is item epoch_order(seed, e, n)[g mod n] of epoch e = g // n (a pure
    function of the step; distillation draws its prompts the same way)."""
    index = np.empty(batch_size, np.int64)
    for j in range(batch_size):
        g = step * batch_size + j
        index[j] = epoch_order(seed, g // n, n)[g % n]
    return index


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    key = (seed, epoch, n)
    if key not in _ORDER_CACHE:
        if len(_ORDER_CACHE) > 8:
            _ORDER_CACHE.clear()
        _ORDER_CACHE[key] = np.random.default_rng([seed, epoch, 0x5EED]).permutation(n)
    return _ORDER_CACHE[key]


# ------------------------------------------------------------------------------------------
# Reading


def read_jsonl(path: str | os.PathLike) -> list[tuple[int, str]]:
    """(line number, text) of every non-blank line; a missing or empty file is an error."""
    path = pathlib.Path(path).expanduser()
    if not path.exists():
        raise DataError("no such file; give the path of a JSONL file of examples", path=path)
    if not path.is_file():
        raise DataError("is a folder, not a JSONL file", path=path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"is not UTF-8 text ({err})", path=path) from None
    lines = [(i, line) for i, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not lines:
        raise DataError("is empty; it needs one JSON object per line", path=path)
    return lines


def _text_of(content: Any, *, where: str, base: pathlib.Path, images: list) -> str:
    """A message content (str, or a list of text/image parts) -> its text, with the image
    marker where each image part was; collects the image files."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ValueError(
            f"{where} content must be a string or a list of parts, got {type(content).__name__}"
        )
    texts = []
    for k, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image":
            ref = part.get("path", part.get("image"))
            if not isinstance(ref, str) or not ref:
                raise ValueError(f'{where} part {k} is an image without a "path"')
            image = (base / ref) if not pathlib.Path(ref).is_absolute() else pathlib.Path(ref)
            if not image.is_file():
                raise ValueError(
                    f"{where} part {k}: image {ref!r} does not exist "
                    f"(looked for {image}; paths are relative to the JSONL file)"
                )
            images.append(image)
            texts.append(IMAGE_MARKER)
        else:
            raise ValueError(
                f'{where} part {k} must be {{"type": "text", "text": ...}} or '
                f'{{"type": "image", "path": ...}}, got {part!r}'
            )
    return "".join(texts)


def _encode(tokenizer: Tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_bos=False) if text else []


def encode_messages(tokenizer: Tokenizer, messages: Sequence[dict]) -> tuple[list[int], list[bool]]:
    """Token ids and loss mask of a chat; the mask covers each model turn's reply + <end_of_turn>.

    The chat text comes from format_chat (one definition of the format); each model turn is
    cut out of it and encoded on its own, so its ids are those the model produces after the
    generation prompt "<start_of_turn>model\\n".
    """
    full = format_chat(messages, add_generation_prompt=False)
    end = "<end_of_turn>"
    tokens, mask = [tokenizer.bos_id], [False]
    done = 0
    for i, message in enumerate(messages):
        if message["role"] not in MODEL_ROLES:
            continue
        prompt = format_chat(messages[:i], add_generation_prompt=True)
        through = format_chat(messages[: i + 1], add_generation_prompt=False)
        reply = through[len(prompt) :]
        if not (full.startswith(through) and through.startswith(prompt) and end in reply):
            raise AssertionError("format_chat is not prefix-consistent")  # a bug, not bad data
        reply = reply[: reply.rindex(end) + len(end)]
        before = _encode(tokenizer, full[done : len(prompt)])
        ids = _encode(tokenizer, reply)
        tokens += before + ids
        mask += [False] * len(before) + [True] * len(ids)
        done = len(prompt) + len(reply)
    rest = _encode(tokenizer, full[done:])
    return tokens + rest, mask + [False] * len(rest)


def parse_row(
    obj: Any,
    tokenizer: Tokenizer,
    *,
    base: pathlib.Path,
    max_length: int,
    num_soft_tokens: int | None = None,
) -> list[tuple[list[int], list[bool], tuple]]:
    """A decoded JSON row -> one or more (ids, loss mask, image files); raises ValueError
    saying what is wrong. num_soft_tokens: slots per image of the model's image encoder (None:
    the model takes no images)."""
    if not isinstance(obj, dict):
        raise ValueError(f"a row must be a JSON object, got {type(obj).__name__}")
    shapes = [
        s
        for s, keys in (
            ("messages", ("messages",)),
            ("prompt/completion", ("prompt", "completion")),
            ("text", ("text",)),
        )
        if any(k in obj for k in keys)
    ]
    if len(shapes) != 1:
        found = f"keys {sorted(obj)}" if obj else "an empty object"
        raise ValueError(
            f'a row needs exactly one of {{"messages"}}, {{"prompt", '
            f'"completion"}} or {{"text"}}; found {found}'
        )
    shape = shapes[0]
    images: list[pathlib.Path] = []
    if shape == "messages":
        messages = obj["messages"]
        if not isinstance(messages, list) or not messages:
            raise ValueError('"messages" must be a non-empty list of {"role", "content"}')
        clean = []
        for k, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ValueError(f'message {k} must be an object with "role" and "content"')
            before = len(images)
            content = _text_of(m["content"], where=f"message {k}", base=base, images=images)
            if len(images) > before and m["role"] in MODEL_ROLES:
                raise ValueError(
                    f"message {k} is a model turn with an image; images may only be "
                    "in user (or system) turns"
                )
            clean.append({"role": m["role"], "content": content})
        if images and num_soft_tokens is None:
            raise ValueError(
                f"this row has {len(images)} image(s) but the model has no image encoder; use a "
                "Gemma 3 4B/12B/27B checkpoint with its vision weights, or remove image parts"
            )
        try:
            check_image_count("".join(m["content"] for m in clean), len(images), "this row")
            tokens, mask = encode_messages(tokenizer, clean)
            if images:
                assert num_soft_tokens is not None  # a row with images was refused above
                tokens, mask = _expand_images(tokens, mask, tokenizer, num_soft_tokens)
        except (ChatFormatError, ImageError) as err:
            raise ValueError(str(err)) from None
        if not any(mask):
            raise ValueError("the conversation has no model turn, so nothing to learn from")
        for k, n in _turn_lengths(mask):
            if n > max_length - 1:
                raise ValueError(
                    f"model turn {k + 1} is {n} tokens, longer than max_length "
                    f"{max_length} allows; raise max_length or shorten the reply"
                )
        _check_length(tokens, max_length)
        return [(tokens, mask, tuple(str(i) for i in images))]
    if shape == "prompt/completion":
        for key in ("prompt", "completion"):
            if not isinstance(obj.get(key), str):
                raise ValueError(f'"{key}" must be a string, got {type(obj.get(key)).__name__}')
        if not obj["completion"]:
            raise ValueError('"completion" is empty, so nothing to learn from')
        prompt = [tokenizer.bos_id] + _encode(tokenizer, obj["prompt"])
        completion = _encode(tokenizer, obj["completion"]) + [tokenizer.eos_id]
        if len(completion) > max_length - 1:
            raise ValueError(
                f"the completion is {len(completion)} tokens, longer than "
                f"max_length {max_length} allows"
            )
        tokens = prompt + completion
        _check_length(tokens, max_length)
        return [(tokens, [False] * len(prompt) + [True] * len(completion), ())]
    text = obj["text"]
    if not isinstance(text, str):
        raise ValueError(f'"text" must be a string, got {type(text).__name__}')
    if not text.strip():
        raise ValueError('"text" is empty')
    body = _encode(tokenizer, text) + [tokenizer.eos_id]
    piece = max_length - 1  # each piece gets its own <bos>: Gemma never runs without one
    return [
        ([tokenizer.bos_id] + body[i : i + piece], [False] + [True] * len(body[i : i + piece]), ())
        for i in range(0, len(body), piece)
    ]


def _expand_images(
    tokens: list[int], mask: list[bool], tokenizer: Tokenizer, num_soft_tokens: int
) -> tuple[list[int], list[bool]]:
    """Each <start_of_image> id -> the image's slots (gemma_kit.vision.prompt), out of the loss."""
    block = image_tokens(tokenizer, num_soft_tokens)
    out, out_mask = [], []
    for token, m in zip(tokens, mask):
        if token == tokenizer.start_of_image_id:
            out += block
            out_mask += [False] * len(block)
        else:
            out.append(token)
            out_mask.append(m)
    return out, out_mask


def _turn_lengths(mask: list[bool]):
    """(turn number, length) of each run of True in the mask."""
    runs, n, k = [], 0, 0
    for m in [*mask, False]:
        if m:
            n += 1
        elif n:
            runs.append((k, n))
            k, n = k + 1, 0
    return runs


def _check_length(tokens: list[int], max_length: int) -> None:
    if len(tokens) > max_length:
        raise ValueError(
            f"the example is {len(tokens)} tokens, longer than max_length "
            f"{max_length}; raise max_length or shorten the example"
        )


def load_examples(
    path: str | os.PathLike,
    tokenizer: Tokenizer,
    *,
    max_length: int,
    skip_bad_rows: bool = False,
    num_soft_tokens: int | None = None,
) -> tuple[list[list[Example]], dict[str, Any]]:
    """Every row of a JSONL file -> its examples (a long text row gives several).

    Returns (examples per kept row, stats). A bad row raises DataError naming file:line unless
    skip_bad_rows, in which case it is counted in stats["skipped"] with its reason.
    """
    path = pathlib.Path(path).expanduser()
    base = path.parent.absolute()
    rows, skipped = [], []
    for line_no, line in read_jsonl(path):
        try:
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"not valid JSON ({err.msg} at column {err.colno})") from None
            pieces = parse_row(
                obj, tokenizer, base=base, max_length=max_length, num_soft_tokens=num_soft_tokens
            )
        except ValueError as err:
            if not skip_bad_rows:
                raise DataError(
                    f"{err} (pass skip_bad_rows to skip such rows and count them)",
                    path=path,
                    line=line_no,
                ) from None
            skipped.append(f"{path}:{line_no}: {err}")
            continue
        source = f"{path}:{line_no}"
        rows.append(
            [
                Example(np.asarray(t, np.int32), np.asarray(m, bool), source, images)
                for t, m, images in pieces
            ]
        )
    if not rows:
        raise DataError(
            f"no usable rows ({len(skipped)} skipped; the first: {skipped[0] if skipped else '-'})",
            path=path,
        )
    return rows, dict(rows=len(rows), skipped=len(skipped), skipped_reasons=skipped[:20])


# ------------------------------------------------------------------------------------------
# Packing


def pack(examples: Sequence[Example], length: int, *, packing: bool = True) -> Rows:
    """Examples -> rows of `length` inputs; with packing several examples share a row.

    An example of n tokens gives n - 1 inputs (tokens[:-1]) and n - 1 targets (tokens[1:]).
    Packing is first-fit over the examples in decreasing length (ties in data order), looking
    at the most recent 64 open rows, which keeps it linear in the number of examples.
    """
    if not examples:
        raise DataError("no examples to pack")
    sizes = [len(e.tokens) - 1 for e in examples]
    if max(sizes) > length:
        raise DataError(
            f"an example has {max(sizes) + 1} tokens; rows of {length} inputs hold "
            f"examples of at most {length + 1}"
        )
    if packing:
        order = sorted(range(len(examples)), key=lambda i: (-sizes[i], i))
        rows: list[list[int]] = []
        free: list[int] = []
        for i in order:
            for r in range(max(0, len(rows) - 64), len(rows)):
                if free[r] >= sizes[i]:
                    rows[r].append(i)
                    free[r] -= sizes[i]
                    break
            else:
                rows.append([i])
                free.append(length - sizes[i])
    else:
        rows = [[i] for i in range(len(examples))]
    R = len(rows)

    def zeros(dtype) -> np.ndarray:
        return np.zeros((R, length), dtype)

    out = Rows(
        zeros(np.int32), zeros(np.int32), zeros(np.float32), zeros(np.int32), zeros(np.int32)
    )
    if any(e.images for e in examples):
        # A row's images in the order of its slots: its examples' images, example by example.
        out.images = [tuple(f for i in members for f in examples[i].images) for members in rows]
    for r, members in enumerate(rows):
        at = 0
        for segment, i in enumerate(members, 1):
            e, n = examples[i], sizes[i]
            out.tokens[r, at : at + n] = e.tokens[:-1]
            out.targets[r, at : at + n] = e.tokens[1:]
            out.weights[r, at : at + n] = e.loss_mask[1:]
            out.positions[r, at : at + n] = np.arange(n)
            out.segments[r, at : at + n] = segment
            at += n
    return out


# ------------------------------------------------------------------------------------------
# The whole pipeline


def fingerprint(*files: str | os.PathLike | None, **settings) -> str:
    digest = hashlib.sha256()
    for f in files:
        if f is not None:
            digest.update(pathlib.Path(f).expanduser().read_bytes())
        digest.update(b"\0")
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


def load_dataset(
    train_file: str | os.PathLike,
    tokenizer: Tokenizer,
    *,
    max_length: int,
    eval_file: str | os.PathLike | None = None,
    eval_fraction: float = 0.0,
    packing: bool = True,
    skip_bad_rows: bool = False,
    seed: int = 0,
    num_soft_tokens: int | None = None,
) -> Dataset:
    """Reads, tokenises, splits and packs the data of a run.

    The held-out split is by row (so pieces of one long text never fall on both sides), drawn
    with `seed`. Held-out examples are packed too: segment masks make that exact.
    """
    rows, stats = load_examples(
        train_file,
        tokenizer,
        max_length=max_length,
        skip_bad_rows=skip_bad_rows,
        num_soft_tokens=num_soft_tokens,
    )
    if eval_file is not None:
        eval_rows, eval_stats = load_examples(
            eval_file,
            tokenizer,
            max_length=max_length,
            skip_bad_rows=skip_bad_rows,
            num_soft_tokens=num_soft_tokens,
        )
        stats["eval_skipped"] = eval_stats["skipped"]
        stats["skipped_reasons"] += eval_stats["skipped_reasons"]
    else:
        n_eval = int(round(eval_fraction * len(rows)))
        if eval_fraction > 0 and len(rows) >= 2:
            n_eval = min(max(n_eval, 1), len(rows) - 1)
        order = np.random.default_rng([seed, 0xE7A1]).permutation(len(rows))
        held = set(order[:n_eval].tolist())
        eval_rows = [r for i, r in enumerate(rows) if i in held]
        rows = [r for i, r in enumerate(rows) if i not in held]
    train_examples = [e for r in rows for e in r]
    eval_examples = [e for r in eval_rows for e in r]
    train = pack(train_examples, max_length, packing=packing)
    held_out = pack(eval_examples, max_length, packing=packing) if eval_examples else None
    del stats["rows"]
    stats.update(
        train_rows=len(rows),
        eval_rows=len(eval_rows),
        train_examples=len(train_examples),
        packed_rows=len(train),
        train_tokens=int((train.segments > 0).sum()),
        train_loss_tokens=train.loss_tokens,
        eval_loss_tokens=held_out.loss_tokens if held_out is not None else 0,
        fill=float((train.segments > 0).mean()),
    )
    fp = fingerprint(
        train_file,
        eval_file,
        max_length=max_length,
        eval_fraction=eval_fraction,
        packing=packing,
        skip_bad_rows=skip_bad_rows,
        seed=seed,
        vocab=tokenizer.vocab_size,
        soft_tokens=num_soft_tokens,
    )
    return Dataset(train, held_out, stats, fp)
