"""int8 (or int4) weights with float32 (bf16) scales, dequantized inside the compiled computation.

Each Einsum weight is stored as int8 values q and a scale s per output channel (every kept axis;
the contracted axes are reduced, kept at size 1 so s broadcasts against q in the einsum's own
layout):

    s = max |w| over the contracted axes / 127,     q = round(w / s) in [-127, 127]

and the einsum multiplies the activations by q (exact in bf16) and its outputs by s, inside the
caller's jitted function, so memory holds one byte per weight. Symmetric rounding bounds each
weight's error by s / 2, i.e. by 1/254 of the largest weight of its channel.

The tied embedding table can be quantized the same way, with one scale per vocabulary row
(`embedding=True`): the logits projection, the largest read of a decode step, then reads a
quarter of the float32 bytes (a half of bf16's). The sampler's int8 mode does that; QLoRA (an
int8 frozen base with LoRA on top) leaves the table as it is.

The int8 values keep their names (`w`, `input_embedding`) with variable type `Int8Weight`, not
`nnx.Param`, so nothing trains them and save_checkpoint refuses them; `to_matvec_layout`
transposes `w` and its scale together, so the sampler runs on an int8 model unchanged.

int4 (`bits=4`): group-wise, a bf16 scale and minimum per 32 inputs (gemma_kit.int4 has the
format and its error bound, |w - (q s + m)| <= s / 2 = the group's range / 30). Each Einsum
weight is moved to the matvec layout (contracted axes last), flattened to [O, I] and packed two
values per byte (Int4Weight uint8 [O/2, I]; each group's scale and minimum in one word,
Int4Groups uint32 [O, I/32], in `w_scale`); `Einsum.matvec_shape` keeps the layout's
unflattened shape. The table, with `embedding=True`, is packed the same way along D (per 32
features of a row; words in input_embedding_scale): the logits read 5 bits per weight. Products of
5 or more rows (prefill, batches, training) dequantize each weight to bf16 inside the
computation first.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, TypeVar, cast

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gemma_kit import int4
from gemma_kit.errors import ConfigError
from gemma_kit.layers import Einsum

if TYPE_CHECKING:
    from gemma_kit.transformer import Transformer

ModuleT = TypeVar("ModuleT", bound=nnx.Module)


class Int8Weight(nnx.Variable):
    """The int8 values of a quantized Einsum weight (frozen: not an nnx.Param)."""


class Int8Scale(nnx.Variable):
    """Per-channel float32 scales of an Int8Weight, broadcastable against it."""


class Int4Weight(nnx.Variable):
    """int4 values of a quantized weight, two per byte (gemma_kit.int4; frozen)."""


class Int4Groups(nnx.Variable):
    """The bf16 scale and minimum of every group of 32 inputs of an Int4Weight, one uint32 word
    per group [O, I/32] (gemma_kit.int4)."""


def contracted_axes(einsum: Einsum) -> tuple[int, ...]:
    """Axes of the stored `w` that are contracted with x (the last one in the matvec layout's
    [O, I] matrix)."""
    if einsum.matvec:
        return (einsum.w.ndim - 1,)
    return tuple(i for i, c in enumerate(einsum.w_spec) if c in einsum.contracted)


@functools.partial(jax.jit, static_argnames="axes")
def quantize_int8(w: jax.Array, axes: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """w -> (int8 q, float32 scale with `axes` kept at size 1); w ~= q * scale."""
    w32 = w.astype(jnp.float32)
    absmax = jnp.max(jnp.abs(w32), axis=axes, keepdims=True)
    # An all-zero channel gets scale 1 (any value works; this avoids dividing by zero).
    scale = jnp.where(absmax > 0, absmax / 127.0, 1.0)
    q = jnp.clip(jnp.round(w32 / scale), -127, 127).astype(jnp.int8)
    return q, scale


def quantize_model(
    model: ModuleT,
    *,
    embedding: bool = False,
    einsums: bool = True,
    bits: int = 8,
    embedding_bits: int | None = None,
) -> ModuleT:
    """A copy of `model` whose Einsum weights are int8 with per-channel scales (or int4).

    embedding: also quantize the (tied) token embedding table, one scale per row (int4: per
      group of 32 features of a row).
    einsums: quantize the Einsum weights (default). `embedding=True, einsums=False` quantizes
      the table alone.
    bits: 8 (per-channel int8) or 4 (group-wise int4, module docstring).
    embedding_bits: the table's own bits (default: `bits`). `bits=4, embedding_bits=8` is what
      llama.cpp's Q4_0 files hold (int4 layers, an 8-bit table): the table is both the logits
      projection, where int4's error shows most, and on the AMD EPYC host its int8 product
      ran faster than int4's (docs/speed.md).
    The copy shares every other array (norms, LoRA factors, the image encoder) with `model`;
    the original model is unchanged. Weights already quantized are left as they are.
    """
    embedding_bits = bits if embedding_bits is None else embedding_bits
    for name, value in (("bits", bits), ("embedding_bits", embedding_bits)):
        if value not in (4, 8):
            raise ConfigError(f"{name}={value!r}: gemma_kit quantizes to 8 or 4 bits")
    if not (embedding or einsums):
        raise ConfigError("nothing to quantize: pass embedding=True, einsums=True, or both")
    graphdef, state = nnx.split(model)
    copy = nnx.merge(graphdef, state)
    if embedding:
        embedder = cast("Transformer", copy).embedder
        if embedder.input_embedding_scale is None:
            table = embedder.input_embedding[...]
            if not jnp.issubdtype(table.dtype, jnp.floating):
                raise ConfigError(f"cannot quantize an embedding of dtype {table.dtype}")
            embedder.normalizer_dtype = jnp.dtype(table.dtype).name
            if embedding_bits == 4:
                int4.check_shape(table.shape[0], table.shape[1], "the embedding table")
                m = int4.quantize(table)
                embedder.input_embedding = Int4Weight(m.packed)
                embedder.input_embedding_scale = Int4Groups(m.groups)
            else:
                q, scale = quantize_int8(table, (1,))
                embedder.input_embedding = Int8Weight(q)
                embedder.input_embedding_scale = Int8Scale(scale)
    modules = [(p, m) for p, m in copy.iter_modules() if isinstance(m, Einsum)] if einsums else []
    for path, module in modules:
        if module.w_scale is not None:
            continue
        if not jnp.issubdtype(module.w.dtype, jnp.floating):
            raise ConfigError(f"cannot quantize a weight of dtype {module.w.dtype}")
        if bits == 4:
            quantize_einsum_int4(module, "/".join(map(str, path)))
            continue
        q, scale = quantize_int8(module.w[...], contracted_axes(module))
        if module.matvec:  # the scale keeps the unflattened layout, as to_matvec_layout's
            assert module.matvec_shape is not None, "matvec_shape is set with the matvec layout"
            kept = len(module.matvec_shape) - len(module.contracted)
            scale = scale.reshape(*module.matvec_shape[:kept], *[1] * len(module.contracted))
        module.w = Int8Weight(q)
        module.w_scale = Int8Scale(scale)
    return copy


def quantize_einsum_int4(module: Einsum, name: str = "an Einsum") -> None:
    """Replaces module's float weight by its int4 form in the matvec layout, in place."""
    w = module.w[...]
    if not module.matvec:
        w = jnp.transpose(w, module.matvec_permutation())
        module.matvec_shape = tuple(int(n) for n in w.shape)
    w = w.reshape(module.matvec_rows(), -1)
    int4.check_shape(w.shape[0], w.shape[1], name)
    m = int4.quantize(w)
    module.w = Int4Weight(m.packed)
    module.w_scale = Int4Groups(m.groups)
    module.matvec = True


def is_quantized(model: nnx.Module) -> bool:
    """Whether any weight of `model` (an Einsum's, or the embedding table) is int8 or int4."""
    return any(
        (isinstance(m, Einsum) and m.w_scale is not None)
        or getattr(m, "input_embedding_scale", None) is not None
        for _, m in model.iter_modules()
    )


def weight_bytes(model: nnx.Module) -> int:
    """Bytes of every array the model holds (int8 weights count one byte each, int4 half)."""
    leaves = jax.tree.leaves(nnx.state(model))
    return int(sum(np.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in leaves))
