"""Prompt files for on-policy training: JSONL rows -> the token ids a rollout starts from and the
text a reward function sees.

One prompt per line, in the shapes TRL's prompt-only datasets use:

    {"prompt": "The movie was"}                                         plain text
    {"prompt": [{"role": "user", "content": "Write a haiku."}]}         a conversation
    {"messages": [{"role": "user", "content": "Write a haiku."}]}       the same

Plain text is encoded as the Sampler encodes a prompt (<bos> first, nothing appended), so the
model continues the text. A conversation (ending with a user turn) is written in the Gemma chat
format with the generation prompt "<start_of_turn>model\\n" (gemma_kit.tokenizer.format_chat),
so the model answers as the next turn; the reward then sees that chat text (without <bos>) as the
prompt. Other keys of a row are ignored. A malformed row raises DataError naming file:line (or is
skipped and counted with skip_bad_rows); an empty file, or one whose rows were all skipped, is
one DataError too.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterable

import numpy as np

from gemma_kit.errors import ChatFormatError, DataError
from gemma_kit.finetune.data import read_jsonl
from gemma_kit.tokenizer import Tokenizer, format_chat


@dataclasses.dataclass(frozen=True)
class Prompts:
    """P prompts: texts[i] is what a reward function sees, ids[i] what the sampler starts from
    (<bos> first), sources[i] its "file:line"."""

    texts: list[str]
    ids: list[list[int]]
    sources: list[str]
    skipped: int = 0

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def longest(self) -> int:
        """The most token ids of any prompt (<bos> included)."""
        return max(map(len, self.ids))

    @property
    def fingerprint(self) -> str:
        """A hash of the prompts' token ids (their identity, for --resume)."""
        return hashlib.sha256(json.dumps(self.ids).encode()).hexdigest()[:16]

    def subset(self, index: Iterable[int]) -> Prompts:
        index = [int(i) for i in index]
        return Prompts(
            [self.texts[i] for i in index],
            [self.ids[i] for i in index],
            [self.sources[i] for i in index],
            self.skipped,
        )

    def split(self, fraction: float, seed: int) -> tuple[Prompts, Prompts | None]:
        """(training, held-out) prompts by a seeded shuffle: round(fraction * P) held out (at
        least one when fraction > 0, and at least one left to train on); fraction 0: no
        held-out prompts (None)."""
        if fraction <= 0 or len(self) < 2:
            return self, None
        order = np.random.default_rng([seed, 0x5EED]).permutation(len(self))
        held = min(max(int(round(fraction * len(self))), 1), len(self) - 1)
        return self.subset(np.sort(order[held:])), self.subset(np.sort(order[:held]))

    def batch(self, step: int, size: int, seed: int) -> Prompts:
        """The `size` prompts of batch `step`: consecutive slices of a seeded shuffle of all the
        prompts, a new shuffle per pass (a pure function of step and seed, so a resumed run
        takes the same prompts)."""
        P = len(self)
        chosen: list[int] = []
        position = step * size
        while len(chosen) < size:
            epoch, offset = divmod(position, P)
            order = np.random.default_rng([seed, epoch, 0xB47C]).permutation(P)
            take = min(size - len(chosen), P - offset)
            chosen.extend(order[offset : offset + take].tolist())
            position += take
        return self.subset(chosen)


def parse_prompt(row) -> str | list[dict]:
    """A decoded JSON row -> its prompt (text, or a message list ending with a user turn);
    ValueError saying what is wrong."""
    if not isinstance(row, dict):
        raise ValueError(f"a row must be a JSON object, got {type(row).__name__}")
    keys = [k for k in ("prompt", "messages") if k in row]
    if len(keys) != 1:
        found = f"keys {sorted(row)}" if row else "an empty object"
        raise ValueError(
            'a prompt row needs "prompt" (text or messages) or "messages", '
            f"exactly one of them; found {found}"
        )
    value = row[keys[0]]
    if isinstance(value, str):
        if keys[0] == "messages":
            raise ValueError('"messages" must be a list of {"role", "content"} messages')
        if not value:
            raise ValueError("the prompt is empty")
        return value
    if not isinstance(value, list) or not value:
        raise ValueError(
            f'"{keys[0]}" must be a string or a non-empty list of messages, got '
            f"{type(value).__name__}"
        )
    messages = []
    for k, m in enumerate(value):
        if not (
            isinstance(m, dict)
            and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str)
        ):
            raise ValueError(
                f'message {k} must be an object with a string "role" and a string "content"'
            )
        messages.append({"role": m["role"], "content": m["content"]})
    if messages[-1]["role"] != "user":
        raise ValueError(
            "a prompt conversation must end with a user turn (the model answers "
            f"it), not a {messages[-1]['role']!r} turn"
        )
    try:
        format_chat(messages, add_generation_prompt=True)
    except ChatFormatError as err:
        raise ValueError(f"the conversation: {err}") from None
    return messages


def encode_prompt(tokenizer: Tokenizer, prompt: str | list[dict]) -> tuple[str, list[int]]:
    """(the text a reward sees, the token ids the sampler starts from) of one prompt."""
    text = prompt if isinstance(prompt, str) else format_chat(prompt, add_generation_prompt=True)
    return text, tokenizer.encode(text, add_bos=True)


def read_prompts(
    path: str | os.PathLike, tokenizer: Tokenizer, *, skip_bad_rows: bool = False
) -> Prompts:
    """Every prompt of a JSONL file, encoded (see the module docstring)."""
    texts, ids, sources = [], [], []
    skipped = 0
    for line, raw in read_jsonl(path):
        try:
            try:
                row = json.loads(raw)
            except json.JSONDecodeError as err:
                raise ValueError(f"not valid JSON ({err.msg} at column {err.colno})") from None
            text, tokens = encode_prompt(tokenizer, parse_prompt(row))
        except ValueError as err:
            if skip_bad_rows:
                skipped += 1
                continue
            raise DataError(
                f"{err} (skip_bad_rows = true skips such rows)", path=path, line=line
            ) from None
        texts.append(text)
        ids.append(tokens)
        sources.append(f"{path}:{line}")
    if not texts:
        raise DataError(
            f"all {skipped} rows were malformed and skipped; no prompt is left", path=path
        )
    return Prompts(texts, ids, sources, skipped)
