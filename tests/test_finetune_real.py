"""Fine-tuning on the real Gemma 3 270M (the embedded default model): LoRA lowers the loss, and
the int8 base of QLoRA stays close to the bf16 one.

Kept small for 2 CPU cores: 24 steps of one 48-token row (about a minute of training).
"""

from __future__ import annotations

import json
import pydoc_data.topics

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gemma_kit
from tests.support.logits import ours as logits_of

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def real():
    return gemma_kit.default_model()  # bf16 weights, as the README's users get them


def test_lora_loss_falls_on_the_real_270m(real, tmp_path):
    """Chat rows built from CPython's pydoc topics: "What is X?" -> the topic's first words."""
    pytest.importorskip("optax", reason="fine-tuning needs the [finetune] extra")
    from gemma_kit.finetune import TrainConfig, train

    model, tokenizer = real
    topics = pydoc_data.topics.topics
    rows = []
    for name in (
        "assert",
        "break",
        "continue",
        "for",
        "if",
        "while",
        "with",
        "pass",
        "del",
        "return",
        "global",
        "nonlocal",
        "lambda",
        "import",
        "raise",
        "try",
    ):
        reply = " ".join(topics[name].split())[:90]
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": f"What is the {name} statement?"},
                    {"role": "model", "content": reply},
                ]
            }
        )
    data = tmp_path / "topics.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = TrainConfig(
        train_file=str(data),
        out_dir=str(tmp_path / "run"),
        steps=24,
        batch_size=1,
        max_length=48,
        learning_rate=2e-3,
        warmup_steps=2,
        lora_rank=8,
        eval_fraction=0.25,
        save_every=100,
        eval_every=100,
        progress=False,
    )
    result = train(config, model=model, tokenizer=tokenizer)
    assert result.stats["train_rows"] == 12 and result.stats["eval_rows"] == 4
    losses = [
        json.loads(line)["loss"]
        for line in (result.out_dir / "metrics.jsonl").read_text().splitlines()
        if '"loss"' in line
    ]
    assert len(losses) == 24 and all(np.isfinite(losses))
    # Training loss over the last 6 steps well below the first 6 (a pass and a bit over the
    # 12 rows; observed 3.63 -> 1.23); the held-out topics' loss falls too, as the reply format
    # is learned (observed 6.10 -> 3.42).
    assert np.mean(losses[-6:]) < np.mean(losses[:6]) - 0.5, losses
    assert result.eval_after < result.eval_before - 0.1, (result.eval_before, result.eval_after)


@pytest.mark.parametrize(
    "embedding,einsums",
    [(False, True), (True, True), (True, False)],
    ids=["einsums", "einsums+embedding", "embedding"],
)
def test_int8_base_is_close_to_bf16_on_the_real_270m(real, embedding, einsums):
    """int8 per-channel weights against the bf16 checkpoint: the Einsums alone (QLoRA's frozen
    base), with the tied embedding too (`gemma-kit sample --int8`, one scale per row), and the
    embedding alone (the fastest batch-1 decoding on CPU).

    Bounds (observed on this prompt, Einsums / both / embedding): max |logit difference| <= 5%
    of the largest |logit| (3.0% / 3.8% / 3.6%); KL(bf16 || int8) <= 0.02 nats at every
    position (0.005 / 0.010 / 0.005); the same argmax wherever the bf16 model's top-2
    margin exceeds 1 logit. Quantized weights take half their bf16 bytes: 100M Einsum weights,
    168M table entries.
    """
    from gemma_kit import quant

    model, tokenizer = real
    tokens = jnp.asarray(
        [
            tokenizer.encode(
                "The Python for statement iterates over the items of any sequence, in the order"
            )
        ]
    )
    reference = logits_of(model, tokens)[0]
    q = quant.quantize_model(model, embedding=embedding, einsums=einsums)
    logits = logits_of(q, tokens)[0]
    assert np.abs(logits - reference).max() <= 5e-2 * np.abs(reference).max()
    log_p = jax.nn.log_softmax(reference)
    log_q = jax.nn.log_softmax(logits)
    kl = np.asarray(jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1))
    assert kl.max() <= 2e-2, kl
    top2 = np.sort(reference, axis=-1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 1.0
    assert clear.sum() >= 4
    assert (logits.argmax(-1)[clear] == reference.argmax(-1)[clear]).all()
    saved = (90e6 if einsums else 0) + (160e6 if embedding else 0)
    assert quant.weight_bytes(q) < quant.weight_bytes(model) - saved
