"""Preference data: TRL's JSONL format -> padded token arrays for reward models and DPO.

One pair per line, in the shapes TRL's RewardTrainer and DPOTrainer read:

    {"prompt": "The movie was", "chosen": " great.", "rejected": " dull."}
    {"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "assistant",
     "content": "Hello!"}], "rejected": [{"role": "assistant", "content": "Go away."}]}
    {"messages": [{"role": "user", "content": "Hi"}], "chosen": "Hello!", "rejected": "..."}
    {"chosen": [user, assistant], "rejected": [user, assistant]}     (TRL's implicit prompt)

plus an optional "margin" (a number: the Bradley-Terry loss then asks chosen to beat rejected by
at least that much; 0 for rows without one).

* Plain text (a string prompt): <bos> prompt completion <eos>, prompt and completion tokenised
  apart, exactly as gemma_kit.finetune reads a {"prompt", "completion"} row and as the Sampler
  sees a prompt and what it generated; the completion tokens are the completion and <eos>.
* A conversation (a message list as "prompt" or "messages", ending with a user turn): the Gemma
  chat format (gemma_kit.finetune.data.encode_messages, the one definition), the reply being one
  model turn; the completion tokens are the reply and its <end_of_turn>, and the sequence ends
  there (what the Sampler generates before it stops). chosen/rejected may be the reply string or
  TRL's [{"role": "assistant", "content": ...}].

A reward model scores the last token of each sequence; DPO sums the log-probabilities of the
completion tokens (position t's logits predict token t + 1, so the weights of targets
tokens[:, 1:] are completion[:, 1:]). A malformed row raises DataError naming file:line (or is
skipped and counted with skip_bad_rows), as the fine-tuning loader does.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from gemma_kit.errors import ChatFormatError, DataError
from gemma_kit.finetune.data import MODEL_ROLES, encode_messages, read_jsonl
from gemma_kit.tokenizer import Tokenizer, format_chat

Prompt = str | Sequence[dict]


@dataclasses.dataclass
class Preferences:
    """N preference pairs as right-padded arrays (pad id 0), chosen and rejected of one length T.

    chosen, rejected: int32 [N, T] prompt + completion ids.
    chosen_completion, rejected_completion: bool [N, T], True at the completion's tokens.
    margin: float32 [N]; sources: "file:line" of each pair.
    """

    chosen: np.ndarray
    rejected: np.ndarray
    chosen_completion: np.ndarray
    rejected_completion: np.ndarray
    margin: np.ndarray
    sources: list[str]
    stats: dict[str, Any] = dataclasses.field(default_factory=dict)

    ARRAYS = ("chosen", "rejected", "chosen_completion", "rejected_completion", "margin")

    def __len__(self) -> int:
        return self.chosen.shape[0]

    def take(self, index) -> dict[str, np.ndarray]:
        """The arrays of pairs `index` (a batch for the Bradley-Terry or DPO loss)."""
        return {name: getattr(self, name)[index] for name in self.ARRAYS}

    def subset(self, index) -> Preferences:
        index = np.asarray(index, np.int64)
        return Preferences(
            **{n: getattr(self, n)[index] for n in self.ARRAYS},
            sources=[self.sources[i] for i in index],
            stats=dict(self.stats),
        )

    def split(self, eval_fraction: float, seed: int = 0) -> tuple[Preferences, Preferences]:
        """(train, held-out) by a seeded shuffle; at least one pair on each side."""
        if not 0.0 < eval_fraction < 1.0 or len(self) < 2:
            raise DataError(
                f"cannot hold out a fraction {eval_fraction} of {len(self)} pairs; "
                "use a fraction in (0, 1) and at least 2 pairs"
            )
        order = np.random.default_rng([seed, 0xE7A1]).permutation(len(self))
        n_eval = min(max(int(round(eval_fraction * len(self))), 1), len(self) - 1)
        return self.subset(np.sort(order[n_eval:])), self.subset(np.sort(order[:n_eval]))


# --------------------------------------------------------------------------------------------
# One prompt and completion -> ids


def encode_pair(tokenizer: Tokenizer, prompt: Prompt, completion: str) -> tuple[list[int], int]:
    """(ids of prompt + completion, number of prompt ids); see the module docstring.

    prompt: plain text, or a message list ending with a user turn (chat format).
    """
    if isinstance(prompt, str):
        ids = [tokenizer.bos_id] + (tokenizer.encode(prompt, add_bos=False) if prompt else [])
        completion_ids = tokenizer.encode(completion, add_bos=False) if completion else []
        return ids + completion_ids + [tokenizer.eos_id], len(ids)
    messages = list(prompt) + [{"role": "model", "content": completion}]
    tokens, mask = encode_messages(tokenizer, messages)
    last = len(mask) - 1 - mask[::-1].index(True)  # the reply's <end_of_turn>
    first = last
    while first > 0 and mask[first - 1]:
        first -= 1
    return tokens[: last + 1], first


def pad_right(rows: Sequence[Sequence[int]], length: int, pad_id: int = 0) -> np.ndarray:
    """Id lists -> int32 [len(rows), length], each row left-aligned, pad_id after it."""
    out = np.full((len(rows), length), pad_id, np.int32)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


# --------------------------------------------------------------------------------------------
# Rows


def _messages(value, what: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise ValueError(f'"{what}" must be a non-empty list of {{"role", "content"}}')
    for k, m in enumerate(value):
        if not (
            isinstance(m, dict)
            and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str)
        ):
            raise ValueError(
                f'"{what}" message {k} must be an object with a string "role" '
                'and a string "content"'
            )
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _reply(value, what: str, conversational: bool) -> str:
    """A chosen/rejected value -> the reply text."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        if not conversational:
            raise ValueError(
                f'"{what}" is a message list but the prompt is plain text; give '
                "both as text, or the prompt as messages too"
            )
        messages = _messages(value, what)
        if len(messages) != 1 or messages[0]["role"] not in MODEL_ROLES:
            raise ValueError(
                f'"{what}" must be one assistant message [{{"role": "assistant", "content": ...}}]'
            )
        return messages[0]["content"]
    raise ValueError(
        f'"{what}" must be a string or a list with one assistant message, got '
        f"{type(value).__name__}"
    )


def parse_pair(obj: Any) -> tuple[Prompt, str, str, float]:
    """A decoded JSON row -> (prompt, chosen reply, rejected reply, margin); raises ValueError
    saying what is wrong."""
    if not isinstance(obj, dict):
        raise ValueError(f"a row must be a JSON object, got {type(obj).__name__}")
    missing = [k for k in ("chosen", "rejected") if k not in obj]
    if missing:
        found = f"keys {sorted(obj)}" if obj else "an empty object"
        raise ValueError(
            f'a preference row needs "chosen" and "rejected" (missing '
            f"{', '.join(missing)}); found {found}"
        )
    if "prompt" in obj and "messages" in obj:
        raise ValueError('give the prompt as "prompt" or as "messages", not both')
    chosen, rejected = obj["chosen"], obj["rejected"]
    if "prompt" in obj or "messages" in obj:
        key = "prompt" if "prompt" in obj else "messages"
        prompt = obj[key]
        if isinstance(prompt, str):
            prompt_value: Prompt = prompt
        elif isinstance(prompt, list):
            prompt_value = _messages(prompt, key)
        else:
            raise ValueError(
                f'"{key}" must be a string or a list of messages, got {type(prompt).__name__}'
            )
    else:  # TRL's implicit prompt: two conversations that differ in their last turn only
        if not (isinstance(chosen, list) and isinstance(rejected, list)):
            raise ValueError(
                'a row without "prompt" needs "chosen" and "rejected" as '
                "conversations (message lists) sharing all but the last turn"
            )
        chosen, rejected = _messages(chosen, "chosen"), _messages(rejected, "rejected")
        if len(chosen) < 2 or chosen[:-1] != rejected[:-1]:
            raise ValueError(
                'without a "prompt", "chosen" and "rejected" must be the same '
                "conversation up to their last (assistant) turn"
            )
        prompt_value, chosen, rejected = chosen[:-1], chosen[-1:], rejected[-1:]
    conversational = not isinstance(prompt_value, str)
    if not isinstance(prompt_value, str):
        try:
            format_chat(prompt_value, add_generation_prompt=True)
        except ChatFormatError as err:
            raise ValueError(f"the prompt conversation: {err}") from None
    margin = obj.get("margin", 0.0)
    if (
        isinstance(margin, bool)
        or not isinstance(margin, (int, float))
        or not math.isfinite(margin)
    ):
        raise ValueError(f'"margin" must be a finite number, got {margin!r}')
    return (
        prompt_value,
        _reply(chosen, "chosen", conversational),
        _reply(rejected, "rejected", conversational),
        float(margin),
    )


def load_preferences(
    path: str | os.PathLike,
    tokenizer: Tokenizer,
    *,
    max_length: int = 1024,
    skip_bad_rows: bool = False,
) -> Preferences:
    """Every pair of a JSONL file, tokenised and padded (see the module docstring).

    A pair whose prompt + completion exceeds max_length tokens is an error (or skipped with
    skip_bad_rows, as is any malformed row; stats counts them and keeps the first reasons).
    """
    path = pathlib.Path(path).expanduser()
    ids: dict[str, list[list[int]]] = {"chosen": [], "rejected": []}
    starts: dict[str, list[int]] = {"chosen": [], "rejected": []}
    margins, sources, skipped = [], [], []
    for line_no, line in read_jsonl(path):
        try:
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"not valid JSON ({err.msg} at column {err.colno})") from None
            prompt, chosen, rejected, margin = parse_pair(obj)
            pair = {}
            for side, reply in (("chosen", chosen), ("rejected", rejected)):
                seq, start = encode_pair(tokenizer, prompt, reply)
                if len(seq) > max_length:
                    raise ValueError(
                        f"prompt + {side} is {len(seq)} tokens, longer than "
                        f"max_length {max_length}; raise it or shorten the row"
                    )
                pair[side] = (seq, start)
        except ValueError as err:
            if not skip_bad_rows:
                raise DataError(
                    f"{err} (pass skip_bad_rows to skip such rows and count them)",
                    path=path,
                    line=line_no,
                ) from None
            skipped.append(f"{path}:{line_no}: {err}")
            continue
        for side, (seq, start) in pair.items():
            ids[side].append(seq)
            starts[side].append(start)
        margins.append(margin)
        sources.append(f"{path}:{line_no}")
    if not sources:
        raise DataError(
            f"no usable pairs ({len(skipped)} skipped; the first: "
            f"{skipped[0] if skipped else '-'})",
            path=path,
        )
    length = max(len(s) for side in ids.values() for s in side)
    arrays = {}
    for side in ("chosen", "rejected"):
        arrays[side] = pad_right(ids[side], length, tokenizer.pad_id)
        positions = np.arange(length)[None, :]
        begin = np.asarray(starts[side])[:, None]
        end = np.asarray([len(s) for s in ids[side]])[:, None]
        arrays[f"{side}_completion"] = (positions >= begin) & (positions < end)
    stats = dict(
        pairs=len(sources),
        skipped=len(skipped),
        skipped_reasons=skipped[:20],
        length=length,
        with_margin=int(sum(m != 0 for m in margins)),
    )
    return Preferences(
        arrays["chosen"],
        arrays["rejected"],
        arrays["chosen_completion"],
        arrays["rejected_completion"],
        np.asarray(margins, np.float32),
        sources,
        stats,
    )
