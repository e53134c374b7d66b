"""DPO on the worked example: the gold (VADER) reward of the policy's own samples and their KL
to the base, before and after training on the noisy preference pairs.

    python posttrain/dpo_270m.py                 # ~15 min on a shared 2-core CPU
    python posttrain/dpo_270m.py --steps 5       # a quicker look

1. Draws --samples completions of each of the 12 held-out review prompts from the base
   (temperature 1, no filters: gemma_kit.posttrain.rollout) and scores them with VADER.
2. Trains LoRA DPO (posttrain/configs/dpo_270m.toml: beta 0.1, the reference = the base with
   the adapter off) on posttrain/data/train.jsonl (393 pairs, 25% of their labels flipped),
   held-out metrics on the 44 clean pairs of eval.jsonl.
3. Draws the same number of completions from the trained policy (the same seeds) and scores
   them; the KL to the base is measured exactly over the vocabulary at every position of the
   policy's own samples, KL(pi(.|s_t) || ref(.|s_t)) summed over each completion's tokens
   (gemma_kit.posttrain.logprobs.divergence, "reverse_kl", the policy as student), then
   averaged over the samples. The base's KL to itself is 0 by construction.

Writes posttrain/results/dpo.json (--name) and docs/images/dpo_270m.png (--plot: the run's
implicit rewards).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import review_prompts  # noqa: E402  (this folder's prompt list)
from warm_rm import cpu_name  # noqa: E402


def sample_and_score(
    model,
    tokenizer,
    prompts,
    samples: int,
    max_new_tokens: int,
    seed: int,
    reference=None,
    chunk: int = 128,
):
    """(gold rewards [R], KL to `reference` per sample [R] or None, texts) of `samples`
    completions of each prompt drawn from `model` at temperature 1."""
    import jax
    import numpy as np
    from flax import nnx

    import gemma_kit
    from gemma_kit.posttrain.logprobs import divergence
    from gemma_kit.posttrain.losses import Divergence
    from gemma_kit.posttrain.rewards import call_reward, vader_sentiment
    from gemma_kit.posttrain.rollout import rollout
    from gemma_kit.training.losses import attention_mask

    sampler = gemma_kit.Sampler(model, tokenizer)
    drawn = rollout(sampler, prompts, samples, max_new_tokens, seed=seed, step=0)
    del sampler
    prompt_texts = [prompts[i] for i in drawn.prompt_index]
    gold = np.asarray(call_reward(vader_sentiment, prompt_texts, drawn.texts))
    if reference is None:
        return gold, None, drawn.texts
    batch = drawn.training_batch()
    graphdef, state = nnx.split(model)
    ref_graphdef, ref_state = nnx.split(reference)

    @jax.jit
    def kl_per_sample(state, ref_state, rows):
        policy, ref = nnx.merge(graphdef, state), nnx.merge(ref_graphdef, ref_state)
        mask = attention_mask(rows["positions"], rows["segments"])
        hidden = policy.hidden_states(rows["tokens"], rows["positions"], mask)
        ref_hidden = ref.hidden_states(rows["tokens"], rows["positions"], mask)
        per = divergence(policy, hidden, ref, ref_hidden, Divergence("reverse_kl"), chunk=chunk)
        return (per * rows["weights"]).sum(axis=1)

    kl = []
    for start in range(0, len(gold), 16):  # 16 samples at a time (bounded memory)
        rows = {
            k: v[start : start + 16]
            for k, v in batch.items()
            if k in ("tokens", "positions", "segments", "weights")
        }
        kl.append(np.asarray(kl_per_sample(state, ref_state, rows)))
    return gold, np.concatenate(kl), drawn.texts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(HERE / "configs" / "dpo_270m.toml"))
    parser.add_argument("--steps", type=int, default=None, help="default: the config's")
    parser.add_argument("--learning-rate", type=float, default=None, help="default: the config's")
    parser.add_argument("--name", default="dpo", help="results/NAME.json")
    parser.add_argument("--out-dir", default=None, help="the run's folder (default: config's)")
    parser.add_argument("--samples", type=int, default=8, help="completions per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--seed", type=int, default=1, help="the samples' draw")
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument("--plot", default=str(HERE.parent / "docs" / "images" / "dpo_270m.png"))
    args = parser.parse_args(argv)

    import gemma_kit
    from gemma_kit.lora import lora_state
    from gemma_kit.posttrain.dpo import DPOConfig, train_dpo
    from gemma_kit.posttrain.policy import reference_values, with_trained

    start = time.time()
    config = DPOConfig.from_file(args.config)
    changes = {"steps": args.steps} if args.steps else {}
    if args.learning_rate:
        changes["learning_rate"] = args.learning_rate
    if args.out_dir:
        changes["out_dir"] = args.out_dir
    config = config.replace(**changes).validate()
    _, prompts = review_prompts.split()
    model, tokenizer = gemma_kit.default_model()

    t = time.time()
    gold_before, _, texts_before = sample_and_score(
        model, tokenizer, prompts, args.samples, args.max_new_tokens, args.seed
    )
    before_seconds = time.time() - t

    t = time.time()
    resume = (pathlib.Path(config.out_dir) / "checkpoints").is_dir()
    result = train_dpo(config, model=model, tokenizer=tokenizer, resume=resume)
    trained = time.time() - t
    policy = result.model
    reference = with_trained(policy, reference_values(lora_state(policy)))

    t = time.time()
    gold_after, kl, texts_after = sample_and_score(
        policy, tokenizer, prompts, args.samples, args.max_new_tokens, args.seed, reference
    )
    after_seconds = time.time() - t

    lengths = [len(tokenizer.encode(x, add_bos=False)) for x in texts_after]
    report = dict(
        machine=f"{cpu_name()} (shared with other jobs)",
        settings=dict(
            steps=config.steps,
            batch_size=config.batch_size,
            beta=config.beta,
            learning_rate=config.learning_rate,
            lora_rank=config.lora_rank,
            loss_type=config.loss_type,
            label_smoothing=config.label_smoothing,
            samples_per_prompt=args.samples,
            prompts=len(prompts),
            max_new_tokens=args.max_new_tokens,
        ),
        held_out_pairs=dict(
            before=result.evaluations.get("before"), after=result.evaluations.get("after")
        ),
        gold_reward=dict(
            before=round(float(gold_before.mean()), 4), after=round(float(gold_after.mean()), 4)
        ),
        kl_to_base_nats=dict(
            before=0.0,
            after=round(float(kl.mean()), 4),
            after_per_token=round(float(kl.sum() / max(sum(lengths), 1)), 4),
        ),
        examples_after=texts_after[:4],
        examples_before=texts_before[:4],
        seconds=dict(
            sampling_before=round(before_seconds, 1),
            training=round(trained, 1),
            sampling_and_kl_after=round(after_seconds, 1),
            total=round(time.time() - start, 1),
        ),
    )
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(report, indent=2) + "\n")
    png = pathlib.Path(config.out_dir) / "dpo.png"
    if png.is_file():
        pathlib.Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(png, args.plot)
    held = report["held_out_pairs"]
    print(
        f"gold reward (VADER) of the policy's samples: {report['gold_reward']['before']:.4f} "
        f"-> {report['gold_reward']['after']:.4f}"
    )
    print(
        f"KL to the base (nats per completion, exact): 0 -> "
        f"{report['kl_to_base_nats']['after']:.4f}"
    )
    if held["before"] and held["after"]:
        print(
            f"held-out pairs: accuracy {held['before']['eval_accuracy']:.4f} -> "
            f"{held['after']['eval_accuracy']:.4f}, loss {held['before']['eval_loss']:.4f} "
            f"-> {held['after']['eval_loss']:.4f}"
        )
    print(f"({report['machine']}; {report['seconds']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
