"""Best-of-N (gemma_kit.posttrain.bon) on a tiny random model and the small real tokenizer.

The reward is a tiny random reward model on the same tokenizer (a real, non-trivial scorer), or
simple callables where a test needs known values (ties). Each sampler call is recorded, so the
tests see that the n candidates of every prompt come from one batched generate.
"""

from __future__ import annotations

import json
import math

import jax.numpy as jnp
import numpy as np
import pytest

from gemma_kit.errors import RewardError
from gemma_kit.posttrain.bon import Candidate, best_of_n, kl_bound
from gemma_kit.posttrain.reward_model import RewardModel, RewardTransformer
from gemma_kit.posttrain.rewards import call_reward
from gemma_kit.sampler import Sampler
from gemma_kit.sampling import SamplingError

PROMPTS = ["The for statement", "An if statement is"]
SAMPLING = dict(max_new_tokens=8, seed=7)


class RecordingSampler:
    """A Sampler that records the prompts of each generate call."""

    def __init__(self, sampler):
        self.sampler, self.calls = sampler, []

    def generate(self, prompts, **kwargs):
        self.calls.append((list(prompts), kwargs))
        return self.sampler.generate(prompts, **kwargs)


_SHARED: dict = {}


@pytest.fixture
def tiny(tiny_gemma3_config, tiny_model, small_tokenizer):
    """(sampler, reward model) sharing the tiny model's compilations across tests."""
    if not _SHARED:
        config = tiny_gemma3_config.replace(vocab_size=small_tokenizer.vocab_size, max_context=128)
        sampler = Sampler(tiny_model(config, seed=1), small_tokenizer, cache_dtype=jnp.float32)
        network = RewardTransformer(tiny_model(config, seed=4), init_std=0.5, seed=1)
        _SHARED.update(sampler=sampler, rm=RewardModel(network, small_tokenizer))
    return RecordingSampler(_SHARED["sampler"]), _SHARED["rm"]


def test_each_prompt_gets_its_own_n_sorted_from_one_batched_generate(tiny):
    sampler, rm = tiny
    n = 4
    best = best_of_n(sampler, PROMPTS, n, rm, **SAMPLING)
    # One generate call, each prompt repeated n times, sampled at temperature 1 by default.
    [(rows, kwargs)] = sampler.calls
    assert rows == [PROMPTS[0]] * n + [PROMPTS[1]] * n
    assert kwargs["temperature"] == 1.0 and kwargs["max_new_tokens"] == 8
    direct = sampler.sampler.generate(rows, temperature=1.0, **SAMPLING)

    assert len(best) == len(PROMPTS)
    for k, (prompt, candidates) in enumerate(zip(PROMPTS, best)):
        assert len(candidates) == n and all(isinstance(c, Candidate) for c in candidates)
        assert all(c.prompt == prompt for c in candidates)
        assert sorted(c.index for c in candidates) == list(range(n))
        rewards = [c.reward for c in candidates]
        assert rewards == sorted(rewards, reverse=True) and rewards[0] == max(rewards)
        for c in candidates:
            row = direct[k * n + c.index]  # the candidate is that row of the batch
            assert (c.text, c.tokens, c.finish_reason) == (row.text, row.tokens, row.finish_reason)
            np.testing.assert_allclose(c.logprobs, row.logprobs, rtol=1e-6)
            # Scored in a batch of 2n, equal to scoring it alone.
            alone = call_reward(rm, [prompt], [c.text])[0]
            assert c.reward == pytest.approx(alone, abs=1e-5)
    texts = {c.text for candidates in best for c in candidates}
    assert len(texts) > n  # rows sampled independently: not n copies of one completion


def test_one_prompt_string_gives_one_sorted_list(tiny):
    sampler, _ = tiny
    best = best_of_n(sampler, PROMPTS[0], 3, lambda p, c: [len(x) for x in c], **SAMPLING)
    assert isinstance(best, list) and len(best) == 3 and isinstance(best[0], Candidate)
    assert [c.reward for c in best] == sorted((len(c.text) for c in best), reverse=True)
    assert len(sampler.calls[0][0]) == 3


def test_ties_keep_generation_order(tiny):
    sampler, _ = tiny
    flat = best_of_n(sampler, PROMPTS, 4, lambda p, c: [1.0] * len(c), **SAMPLING)
    assert [[c.index for c in cs] for cs in flat] == [[0, 1, 2, 3], [0, 1, 2, 3]]
    # Two tied groups: each keeps its order, the higher group first.
    halves = best_of_n(
        sampler, PROMPTS[0], 4, lambda p, c: [float(i % 2) for i in range(len(c))], **SAMPLING
    )
    assert [c.index for c in halves] == [1, 3, 0, 2]


def test_a_spec_reward_runs_in_its_worker(tiny, tmp_path, monkeypatch):
    sampler, _ = tiny
    (tmp_path / "bon_rewards.py").write_text(
        "def vowels(prompts, completions):\n"
        "    return [sum(ch in 'aeiou' for ch in c) for c in completions]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    best = best_of_n(sampler, PROMPTS[1], 3, "bon_rewards:vowels", **SAMPLING)
    assert [c.reward for c in best] == sorted(
        (float(sum(ch in "aeiou" for ch in c.text)) for c in best), reverse=True
    )


def test_bad_settings_and_rewards_are_one_error_each(tiny):
    sampler, _ = tiny
    with pytest.raises(SamplingError, match="greedy decoding"):
        best_of_n(sampler, PROMPTS, 2, lambda p, c: [0.0] * len(c), temperature=0.0)
    with pytest.raises(SamplingError, match="n must be an integer >= 1"):
        best_of_n(sampler, PROMPTS, 0, lambda p, c: [])
    with pytest.raises(SamplingError, match="no prompts"):
        best_of_n(sampler, [], 2, lambda p, c: [])
    with pytest.raises(RewardError, match="a reward must be a callable"):
        best_of_n(sampler, PROMPTS, 2, 3.5)
    with pytest.raises(RewardError, match="no_such_module_bon"):
        best_of_n(sampler, PROMPTS, 2, "no_such_module_bon:f")
    assert not sampler.calls  # all of the above fail before sampling

    def short(prompts, completions):
        return [0.0]

    with pytest.raises(RewardError, match="short returned 1 value\\(s\\) for 4 completions"):
        best_of_n(sampler, PROMPTS, 2, short, **SAMPLING)
    # Greedy Best-of-1 is allowed (it is plain sampling).
    [only] = best_of_n(sampler, PROMPTS[0], 1, lambda p, c: [0.0], temperature=0.0, **SAMPLING)
    assert only.index == 0


def test_kl_bound_closed_form():
    assert kl_bound(1) == 0.0
    assert [round(kl_bound(n), 2) for n in (2, 4, 8)] == [0.19, 0.64, 1.20]
    assert kl_bound(8) == pytest.approx(math.log(8) - 7 / 8)
    with pytest.raises(ValueError):
        kl_bound(0)


# --------------------------------------------------------------------------------------------
# gemma-kit sample --best-of N --reward SPEC


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--best-of", "4"], "--best-of N and --reward SPEC go together"),
        (["--reward", "x:y"], "--best-of N and --reward SPEC go together"),
        (["--best-of", "0", "--reward", "x:y"], "argument --best-of: must be an integer >= 1"),
        (
            ["--best-of", "2", "--reward", "no_such_module_cli:f"],
            "module 'no_such_module_cli' does not import",
        ),
    ],
)
def test_cli_best_of_bad_input_fails_before_loading(argv, message, capsys, monkeypatch):
    from gemma_kit import cli

    def no_loading(args):
        raise AssertionError("the model was loaded before the bad input was found")

    monkeypatch.setattr(cli, "_load", no_loading)
    assert cli.main(["sample", "--prompt", "hi", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


@pytest.mark.real_model
def test_cli_best_of_on_the_real_model(capsys):
    pytest.importorskip("vaderSentiment", reason="VADER is the [rewards] extra")
    from gemma_kit.cli import main
    from gemma_kit.posttrain.rewards import vader_sentiment

    prompt = "The hotel was"
    assert (
        main(
            [
                "sample",
                "--prompt",
                prompt,
                "--best-of",
                "4",
                "--max-new-tokens",
                "12",
                "--reward",
                "gemma_kit.posttrain.rewards:vader_sentiment",
                "--json",
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    assert "samples at temperature 1.0" in captured.err
    out = json.loads(captured.out)
    rewards = [c["reward"] for c in out["candidates"]]
    assert out["best_of"] == 4 and len(rewards) == 4 and rewards == sorted(rewards, reverse=True)
    assert rewards == vader_sentiment([prompt] * 4, [c["text"] for c in out["candidates"]])
    assert sorted(c["index"] for c in out["candidates"]) == [0, 1, 2, 3]


def test_sampler_best_of_n_is_the_same_draw(tiny):
    """Sampler.best_of_n (the public method) returns what best_of_n gives for the same seed."""
    sampler, rm = tiny
    via_method = sampler.sampler.best_of_n(PROMPTS, 3, rm, **SAMPLING)
    via_function = best_of_n(sampler.sampler, PROMPTS, 3, rm, **SAMPLING)
    assert [[(c.tokens, c.reward) for c in row] for row in via_method] == [
        [(c.tokens, c.reward) for c in row] for row in via_function
    ]
    assert len(via_method) == 2 and all(len(row) == 3 for row in via_method)
