"""Fine-tuning data and settings: loss masks, packing, batch order, config files, bad input.

No model runs here: these tests tokenise with the small real SentencePiece model of
tests/support/tiny.py.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from gemma_kit.errors import ConfigError, DataError
from gemma_kit.finetune import TrainConfig
from gemma_kit.finetune import data as ftdata


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _ids(tok, text):
    return tok.encode(text, add_bos=False)


def test_loss_mask_covers_exactly_the_model_turns(small_tokenizer):
    """Hand-built: system folded into the first user turn; two model turns; a last user turn."""
    tok = small_tokenizer
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Say for."},
        {"role": "model", "content": "for x in y"},
        {"role": "user", "content": "And while?"},
        {"role": "assistant", "content": "while True"},
        {"role": "user", "content": "Thanks"},
    ]
    tokens, mask = ftdata.encode_messages(tok, messages)
    S, E = "<start_of_turn>", "<end_of_turn>"
    expected = [
        ([tok.bos_id] + _ids(tok, f"{S}user\nBe brief.\n\nSay for.{E}\n{S}model\n"), False),
        (_ids(tok, f"for x in y{E}"), True),
        (_ids(tok, f"\n{S}user\nAnd while?{E}\n{S}model\n"), False),
        (_ids(tok, f"while True{E}"), True),
        (_ids(tok, f"\n{S}user\nThanks{E}\n"), False),
    ]
    assert tokens == [t for ids, _ in expected for t in ids]
    assert mask == [m for ids, m in expected for _ in ids]
    # Each masked span is the reply and its <end_of_turn>, nothing of the markup around it.
    spans = [
        tok.decode(np.asarray(tokens)[np.asarray(mask)][a:b])
        for a, b in ((0, len(expected[1][0])), (len(expected[1][0]), None))
    ]
    assert spans == [f"for x in y{E}", f"while True{E}"]
    # The unmasked text is the chat format of the whole conversation.
    assert tok.decode(tokens) == tok.decode(tok.encode_chat(messages, add_generation_prompt=False))


def test_row_shapes_and_targets(small_tokenizer, tmp_path):
    tok = small_tokenizer
    path = _write(
        tmp_path / "d.jsonl",
        [
            {"prompt": "def f(x):", "completion": " return x"},
            {"text": "while True: pass"},
            "",  # blank lines are not rows
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "Hi "},
                            {"type": "text", "text": "there"},
                        ],
                    },
                    {"role": "model", "content": "Hello"},
                ],
                "id": 7,
            },
        ],
    )
    rows, stats = ftdata.load_examples(path, tok, max_length=64)
    assert stats["rows"] == 3 and stats["skipped"] == 0
    (pc,), (text,), (chat,) = rows
    prompt = [tok.bos_id] + _ids(tok, "def f(x):")
    assert pc.tokens.tolist() == prompt + _ids(tok, " return x") + [tok.eos_id]
    assert pc.loss_mask.tolist() == [False] * len(prompt) + [True] * (len(pc.tokens) - len(prompt))
    assert text.tokens.tolist() == [tok.bos_id] + _ids(tok, "while True: pass") + [tok.eos_id]
    assert text.loss_mask.tolist() == [False] + [True] * (len(text.tokens) - 1)
    assert chat.source == f"{path}:4"
    assert tok.decode(chat.tokens[chat.loss_mask]) == "Hello<end_of_turn>"


def test_long_text_is_cut_into_pieces_with_bos(small_tokenizer, tmp_path):
    tok = small_tokenizer
    text = "for item in range(10): total = total + item\n" * 8
    path = _write(tmp_path / "d.jsonl", [{"text": text}])
    (pieces,), _ = ftdata.load_examples(path, tok, max_length=16)
    body = _ids(tok, text) + [tok.eos_id]
    assert len(pieces) == -(-len(body) // 15) > 2
    assert all(p.tokens[0] == tok.bos_id and len(p.tokens) <= 16 for p in pieces)
    assert [t for p in pieces for t in p.tokens[1:]] == body


def test_packing_keeps_examples_apart(small_tokenizer):
    def example(n, start):
        tokens = np.arange(start, start + n, dtype=np.int32)
        return ftdata.Example(tokens, np.ones(n, bool), "x")

    examples = [example(5, 10), example(9, 20), example(3, 40), example(6, 50)]
    rows = ftdata.pack(examples, 12)
    # Inputs per example: 4, 8, 2, 5 -> first fit, longest first: [8, 4], [5, 2].
    assert len(rows) == 2
    assert rows.segments.tolist() == [[1] * 8 + [2] * 4, [1] * 5 + [2] * 2 + [0] * 5]
    assert rows.positions[0].tolist() == list(range(8)) + list(range(4))
    assert rows.tokens[0, :8].tolist() == list(range(20, 28))
    assert rows.targets[0, :8].tolist() == list(range(21, 29))  # never the next example's
    assert rows.weights[1, 7:].sum() == 0  # padding is never in the loss
    unpacked = ftdata.pack(examples, 12, packing=False)
    assert len(unpacked) == 4 and set(unpacked.segments.max(axis=1).tolist()) == {1}
    with pytest.raises(
        DataError, match="has 9 tokens; rows of 7 inputs hold examples of at most 8"
    ):
        ftdata.pack(examples, 7)


def test_batches_are_a_function_of_the_step(small_tokenizer, tmp_path):
    rows = [{"text": f"row {i} " + "x " * (i % 5)} for i in range(30)]
    path = _write(tmp_path / "d.jsonl", rows)
    load = dict(max_length=16, eval_fraction=0.2, seed=3)
    a = ftdata.load_dataset(path, small_tokenizer, **load)
    b = ftdata.load_dataset(path, small_tokenizer, **load)
    assert a.fingerprint == b.fingerprint
    assert a.stats["eval_rows"] == 6 and a.stats["train_rows"] == 24
    n = len(a.train)
    seen = [a.batch(step, 4, seed=3)["tokens"] for step in range(10)]
    for step in (7, 2, 9):  # any order, any process: the same rows
        np.testing.assert_array_equal(b.batch(step, 4, seed=3)["tokens"], seen[step])
    # One epoch covers every packed row exactly once.
    epoch = np.concatenate([a.batch(s, 1, seed=3)["tokens"] for s in range(n)])
    assert sorted(map(bytes, epoch)) == sorted(map(bytes, a.train.tokens))
    assert not np.array_equal(a.batch(0, 4, seed=4)["tokens"], seen[0])
    # The held-out split is by row and disjoint from training.
    train_rows = {bytes(r) for r in a.train.tokens}
    assert not any(bytes(r) in train_rows for r in a.eval.tokens)
    other = tmp_path / "d2.jsonl"
    _write(other, rows[:-1])
    assert ftdata.load_dataset(other, small_tokenizer, **load).fingerprint != a.fingerprint


@pytest.mark.parametrize(
    "row, message",
    [
        ('{"text": "ok"', "2: not valid JSON"),
        ('["text"]', "2: a row must be a JSON object"),
        ('{"txt": "typo"}', "2: a row needs exactly one of"),
        ('{"text": "a", "prompt": "b", "completion": "c"}', "2: a row needs exactly one of"),
        ('{"messages": [{"role": "bot", "content": "hi"}]}', "2: message 0 has role 'bot'"),
        (
            '{"messages": [{"role": "user", "content": "hi"}]}',
            "2: the conversation has no model turn",
        ),
        ('{"messages": [{"role": "model", "content": "hi"}]}', "2: message 0 has role 'model'"),
        ('{"messages": [{"role": "user"}]}', "2: message 0 must be an object with"),
        ('{"prompt": "a", "completion": ""}', '2: "completion" is empty'),
        ('{"prompt": 3, "completion": "x"}', '2: "prompt" must be a string'),
        ('{"text": "   "}', '2: "text" is empty'),
        (
            '{"messages": [{"role": "user", "content": [{"type": "image", "path": "cat.png"}]}, '
            '{"role": "model", "content": "a cat"}]}',
            "2: message 0 part 0: image 'cat.png' does not exist",
        ),
    ],
)
def test_bad_rows_name_file_and_line(small_tokenizer, tmp_path, row, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "a good first row"}\n' + row + "\n")
    with pytest.raises(DataError) as err:
        ftdata.load_examples(path, small_tokenizer, max_length=64)
    assert f"{path}:{message}" in str(err.value)
    assert "skip_bad_rows" in str(err.value)


def test_bad_files_and_lengths(small_tokenizer, tmp_path):
    tok = small_tokenizer
    with pytest.raises(DataError, match="missing.jsonl: no such file"):
        ftdata.load_examples(tmp_path / "missing.jsonl", tok, max_length=64)
    (tmp_path / "empty.jsonl").write_text("\n  \n")
    with pytest.raises(DataError, match="empty.jsonl: is empty"):
        ftdata.load_examples(tmp_path / "empty.jsonl", tok, max_length=64)
    with pytest.raises(DataError, match="is a folder"):
        ftdata.load_examples(tmp_path, tok, max_length=64)

    long_reply = "for x in range(3): print(x) " * 10
    path = _write(
        tmp_path / "long.jsonl",
        [
            {"messages": [{"role": "user", "content": "hi"}, {"role": "model", "content": "ok"}]},
            {
                "messages": [
                    {"role": "user", "content": "go"},
                    {"role": "model", "content": long_reply},
                ]
            },
        ],
    )
    with pytest.raises(
        DataError,
        match=r"long.jsonl:2: model turn 1 is \d+ tokens, longer than "
        r"max_length 32",
    ):
        ftdata.load_examples(path, tok, max_length=32)
    path = _write(
        tmp_path / "long2.jsonl",
        [
            {
                "messages": [
                    {"role": "user", "content": long_reply},
                    {"role": "model", "content": "ok"},
                ]
            },
        ],
    )
    with pytest.raises(DataError, match=r"long2.jsonl:1: the example is \d+ tokens, longer than"):
        ftdata.load_examples(path, tok, max_length=32)


def test_image_rows(tmp_path):
    """Image parts become the marker's soft-token slots, out of the loss; the file is resolved
    next to the JSONL; a text-only model, an image in a model turn and a marker without an
    image are refused with the place named."""
    from gemma_kit.vision.prompt import SOFT_TOKEN
    from tests.support.vision_tiny import image_tokenizer

    tok = image_tokenizer()
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "cat.png").write_bytes(b"\x89PNG\r\n\x1a\n")  # not read while tokenising
    row = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image", "path": "img/cat.png"},
                    {"type": "text", "text": "What is it?"},
                ],
            },
            {"role": "model", "content": "A cat."},
        ]
    }
    path = _write(tmp_path / "d.jsonl", [row])
    with pytest.raises(DataError, match="d.jsonl:1: this row has 1 image.*no image encoder"):
        ftdata.load_examples(path, tok, max_length=64)

    (rows, stats) = ftdata.load_examples(path, tok, max_length=64, num_soft_tokens=4)
    ((example,),) = rows
    assert example.images == (str(tmp_path / "img" / "cat.png"),)
    tokens = example.tokens.tolist()
    first = tokens.index(SOFT_TOKEN)
    assert tokens[first - 1] == tok.start_of_image_id
    assert tokens[first : first + 5] == [SOFT_TOKEN] * 4 + [tok.end_of_image_id]
    assert tokens.count(SOFT_TOKEN) == 4
    assert not example.loss_mask[: first + 6].any()
    assert tok.decode(example.tokens[example.loss_mask]) == "A cat.<end_of_turn>"
    # Packed rows carry their images in slot order.
    packed = ftdata.pack([example, example], 128)
    assert len(packed) == 1 and packed.images_of(0) == [example.images * 2]

    bad = [
        {
            "messages": [
                {"role": "user", "content": "Draw a cat."},
                {"role": "model", "content": [{"type": "image", "path": "img/cat.png"}]},
            ]
        },
        {
            "messages": [
                {"role": "user", "content": "<start_of_image> What is it?"},
                {"role": "model", "content": "Nothing."},
            ]
        },
    ]
    for row, message in zip(
        bad, ["message 1 is a model turn with an image", "1 <start_of_image> marker but 0 images"]
    ):
        _write(path, [row])
        with pytest.raises(DataError, match=f"d.jsonl:1: .*{message}"):
            ftdata.load_examples(path, tok, max_length=64, num_soft_tokens=4)


def test_skip_bad_rows_counts_them(small_tokenizer, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "one"}\n{oops\n{"text": "two"}\n{"messages": []}\n')
    rows, stats = ftdata.load_examples(path, small_tokenizer, max_length=64, skip_bad_rows=True)
    assert len(rows) == 2 and stats["skipped"] == 2
    assert stats["skipped_reasons"][0].startswith(f"{path}:2: not valid JSON")
    assert stats["skipped_reasons"][1].startswith(f"{path}:4: ")
    path.write_text("{oops\n")
    with pytest.raises(DataError, match="no usable rows"):
        ftdata.load_examples(path, small_tokenizer, max_length=64, skip_bad_rows=True)


def test_config_files(tmp_path):
    (tmp_path / "c.toml").write_text(
        '# a comment\ntrain_file = "data/train.jsonl"\nout_dir = "runs/a"\nsteps = 5\n'
        'lora_targets = ["attn", "mlp"]\nlearning_rate = 1e-3\n'
    )
    c = TrainConfig.from_file(tmp_path / "c.toml").validate()
    assert c.train_file == str(tmp_path / "data/train.jsonl")  # relative to the config file
    assert c.out_dir == str(tmp_path / "runs/a")
    assert c.base == "default" and c.lora_targets == ("attn", "mlp") and c.learning_rate == 1e-3
    (tmp_path / "c.json").write_text(
        json.dumps({"train_file": "/abs/t.jsonl", "out_dir": "o", "epochs": 2, "method": "qlora"})
    )
    c = TrainConfig.from_file(tmp_path / "c.json").validate()
    assert (c.train_file, c.epochs, c.method) == ("/abs/t.jsonl", 2, "qlora")

    (tmp_path / "bad.toml").write_text('train_file = "t"\nlearning_rat = 1e-3\n')
    with pytest.raises(
        ConfigError, match="unknown setting 'learning_rat'; did you mean 'learning_rate'"
    ):
        TrainConfig.from_file(tmp_path / "bad.toml")
    (tmp_path / "broken.toml").write_text("steps = = 3\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        TrainConfig.from_file(tmp_path / "broken.toml")
    with pytest.raises(ConfigError, match="does not exist"):
        TrainConfig.from_file(tmp_path / "nope.toml")

    ok = TrainConfig(train_file="t", out_dir="o", steps=3)
    for change, message in [
        (dict(steps=None), "exactly one of steps and epochs"),
        (dict(method="qlora8"), "method must be one of"),
        (dict(batch_size=6, grad_accum=4), "multiple of grad_accum"),
        (dict(batch_size=4, mesh_data=8), "split evenly over"),
        (dict(lora_targets=("nope",)), "unknown LoRA target"),
        (dict(compute_dtype="fp8"), "compute_dtype"),
        (dict(out_dir=""), "out_dir is required"),
    ]:
        with pytest.raises(ConfigError, match=message):
            ok.replace(**change).validate()


def test_example_configs_are_valid():
    """Every config shipped in finetune/configs reads and validates."""
    import pathlib

    folder = pathlib.Path(__file__).parents[1] / "finetune" / "configs"
    files = sorted(folder.glob("*.toml")) + sorted(folder.glob("*.json"))
    assert len(files) >= 4
    for path in files:
        config = TrainConfig.from_file(path).validate()
        assert pathlib.Path(config.train_file).is_absolute()
