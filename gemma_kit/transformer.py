"""The Gemma 2 / Gemma 3 decoder: Embedder, FeedForward, Block and Transformer.

The NNX state tree of `Transformer` is the official checkpoint tree: `embedder/input_embedding`,
`layer_{i}/attn/q_einsum/w`, `layer_{i}/mlp/gating_einsum/w`, `final_norm/scale`, ... so that
loading a checkpoint is a restore into this tree (see gemma_kit.checkpoint).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gemma_kit import int4
from gemma_kit.attention import Attention, attention_mask, image_blocks
from gemma_kit.config import Config
from gemma_kit.errors import ConfigError, ImageError
from gemma_kit.layers import Einsum, RMSNorm, matmul_t, softcap
from gemma_kit.vision import prompt as image_prompt
from gemma_kit.vision.siglip import SigLiPFromPatches


class Embedder(nnx.Module):
    """Token embedding, shared with the output projection (tied weights).

    With `vision_width` it also holds the multimodal projection of Gemma 3 4B+ (official names):
    `mm_soft_embedding_norm` (RMSNorm over the encoder width W) and `mm_input_projection`
    ([W, D]), which map the image encoder's soft tokens into the embedding space.
    """

    def __init__(
        self,
        vocab_size: int,
        embed_dim: int,
        *,
        param_dtype,
        rngs: nnx.Rngs,
        vision_width: int | None = None,
        vision_param_dtype=jnp.float32,
    ):
        init = jax.nn.initializers.normal(1.0)
        # A Param, or a frozen Variable holding quantized values (gemma_kit.quant).
        self.input_embedding: nnx.Variable = nnx.Param(
            init(rngs.params(), (vocab_size, embed_dim), param_dtype)
        )
        # Set by gemma_kit.quant when the table holds int8 values: a float32 scale per
        # vocabulary row, [V, 1], and the name of the dtype the table had (it rounds sqrt(D)).
        # For int4 values (a uint8 table, gemma_kit.int4): each group's scale and minimum in
        # one uint32 word, [V, D/32].
        self.input_embedding_scale: Any = nnx.data(None)
        self.normalizer_dtype: str | None = None
        if vision_width is not None:
            self.mm_soft_embedding_norm = RMSNorm(vision_width, param_dtype=vision_param_dtype)
            self.mm_input_projection = Einsum(
                "IMW,WD->IMD", (vision_width, embed_dim), param_dtype=vision_param_dtype, rngs=rngs
            )

    def encode_vision(self, soft_tokens: jax.Array) -> jax.Array:
        """[I, M, W] soft tokens of the image encoder -> [I, M, D] embeddings.

        Not multiplied by sqrt(D): the projection was trained to land where scaled token
        embeddings are (official Embedder.encode_vision; transformers' projector likewise).
        """
        return self.mm_input_projection(self.mm_soft_embedding_norm(soft_tokens))

    def encode(self, tokens: jax.Array, dtype) -> jax.Array:
        """[B, T] ids -> [B, T, D] embeddings times sqrt(D).

        sqrt(D) is rounded to the weights' dtype first, as in the official code and in
        transformers: bf16 checkpoints were trained with that rounded factor (sqrt(640) is
        25.298 exactly but 25.25 in bf16).
        """
        table = self.input_embedding[...]
        packed = self._int4_table()
        width = packed.shape[1] if packed is not None else table.shape[1]
        normalizer = jnp.asarray(np.sqrt(width), self.normalizer_dtype or table.dtype)
        normalizer = normalizer.astype(dtype)
        if packed is not None:
            rows = int4.gather_rows(packed, tokens, dtype)
        else:
            rows = table[tokens].astype(dtype)
            if self.input_embedding_scale is not None:
                rows = rows * self.input_embedding_scale[...][tokens].astype(dtype)
        return rows * normalizer

    def decode(self, x: jax.Array) -> jax.Array:
        """[B, T, D] -> [B, T, V] logits against the embedding table.

        Written as x @ E^T (layers.matmul_t) rather than an einsum: XLA's CPU backend streams
        the table fastest in that form (matmul_t picks the compiled form per CPU), ~10x faster
        for one token than the dot_general an einsum over E's last axis lowers to.
        """
        table = self.input_embedding[...]
        packed = self._int4_table()
        if packed is not None:
            logits = matmul_t(x.reshape(-1, x.shape[-1]), packed, None)
            return logits.reshape(*x.shape[:-1], packed.shape[0])
        scale = self.input_embedding_scale
        logits = matmul_t(
            x.reshape(-1, x.shape[-1]),
            table.astype,
            table.dtype,
            None if scale is None else scale[...].reshape(-1),
        )
        return logits.reshape(*x.shape[:-1], table.shape[0])

    def _int4_table(self) -> int4.Int4Matrix | None:
        """The table as an Int4Matrix when gemma_kit.quant packed it (uint8 values)."""
        table = self.input_embedding[...]
        if table.dtype != jnp.uint8:
            return None
        return int4.Int4Matrix(table, self.input_embedding_scale[...])


class FeedForward(nnx.Module):
    """GeGLU: gelu_tanh(x W_gate) * (x W_up), then W_down.

    `gating_einsum` stacks W_gate and W_up on a leading axis of 2 ([2, F, D]; Gemma 2 2B stores
    [2, D, F]); `linear` is W_down [F, D].
    """

    def __init__(self, config: Config, *, param_dtype, rngs: nnx.Rngs):
        D, F = config.embed_dim, config.hidden_dim
        if config.transpose_gating:
            self.gating_einsum = Einsum(
                "BTD,CFD->CBTF", (2, F, D), param_dtype=param_dtype, rngs=rngs
            )
        else:
            self.gating_einsum = Einsum(
                "BTD,CDF->CBTF", (2, D, F), param_dtype=param_dtype, rngs=rngs
            )
        self.linear = Einsum("BTF,FD->BTD", (F, D), param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        gate, up = self.gating_einsum(x)
        return self.linear(jax.nn.gelu(gate, approximate=True) * up)


class Block(nnx.Module):
    """Pre- and post-normed attention and feed-forward, each added to the residual stream."""

    def __init__(self, config: Config, layer: int, *, param_dtype, rngs: nnx.Rngs):
        D, eps = config.embed_dim, config.norm_eps
        self.pre_attention_norm = RMSNorm(D, param_dtype=param_dtype, eps=eps)
        self.attn = Attention(config, config.layers[layer], param_dtype=param_dtype, rngs=rngs)
        self.post_attention_norm = RMSNorm(D, param_dtype=param_dtype, eps=eps)
        self.pre_ffw_norm = RMSNorm(D, param_dtype=param_dtype, eps=eps)
        self.mlp = FeedForward(config, param_dtype=param_dtype, rngs=rngs)
        self.post_ffw_norm = RMSNorm(D, param_dtype=param_dtype, eps=eps)

    def __call__(self, x, positions, mask, cache=None, index=None, fresh=False):
        """-> (x [B, T, D], updated layer cache or None); arguments as for Attention."""
        attn, cache = self.attn(self.pre_attention_norm(x), positions, mask, cache, index, fresh)
        h = x + self.post_attention_norm(attn)
        return h + self.post_ffw_norm(self.mlp(self.pre_ffw_norm(h))), cache


def default_positions(tokens: jax.Array, valid: jax.Array | None) -> jax.Array:
    """Positions 0, 1, 2, ... of each row's real tokens (pads before them get position 0)."""
    if valid is None:
        return jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    return jnp.maximum(jnp.cumsum(valid.astype(jnp.int32), axis=-1) - 1, 0)


class Transformer(nnx.Module):
    """A Gemma text model: `model(tokens) -> logits [B, T, V]`.

    Args:
      config: the static configuration (see gemma_kit.config).
      param_dtype: dtype the weights are stored in (bf16 halves memory and bandwidth).
      dtype: dtype activations are computed in. float32 by default: on CPU it is also the
        fastest (narrow weights meet bf16-rounded activations inside the compiled step, see
        gemma_kit.layers); pass bfloat16 on accelerators.
    """

    def __init__(
        self,
        config: Config,
        *,
        param_dtype=jnp.float32,
        dtype=jnp.float32,
        rngs: nnx.Rngs | None = None,
        with_vision: bool = False,
    ):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.config = config
        self.dtype = jnp.dtype(dtype)
        vision = config.vision if with_vision else None
        if with_vision and vision is None:
            raise ConfigError(
                f"Config {config.name!r} has no image encoder (has_vision=False); build it with "
                "with_vision=False, or use a Gemma 3 4B/12B/27B config"
            )
        vision_width = vision.width if vision is not None else None
        self.embedder = Embedder(
            config.vocab_size,
            config.embed_dim,
            param_dtype=param_dtype,
            rngs=rngs,
            vision_width=vision_width,
        )
        for i in range(config.num_layers):
            setattr(self, f"layer_{i}", Block(config, i, param_dtype=param_dtype, rngs=rngs))
        self.final_norm = RMSNorm(config.embed_dim, param_dtype=param_dtype, eps=config.norm_eps)
        if vision is not None:
            # float32 whatever param_dtype says: the released checkpoints store the encoder so.
            self.vision_encoder = SigLiPFromPatches(vision, param_dtype=jnp.float32, rngs=rngs)

    @property
    def blocks(self) -> list[Block]:
        return [getattr(self, f"layer_{i}") for i in range(self.config.num_layers)]

    @property
    def has_vision(self) -> bool:
        """Whether this model holds an image encoder (and so accepts images)."""
        return hasattr(self, "vision_encoder")

    def require_vision(self) -> None:
        """Raises ImageError when this model cannot take images."""
        if not self.has_vision:
            raise ImageError(
                f"this {self.config.name} model has no image encoder, so it cannot read images: "
                "load a Gemma 3 4B/12B/27B checkpoint with its vision weights (load_model's "
                "default), or send text only"
            )

    def encode_images(self, pixels: jax.Array) -> jax.Array:
        """Preprocessed images [I, S, S, 3] (gemma_kit.vision.preprocess) -> [I, M, D].

        The embeddings that go into the soft-token slots, in the compute dtype. The encoder
        itself runs in float32.
        """
        self.require_vision()
        soft = self.vision_encoder(jnp.asarray(pixels, jnp.float32))
        return self.embedder.encode_vision(soft).astype(self.dtype)

    def _embed(self, tokens: jax.Array, images, image_embeddings):
        """Token embeddings [B, T, D] with image embeddings merged at the soft-token slots, and
        the slots' image block ids [B, T] (None without images)."""
        if images is None and image_embeddings is None:
            return self.embedder.encode(tokens, self.dtype), None
        if images is not None:
            images = jnp.asarray(images)
            if images.ndim != 5:
                raise ImageError(
                    f"images must be [batch, images per row, S, S, 3], got shape {images.shape}"
                )
            B, I = images.shape[:2]
            image_embeddings = self.encode_images(images.reshape(B * I, *images.shape[2:]))
            image_embeddings = image_embeddings.reshape(B, I, *image_embeddings.shape[1:])
        else:
            self.require_vision()
        soft = image_prompt.soft_token_mask(tokens)
        x = self.embedder.encode(jnp.where(soft, 0, tokens), self.dtype)
        return image_prompt.merge_embeddings(x, image_embeddings, soft), image_blocks(soft)

    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array | None = None,
        mask: jax.Array | None = None,
        *,
        images: jax.Array | None = None,
        image_embeddings: jax.Array | None = None,
    ) -> jax.Array:
        """Logits of every position.

        Args:
          tokens: [B, T] int token ids.
          positions: [B, T] absolute positions. Default: counted over the real tokens of `mask`
            (so a left-padded row starts at 0), or 0..T-1 without a mask.
          mask: either [B, T] (True/1 for real tokens, False/0 for padding; attention is then
            causal over positions) or a full [B, T, T] boolean attention mask used as given.
            Default: all tokens real. Local layers narrow either to their sliding window.
          images: [B, I, S, S, 3] preprocessed images (gemma_kit.vision.preprocess), the I
            images of each row in the order of its soft-token slots (rows with fewer images are
            padded with anything). `tokens` then holds SOFT_TOKEN (-2) at the slots
            (gemma_kit.vision.prompt.expand_markers), whose soft tokens attend to those of the
            same image in both directions when the mask is built here ([B, T] or None).
          image_embeddings: instead of images, their encode_images() output [B, I, M, D].
        Returns:
          [B, T, V] logits in the compute dtype (final soft-cap applied for Gemma 2).
        """
        return self.logits(
            self.hidden_states(
                tokens, positions, mask, images=images, image_embeddings=image_embeddings
            )
        )

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Final hidden states [B, T, D] -> logits [B, T, V]."""
        return softcap(self.embedder.decode(hidden), self.config.final_logit_softcap)

    def hidden_states(
        self,
        tokens: jax.Array,
        positions: jax.Array | None = None,
        mask: jax.Array | None = None,
        *,
        images: jax.Array | None = None,
        image_embeddings: jax.Array | None = None,
    ) -> jax.Array:
        """Final-normed hidden states [B, T, D]; arguments as for `__call__`.

        Callers that need the logits of a few positions only (sampling) project those alone:
        the [D, V] output projection is the largest matmul of a small model.
        """
        tokens = jnp.asarray(tokens)
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [batch, length], got shape {tokens.shape}")
        valid = None
        if mask is not None:
            mask = jnp.asarray(mask).astype(bool)
            if mask.shape == tokens.shape:
                valid = mask
            elif mask.shape != (*tokens.shape, tokens.shape[1]):
                raise ValueError(
                    f"mask must be [B, T] = {tokens.shape} or [B, T, T], got {mask.shape}"
                )
        if positions is None:
            positions = default_positions(tokens, valid)
        positions = jnp.asarray(positions, jnp.int32)
        x, blocks = self._embed(tokens, images, image_embeddings)
        if mask is None or valid is not None:
            attn_mask = attention_mask(positions, valid=valid, blocks=blocks)
        else:
            attn_mask = mask
        for block in self.blocks:
            x, _ = block(x, positions, attn_mask)
        return self.final_norm(x)

    def extend(
        self,
        tokens: jax.Array,
        positions: jax.Array,
        cache: dict,
        *,
        fresh: bool = False,
        mask: jax.Array | None = None,
        image_embeddings: jax.Array | None = None,
    ) -> tuple[jax.Array, dict]:
        """Runs T new tokens against a KV cache (gemma_kit.cache) and writes them into it.

        Args:
          tokens: [B, T] ids; padding is marked by position -1 and never attended to.
          positions: [B, T] absolute positions (-1 for pads).
          cache: the cache; its "index" counts tokens written so far (pads included).
          fresh: the cache is known to be empty (the first prefill): attend to the new keys
            only, saving the work of scanning empty slots. A static Python bool.
          mask: an optional [B, T, T] mask among the new tokens replacing the causal one
            (bidirectional spans); cached tokens are seen causally, pads and sliding windows
            still apply.
          image_embeddings: [B, I, M, D] (encode_images) for the SOFT_TOKEN slots of `tokens`;
            the default mask then lets each image's slots see each other. An image's slots
            must all come in one call.
        Returns:
          (final hidden states [B, T, D], updated cache).
        """
        index = cache["index"]
        new_cache = {"index": index + tokens.shape[1]}
        x, blocks = self._embed(jnp.asarray(tokens), None, image_embeddings)
        if blocks is not None and mask is None:
            mask = attention_mask(positions, blocks=blocks)
        for i, block in enumerate(self.blocks):
            x, new_cache[f"layer_{i}"] = block(
                x, positions, mask, cache[f"layer_{i}"], index, fresh
            )
        return self.final_norm(x), new_cache
