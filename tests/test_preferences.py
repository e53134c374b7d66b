"""Preference data (gemma_kit.posttrain.preferences): TRL's JSONL shapes -> padded arrays.

Ids are checked against the definitions they must agree with: a plain-text pair is exactly the
fine-tuning loader's {"prompt", "completion"} row (and the Sampler's encoding of the prompt); a
chat pair is gemma_kit.finetune.data.encode_messages of the conversation, cut after the reply's
<end_of_turn>. Every malformed row is one DataError naming file:line.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

from gemma_kit.errors import DataError
from gemma_kit.finetune.data import encode_messages, parse_row
from gemma_kit.posttrain.preferences import Preferences, encode_pair, load_preferences

USER = [{"role": "user", "content": "What does a for loop do?"}]


def _write(tmp_path: pathlib.Path, rows, name="prefs.jsonl") -> pathlib.Path:
    path = tmp_path / name
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_plain_text_pairs_are_the_fine_tuning_rows(tmp_path, small_tokenizer):
    tok = small_tokenizer
    rows = [
        {
            "prompt": "The for statement",
            "chosen": " iterates over items.",
            "rejected": " is",
            "margin": 0.5,
        },
        {"prompt": "while", "chosen": " loops", "rejected": " stops here and there"},
    ]
    prefs = load_preferences(_write(tmp_path, rows), tok)
    assert len(prefs) == 2 and prefs.chosen.dtype == np.int32
    assert prefs.chosen.shape == prefs.rejected.shape == prefs.chosen_completion.shape
    assert prefs.margin.tolist() == [0.5, 0.0]
    assert prefs.sources == [f"{tmp_path / 'prefs.jsonl'}:1", f"{tmp_path / 'prefs.jsonl'}:2"]
    for i, row in enumerate(rows):
        for side in ("chosen", "rejected"):
            [(ids, mask, _)] = parse_row(
                {"prompt": row["prompt"], "completion": row[side]},
                tok,
                base=tmp_path,
                max_length=512,
            )
            tokens, completion = getattr(prefs, side)[i], getattr(prefs, f"{side}_completion")[i]
            n = len(ids)
            assert tokens[:n].tolist() == ids and not tokens[n:].any()  # right-padded with 0
            assert completion[:n].tolist() == mask and not completion[n:].any()
            assert ids[: len(tok.encode(row["prompt"]))] == tok.encode(row["prompt"])
            assert ids[-1] == tok.eos_id and completion[n - 1]


def test_chat_pairs_in_each_trl_shape(tmp_path, small_tokenizer):
    tok = small_tokenizer
    reply = {"role": "assistant", "content": "It repeats a block."}
    other = {"role": "assistant", "content": "Nothing."}
    rows = [
        {"prompt": USER, "chosen": [reply], "rejected": [other]},  # TRL's explicit form
        {"messages": USER, "chosen": reply["content"], "rejected": "Nothing."},
        {"chosen": USER + [reply], "rejected": USER + [other]},  # implicit prompt
    ]
    prefs = load_preferences(_write(tmp_path, rows), tok)
    assert (prefs.chosen == prefs.chosen[0]).all() and (prefs.rejected == prefs.rejected[0]).all()
    full, mask = encode_messages(tok, USER + [reply])
    end = len(mask) - 1 - mask[::-1].index(True)
    assert prefs.chosen[0][: end + 1].tolist() == full[: end + 1]
    assert not prefs.chosen[0][end + 1 :].any()
    assert (
        tok.decode(prefs.chosen[0][prefs.chosen_completion[0]])
        == "It repeats a block.<end_of_turn>"
    )
    assert prefs.chosen[0][end] == tok.end_of_turn_id
    # The prompt part is what the Sampler would be given: the chat text with its generation
    # prompt, <bos> first.
    prompt_ids = tok.encode(tok.format_chat(USER))
    assert prefs.chosen[0][: len(prompt_ids)].tolist() == prompt_ids
    assert not prefs.chosen_completion[0][: len(prompt_ids)].any()


def test_encode_pair_marks_where_the_completion_starts(small_tokenizer):
    tok = small_tokenizer
    ids, start = encode_pair(tok, "for x in y", " pass")
    assert ids == tok.encode("for x in y") + tok.encode(" pass", add_bos=False) + [tok.eos_id]
    assert start == len(tok.encode("for x in y"))
    ids, start = encode_pair(
        tok,
        USER + [{"role": "model", "content": "A loop."}, {"role": "user", "content": "And while?"}],
        "Too.",
    )
    assert tok.decode(ids[start:]) == "Too.<end_of_turn>"  # only the last turn's reply
    assert encode_pair(tok, "x", "")[0][-1] == tok.eos_id  # an empty completion is just <eos>


def test_split_take_and_subset(tmp_path, small_tokenizer):
    rows = [
        {"prompt": f"for {i}", "chosen": " a", "rejected": " b", "margin": float(i)}
        for i in range(10)
    ]
    prefs = load_preferences(_write(tmp_path, rows), small_tokenizer)
    train, held = prefs.split(0.2, seed=3)
    assert isinstance(train, Preferences) and (len(train), len(held)) == (8, 2)
    assert sorted(train.margin.tolist() + held.margin.tolist()) == [float(i) for i in range(10)]
    again, _ = prefs.split(0.2, seed=3)
    assert again.sources == train.sources  # seeded
    batch = prefs.take(np.array([1, 3]))
    assert set(batch) == {
        "chosen",
        "rejected",
        "chosen_completion",
        "rejected_completion",
        "margin",
    }
    assert batch["margin"].tolist() == [1.0, 3.0] and batch["chosen"].shape[0] == 2
    with pytest.raises(DataError, match="cannot hold out"):
        prefs.split(1.0)


@pytest.mark.parametrize(
    "row, message",
    [
        ({"prompt": "x", "rejected": "b"}, 'needs "chosen" and "rejected" \\(missing chosen\\)'),
        ({"prompt": "x", "chosen": "a"}, "missing rejected"),
        ("{not json", "not valid JSON"),
        ("[1, 2]", "a row must be a JSON object, got list"),
        ({"prompt": "x", "chosen": 3, "rejected": "b"}, '"chosen" must be a string or a list'),
        ({"prompt": 7, "chosen": "a", "rejected": "b"}, '"prompt" must be a string or a list'),
        (
            {"prompt": "x", "chosen": "a", "rejected": "b", "margin": "big"},
            '"margin" must be a finite number',
        ),
        (
            '{"prompt": "x", "chosen": "a", "rejected": "b", "margin": NaN}',
            '"margin" must be a finite number',
        ),
        (
            {"prompt": "x", "chosen": [{"role": "assistant", "content": "a"}], "rejected": "b"},
            "is a message list but the prompt is plain text",
        ),
        (
            {"prompt": USER, "chosen": [{"role": "user", "content": "a"}], "rejected": "b"},
            '"chosen" must be one assistant message',
        ),
        (
            {"prompt": "x", "messages": USER, "chosen": "a", "rejected": "b"},
            'as "prompt" or as "messages", not both',
        ),
        (
            {
                "chosen": USER + [{"role": "assistant", "content": "a"}],
                "rejected": [
                    {"role": "user", "content": "other"},
                    {"role": "assistant", "content": "b"},
                ],
            },
            "must be the same conversation up to their last",
        ),
        ({"chosen": "a", "rejected": "b"}, 'a row without "prompt" needs'),
        (
            {
                "prompt": USER + [{"role": "assistant", "content": "a"}],
                "chosen": "a",
                "rejected": "b",
            },
            "the prompt conversation: the last message is the model's",
        ),
        (
            {"prompt": [{"role": "user"}], "chosen": "a", "rejected": "b"},
            '"prompt" message 0 must be an object with a string "role" and a string "content"',
        ),
        (
            {"prompt": "word " * 300, "chosen": "a", "rejected": "b"},
            "prompt \\+ chosen is .* tokens, longer than max_length 64",
        ),
    ],
)
def test_a_bad_row_is_one_error_naming_file_and_line(tmp_path, small_tokenizer, row, message):
    good = {"prompt": "x", "chosen": "a", "rejected": "b"}
    path = _write(tmp_path, [good, row])
    with pytest.raises(DataError, match=f"prefs.jsonl:2: .*{message}"):
        load_preferences(path, small_tokenizer, max_length=64)
    # skip_bad_rows keeps the good row and counts the bad one.
    prefs = load_preferences(path, small_tokenizer, max_length=64, skip_bad_rows=True)
    assert len(prefs) == 1 and prefs.stats["skipped"] == 1
    assert "prefs.jsonl:2:" in prefs.stats["skipped_reasons"][0]


def test_empty_or_missing_files(tmp_path, small_tokenizer):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    with pytest.raises(DataError, match="empty.jsonl: is empty"):
        load_preferences(empty, small_tokenizer)
    with pytest.raises(DataError, match="no such file"):
        load_preferences(tmp_path / "absent.jsonl", small_tokenizer)
    only_bad = _write(tmp_path, [{"prompt": "x"}], name="bad.jsonl")
    with pytest.raises(DataError, match="bad.jsonl: no usable pairs \\(1 skipped"):
        load_preferences(only_bad, small_tokenizer, skip_bad_rows=True)
