"""Reward-model training on the training core (gemma_kit.posttrain.reward_train): it learns a
separable toy preference set, writes a reward model folder that reloads, serves as a reward
spec and exports to transformers scoring the same, resumes bit-identically after SIGKILL, and
refuses bad input with one clear error.

Tiny Gemma 3 model (tests/support/preference_worker.py: toy pairs, the base as a transformers
folder).
"""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

pytest.importorskip("optax", reason="training needs the [finetune] extra")
# After the skip: these import gemma_kit.training, which needs optax.
from gemma_kit.errors import ConfigError, DataError
from gemma_kit.posttrain.preference_training import load_preference_data
from gemma_kit.posttrain.preferences import encode_pair, pad_right
from gemma_kit.posttrain.reward_model import load_reward_model
from gemma_kit.posttrain.reward_train import RewardConfig, train_reward_model
from gemma_kit.posttrain.rewards import call_reward, load_reward
from tests.support import preference_worker as toy
from tests.support import workers

WORKER = "preference_worker"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return toy.tiny_base(tmp_path_factory.mktemp("base") / "tiny")


def test_reward_train_command_learns_a_separable_preference_set(tmp_path, base, capsys):
    """`gemma-kit reward train` (LoRA, config file + --set) on 36 training pairs: the held-out
    loss starts at log 2 exactly (a zero head scores every sequence 0, so no pair is won) and
    ends below 0.2 with every held-out pair won; the training loss falls. The reward model folder
    reloads (its base from the config), scores the held-out pairs as the trained network did
    (1e-5) and as an `rm:DIR` reward (merged; 1e-5), and, reloaded in float32, its
    transformers export scores the same (1e-4). The run trained over a bfloat16 base (LoRA's
    default param_dtype): merging into it, or reloading it in float32, moves the scores by
    bf16's rounding only (<= 4e-3 relative)."""
    folder, _, tokenizer = base
    toy.write_jsonl(tmp_path / "pairs.jsonl", toy.toy_rows(48))
    config = tmp_path / "rm.toml"
    config.write_text(
        f'train_file = "pairs.jsonl"\nbase = "{folder}"\nout_dir = "out"\n'
        "steps = 12\nbatch_size = 8\nlearning_rate = 1e-2\nwarmup_steps = 0\n"
        "eval_fraction = 0.25\neval_every = 6\nlora_rank = 4\n"
    )
    from gemma_kit.cli import main

    assert (
        main(
            [
                "reward",
                "train",
                "--config",
                str(config),
                "--set",
                "progress=false",
                "--set",
                "seed=1",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    out = tmp_path / "out"
    assert (
        f"wrote {out / 'reward_model'}" in printed
        and "held-out pairwise accuracy 0.0000" in printed
    )
    rows = workers.read_jsonl(out / "metrics.jsonl")
    held = [r for r in rows if "eval_accuracy" in r]
    assert [r["step"] for r in held] == [0, 6, 12]
    assert held[0]["eval_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert held[0]["eval_accuracy"] == 0.0 and held[-1]["eval_accuracy"] == 1.0
    assert held[-1]["eval_loss"] < 0.2
    train = [r for r in rows if "loss" in r]
    assert len(train) == 12 and {"accuracy", "margin", "chosen_reward"} <= set(train[0])
    assert train[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert np.mean([r["loss"] for r in train[-3:]]) < 0.5 * train[0]["loss"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"] == summary["reward_model"] == str(out / "reward_model")
    assert summary["data"]["train_pairs"] == 36 and summary["data"]["eval_pairs"] == 12
    assert (out / "accuracy.png").read_bytes()[:4] == b"\x89PNG"

    rm = load_reward_model(out / "reward_model")
    assert rm.method == "lora" and rm.base == str(folder)
    split = load_preference_data(RewardConfig.from_file(config).replace(seed=1), tokenizer).eval
    evaluated = rm.evaluate(split)
    assert evaluated["accuracy"] == 1.0
    assert evaluated["loss"] == pytest.approx(held[-1]["eval_loss"], abs=1e-5)
    assert evaluated["margin"] == pytest.approx(held[-1]["eval_margin"], abs=1e-5)

    # The folder as a reward spec, and through `reward score` on the pairs file.
    prompts = [r["prompt"] for r in toy.toy_rows(6)]
    texts = [r["chosen"] for r in toy.toy_rows(6)]
    direct = rm.score(prompts, texts, progress=False)
    # The spec merges the adapter into the bfloat16 base (LoRA's default param_dtype), as the
    # export does: the same scores up to bf16's rounding of the merged weights (2^-8 relative).
    merged = rm.merged().score(prompts, texts, progress=False)
    np.testing.assert_allclose(merged, direct, rtol=4e-3)
    np.testing.assert_allclose(
        call_reward(load_reward(f"rm:{out / 'reward_model'}"), prompts, texts),
        merged,
        rtol=0,
        atol=1e-5,
    )

    # transformers' sequence classifier of the export scores the same.
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    # In float32 (the stored base's dtype), where both sides compute alike.
    rm32 = load_reward_model(out / "reward_model", dtype=jnp.float32)
    exact = rm32.score(prompts, texts, progress=False)
    np.testing.assert_allclose(exact, direct, rtol=4e-3)  # bf16 rounding of the base only
    hf = rm32.export_hf(tmp_path / "hf", progress=False)
    classifier = transformers.AutoModelForSequenceClassification.from_pretrained(
        hf, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    seqs = [encode_pair(tokenizer, p, c)[0] for p, c in zip(prompts, texts)]
    tokens = pad_right(seqs, max(map(len, seqs)))
    with torch.no_grad():
        theirs = classifier(
            input_ids=torch.tensor(tokens, dtype=torch.long),
            attention_mask=torch.tensor((tokens != 0).astype(np.int64)),
        ).logits
    np.testing.assert_allclose(theirs[:, 0].numpy(), exact, rtol=0, atol=1e-4)
    assert np.ptp(direct) > 0.2  # distinct rewards: the comparison means something


def test_resume_after_sigkill_is_bit_identical(tmp_path, base):
    """A full-backbone reward-model run killed by SIGKILL after step 5 (checkpoints at steps 2
    and 4; step 5's work is lost) and resumed ends with the same backbone and head, bit for bit,
    and the same metrics rows, as an uninterrupted run (data order from data_seed, 2
    micro-batches per step)."""
    folder, model, tokenizer = base
    data = toy.write_jsonl(tmp_path / "pairs.jsonl", toy.toy_rows(40, seed=2, margin=True))
    straight = train_reward_model(
        RewardConfig(**toy.rm_settings(data, tmp_path / "straight", folder)),
        model=model,
        tokenizer=tokenizer,
    )
    assert straight.step == 6 and not straight.interrupted

    out = tmp_path / "killed"
    job = dict(kind="kill", kill_after=5, config=toy.rm_settings(data, out, folder))
    code, _, err = workers.finish(workers.start(WORKER, job, tmp_path))
    assert code == -9, err[-3000:]
    assert sorted(int(p.name) for p in (out / "checkpoints").iterdir()) == [2, 4]
    assert [r["step"] for r in workers.read_jsonl(out / "metrics.jsonl") if "loss" in r] == [
        1,
        2,
        3,
        4,
        5,
    ]
    assert not (out / "reward_model").exists()

    resumed = train_reward_model(
        RewardConfig(**toy.rm_settings(data, out, folder)),
        model=model,
        tokenizer=tokenizer,
        resume=True,
    )
    assert resumed.step == 6
    ours = jax.tree.leaves(nnx.state(resumed.model, nnx.Param))
    theirs = jax.tree.leaves(nnx.state(straight.model, nnx.Param))
    assert len(ours) == len(theirs) > 10
    for a, b in zip(ours, theirs, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    def strip(rows):
        return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "elapsed")} for r in rows]

    assert strip(workers.read_jsonl(out / "metrics.jsonl")) == strip(
        workers.read_jsonl(tmp_path / "straight" / "metrics.jsonl")
    )
    moved = max(
        float(np.abs(np.asarray(a) - np.asarray(b)).max())
        for a, b in zip(theirs, jax.tree.leaves(nnx.state(model, nnx.Param)))
    )
    assert moved > 1e-3  # the backbone itself trained (method full)
    # The full reward model folder (no adapter) reloads and scores as the trained network.
    rm = load_reward_model(resumed.model_dir)
    assert rm.method == "full" and rm.trained_from == str(folder)


def test_bad_input_is_one_clear_error(tmp_path, base, capsys):
    from gemma_kit.cli import main

    folder = base[0]
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    args = [
        "reward",
        "train",
        "--out-dir",
        str(tmp_path / "o"),
        "--steps",
        "2",
        "--base",
        str(folder),
    ]
    assert main([*args, "--train-file", str(empty)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "empty.jsonl" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()  # refused before anything was written

    bad = toy.write_jsonl(
        tmp_path / "bad.jsonl", toy.toy_rows(3) + [{"prompt": "x", "chosen": "y"}]
    )
    assert main([*args, "--train-file", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:4" in err and "rejected" in err

    assert main([*args, "--train-file", str(bad), "--set", "center_coefficient=-1"]) == 2
    assert "center_coefficient must be a number >= 0" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="data_seed must be an integer"):
        RewardConfig(train_file="x", out_dir="o", steps=1, data_seed="a").validate()
    with pytest.raises(DataError, match="empty"):
        train_reward_model(
            RewardConfig(
                train_file=str(empty), out_dir=str(tmp_path / "p"), steps=1, base=str(folder)
            )
        )
