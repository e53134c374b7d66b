"""One attention for MHA, GQA and MQA, and the masks it uses.

Masks are pure functions of absolute positions, so the same code covers a full forward pass,
left-padded and packed batches, and a ring-buffer KV cache whose slots hold positions out of
order. A mask is a boolean [B, T, S] array: True where query t may attend to key s.
`attention_mask` assembles the model-wide mask of a sequence from these parts; the cached path
of `Attention` builds its own from the cache's slot positions.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from gemma_kit import cache as kv_cache
from gemma_kit.config import AttentionKind, Config, LocalAttention
from gemma_kit.layers import Einsum, RMSNorm, apply_rope, matmul_dtype, softcap

# Added to masked logits. Finite on purpose: a row with every key masked (a pad query) then
# gives a uniform softmax instead of NaNs that would spread through the batch.
MASKED_LOGIT = -2.3819763e38


def causal_mask(q_positions: jax.Array, k_positions: jax.Array) -> jax.Array:
    """[B, T], [B, S] -> [B, T, S]: a query sees keys at its own or earlier positions."""
    return k_positions[:, None, :] <= q_positions[:, :, None]


def sliding_window_mask(q_positions: jax.Array, k_positions: jax.Array, window: int) -> jax.Array:
    """[B, T], [B, S] -> [B, T, S]: keys less than `window` positions away from the query.

    Symmetric, as in the official code, so that bidirectional spans (image tokens) inside a
    local layer are cut the same way on both sides; combined with a causal mask it keeps the
    `window` most recent positions, the query's own included.
    """
    distance = q_positions[:, :, None] - k_positions[:, None, :]
    return jnp.abs(distance) < window


def image_blocks(is_image: jax.Array) -> jax.Array:
    """[B, T] bool (True at image soft-token slots) -> [B, T] int32 block ids.

    0 for text; k for the slots of the k-th image of the row (a run of consecutive slots: the
    markers around every image keep two images apart).
    """
    previous = jnp.pad(is_image[:, :-1], ((0, 0), (1, 0)))
    starts = is_image & ~previous
    return jnp.where(is_image, jnp.cumsum(starts, axis=1, dtype=jnp.int32), 0)


def image_block_mask(q_blocks: jax.Array, k_blocks: jax.Array) -> jax.Array:
    """[B, T], [B, S] image block ids (0 = text) -> [B, T, S]: query and key in the same image.

    OR-ed with the causal mask it lets the soft tokens of one image see each other in both
    directions while text stays causal; a local layer's sliding window still cuts the result
    (as in the official code: gm/utils/_attention_mask.py, then create_sliding_mask).
    """
    return (q_blocks[:, :, None] == k_blocks[:, None, :]) & (q_blocks[:, :, None] > 0)


def attention_mask(
    positions: jax.Array,
    *,
    valid: jax.Array | None = None,
    blocks: jax.Array | None = None,
    segments: jax.Array | None = None,
) -> jax.Array:
    """The model-wide [B, T, T] self-attention mask of T tokens; local layers narrow it further.

    Args:
      positions: [B, T] absolute positions; a query sees keys at its own or earlier positions.
      valid: [B, T] bool, False at padding: no query sees a pad key.
      blocks: [B, T] image block ids (image_blocks): the soft tokens of one image also see each
        other in both directions.
      segments: [B, T] int, the packed example each token belongs to (1, 2, ...; 0 = padding):
        a query sees keys of its own example only, never padding.
    Returns:
      [B, T, T] bool: (causal | same image) & valid key & same segment.
    """
    mask = causal_mask(positions, positions)
    if blocks is not None:
        mask = mask | image_block_mask(blocks, blocks)
    if valid is not None:
        mask = mask & valid[:, None, :]
    if segments is not None:
        same = segments[:, :, None] == segments[:, None, :]
        mask = mask & same & (segments > 0)[:, None, :]
    return mask


def attend(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *, logit_cap: float | None
) -> jax.Array:
    """Scaled dot-product attention over grouped heads.

    Args:
      q: [B, T, N, H] queries, already multiplied by the query scale.
      k, v: [B, S, K, H] keys and values; N must be a multiple of K (G = N / K queries share
        one key/value head: G = 1 is MHA, K = 1 is MQA, anything between is GQA).
      mask: [B, T, S] boolean.
      logit_cap: soft-cap applied to the attention logits (Gemma 2), or None.
    Returns:
      [B, T, N, H] in the dtype of q.

    Keys and values stored narrower than q (a bf16 cache) meet bf16-rounded queries and
    probabilities, accumulating in float32 (layers.matmul_dtype, the rule for weights too).
    """
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    G = N // K
    dtype = matmul_dtype(k.dtype, q.dtype)
    # Both products as dot_generals batched over (B, K): queries [B, K, T*G, H] against keys
    # [B, K, S, H] contracting H, then probabilities [B, K, T*G, S] against values [B, K, S, H]
    # contracting S. XLA's CPU backend runs these in bf16 directly. Written as einsums over
    # [B, S, K, H] they got float32 copies and transposes of the whole cache each step (3-6x
    # slower decode, 6x slower 512-token prefill, measured). Values transposed to [B, K, H, S]
    # (both contracted axes last) also cost a float32 copy per step: 3.4x slower attention at
    # batch 16 over 256 slots than contracting S where it is. With one kv head (Gemma 3 270M /
    # 1B) the transposes to [B, K, S, H] move no data at all.
    qg = q.astype(dtype).reshape(B, T, K, G, H).transpose(0, 2, 1, 3, 4).reshape(B, K, T * G, H)
    kk = k.astype(dtype).transpose(0, 2, 1, 3)  # [B, K, S, H]
    vv = v.astype(dtype).transpose(0, 2, 1, 3)  # [B, K, S, H]
    # Logits and softmax in float32 whatever the compute dtype: bf16 logits of long contexts
    # lose the small differences that decide the attention weights.
    logits = jax.lax.dot_general(
        qg, kk, (((3,), (3,)), ((0, 1), (0, 1))), preferred_element_type=jnp.float32
    )
    logits = softcap(logits.reshape(B, K, T, G, S), logit_cap)
    logits = jnp.where(mask[:, None, :, None, :], logits, MASKED_LOGIT)
    probs = jax.nn.softmax(logits, axis=-1).astype(dtype).reshape(B, K, T * G, S)
    out = jax.lax.dot_general(
        probs, vv, (((3,), (2,)), ((0, 1), (0, 1))), preferred_element_type=jnp.float32
    )  # [B, K, T*G, H]
    out = out.reshape(B, K, T, G, H).transpose(0, 2, 1, 3, 4)
    return out.reshape(B, T, N, H).astype(q.dtype)


class Attention(nnx.Module):
    """Multi-head attention with Gemma's projections, QK-norm, RoPE and soft-cap.

    Parameter names follow the official checkpoints: `q_einsum` [N, D, H] and `kv_einsum`
    [2, K, D, H], or a fused `qkv_einsum` [3, N, D, H] when N == K; `attn_vec_einsum` [N, H, D];
    `_query_norm` / `_key_norm` [H] for Gemma 3.
    """

    def __init__(self, config: Config, kind: AttentionKind, *, param_dtype, rngs: nnx.Rngs):
        N, K, D, H = config.num_heads, config.num_kv_heads, config.embed_dim, config.head_dim
        if config.uses_qkv_einsum:
            self.qkv_einsum = Einsum(
                "BTD,CNDH->CBTNH", (3, N, D, H), param_dtype=param_dtype, rngs=rngs
            )
        else:
            self.q_einsum = Einsum("BTD,NDH->BTNH", (N, D, H), param_dtype=param_dtype, rngs=rngs)
            self.kv_einsum = Einsum(
                "BTD,CKDH->CBTKH", (2, K, D, H), param_dtype=param_dtype, rngs=rngs
            )
        self.attn_vec_einsum = Einsum(
            "BTNH,NHD->BTD", (N, H, D), param_dtype=param_dtype, rngs=rngs
        )
        if config.use_qk_norm:
            self._query_norm = RMSNorm(H, param_dtype=param_dtype, eps=config.norm_eps)
            self._key_norm = RMSNorm(H, param_dtype=param_dtype, eps=config.norm_eps)
        self.kind = kind
        self.use_qk_norm = config.use_qk_norm
        self.query_scale = config.query_pre_attn_scalar**-0.5
        self.logit_cap = config.attn_logit_softcap

    def project(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """[B, T, D] -> scaled, rotated queries [B, T, N, H]; rotated keys, values [B, T, K, H]."""
        if hasattr(self, "qkv_einsum"):
            q, k, v = self.qkv_einsum(x)
        else:
            q = self.q_einsum(x)
            k, v = self.kv_einsum(x)
        if self.use_qk_norm:
            q = self._query_norm(q)
            k = self._key_norm(k)
        q = apply_rope(q, positions, base=self.kind.rope_base, scale=self.kind.rope_scale)
        k = apply_rope(k, positions, base=self.kind.rope_base, scale=self.kind.rope_scale)
        return q * jnp.asarray(self.query_scale, q.dtype), k, v

    def layer_mask(self, mask: jax.Array, q_positions: jax.Array, k_positions: jax.Array):
        """Narrows the model-wide mask to this layer's sliding window, if it has one."""
        if isinstance(self.kind, LocalAttention):
            return mask & sliding_window_mask(q_positions, k_positions, self.kind.window)
        return mask

    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        mask: jax.Array | None,
        cache: dict | None = None,
        index: jax.Array | None = None,
        fresh: bool = False,
    ) -> tuple[jax.Array, dict | None]:
        """Attention of x [B, T, D] (positions [B, T]) -> ([B, T, D], updated layer cache).

        Without a cache the keys are x's own and `mask` [B, T, T] is the model-wide mask.
        With a cache (see gemma_kit.cache) the T new keys are written at token `index` and the
        mask comes from the slot positions; `mask`, if given ([B, T, T] over the new keys, e.g.
        causal plus bidirectional image blocks), replaces the causal part among the new keys,
        while cached keys, all earlier, are seen causally. A single token ignores it.
          T == 1 (a decode step): write first, then attend over the slots. In a ring of W slots
            the overwritten entry is W positions back, just outside the window.
          fresh (the first prefill, cache known empty): attend to the new keys alone.
          otherwise (a chat turn added to a filled cache): attend over old slots + new keys,
            then write; writing first could evict keys the earlier new queries still need.
        """
        q, k, v = self.project(x, positions)
        if cache is None:
            k_pos, new_cache = positions, None
            if mask is None:
                mask = causal_mask(positions, positions)
        else:
            new_cache = kv_cache.write(cache, k, v, positions, index)
            # The new keys as the cache stores them, so that a token attends to the same
            # (rounded) keys whether it is prefilled or decoded later.
            k, v = k.astype(cache["k"].dtype), v.astype(cache["v"].dtype)
            if x.shape[1] == 1:
                k, v, k_pos = new_cache["k"], new_cache["v"], new_cache["pos"]
                mask = None  # one token: its own block is itself, which causality covers
            elif fresh:
                k_pos = positions
            else:
                k = jnp.concatenate([cache["k"], k], axis=1)
                v = jnp.concatenate([cache["v"], v], axis=1)
                k_pos = jnp.concatenate([cache["pos"], positions], axis=1)
                if mask is not None:
                    mask = jnp.concatenate([causal_mask(positions, cache["pos"]), mask], axis=-1)
            causal = causal_mask(positions, k_pos) if mask is None else mask
            mask = causal & (k_pos >= 0)[:, None, :]
        mask = self.layer_mask(mask, positions, k_pos)
        encoded = attend(q, k, v, mask, logit_cap=self.logit_cap)
        return self.attn_vec_einsum(encoded), new_cache
