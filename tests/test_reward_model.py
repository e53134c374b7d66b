"""Reward models (gemma_kit.posttrain.reward_model): parity with transformers' sequence
classifiers, export to them, save/load, batched scoring, and the Bradley-Terry loss.

Oracles: transformers' Gemma2ForSequenceClassification / Gemma3TextForSequenceClassification on
tiny random models (every weight random, the head too), float32: rewards within 1e-4 (observed
~1e-6, summation order). The loss against its closed form, and the head's gradient against
d/dw mean softplus(-(w.h_c - w.h_r - m)) = mean -sigmoid(-(d)) (h_c - h_r).
"""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gemma_kit.errors import CheckpointError, CheckpointNotFoundError, RewardError
from gemma_kit.loading import model_from_params, save_checkpoint
from gemma_kit.lora import LoRAParam, apply_lora
from gemma_kit.posttrain.preferences import encode_pair, load_preferences, pad_right
from gemma_kit.posttrain.reward_model import (
    TRAINABLE,
    HeadParam,
    RewardModel,
    RewardTransformer,
    bradley_terry_loss,
    last_token_index,
    load_reward_model,
    reward_loss,
)
from gemma_kit.posttrain.rewards import as_reward, call_reward

ATOL = 1e-4
SEQ = 24
LENGTHS = [SEQ, 9, 16, 1]  # a full row, two shorter ones, a one-token row
PROMPTS = ["The for statement", "while", "An if statement", "try"]
COMPLETIONS = [" iterates over the items of a sequence.", " loops", " runs a block", ""]


def _random_factors(model, seed: int = 5):
    """LoRA B factors start at zero; make them random so the adapter changes the output."""
    rng = np.random.default_rng(seed)
    state = nnx.state(model, LoRAParam)
    nnx.update(
        model, jax.tree.map(lambda x: jnp.asarray(rng.normal(0, 0.3, x.shape), x.dtype), state)
    )


def _tiny_rm(config, tiny_model, small_tokenizer, *, lora: bool, base=None) -> RewardModel:
    model = tiny_model(config, seed=2)
    if lora:
        apply_lora(model, rank=2, alpha=4.0)
        _random_factors(model)
    network = RewardTransformer(model, pad_id=small_tokenizer.pad_id, init_std=0.5, seed=3)
    return RewardModel(network, small_tokenizer, base=base)


# Compiled once per model structure: eager op-by-op execution would compile every small op.
_rewards = nnx.jit(lambda network, tokens: network(tokens))
_loss = nnx.jit(reward_loss, static_argnames=("use_margin", "center_coefficient"))


@pytest.fixture
def tiny3(tiny_gemma3_config, small_tokenizer):
    return tiny_gemma3_config.replace(vocab_size=small_tokenizer.vocab_size)


# --------------------------------------------------------------------------------------------
# Parity with transformers


torch = pytest.importorskip("torch", reason="the parity tests need the [test] extra (torch)")
transformers = pytest.importorskip("transformers", reason="the parity tests need transformers")

HF_COMMON = dict(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=40,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    sliding_window=5,
    query_pre_attn_scalar=16,
    attn_implementation="eager",
    num_labels=1,
    pad_token_id=0,
)
HF_CASES = {
    "gemma2-gqa-softcaps": (
        "gemma2",
        dict(attn_logit_softcapping=3.0, final_logit_softcapping=4.0),
    ),
    "gemma3-gqa-local-and-global": ("gemma3", dict(num_hidden_layers=6)),
}


def _hf_reward_model(family: str, **overrides):
    from gemma_kit.checkpoint.hf import config_from_hf, params_from_hf

    kwargs = {**HF_COMMON, **overrides}
    if family == "gemma2":
        hf_model = transformers.Gemma2ForSequenceClassification(transformers.Gemma2Config(**kwargs))
    else:
        hf_model = transformers.Gemma3TextForSequenceClassification(
            transformers.Gemma3TextConfig(**kwargs)
        )
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in hf_model.named_parameters():
            p.normal_(0.0, 0.5 if ("norm" in name or name == "score.weight") else 0.15)
    hf_model.eval()
    state = {k: v for k, v in hf_model.state_dict().items() if k != "score.weight"}
    config = config_from_hf(hf_model.config, name="tiny")
    network = RewardTransformer(model_from_params(config, params_from_hf(state, config)))
    network.score.weight = HeadParam(jnp.asarray(hf_model.score.weight.detach().numpy()))
    return hf_model, network


def _hf_rewards(hf_model, tokens, valid, positions=None) -> np.ndarray:
    with torch.no_grad():
        out = hf_model(
            input_ids=torch.tensor(tokens, dtype=torch.long),
            attention_mask=torch.tensor(valid.astype(np.int64)),
            position_ids=None if positions is None else torch.tensor(positions),
        )
    assert out.logits.shape == (tokens.shape[0], 1)
    return out.logits[:, 0].float().numpy()


@pytest.mark.parametrize("case", sorted(HF_CASES))
def test_reward_head_equals_transformers_left_and_right_padded(case):
    hf_model, network = _hf_reward_model(*HF_CASES[case][:1], **HF_CASES[case][1])
    rng = np.random.default_rng(1)
    right = np.zeros((len(LENGTHS), SEQ), np.int64)
    left = np.zeros_like(right)
    for row, n in enumerate(LENGTHS):
        ids = rng.integers(1, 97, n)
        right[row, :n], left[row, SEQ - n :] = ids, ids
    # Right padding, as TRL's RewardTrainer pads and calls the model (no position ids).
    ref = _hf_rewards(hf_model, right, right != 0)
    ours = np.asarray(_rewards(network, jnp.asarray(right)))
    assert np.abs(ref).max() > 0.5, "rewards too small for the comparison to mean much"
    np.testing.assert_allclose(ours, ref, rtol=0, atol=ATOL)
    # Left padding: transformers needs the position ids counted over real tokens, which
    # gemma_kit computes from the padding itself; both pool the rightmost real token.
    positions = np.maximum(np.cumsum(left != 0, axis=1) - 1, 0)
    ref_left = _hf_rewards(hf_model, left, left != 0, positions)
    ours_left = np.asarray(_rewards(network, jnp.asarray(left)))
    np.testing.assert_allclose(ours_left, ref_left, rtol=0, atol=ATOL)
    np.testing.assert_allclose(ours_left, ours, rtol=0, atol=ATOL)
    assert last_token_index(jnp.asarray(right), 0).tolist() == [n - 1 for n in LENGTHS]


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_exported_reward_model_scores_the_same_in_transformers(
    family, tmp_path, tiny_model, tiny_gemma2_config, tiny_gemma3_config, small_tokenizer
):
    base = tiny_gemma2_config if family == "gemma2" else tiny_gemma3_config
    config = base.replace(vocab_size=small_tokenizer.vocab_size)
    rm = _tiny_rm(config, tiny_model, small_tokenizer, lora=True)  # merged on export
    out = rm.export_hf(tmp_path / "hf", progress=False)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left
    written = json.loads((out / "config.json").read_text())
    hf_model, info = transformers.AutoModelForSequenceClassification.from_pretrained(
        out, dtype=torch.float32, attn_implementation="eager", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    expected_class = {
        "gemma2": "Gemma2ForSequenceClassification",
        "gemma3": "Gemma3TextForSequenceClassification",
    }[family]
    assert type(hf_model).__name__ == written["architectures"][0] == expected_class
    assert hf_model.config.num_labels == 1 and hf_model.config.pad_token_id == 0

    seqs = [encode_pair(small_tokenizer, p, c)[0] for p, c in zip(PROMPTS, COMPLETIONS)]
    tokens = pad_right(seqs, max(map(len, seqs)))
    ref = _hf_rewards(hf_model.eval(), tokens, tokens != 0)
    ours = rm.score(PROMPTS, COMPLETIONS, progress=False)
    assert np.abs(ref).max() > 0.5
    np.testing.assert_allclose(ours, ref, rtol=0, atol=ATOL)


# --------------------------------------------------------------------------------------------
# Save, load, score


@pytest.mark.parametrize("method", ["lora", "full"])
def test_save_load_round_trip_is_exact(method, tmp_path, tiny3, tiny_model, small_tokenizer):
    base = tmp_path / "base"
    save_checkpoint(tiny_model(tiny3, seed=2), base / "checkpoint")
    (base / "tokenizer.model").write_bytes(small_tokenizer.to_bytes())
    rm = RewardModel.from_base(
        base, method=method, rank=2, alpha=4.0, init_std=0.5, seed=3, preset=tiny3
    )
    assert rm.method == method
    if method == "lora":
        _random_factors(rm.network.model)
    before = rm.score(PROMPTS, COMPLETIONS, progress=False)

    folder = rm.save(tmp_path / "rm")
    expected = {
        "reward_model.json",
        "score.npy",
        "tokenizer.model",
        "adapter" if method == "lora" else "checkpoint",
    }
    assert {p.name for p in folder.iterdir()} == expected
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    loaded = load_reward_model(folder)  # the custom size comes back from reward_model.json
    assert loaded.method == method and loaded.config == tiny3.replace(name=loaded.config.name)
    np.testing.assert_array_equal(loaded.score(PROMPTS, COMPLETIONS, progress=False), before)
    ours = nnx.to_pure_dict(nnx.state(rm.network, nnx.Any(nnx.Param, LoRAParam)))
    theirs = nnx.to_pure_dict(nnx.state(loaded.network, nnx.Any(nnx.Param, LoRAParam)))
    jax.tree.map(np.testing.assert_array_equal, ours, theirs)

    with pytest.raises(CheckpointError, match="already exists"):
        rm.save(folder)
    assert rm.save(folder, overwrite=True) == folder
    # A folder that is not ours is never replaced.
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="refusing to overwrite"):
        rm.save(other, overwrite=True)
    assert (other / "notes.txt").read_text() == "mine"


def test_bad_reward_model_folders(tmp_path, tiny3, tiny_model, small_tokenizer):
    with pytest.raises(CheckpointNotFoundError, match="no reward model folder"):
        load_reward_model(tmp_path / "absent")
    with pytest.raises(CheckpointError, match="not a reward model folder"):
        load_reward_model(tmp_path)
    rm = _tiny_rm(tiny3, tiny_model, small_tokenizer, lora=False)
    folder = rm.save(tmp_path / "rm")
    np.save(folder / "score.npy", np.zeros((1, 7), np.float32))
    with pytest.raises(CheckpointError, match="score.npy has shape \\(1, 7\\)"):
        load_reward_model(folder)
    (folder / "reward_model.json").write_text("{oops")
    with pytest.raises(CheckpointError, match="is not valid JSON"):
        load_reward_model(folder)
    lora = _tiny_rm(tiny3, tiny_model, small_tokenizer, lora=True)  # no base recorded
    with pytest.raises(RewardError, match="does not know its base"):
        lora.save(tmp_path / "lora")
    assert not (tmp_path / "lora").exists()


def test_batched_scoring_equals_one_by_one(tiny3, tiny_model, small_tokenizer):
    rm = _tiny_rm(tiny3, tiny_model, small_tokenizer, lora=True)
    prompts, completions = PROMPTS * 2, COMPLETIONS + COMPLETIONS[::-1]
    batched = rm.score(prompts, completions, batch_size=3, progress=False)
    alone = np.array([rm.score([p], [c], progress=False)[0] for p, c in zip(prompts, completions)])
    np.testing.assert_allclose(batched, alone, rtol=0, atol=1e-5)
    assert len(set(np.round(batched, 4))) > 3  # distinct inputs, distinct rewards
    # The adapter folded into the (float32) weights scores the same, faster.
    merged = rm.merged()
    assert merged.method == "full" and rm.method == "lora"
    np.testing.assert_allclose(
        merged.score(prompts, completions, batch_size=3, progress=False), batched, rtol=0, atol=1e-4
    )
    # A reward model is a reward: the protocol, checked.
    assert as_reward(rm) is rm
    np.testing.assert_allclose(call_reward(rm, prompts, completions), batched, atol=1e-6)
    with pytest.raises(RewardError, match="longer than the model's context"):
        rm.score(["for " * 200], ["x"], progress=False)


# --------------------------------------------------------------------------------------------
# The Bradley-Terry loss


def _pairs(tmp_path, tokenizer, n: int = 6):
    rows = [
        {
            "prompt": PROMPTS[i % 4],
            "chosen": COMPLETIONS[i % 4],
            "rejected": COMPLETIONS[(i + 1) % 4],
            "margin": 0.25 * i,
        }
        for i in range(n)
    ]
    path = tmp_path / "prefs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return load_preferences(path, tokenizer)


def test_bradley_terry_loss_is_log2_at_equal_scores_and_its_closed_form(
    tmp_path, tiny3, tiny_model, small_tokenizer
):
    prefs = _pairs(tmp_path, small_tokenizer)
    batch = {k: jnp.asarray(v) for k, v in prefs.take(np.arange(len(prefs))).items()}
    zero = RewardTransformer(tiny_model(tiny3, seed=2))  # a zero head: every reward is 0
    loss_sum, pairs, metrics = _loss(zero, batch, use_margin=False)
    assert float(pairs) == len(prefs)
    assert abs(float(loss_sum / pairs) - math.log(2)) < 1e-7
    assert float(metrics["accuracy"]) == 0.0  # ties are not wins
    assert float(bradley_terry_loss(jnp.zeros(3), jnp.zeros(3))) == pytest.approx(math.log(2))

    network = _tiny_rm(tiny3, tiny_model, small_tokenizer, lora=True).network
    chosen = np.asarray(_rewards(network, batch["chosen"]), np.float64)
    rejected = np.asarray(_rewards(network, batch["rejected"]), np.float64)
    margin = prefs.margin.astype(np.float64)
    delta = chosen - rejected - margin
    closed = np.mean(np.log1p(np.exp(-delta)))  # -log sigmoid
    loss_sum, pairs, metrics = _loss(network, batch)
    assert float(loss_sum / pairs) == pytest.approx(closed, abs=1e-6)
    assert float(metrics["accuracy"]) == np.sum(chosen > rejected)
    assert float(metrics["margin"]) == pytest.approx(np.sum(chosen - rejected), abs=1e-5)
    no_margin = float(_loss(network, batch, use_margin=False)[0] / pairs)
    assert no_margin == pytest.approx(np.mean(np.log1p(np.exp(-(chosen - rejected)))), abs=1e-6)
    centered = float(_loss(network, batch, center_coefficient=0.01)[0] / pairs)
    assert centered == pytest.approx(closed + 0.01 * np.mean((chosen + rejected) ** 2), abs=1e-6)
    # Swapping chosen and rejected flips the sign of the margin metric.
    swapped = dict(batch, chosen=batch["rejected"], rejected=batch["chosen"])
    assert float(_loss(network, swapped)[2]["margin"]) == pytest.approx(
        -float(metrics["margin"]), abs=1e-5
    )
    # Held-out metrics over the same pairs agree with the loss.
    held = RewardModel(network, small_tokenizer).evaluate(prefs, batch_size=4)
    assert held["loss"] == pytest.approx(closed, abs=1e-5)
    assert held["accuracy"] == pytest.approx(np.mean(chosen > rejected))


def test_head_gradient_is_the_closed_form_and_lora_trains_beside_it(
    tmp_path, tiny3, tiny_model, small_tokenizer
):
    prefs = _pairs(tmp_path, small_tokenizer)
    batch = {k: jnp.asarray(v) for k, v in prefs.take(np.arange(len(prefs))).items()}
    network = _tiny_rm(tiny3, tiny_model, small_tokenizer, lora=True).network
    graphdef, trainable, rest = nnx.split(network, TRAINABLE["lora"], ...)

    def mean_loss(params):
        total, pairs, _ = reward_loss(nnx.merge(graphdef, params, rest), batch)
        return total / pairs

    grads = nnx.to_pure_dict(jax.jit(jax.grad(mean_loss))(trainable))
    # Only LoRA factors and the head are trainable; the base weights are not in the tree.
    assert set(grads) == {"model", "score"}
    assert all(
        "lora" in "/".join(map(str, path))
        for path, _ in nnx.to_flat_state(nnx.state(network.model, LoRAParam))
    )
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads["model"])) > 0

    @nnx.jit
    def pooled_hidden(model, tokens):
        hidden = model.hidden_states(tokens, mask=tokens != 0)
        return hidden[jnp.arange(tokens.shape[0]), last_token_index(tokens, 0)]

    def pooled(tokens):
        return np.asarray(pooled_hidden(network.model, tokens), np.float64)

    h_c, h_r = pooled(batch["chosen"]), pooled(batch["rejected"])
    w = np.asarray(network.score.weight[...], np.float64)[0]
    delta = h_c @ w - h_r @ w - prefs.margin
    expected = np.mean(-(1 / (1 + np.exp(delta)))[:, None] * (h_c - h_r), axis=0)
    np.testing.assert_allclose(
        np.asarray(grads["score"]["weight"])[0], expected, rtol=1e-4, atol=1e-5
    )


# --------------------------------------------------------------------------------------------
# gemma-kit reward score


def test_cli_reward_score(tmp_path, tiny3, tiny_model, small_tokenizer, capsys):
    from gemma_kit.cli import main

    rm = _tiny_rm(tiny3, tiny_model, small_tokenizer, lora=False)
    folder = rm.save(tmp_path / "rm")
    rows = [{"prompt": p, "completion": c} for p, c in zip(PROMPTS, COMPLETIONS)]
    rows[1] = {"messages": [{"role": "user", "content": "while"}], "completion": " loops"}
    completions = tmp_path / "completions.jsonl"
    completions.write_text("\n".join(json.dumps(r) for r in rows))
    assert main(["reward", "score", "--rm", str(folder), "--file", str(completions), "--json"]) == 0
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    expected = rm.score(
        [r.get("prompt", r.get("messages")) for r in rows],
        [r["completion"] for r in rows],
        progress=False,
    )
    assert [o["completion"] for o in out] == [r["completion"] for r in rows]
    np.testing.assert_allclose([o["reward"] for o in out], expected, atol=1e-6)

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(
        "\n".join(
            json.dumps({"prompt": p, "chosen": c, "rejected": "x"})
            for p, c in zip(PROMPTS, COMPLETIONS)
        )
    )
    assert main(["reward", "score", "--rm", str(folder), "--file", str(pairs)]) == 0
    captured = capsys.readouterr()
    chosen = rm.score(PROMPTS, COMPLETIONS, progress=False)
    rejected = rm.score(PROMPTS, ["x"] * 4, progress=False)
    wins = int(np.sum(chosen > rejected))
    assert f"4 pairs, pairwise accuracy {wins / 4:.4f} ({wins} of 4" in captured.err
    assert len(captured.out.splitlines()) == 4

    # Bad input: one line, exit status 2, before any model is loaded.
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(rows[0]) + "\n" + json.dumps({"completion": "x"}) + "\n")
    assert main(["reward", "score", "--rm", str(tmp_path / "nowhere"), "--file", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "bad.jsonl:2: a completion row needs" in err
    assert (
        main(["reward", "score", "--rm", str(tmp_path / "nowhere"), "--file", str(completions)])
        == 2
    )
    assert "no reward model folder" in capsys.readouterr().err
