"""Group-wise int4 matrices: two values per byte, a bf16 scale and minimum per group of 32.

A matrix W [O, I] (outputs by contracted inputs, the matvec orientation of gemma_kit.layers)
is cut along I into groups of GROUP = 32 consecutive inputs. Each group gets a minimum m and a
scale s (both bf16), and each weight an integer q in [0, 15]:

    m = min of the group, rounded down to bf16;
    s = (max of the group - m) / 15, rounded up to bf16;
    q = round((W - m) / s),           W ~= q s + m.

The roundings keep (W - m) / s within [0, 15], so nothing clips and |W - (q s + m)| <= s / 2:
at most 1/30 of the group's range (and float32 evaluates q s + m to within its own rounding).
The asymmetric form (llama.cpp's Q4_1 has the same shape) halves the error of a symmetric
scale-only one on the real Gemma 3 270M (relative rms weight error 0.04-0.08 against 0.10-0.12,
both with groups of 32): a group's weights are seldom centred on zero.

Storage ("halves" packing along the outputs): byte [o, i] holds q[o, i] in its low nibble and
q[o + O/2, i] in its high nibble, so `packed` is uint8 [O/2, I], and each half of the rows
unpacks with one mask or one shift over contiguous bytes. That layout is what lets XLA's CPU
backend fuse the unpacking into two matrix-vector loops over full rows (`matvec`), whose outputs
are concatenated: packing the two halves of each row's inputs instead gives two loops over half
rows plus a sum, measured ~1.3x slower on the AMD EPYC host, and an interleaved layout (q[2j],
q[2j+1] in one byte) would need a gather per element. It needs O even and I a multiple of GROUP
(every Gemma matrix is).

Shapes: packed [O/2, I] uint8; groups [O, I/32] uint32, each word a group's bf16 scale (high
16 bits) and bf16 minimum (low 16 bits), 5 bits per weight in all. A bf16 is the high half of a
float32, so one 32-bit load and a mask or a shift give both as float32: with two bf16 arrays the
matrix-vector loop loaded, widened and shifted each of them apart, and the packed word made the
whole decode step ~5% faster on the AMD EPYC host (docs/speed.md). The packed bytes and the
words stay two arrays: stacked into one, XLA slices them apart per step (the table's lookup took
1.6 ms instead of 0.01, its product 14 ms instead of 10).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from gemma_kit.errors import ConfigError

GROUP = 32
LEVELS = 15  # q in [0, LEVELS]


class Int4Matrix(NamedTuple):
    """packed uint8 [O/2, I] and groups uint32 [O, I/GROUP] (scale and minimum) of a W [O, I]."""

    packed: jax.Array
    groups: jax.Array

    @property
    def shape(self) -> tuple[int, int]:
        """(O, I) of the matrix it stands for."""
        return 2 * self.packed.shape[0], self.packed.shape[1]

    @property
    def scale(self) -> jax.Array:
        """The groups' scales, bf16 [O, I/GROUP]."""
        return jax.lax.bitcast_convert_type((self.groups >> 16).astype(jnp.uint16), jnp.bfloat16)

    @property
    def minimum(self) -> jax.Array:
        """The groups' minima, bf16 [O, I/GROUP]."""
        return jax.lax.bitcast_convert_type((self.groups & 0xFFFF).astype(jnp.uint16), jnp.bfloat16)


def pack_groups(scale: jax.Array, minimum: jax.Array) -> jax.Array:
    """bf16 scales and minima (same shape) -> their uint32 words (module docstring)."""
    bits = lambda a: jax.lax.bitcast_convert_type(a, jnp.uint16).astype(jnp.uint32)  # noqa: E731
    return (bits(scale) << 16) | bits(minimum)


def _group_floats(groups: jax.Array) -> tuple[jax.Array, jax.Array]:
    """uint32 words -> (scale, minimum) as float32, exactly (a bf16 is a float32's high half)."""
    scale = jax.lax.bitcast_convert_type(groups & jnp.uint32(0xFFFF0000), jnp.float32)
    minimum = jax.lax.bitcast_convert_type(groups << 16, jnp.float32)
    return scale, minimum


def check_shape(outputs: int, inputs: int, what: str = "the matrix") -> None:
    """Raises ConfigError unless an [outputs, inputs] matrix can be packed (module docstring)."""
    if outputs % 2 or inputs % GROUP:
        raise ConfigError(
            f"{what} is [{outputs}, {inputs}] (outputs, inputs); int4 packing needs "
            f"an even number of outputs and inputs in whole groups of {GROUP}; "
            "keep it in bf16 or int8"
        )


def _to_bf16(x: jax.Array, direction: float) -> jax.Array:
    """float32 x rounded to the nearest bf16 on the side of `direction` (+inf: up, -inf: down)."""
    b = x.astype(jnp.bfloat16)
    past = b.astype(jnp.float32) < x if direction > 0 else b.astype(jnp.float32) > x
    return jnp.where(past, jnp.nextafter(b, jnp.asarray(direction, jnp.bfloat16)), b)


@jax.jit
def quantize(w: jax.Array) -> Int4Matrix:
    """W [O, I] (any float dtype) -> its Int4Matrix. The shape must pass check_shape."""
    O, I = w.shape
    check_shape(O, I)
    w32 = w.astype(jnp.float32).reshape(O, I // GROUP, GROUP)
    minimum = _to_bf16(jnp.min(w32, axis=-1), -jnp.inf)
    spread = jnp.max(w32, axis=-1) - minimum.astype(jnp.float32)
    # A constant group gets scale 1 (its q are 0, W = m up to bf16's step; avoids 0 / 0).
    scale = _to_bf16(jnp.where(spread > 0, spread / LEVELS, 1.0), jnp.inf)
    q = jnp.round(
        (w32 - minimum.astype(jnp.float32)[..., None]) / scale.astype(jnp.float32)[..., None]
    )
    nibbles = jnp.clip(q, 0, LEVELS).reshape(O, I).astype(jnp.uint8)
    packed = nibbles[: O // 2] | (nibbles[O // 2 :] << 4)
    return Int4Matrix(packed, pack_groups(scale, minimum))


def unpack(packed: jax.Array) -> jax.Array:
    """packed uint8 [O/2, I] -> q uint8 [O, I] in [0, 15] (no scale)."""
    return jnp.concatenate([packed & 15, packed >> 4], axis=0)


def _dequantized(q: jax.Array, groups: jax.Array) -> jax.Array:
    """q [..., I] (integers in [0, 15]) with their groups' words [..., I/GROUP]: the float32
    weights q s + m."""
    lead, I = q.shape[:-1], q.shape[-1]
    scale, minimum = _group_floats(groups)
    w = q.astype(jnp.float32).reshape(*lead, I // GROUP, GROUP)
    w = w * scale[..., None] + minimum[..., None]
    return w.reshape(*lead, I)


def dequantize(m: Int4Matrix, dtype=jnp.float32) -> jax.Array:
    """The [O, I] matrix q s + m in `dtype` (float32: exact up to one rounding; bf16 rounds)."""
    return _dequantized(unpack(m.packed), m.groups).astype(dtype)


def gather_rows(m: Int4Matrix, ids: jax.Array, dtype) -> jax.Array:
    """Rows `ids` (any shape [...], values in [0, O)) of the dequantized matrix: [..., I]."""
    half = m.packed.shape[0]
    high = ids >= half
    byte = m.packed[jnp.where(high, ids - half, ids)]
    nibble = jnp.where(high[..., None], byte >> 4, byte & 15)
    return _dequantized(nibble, m.groups[ids]).astype(dtype)


def matvec(x: jax.Array, m: Int4Matrix) -> jax.Array:
    """x [1, I] float32 @ W^T -> [1, O] float32, W dequantized inside the two products.

    Each half of the rows (low nibbles, high nibbles) is unpacked, scaled and contracted in its
    own product, which XLA's CPU backend fuses into one matrix-vector loop reading the bytes;
    the two outputs are concatenated.
    """
    half = m.packed.shape[0]
    low = x @ _dequantized(m.packed & 15, m.groups[:half]).T
    high = x @ _dequantized(m.packed >> 4, m.groups[half:]).T
    return jnp.concatenate([low, high], axis=1)
