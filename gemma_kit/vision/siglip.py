"""The SigLIP image encoder of Gemma 3 (ViT So400m/14) and its pooling to soft tokens.

Module and parameter names are those of the official checkpoints, whose flat tree holds

    SigLiPFromPatches_0/siglip_encoder                 {pos_embedding: [1, P, W]}
    SigLiPFromPatches_0/siglip_encoder/embedding       {kernel: [p, p, 3, W], bias: [W]}
    .../Transformer/encoderblock_{j}/LayerNorm_0, LayerNorm_1           {scale, bias: [W]}
    .../Transformer/encoderblock_{j}/MultiHeadDotProductAttention_0/{query,key,value}
                                                       {kernel: [W, N, H], bias: [N, H]}
    .../Transformer/encoderblock_{j}/MultiHeadDotProductAttention_0/out
                                                       {kernel: [N, H, W], bias: [W]}
    .../Transformer/encoderblock_{j}/MlpBlock_0/Dense_0 {kernel: [W, F], bias: [F]}
    .../Transformer/encoderblock_{j}/MlpBlock_0/Dense_1 {kernel: [F, W], bias: [W]}
    .../Transformer/encoder_norm                       {scale, bias: [W]}

(the official library writes these Flax linen names; google-deepmind/gemma
`gemma/gm/nn/vision/_vision_utils.py`, `_vision.py`). Inside a gemma_kit Transformer the
encoder is the submodule `vision_encoder`, the name the official nested layout uses.

Letters used here (listed in gemma_kit.layers' glossary too): I images, P patches per image (4096),
W encoder width (1152), M soft tokens per image (256), p patch side in pixels (14), c colour
channels (3). N, H and F are the encoder's heads (16), head dim (72) and MLP hidden dim (4304).

The encoder computes in float32 whatever the text model does: the released checkpoints store
it in float32, and its 4096-token attention and LayerNorm statistics are where low precision
would hurt first.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from gemma_kit.attention import attend
from gemma_kit.config import VisionConfig
from gemma_kit.errors import ImageError


class Dense(nnx.Module):
    """A weight `kernel` (with a `bias`) applied by a fixed einsum equation, as Flax linen's
    Dense / DenseGeneral store them.

    gemma_kit's Einsum is the text model's projection (one weight named `w`, no bias); the
    encoder's checkpoint names and biases need this small sibling.
    """

    def __init__(self, equation: str, kernel_shape, bias_shape, *, param_dtype, rngs: nnx.Rngs):
        self.equation = equation
        init = jax.nn.initializers.lecun_normal(in_axis=0, out_axis=-1)
        self.kernel = nnx.Param(init(rngs.params(), tuple(kernel_shape), param_dtype))
        self.bias = nnx.Param(jnp.zeros(tuple(bias_shape), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.einsum(self.equation, x, self.kernel[...].astype(x.dtype))
        return y + self.bias[...].astype(x.dtype)


class LayerNorm(nnx.Module):
    """(x - mean) / sqrt(var + eps) * scale + bias over the last axis (statistics in float32)."""

    def __init__(self, dim: int, *, param_dtype, eps: float):
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((dim,), param_dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        normed = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        out = normed * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return out.astype(x.dtype)


class MultiHeadDotProductAttention(nnx.Module):
    """Full (bidirectional) self-attention over the patches of one image."""

    def __init__(self, config: VisionConfig, *, param_dtype, rngs: nnx.Rngs):
        W, N, H = config.width, config.num_heads, config.head_dim

        def projection() -> Dense:
            return Dense("IPW,WNH->IPNH", (W, N, H), (N, H), param_dtype=param_dtype, rngs=rngs)

        self.query, self.key, self.value = projection(), projection(), projection()
        self.out = Dense("IPNH,NHW->IPW", (N, H, W), (W,), param_dtype=param_dtype, rngs=rngs)
        self.scale = H**-0.5

    def __call__(self, x: jax.Array) -> jax.Array:
        q = self.query(x) * jnp.asarray(self.scale, x.dtype)
        k, v = self.key(x), self.value(x)
        # Every patch sees every patch: a constant all-true mask, which XLA folds away.
        everywhere = jnp.ones((1, 1, 1), bool)
        return self.out(attend(q, k, v, everywhere, logit_cap=None))


class MlpBlock(nnx.Module):
    """Dense -> gelu (tanh approximation, Flax's default) -> Dense."""

    def __init__(self, config: VisionConfig, *, param_dtype, rngs: nnx.Rngs):
        W, F = config.width, config.mlp_dim
        self.Dense_0 = Dense("IPW,WF->IPF", (W, F), (F,), param_dtype=param_dtype, rngs=rngs)
        self.Dense_1 = Dense("IPF,FW->IPW", (F, W), (W,), param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.Dense_1(jax.nn.gelu(self.Dense_0(x), approximate=True))


class EncoderBlock(nnx.Module):
    """Pre-LayerNorm ViT block: x + attn(LN(x)), then + mlp(LN(.))."""

    def __init__(self, config: VisionConfig, *, param_dtype, rngs: nnx.Rngs):
        W, eps = config.width, config.norm_eps
        self.LayerNorm_0 = LayerNorm(W, param_dtype=param_dtype, eps=eps)
        self.MultiHeadDotProductAttention_0 = MultiHeadDotProductAttention(
            config, param_dtype=param_dtype, rngs=rngs
        )
        self.LayerNorm_1 = LayerNorm(W, param_dtype=param_dtype, eps=eps)
        self.MlpBlock_0 = MlpBlock(config, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.MultiHeadDotProductAttention_0(self.LayerNorm_0(x))
        return x + self.MlpBlock_0(self.LayerNorm_1(x))


class Encoder(nnx.Module):
    """`depth` blocks then the final LayerNorm (official name: `Transformer`)."""

    def __init__(self, config: VisionConfig, *, param_dtype, rngs: nnx.Rngs):
        self.depth = config.depth
        for j in range(config.depth):
            setattr(
                self, f"encoderblock_{j}", EncoderBlock(config, param_dtype=param_dtype, rngs=rngs)
            )
        self.encoder_norm = LayerNorm(config.width, param_dtype=param_dtype, eps=config.norm_eps)

    def __call__(self, x: jax.Array) -> jax.Array:
        for j in range(self.depth):
            x = getattr(self, f"encoderblock_{j}")(x)
        return self.encoder_norm(x)


class ViTModel(nnx.Module):
    """Patch embedding (a stride-p convolution), learned position embedding, encoder.

    Call: pixels [I, S, S, c] (S = image_size, values in [-1, 1]) -> [I, P, W].
    """

    def __init__(self, config: VisionConfig, *, param_dtype, rngs: nnx.Rngs):
        W, p = config.width, config.patch_size
        self.config = config
        # A convolution with stride = kernel = p is one matmul per patch; stored as Flax's Conv
        # kernel [p, p, c, W] (rows, columns, input channels, output channels).
        self.embedding = Dense(
            "IPpqc,pqcW->IPW", (p, p, 3, W), (W,), param_dtype=param_dtype, rngs=rngs
        )
        init = jax.nn.initializers.normal(W**-0.5)
        self.pos_embedding = nnx.Param(init(rngs.params(), (1, config.num_patches, W), param_dtype))
        self.Transformer = Encoder(config, param_dtype=param_dtype, rngs=rngs)

    def patches(self, pixels: jax.Array) -> jax.Array:
        """[I, S, S, c] -> [I, P, p, p, c], patches in row-major order of the patch grid."""
        I, S, _, c = pixels.shape
        p, side = self.config.patch_size, self.config.patches_per_side
        x = pixels.reshape(I, side, p, side, p, c).transpose(0, 1, 3, 2, 4, 5)
        return x.reshape(I, side * side, p, p, c)

    def __call__(self, pixels: jax.Array) -> jax.Array:
        x = self.embedding(self.patches(pixels.astype(jnp.float32)))
        x = x + self.pos_embedding[...].astype(x.dtype)
        return self.Transformer(x)


def average_pool(x: jax.Array, config: VisionConfig) -> jax.Array:
    """[I, P, W] -> [I, M, W]: mean over square windows of the patch grid (4x4 for Gemma 3).

    Soft tokens stay in row-major order of the pooled grid, as in the official VisionExit.
    """
    I, _, W = x.shape
    side, k = config.patches_per_side, config.pool_window
    out = side // k
    x = x.reshape(I, out, k, out, k, W)
    return x.mean(axis=(2, 4)).reshape(I, out * out, W)


class SigLiPFromPatches(nnx.Module):
    """The whole image side of Gemma 3: pixels [I, S, S, 3] -> soft tokens [I, M, W].

    The text model's embedder then normalises and projects them (Embedder.encode_vision).
    """

    def __init__(
        self, config: VisionConfig, *, param_dtype=jnp.float32, rngs: nnx.Rngs | None = None
    ):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.config = config
        self.siglip_encoder = ViTModel(config, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, pixels: jax.Array) -> jax.Array:
        S = self.config.image_size
        if pixels.ndim != 4 or pixels.shape[1:] != (S, S, 3):
            raise ImageError(
                f"pixels must be [images, {S}, {S}, 3], got shape {tuple(pixels.shape)}; "
                "prepare images with gemma_kit.vision.preprocess_image"
            )
        soft = average_pool(self.siglip_encoder(pixels), self.config)
        # The encoder stays frozen when the text model is trained, as in the official code
        # (SigLiPFromPatches.apply_stop_gradient) and the Gemma 3 report.
        return jax.lax.stop_gradient(soft)
