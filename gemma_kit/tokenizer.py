"""A thin wrapper over SentencePiece for the Gemma 2 and Gemma 3 tokenizers, plus the chat format.

Chat turns are written as text and encoded like any other text: the tokenizer parses
<start_of_turn> and <end_of_turn> as single tokens (USER_DEFINED pieces), while <bos>, <eos> and
<pad> are CONTROL pieces that no text can produce.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import sentencepiece as spm

from gemma_kit.errors import ChatFormatError, TokenizerError, TokenizerNotFoundError

# The vocabulary size tells the versions apart; <start_of_turn> moved from 106 to 105.
_VERSION_BY_VOCAB_SIZE = {256000: 2, 262144: 3}
_VERSION_BY_START_OF_TURN = {106: 2, 105: 3}
_ROLE_ALIASES = {"user": "user", "model": "model", "assistant": "model", "system": "system"}


class Tokenizer:
    """Gemma tokenizer: `Tokenizer("tokenizer.model")` or `Tokenizer.from_bytes(serialized)`."""

    def __init__(self, path: str | os.PathLike):
        path = Path(path).expanduser()
        if not path.is_file():
            raise TokenizerNotFoundError(
                f"No tokenizer file at {path}; pass the tokenizer.model shipped with the "
                "checkpoint."
            )
        self._load(path.read_bytes(), str(path))

    @classmethod
    def from_bytes(cls, serialized: bytes, *, name: str = "<bytes>") -> Tokenizer:

        tokenizer = cls.__new__(cls)
        tokenizer._load(bytes(serialized), name)
        return tokenizer

    def _load(self, serialized: bytes, name: str) -> None:
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(serialized)
        except RuntimeError as e:
            raise TokenizerError(
                f"{name} is not a SentencePiece model: {e}. Pass the tokenizer.model shipped with "
                "the checkpoint."
            ) from None
        self.name = name
        start_of_turn = self._lookup("<start_of_turn>")
        version = _VERSION_BY_VOCAB_SIZE.get(self.vocab_size)
        if version is None and start_of_turn is not None:
            version = _VERSION_BY_START_OF_TURN.get(start_of_turn)
        if version is None:
            raise TokenizerError(
                f"{name} is a SentencePiece model but not a Gemma 2 or Gemma 3 tokenizer "
                f"(vocabulary of {self.vocab_size}, <start_of_turn> id {start_of_turn}). Pass the "
                "tokenizer.model shipped with the checkpoint."
            )
        self.version = version
        self.start_of_turn_id = start_of_turn
        self.end_of_turn_id = self._lookup("<end_of_turn>")
        self.start_of_image_id = self._lookup("<start_of_image>") if version == 3 else None
        self.end_of_image_id = self._lookup("<end_of_image>") if version == 3 else None

    def to_bytes(self) -> bytes:
        """The serialized SentencePiece model (what a tokenizer.model file holds)."""
        return self._sp.serialized_model_proto()

    def _lookup(self, piece: str) -> int | None:
        # SentencePiece answers unk_id for a piece it does not know.
        token = self._sp.PieceToId(piece)
        return token if self._sp.IdToPiece(token) == piece else None

    def __repr__(self) -> str:
        return f"Tokenizer({self.name!r}, version={self.version}, vocab_size={self.vocab_size})"

    @property
    def vocab_size(self) -> int:
        return self._sp.GetPieceSize()

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def pad_id(self) -> int:
        return self._sp.pad_id()

    def id_to_piece(self, token: int) -> str:
        return self._sp.IdToPiece(int(token))

    def piece_to_id(self, piece: str) -> int:
        """The id of `piece`, or unk id (3) when the vocabulary lacks it (SentencePiece's rule)."""
        return self._sp.PieceToId(piece)

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = self._sp.EncodeAsIds(text)
        return [self.bos_id, *ids] if add_bos else ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`, padding skipped. bos/eos decode to nothing; turn markers to their text."""
        pad = self.pad_id
        return self._sp.DecodeIds([int(i) for i in ids if int(i) != pad])

    def encode_chat(
        self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True
    ) -> list[int]:
        return self.encode(format_chat(messages, add_generation_prompt), add_bos=True)

    def format_chat(
        self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True
    ) -> str:
        return format_chat(messages, add_generation_prompt)


def format_chat(messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True) -> str:
    """The Gemma chat text of `messages`, without the leading <bos> (encode() adds it).

    Each message is {"role": "system" | "user" | "model" | "assistant", "content": str}.
    Turns must alternate user, model, user, ... Gemma has no system role: a system message may
    only come first and is folded into the first user turn as "{system}\\n\\n{user}". As in the
    official Gemma 3 template, turn contents are stripped of surrounding whitespace.
    """
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise ChatFormatError(
            "messages must be a list of {'role', 'content'} dicts, got "
            f"{type(messages).__name__}."
        )
    turns = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping) or not {"role", "content"} <= message.keys():
            raise ChatFormatError(
                f"message {index} must be a dict with 'role' and 'content', got {message!r}."
            )
        role = _ROLE_ALIASES.get(message["role"])
        if role is None:
            raise ChatFormatError(
                f"message {index} has role {message['role']!r}; use one of "
                f"{', '.join(repr(r) for r in _ROLE_ALIASES)}."
            )
        if not isinstance(message["content"], str):
            raise ChatFormatError(
                f"message {index} content must be a str, got {type(message['content']).__name__}."
            )
        turns.append((role, message["content"]))

    system = None
    if turns and turns[0][0] == "system":
        system = turns.pop(0)[1]
        if not turns:
            raise ChatFormatError("a system message must be followed by a user message.")
    if not turns:
        raise ChatFormatError("messages is empty; a chat needs at least one user message.")
    offset = len(messages) - len(turns)
    for index, (role, _) in enumerate(turns):
        expected = "user" if index % 2 == 0 else "model"
        if role != expected:
            hint = f"expected {expected!r}"
            if role == "system":
                hint = "a system message may only come first"
            raise ChatFormatError(
                f"message {index + offset} has role {role!r}, but roles must alternate user/model "
                f"starting with user; {hint}."
            )
    if add_generation_prompt and turns[-1][0] == "model":
        raise ChatFormatError(
            "the last message is the model's, so there is no user turn to answer; pass "
            "add_generation_prompt=False to format a finished conversation."
        )

    # As in the official template: turn contents are trimmed, the system prompt is kept verbatim.
    turns = [(role, content.strip()) for role, content in turns]
    if system is not None:
        turns[0] = ("user", f"{system}\n\n{turns[0][1]}")
    text = "".join(f"<start_of_turn>{role}\n{content}<end_of_turn>\n" for role, content in turns)
    return text + ("<start_of_turn>model\n" if add_generation_prompt else "")
