"""Tokenizer: the SentencePiece model built from the GGUF against transformers' GGUF tokenizer,
the chat format, and the errors for files that are not tokenizers."""

from __future__ import annotations

import io

import pytest
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

from gemma_kit.checkpoint.gguf import build_sentencepiece
from gemma_kit.errors import GemmaKitError, TokenizerError
from gemma_kit.tokenizer import ChatFormatError, Tokenizer, TokenizerNotFoundError, format_chat
from tests.support.real_model import gguf_reader, hf_gguf_tokenizer

real = pytest.mark.real_model  # built from the packaged Gemma 3 270M GGUF

CHAT = (
    "<start_of_turn>user\nWhat is 2 + 2?<end_of_turn>\n"
    "<start_of_turn>model\n2 + 2 = 4.<end_of_turn>\n"
    "<start_of_turn>user\nAnd   times\tthree?<end_of_turn>\n"
    "<start_of_turn>model\n"
)
TEXTS = {
    "chat": CHAT,
    "digits": "12345 3.14159",
    "cjk": "你好，世界！日本語の文章と한국어 텍스트。",
    "emoji": "emoji 😀👍🏽 family 👨‍👩‍👧 flag 🇫🇷",
    "spaces": "a  b   c    d" + " " * 31 + "e",
    "tabs": "col1\tcol2\t\tcol3\t\t\t\tend",
    "newlines": "one\ntwo\n\nthree\n\n\nfour\n\n\n\n\nfive\r\nsix",
    "leading_trailing": "  indented line \n\t tab then space  ",
    "mixed": "def f(x):\n    return {'ü': x ** 2}  # naïve café ﬁ ＡＢＣ①\u00a0—\u200b",
    "images": "see <start_of_image> and <end_of_image> here",
    "rare": "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ꙮ \x00\x07 control",
}


@pytest.fixture(scope="module")
def serialized() -> bytes:
    return build_sentencepiece(gguf_reader())


@pytest.fixture(scope="module")
def tok(serialized) -> Tokenizer:
    return Tokenizer.from_bytes(serialized)


@real
@pytest.mark.parametrize("name", TEXTS)
def test_encode_matches_transformers(tok, name):
    text = TEXTS[name]
    reference = hf_gguf_tokenizer()
    assert tok.encode(text) == reference(text).input_ids  # both add <bos>
    assert tok.encode(text, add_bos=False) == reference(text, add_special_tokens=False).input_ids


@real
@pytest.mark.parametrize("name", TEXTS)
def test_decode_inverts_encode(tok, name):
    assert tok.decode(tok.encode(TEXTS[name])) == TEXTS[name]


@real
def test_special_ids(tok):
    assert (tok.version, tok.vocab_size) == (3, 262144)
    assert (tok.pad_id, tok.eos_id, tok.bos_id) == (0, 1, 2)
    assert (tok.start_of_turn_id, tok.end_of_turn_id) == (105, 106)
    assert (tok.start_of_image_id, tok.end_of_image_id) == (255999, 256000)
    assert tok.encode("\n\n", add_bos=False) == [108]
    assert tok.id_to_piece(105) == "<start_of_turn>"
    assert tok.piece_to_id("<end_of_turn>") == 106


@real
def test_chat_markup_is_one_token_each(tok):
    ids = tok.encode("<start_of_turn>user\nHi<end_of_turn>\n")
    assert ids == [2, 105, 2364, 107, 10979, 106, 107]


@real
def test_bos_eos_pad_cannot_be_typed(tok):
    # They stay CONTROL pieces, as in the official SentencePiece model, so user text cannot forge
    # them. transformers' GGUF tokenizer does parse them from text: a deliberate difference.
    ids = tok.encode("<bos><eos><pad>", add_bos=False)
    assert not {tok.bos_id, tok.eos_id, tok.pad_id} & set(ids)
    assert tok.decode(ids) == "<bos><eos><pad>"


@real
def test_space_runs_longer_than_a_piece_split_greedily(tok):
    # Space runs are USER_DEFINED pieces of up to 31 spaces, which SentencePiece (and llama.cpp)
    # match longest-first: 40 spaces = 31 + 9. transformers' GGUF tokenizer instead runs BPE over
    # them and gets 16 + 24 (llama.cpp PR #8228 describes the same HF quirk); runs of <= 31 agree.
    runs = [tok.piece_to_id("\u2581" * 31), tok.piece_to_id("\u2581" * 9)]
    assert tok.encode(" " * 40, add_bos=False) == runs


@real
def test_decode_skips_padding_and_hides_bos_eos(tok):
    ids = tok.encode("Hello world")
    assert tok.decode([tok.pad_id] * 3 + ids + [tok.eos_id] + [tok.pad_id] * 2) == "Hello world"


@real
def test_built_model_settings(serialized):
    proto = sp_pb2.ModelProto()
    proto.ParseFromString(serialized)
    assert proto.trainer_spec.model_type == sp_pb2.TrainerSpec.BPE
    assert proto.trainer_spec.byte_fallback
    spec = proto.normalizer_spec
    assert not spec.precompiled_charsmap and not spec.add_dummy_prefix
    assert not spec.remove_extra_whitespaces and spec.escape_whitespaces
    assert proto.pieces[138].piece == "\u2581\u2581"  # stored in the GGUF as two raw spaces


@real
def test_file_round_trip(tok, serialized, tmp_path):
    path = tmp_path / "tokenizer.model"
    path.write_bytes(serialized)
    loaded = Tokenizer(path)
    assert loaded.encode(CHAT) == tok.encode(CHAT)
    assert loaded.to_bytes() == serialized  # what an export writes as tokenizer.model


# -- chat format -------------------------------------------------------------------------------


def test_format_chat_folds_system_and_adds_generation_prompt():
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": " Hi! \n"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye?"},
    ]
    assert format_chat(messages) == (
        "<start_of_turn>user\nYou are terse.\n\nHi!<end_of_turn>\n"
        "<start_of_turn>model\nHello.<end_of_turn>\n"
        "<start_of_turn>user\nBye?<end_of_turn>\n"
        "<start_of_turn>model\n"
    )


def test_format_chat_finished_conversation():
    messages = [{"role": "user", "content": "Hi"}, {"role": "model", "content": "Hello"}]
    assert format_chat(messages, add_generation_prompt=False) == (
        "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHello<end_of_turn>\n"
    )


@real
def test_encode_chat(tok):
    messages = [{"role": "user", "content": "Hi"}]
    ids = tok.encode_chat(messages)
    assert ids == [2, 105, 2364, 107, 10979, 106, 107, 105, 4368, 107]
    assert ids == hf_gguf_tokenizer()(tok.format_chat(messages)).input_ids
    assert tok.decode(ids) == format_chat(messages)


@pytest.mark.parametrize(
    "messages, match",
    [
        ([], "empty"),
        ("hello", "list"),
        ([{"role": "bot", "content": "x"}], "role 'bot'"),
        ([{"role": "user"}], "'role' and 'content'"),
        ([{"role": "user", "content": ["x"]}], "must be a str"),
        ([{"role": "model", "content": "x"}], "starting with user"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "expected 'model'"),
        ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], "only come first"),
        ([{"role": "system", "content": "s"}], "followed by a user"),
        (
            [{"role": "user", "content": "a"}, {"role": "model", "content": "b"}],
            "add_generation_prompt",
        ),
    ],
)
def test_format_chat_rejects(messages, match):
    with pytest.raises(ChatFormatError, match=match) as info:
        format_chat(messages)
    assert isinstance(info.value, (GemmaKitError, ValueError))


# -- files that are not tokenizers -------------------------------------------------------------


@pytest.mark.parametrize("content", [bytes(range(256)) * 4, b"just some text\n", b""])
def test_not_a_sentencepiece_file(tmp_path, content):
    path = tmp_path / "tokenizer.model"
    path.write_bytes(content)
    with pytest.raises(TokenizerError, match="is not a SentencePiece model.*tokenizer.model"):
        Tokenizer(path)


def test_missing_file(tmp_path):
    with pytest.raises(TokenizerNotFoundError, match="No tokenizer file") as info:
        Tokenizer(tmp_path / "nope.model")
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, TokenizerError)


def test_sentencepiece_model_that_is_not_gemma(tmp_path):
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(["hello world", "a tiny corpus of words"] * 50),
        model_writer=model,
        vocab_size=30,
        model_type="bpe",
    )
    with pytest.raises(TokenizerError, match="not a Gemma 2 or Gemma 3 tokenizer"):
        Tokenizer.from_bytes(model.getvalue())


def test_gemma2_is_told_apart_by_start_of_turn_id():
    # A toy vocabulary laid out like Gemma 2's head: <start_of_turn> at 106, not 105.
    proto = sp_pb2.ModelProto()
    Piece = sp_pb2.ModelProto.SentencePiece
    names = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"] + [f"<unused{i}>" for i in range(101)]
    for i, name in enumerate(names + ["<start_of_turn>", "<end_of_turn>", "a", "b"]):
        kind = {3: Piece.UNKNOWN}.get(i, Piece.CONTROL if i < 3 else Piece.USER_DEFINED)
        proto.pieces.add(piece=name, score=0.0, type=kind if i < 108 else Piece.NORMAL)
    spec = proto.trainer_spec
    spec.model_type, spec.unk_id, spec.bos_id, spec.eos_id, spec.pad_id = spec.BPE, 3, 2, 1, 0
    spec.unk_piece, spec.bos_piece, spec.eos_piece, spec.pad_piece = (
        "<unk>",
        "<bos>",
        "<eos>",
        "<pad>",
    )
    proto.normalizer_spec.add_dummy_prefix = False
    tok = Tokenizer.from_bytes(proto.SerializeToString())
    assert (tok.version, tok.start_of_turn_id, tok.end_of_turn_id) == (2, 106, 107)
    assert tok.start_of_image_id is None and tok.end_of_image_id is None
    assert tok.encode("<start_of_turn>ab") == [2, 106, 108, 109]
