"""Small building blocks: Einsum, RMSNorm, RoPE and soft-capping.

Dimension glossary, used in every einsum equation and docstring of gemma_kit:

    B  batch                     T  query length            S  key (or cache) length
    D  embed dim                 N  query heads             K  key/value heads
    G  query heads per kv head   H  head dim                F  feed-forward hidden dim
    V  vocabulary                C  a stacked-weights axis  L  layers
    R  LoRA rank

and for images (gemma_kit.vision): I images, P patches per image, W encoder width, M soft tokens
per image, p patch side in pixels, c colour channels.

Parameters may be stored in a narrower dtype (bf16, or int8 with scales) than the activations
(float32). Such a weight multiplies bf16-rounded activations and accumulates in float32 on every
path (`matmul_dtype`), the numerics of bf16 inference everywhere; how the product is computed
depends on its shape, because XLA's CPU backend is fast at different things for each
(measured by the scripts in benchmarks/):
  * bf16 weights: a bf16 x bf16 product with float32 accumulation, which XLA runs through its
    GEMM library (the CPU's bf16 units), ~10x faster than upcasting several rows (XLA
    materialises a float32 copy of the weight first), and the native form on accelerators.
    `matmul_t` pads fewer than MIN_ROWS rows with zero rows: one row alone takes a
    matrix-vector path ~35x slower, and a few rows a slower GEMM kernel;
  * int8 weights, one activation row (int8 decoding at batch 1): the weight is upcast inside
    the computation, fused into a matrix-vector loop that reads one byte per weight; a
    several-row product materialises a bf16 copy of the weight, so int8 is for batch 1.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def _normal(stddev: float):
    return jax.nn.initializers.normal(stddev)


def matmul_dtype(stored, activations) -> jnp.dtype:
    """The dtype in which activations of dtype `activations` meet a weight stored as `stored`.

    bf16 for float32 activations against bf16 or int8 (scaled) weights, the activations'
    dtype otherwise. The product always accumulates in the activations' dtype.
    """
    stored, activations = jnp.dtype(stored), jnp.dtype(activations)
    if activations == jnp.float32 and stored in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.int8)):
        return jnp.dtype(jnp.bfloat16)
    return activations


# Narrow products of fewer rows are padded to this many with zero rows, whose outputs are
# dropped. On the 2-core CPU of benchmarks/bench_sampler.py, the 18 blocks of a batch-1 decode
# step of Gemma 3 270M (bf16, 200 MB of weights) took ~25 ms as a matrix-vector loop over
# upcast weights, 19 ms padded to 2 rows, 15 ms padded to 8: the extra rows cost no extra
# reads, and the GEMM kernel streams the weights faster.
MIN_ROWS = 8


def matmul_t(x: jax.Array, weight, stored, scale: jax.Array | None = None) -> jax.Array:
    """x [M, I] @ W^T for W [O, I] given as weight(dtype) (the stored W cast, inside the jit).

    Computes in matmul_dtype(stored, x.dtype), choosing the fast form (module docstring): int8
    weights against one row are upcast; otherwise a narrow product with wide accumulation runs
    on at least MIN_ROWS rows. Either way x is rounded first, so every form and every M gives
    the same products. `scale` [O], if given, multiplies the product's columns: the per-row
    scales of int8 weights, applied to O outputs rather than to O x I weights (and exactly:
    int8 values are exact in bf16, so only x is rounded).
    """
    dtype = matmul_dtype(stored, x.dtype)
    rows = x.shape[0]
    if dtype == x.dtype:
        y = x @ weight(dtype).T
    elif rows == 1 and jnp.dtype(stored) == jnp.int8:
        y = x.astype(dtype).astype(x.dtype) @ weight(x.dtype).T
    else:
        # Contracting the last axis of both operands as they are: written as matmul(x, w.T),
        # XLA's CPU backend upcasts both operands to float32 before the dot (measured ~10x
        # slower).
        padded = jnp.pad(x.astype(dtype), ((0, max(0, MIN_ROWS - rows)), (0, 0)))
        y = jax.lax.dot_general(padded, weight(dtype), (((1,), (1,)), ((), ())),
                                preferred_element_type=x.dtype)[:rows]
    return y if scale is None else y * scale.astype(y.dtype)


class Einsum(nnx.Module):
    """A weight `w` applied to activations with a fixed einsum equation, e.g. "BTD,NDH->BTNH".

    The parameter is called `w` and has the official shape, so the state tree of a model equals
    the checkpoint tree. `to_matvec_layout` can re-store `w` with its contracted axes last
    (see there); `__call__` gives the same result either way.
    """

    def __init__(self, equation: str, shape: Sequence[int], *, param_dtype, rngs: nnx.Rngs,
                 stddev: float = 0.02):
        inputs, self.out_spec = equation.replace(" ", "").split("->")
        self.x_spec, self.w_spec = inputs.split(",")
        self.equation = equation
        if len(self.w_spec) != len(shape):
            raise ValueError(f"equation {equation!r} does not fit a weight of shape {shape}")
        self.w = nnx.Param(_normal(stddev)(rngs.params(), tuple(shape), param_dtype))
        # Letters of w that are contracted with x, in x's order; they must end x's spec.
        self.contracted = "".join(c for c in self.x_spec if c in self.w_spec and c not in self.out_spec)
        if not self.x_spec.endswith(self.contracted):
            raise ValueError(f"{equation!r}: contracted dims must be the last dims of x")
        self.matvec = False  # True once w is stored as [kept axes..., contracted axes...]
        # Hooks, both empty unless set by another module:
        # - w_scale: set by gemma_kit.quant when `w` holds int8 values; a per-output-channel
        #   scale of w's shape with the contracted axes kept at size 1. The product is taken
        #   with the int8 values themselves (exact in bf16) and its outputs are scaled, inside
        #   the caller's compiled computation: memory holds, and a matmul reads, one byte per
        #   weight.
        # - lora: set by gemma_kit.lora; a module adding (alpha / r) * x A B to the output.
        self.w_scale: Any = nnx.data(None)
        self.lora: Any = nnx.data(None)  # a gemma_kit.lora.LoRA once set

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self._base(x)
        if self.lora is not None:
            y = y + self.lora(x)
        return y

    def _base(self, x: jax.Array) -> jax.Array:
        dtype = matmul_dtype(self.w[...].dtype, x.dtype)
        if not self.matvec:
            n_in = int(np.prod(x.shape[len(x.shape) - len(self.contracted):]))
            w = self.w[...]
            # One row upcasts (a one-row bf16 x bf16 product is ~35x slower on CPU); the CPU
            # sampler uses the matvec layout instead, where matmul_t pads the rows.
            if dtype == x.dtype or x.size == n_in:
                y = jnp.einsum(self.equation, x.astype(dtype).astype(x.dtype), w.astype(x.dtype))
            else:
                y = jnp.einsum(self.equation, x.astype(dtype), w.astype(dtype),
                               preferred_element_type=x.dtype)
            return y if self.w_scale is None else y * self._scale_for_output(y.dtype)
        # w is [kept..., contracted...]: a plain x2 @ w2.T contracting W's contiguous axis, the
        # form matmul_t's fast paths need.
        kept = "".join(c for c in self.w_spec if c not in self.contracted)
        batch = self.x_spec[: len(self.x_spec) - len(self.contracted)]
        shape = self.w[...].shape
        n_in = int(np.prod(shape[len(kept):]))
        scale = None if self.w_scale is None else self.w_scale[...].reshape(-1)
        y = matmul_t(x.reshape(-1, n_in), lambda d: self.w[...].astype(d).reshape(-1, n_in),
                     self.w[...].dtype, scale)
        y = y.reshape(*x.shape[: len(batch)], *shape[: len(kept)])
        return jnp.transpose(y, [(batch + kept).index(c) for c in self.out_spec])

    def _scale_for_output(self, dtype) -> jax.Array:
        """The int8 scale (w's shape, contracted axes of size 1) arranged to broadcast against
        the einsum's output: kept letters in output order, size 1 for x's batch letters."""
        kept = "".join(c for c in self.w_spec if c not in self.contracted)
        scale = self.w_scale[...].astype(dtype).reshape(
            [n for c, n in zip(self.w_spec, self.w[...].shape) if c in kept])
        in_out_order = "".join(c for c in self.out_spec if c in kept)
        scale = jnp.einsum(f"{kept}->{in_out_order}", scale)
        return scale.reshape([scale.shape[in_out_order.index(c)] if c in kept else 1
                              for c in self.out_spec])

    def matvec_permutation(self) -> tuple[int, ...]:
        """Axes of the official `w` in matvec-layout order: kept axes, then contracted ones."""
        kept = [i for i, c in enumerate(self.w_spec) if c not in self.contracted]
        return tuple(kept) + tuple(self.w_spec.index(c) for c in self.contracted)


def to_matvec_layout(model: nnx.Module) -> nnx.Module:
    """A copy of `model` whose Einsum weights are stored contracted-axes-last.

    On CPU, XLA streams the weights fastest when x @ W^T contracts W's contiguous last axis
    (matmul_t); a contraction over a leading axis of W (the official [F, D] `linear`,
    [N, H, D] `attn_vec_einsum`) falls back to a path several times slower at decode sizes,
    so the sampler uses this layout on CPU. It costs one transposed copy of the layer weights;
    never save such a copy as a checkpoint (`gemma_kit.save_checkpoint` refuses).
    """
    graphdef, state = nnx.split(model)
    copy = nnx.merge(graphdef, state)
    for _, module in copy.iter_modules():
        if isinstance(module, Einsum) and not module.matvec:
            perm = module.matvec_permutation()
            # type(...) keeps the variable kind (an int8 weight stays an int8 weight).
            module.w = type(module.w)(jnp.transpose(module.w[...], perm))
            if module.w_scale is not None:
                module.w_scale = type(module.w_scale)(jnp.transpose(module.w_scale[...], perm))
            module.matvec = True
    return copy


class RMSNorm(nnx.Module):
    """RMSNorm with a zero-centred scale: x / rms(x) * (1 + scale).

    The statistics and the (1 + scale) product are taken in float32 and only the result is cast
    back: with bf16 activations a bf16 mean of squares loses most of its mantissa, and Gemma was
    trained with the multiplication done before the cast.
    """

    def __init__(self, dim: int, *, param_dtype, eps: float = 1e-6):
        self.scale = nnx.Param(jnp.zeros((dim,), param_dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        normed = x32 * jax.lax.rsqrt(var + self.eps)
        return (normed * (1.0 + self.scale[...].astype(jnp.float32))).astype(x.dtype)


def apply_rope(
    x: jax.Array, positions: jax.Array, *, base: float, scale: float = 1.0
) -> jax.Array:
    """Rotary position embedding, half-split form (the first H/2 features pair with the last).

    Args:
      x: [B, T, N, H] queries or keys.
      positions: [B, T] absolute positions (integers; pads may hold anything).
      base: the base frequency (10k for local layers, 1M for Gemma 3 global layers).
      scale: positions are divided by this before rotating (Gemma 3 4B+ global layers: 8).
    Returns:
      [B, T, N, H], same dtype as x. Angles are computed in float32: at positions in the
      tens of thousands a bf16 angle would be off by whole radians.
    """
    if scale < 1.0:
        raise ValueError(f"RoPE scale must be >= 1, got {scale}")
    half = x.shape[-1] // 2
    inv_freq = base ** (-jnp.arange(half, dtype=jnp.float32) / half)  # [H/2]
    angles = positions.astype(jnp.float32)[..., None] / scale * inv_freq  # [B, T, H/2]
    sin = jnp.sin(angles)[:, :, None, :]
    cos = jnp.cos(angles)[:, :, None, :]
    x32 = x.astype(jnp.float32)
    first, second = x32[..., :half], x32[..., half:]
    rotated = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
    return rotated.astype(x.dtype)


def softcap(x: jax.Array, cap: float | None) -> jax.Array:
    """cap * tanh(x / cap): bounds logits smoothly to (-cap, cap). Gemma 2 uses it twice."""
    if cap is None:
        return x
    return jnp.tanh(x / cap) * cap
