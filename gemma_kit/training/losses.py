"""Token losses over packed rows: the loss functions the training step takes.

A loss function is `loss(model, batch, frozen) -> (loss_sum, normaliser, metrics)`: the model
(trainable and fixed variables merged), one micro-batch of host arrays made device arrays, and
the objective's frozen pytrees of this step (None when it has none). The step sums loss_sum,
normaliser, the gradient of loss_sum and every metric over the micro-batches of a step, then
divides the loss and the gradient once by the summed normaliser (gemma_kit.training.step).
Loss functions must be hashable, and equal when they compute the same thing, because the
compiled step is cached by them: frozen dataclasses holding their static settings, as below,
or module-level functions.

A batch of packed rows holds [B, T] arrays (gemma_kit.finetune.data.Rows):
    tokens     int32 inputs (0 = padding; image soft-token slots SOFT_TOKEN = -2)
    targets    int32 the next token of the same example
    weights    float32 the weight of each target's loss (0 = not in the loss)
    positions  int32 the position within its example
    segments   int32 the example number within its row, from 1 (0 = padding)
and, for rows with images, image_embeddings [B, I, M, D] (made once by the frozen encoder).

The two losses here differ only in their normaliser:
    CrossEntropy         sum_t w_t CE_t / sum_t w_t: supervised fine-tuning (weights 0/1);
    SignedCrossEntropy   sum_t w_t CE_t / N, N given by the batch ("normaliser", [B] per row):
                         the policy-gradient form, with w_t = A_i the (signed) advantage of the
                         sample i that token t belongs to, CE_t = -log pi(y_t), so the loss is
                         -sum A log pi / N. Signed weights must never be divided by their sum
                         (it can be ~0 or negative); N is e.g. the number of completion tokens
                         (token mean) or of sequences (with w_t = A_i / |y_i|: sequence mean).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from gemma_kit.attention import attention_mask as build_mask
from gemma_kit.attention import image_blocks
from gemma_kit.training.chunks import fused_logits_sum
from gemma_kit.vision.prompt import soft_token_mask


def attention_mask(
    positions: jax.Array, segments: jax.Array, tokens: jax.Array | None = None
) -> jax.Array:
    """[B, T] positions and segment ids of packed rows -> [B, T, T]: causal, within one packed
    example only (gemma_kit.attention.attention_mask, the one mask builder).

    With `tokens`, the soft-token slots of each image also see each other in both directions,
    as in the model's own default mask.
    """
    blocks = None if tokens is None else image_blocks(soft_token_mask(tokens))
    return build_mask(positions, blocks=blocks, segments=segments)


def cross_entropy_sums(
    model, hidden: jax.Array, targets: jax.Array, weights: jax.Array, chunk: int
) -> tuple[jax.Array, jax.Array]:
    """(sum of weighted token losses, sum of weights) for hidden [B, T, D], targets [B, T].

    Logits are made `chunk` tokens at a time, value and gradient in one pass
    (gemma_kit.training.chunks.fused_logits_sum), so [B * T, V] logits never exist whole,
    forward or backward, and each chunk's logits are made once. Log-softmax in float32.
    """

    def token_losses(logits, t, _):
        # Targets that are image slots (SOFT_TOKEN, -2) are never weighted; clip to index.
        picked = jnp.take_along_axis(logits, jnp.maximum(t, 0)[:, None], axis=-1)[:, 0]
        return jax.nn.logsumexp(logits, axis=-1) - picked

    D = hidden.shape[-1]
    w = weights.reshape(-1).astype(jnp.float32)
    loss = fused_logits_sum(
        model, hidden.reshape(-1, D), w, token_losses, targets.reshape(-1), chunk=chunk
    )
    return loss, jnp.sum(w)


def token_loss_sums(model, batch: dict[str, jax.Array], chunk: int) -> tuple[jax.Array, jax.Array]:
    """(sum_t w_t CE_t, sum_t w_t) of a batch of packed rows under `model`.

    A batch with images carries their embeddings ([B, I, M, D], made once by the frozen image
    encoder, see gemma_kit.finetune.train.ImageBank) for the rows' soft-token slots.
    """
    images = batch.get("image_embeddings")
    tokens = batch["tokens"]
    mask = attention_mask(
        batch["positions"], batch["segments"], tokens if images is not None else None
    )
    hidden = model.hidden_states(tokens, batch["positions"], mask, image_embeddings=images)
    return cross_entropy_sums(model, hidden, batch["targets"], batch["weights"], chunk)


@dataclasses.dataclass(frozen=True)
class CrossEntropy:
    """Supervised fine-tuning: the mean token cross-entropy over the weighted targets.

    normaliser = sum of the weights; metrics: loss_tokens (that same sum).
    chunk: tokens per logits chunk (bounds the [tokens, V] logits memory).
    """

    chunk: int = 1024

    def __call__(self, model, batch, frozen=None):
        loss, tokens = token_loss_sums(model, batch, self.chunk)
        return loss, tokens, {"loss_tokens": tokens}


@dataclasses.dataclass(frozen=True)
class SignedCrossEntropy:
    """sum_t w_t * (-log p(y_t)) with signed weights, over a normaliser the batch gives.

    batch["weights"] [B, T]: the signed token weights (advantages); batch["normaliser"] [B]:
    each row's share of the normaliser (summed over rows and micro-batches, then the step
    divides by it once). metrics: weight_sum (sum w_t) and weighted_tokens (the targets with
    w_t != 0), both summed over the step's micro-batches.
    """

    chunk: int = 1024

    def __call__(self, model, batch, frozen=None):
        loss, weight_sum = token_loss_sums(model, batch, self.chunk)
        normaliser = jnp.sum(batch["normaliser"].astype(jnp.float32))
        counted = jnp.sum((batch["weights"] != 0).astype(jnp.float32))
        return loss, normaliser, {"weight_sum": weight_sum, "weighted_tokens": counted}
