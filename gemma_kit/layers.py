"""Small building blocks: Einsum, RMSNorm, RoPE and soft-capping.

Dimension glossary, used in every einsum equation and docstring of gemma_kit:

    B  batch                     T  query length            S  key (or cache) length
    D  embed dim                 N  query heads             K  key/value heads
    G  query heads per kv head   H  head dim                F  feed-forward hidden dim
    V  vocabulary                C  a stacked-weights axis  L  layers
    R  LoRA rank

and for images (gemma_kit.vision): I images, P patches per image, W encoder width, M soft tokens
per image, p patch side in pixels, c colour channels.

Parameters may be stored in a narrower dtype (bf16, int8 with per-channel scales, or int4 with
group scales, gemma_kit.int4) than the activations (float32). Such a weight multiplies
bf16-rounded activations and accumulates in float32 on every path (`matmul_dtype`), the
numerics of bf16 inference everywhere. How the product is computed depends on its shape and on
the CPU, because XLA's CPU backend is fast at different things on different machines
(docs/speed.md): `matmul_t` takes one of the forms of
gemma_kit.cpu_paths for fewer than MIN_ROWS rows, the one probed fastest on this CPU:
  * "dot": a bf16 x bf16 product with float32 accumulation padded to MIN_ROWS rows, which XLA
    runs through its GEMM library; the reference form, and the native one on accelerators.
    Several rows always take it (int8 and int4 weights are dequantized to bf16 first);
  * "upcast": the weight converted to float32 inside the computation, fused by XLA into one
    matrix-vector loop per activation row that reads the stored bytes once.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gemma_kit import cpu_paths, int4

ModuleT = TypeVar("ModuleT", bound=nnx.Module)


def _normal(stddev: float):
    return jax.nn.initializers.normal(stddev)


def matmul_dtype(stored, activations) -> jnp.dtype:
    """The dtype in which activations of dtype `activations` meet a weight stored as `stored`.

    bf16 for float32 activations against bf16, int8 (scaled) or int4 (packed in uint8)
    weights, the activations' dtype otherwise. The product always accumulates in the
    activations' dtype.
    """
    stored, activations = jnp.dtype(stored), jnp.dtype(activations)
    narrow = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.int8), jnp.dtype(jnp.uint8))
    if activations == jnp.float32 and stored in narrow:
        return jnp.dtype(jnp.bfloat16)
    return activations


# Narrow products of fewer rows are padded to this many with zero rows in the "dot" form, whose
# outputs are dropped. On the Intel 2-core CPU of earlier benchmarks, the 18 blocks of a batch-1
# decode step of Gemma 3 270M (bf16, 200 MB of weights) took ~25 ms upcast, 19 ms padded to 2
# rows, 15 ms padded to 8: the extra rows cost no extra reads, and the GEMM kernel streamed the
# weights faster. On an AMD EPYC host the upcast form is the faster one (cpu_paths).
MIN_ROWS = 8
# The upcast form runs one matrix-vector product per row; past this many rows the "few" class
# always takes the dot form (each row would read the whole weight again).
MAX_UPCAST_ROWS = 4


def _stored_name(weight, stored) -> str:
    return "int4" if isinstance(weight, int4.Int4Matrix) else jnp.dtype(stored).name


def matmul_t(
    x: jax.Array, weight, stored, scale: jax.Array | None = None, *, path: str | None = None
) -> jax.Array:
    """x [M, I] @ W^T for W [O, I]: float32 (or the activations' dtype) [M, O].

    `weight` is either a function weight(dtype) giving the stored W cast inside the jit (dense
    weights of dtype `stored`), or a gemma_kit.int4.Int4Matrix (then `stored` is ignored).
    `scale` [O], if given, multiplies the product's columns: the per-row scales of int8
    weights, applied to O outputs rather than to O x I weights (and exactly: int8 values are
    exact in bf16, so only x is rounded).

    Computes in matmul_dtype (x is rounded to bf16 against narrow weights) with float32
    accumulation, in the form `path` names, by default the one gemma_kit.cpu_paths chose for
    this CPU and product class (module docstring). The forms give the same products up to the
    order of float32 sums, except that the dot form rounds int4 weights q s + m to bf16.
    """
    rows = x.shape[0]
    packed = isinstance(weight, int4.Int4Matrix)
    dtype = matmul_dtype(jnp.uint8 if packed else stored, x.dtype)
    if dtype == x.dtype and not packed:  # wide weights, or wide activations: nothing to pick
        return _scaled(x @ weight(dtype).T, scale)
    if path is None:
        path = "dot"
        if rows <= MAX_UPCAST_ROWS:
            O, I = weight.shape if packed else weight(stored).shape
            cls = cpu_paths.product_class(_stored_name(weight, stored), rows, O, I)
            path = cpu_paths.choose(cls, lambda p: probe_product(cls, p))
            _probe_cache.clear()  # the probe's weights (up to ~200 MB) are not needed again
    if path == "upcast":
        xr = x.astype(dtype).astype(x.dtype)
        if packed:
            y = jnp.concatenate([int4.matvec(xr[i : i + 1], weight) for i in range(rows)])
        else:
            w = weight(x.dtype)
            y = jnp.concatenate([xr[i : i + 1] @ w.T for i in range(rows)])
        return _scaled(y, scale)
    if path != "dot":
        raise ValueError(f"unknown product form {path!r}; one of {cpu_paths.PATHS}")
    w = int4.dequantize(weight, dtype) if packed else weight(dtype)
    # Contracting the last axis of both operands as they are: written as matmul(x, w.T),
    # XLA's CPU backend upcasts both operands to float32 before the dot (measured ~10x
    # slower).
    padded = jnp.pad(x.astype(dtype), ((0, max(0, MIN_ROWS - rows)), (0, 0)))
    y = jax.lax.dot_general(padded, w, (((1,), (1,)), ((), ())), preferred_element_type=x.dtype)[
        :rows
    ]
    return _scaled(y, scale)


def _scaled(y: jax.Array, scale: jax.Array | None) -> jax.Array:
    return y if scale is None else y * scale.astype(y.dtype)


# Representative shapes of each probe class (cpu_paths.ProductClass.size): a decode step's
# layer products (many matrices of ~1-4 MB in bf16, together larger than the L3 cache), and one
# embedding-table-sized product (the logits). Rows: 1, or MAX_UPCAST_ROWS for "few".
PROBE_SHAPES = {"layer": (16, 4096, 1024), "table": (1, 131072, 640)}


def probe_product(
    cls: cpu_paths.ProductClass, path: str, compiler_options: dict | None = None
) -> float:
    """Seconds of one call of class `cls`'s probe in form `path` (cpu_paths.choose's measure),
    compiled with `compiler_options` (XLA's defaults if None).

    The probe applies `count` random weights of the class's shape and stored dtype in
    sequence, as a decode step does, inside one jitted function; its first call compiles.
    """
    count, O, I = PROBE_SHAPES[cls.size]
    rows = 1 if cls.rows == "one" else MAX_UPCAST_ROWS
    with jax.ensure_compile_time_eval():
        if _probe_cache.get("class") != cls:
            _probe_cache.clear()  # one class's weights at a time in memory
            _probe_cache.update(
                {
                    "class": cls,
                    "x": jnp.ones((rows, I), jnp.float32),
                    "weights": _probe_weights(cls.stored, count, O, I),
                    "programs": {},
                }
            )
        x, weights, programs = _probe_cache["x"], _probe_cache["weights"], _probe_cache["programs"]
        key = (path, tuple(sorted((compiler_options or {}).items())))
        if key not in programs:

            def run(x, weights):
                out = x
                for w in weights:
                    y = _probe_apply(x, w, cls.stored, path)
                    out = out + y[:, :1]  # keeps every product alive
                return out

            programs[key] = jax.jit(run, compiler_options=compiler_options)
            programs[key](x, weights).block_until_ready()
        start = time.perf_counter()
        programs[key](x, weights).block_until_ready()
        return time.perf_counter() - start


_probe_cache: dict = {}

# The class whose probe decides the vector width: int8 weights against one row, the products
# of `gemma-kit sample --int8` (int4's are alike; bf16's are limited by memory at either width).
WIDTH_PROBE_CLASS = cpu_paths.ProductClass("int8", "one", "layer")


def probe_vector_width(width: str) -> float:
    """Seconds of one call of WIDTH_PROBE_CLASS's probe, in the form chosen for it, compiled
    for vector width `width` (cpu_paths.VectorWidth's measure)."""
    cls = WIDTH_PROBE_CLASS
    path = cpu_paths.choose(cls, lambda p: probe_product(cls, p))
    options = {} if width == cpu_paths.WIDTH_REFERENCE else {cpu_paths.WIDTH_OPTION: int(width)}
    return probe_product(cls, path, options)


def decode_compiler_options() -> dict[str, int]:
    """The XLA compiler options of the decode programs on this CPU (cpu_paths.compiler_options,
    probed on first use and cached)."""
    options = cpu_paths.compiler_options(probe_vector_width)
    _probe_cache.clear()  # the probe's weights are not needed again
    return options


def _probe_weights(stored: str, count: int, O: int, I: int):
    """`count` distinct buffers of one random [O, I] weight in `stored` form (the values repeat;
    the bytes read per call are what the timing is about)."""
    w = jax.random.normal(jax.random.key(0), (O, I), jnp.float32) * 0.02
    if stored == "int4":
        m = int4.quantize(w)
        return [int4.Int4Matrix(*(jnp.copy(a) for a in m)) for _ in range(count)]
    if stored == "int8":
        q = jnp.clip(jnp.round(w * 4000), -127, 127).astype(jnp.int8)
        return [(jnp.copy(q), jnp.full((O,), 1 / 4000, jnp.float32)) for _ in range(count)]
    w = w.astype(stored)
    return [jnp.copy(w) for _ in range(count)]


def _probe_apply(x, w, stored: str, path: str):
    if stored == "int4":
        return matmul_t(x, w, None, path=path)
    if stored == "int8":
        q, s = w
        return matmul_t(x, q.astype, q.dtype, s, path=path)
    return matmul_t(x, w.astype, w.dtype, path=path)


class Einsum(nnx.Module):
    """A weight `w` applied to activations with a fixed einsum equation, e.g. "BTD,NDH->BTNH".

    The parameter is called `w` and has the official shape, so the state tree of a model equals
    the checkpoint tree. `to_matvec_layout` can re-store `w` with its contracted axes last
    (see there); `__call__` gives the same result either way.
    """

    def __init__(
        self,
        equation: str,
        shape: Sequence[int],
        *,
        param_dtype,
        rngs: nnx.Rngs,
        stddev: float = 0.02,
    ):
        inputs, self.out_spec = equation.replace(" ", "").split("->")
        self.x_spec, self.w_spec = inputs.split(",")
        self.equation = equation
        if len(self.w_spec) != len(shape):
            raise ValueError(f"equation {equation!r} does not fit a weight of shape {shape}")
        # A Param, or a frozen Variable holding quantized values (gemma_kit.quant).
        self.w: nnx.Variable = nnx.Param(_normal(stddev)(rngs.params(), tuple(shape), param_dtype))
        # Letters of w that are contracted with x, in x's order; they must end x's spec.
        self.contracted = "".join(
            c for c in self.x_spec if c in self.w_spec and c not in self.out_spec
        )
        if not self.x_spec.endswith(self.contracted):
            raise ValueError(f"{equation!r}: contracted dims must be the last dims of x")
        self.matvec = False  # True once w is stored in the matvec layout (see matvec_shape)
        # The matvec layout holds w as a matrix [O, I]: its kept axes, then its contracted
        # axes, each group flattened (to_matvec_layout; int4 weights always). matvec_shape is
        # the unflattened shape [kept axes..., contracted axes...]; None in the official
        # layout.
        self.matvec_shape: tuple[int, ...] | None = None
        # Hooks, both empty unless set by another module:
        # - w_scale: set by gemma_kit.quant when `w` holds int8 values; a per-output-channel
        #   scale of w's shape with the contracted axes kept at size 1. The product is taken
        #   with the int8 values themselves (exact in bf16) and its outputs are scaled, inside
        #   the caller's compiled computation: memory holds, and a matmul reads, one byte per
        #   weight.
        #   When `w` holds int4 values instead (uint8: gemma_kit.int4, packed [O/2, I] in the
        #   matvec layout), `w_scale` holds its groups' scales and minima, one uint32 word per
        #   group [O, I/32].
        # - lora: set by gemma_kit.lora; a module adding (alpha / r) * x A B to the output.
        self.w_scale: Any = nnx.data(None)
        self.lora: Any = nnx.data(None)  # a gemma_kit.lora.LoRA once set

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self._base(x)
        if self.lora is not None:
            y = y + self.lora(x)
        return y

    @property
    def is_int4(self) -> bool:
        """Whether `w` holds packed int4 values (gemma_kit.int4; always in the matvec layout)."""
        return self.w_scale is not None and self.w_scale[...].dtype == jnp.uint32

    def _base(self, x: jax.Array) -> jax.Array:
        if self.is_int4:
            m = int4.Int4Matrix(self.w[...], self.w_scale[...])
            return self._matvec_product(x, lambda x2: matmul_t(x2, m, None))
        dtype = matmul_dtype(self.w[...].dtype, x.dtype)
        if not self.matvec:
            n_in = int(np.prod(x.shape[len(x.shape) - len(self.contracted) :]))
            w = self.w[...]
            # One row upcasts (a one-row bf16 x bf16 product is ~35x slower on CPU); the CPU
            # sampler uses the matvec layout instead, where matmul_t picks the form.
            if dtype == x.dtype or x.size == n_in:
                y = jnp.einsum(self.equation, x.astype(dtype).astype(x.dtype), w.astype(x.dtype))
            else:
                y = jnp.einsum(
                    self.equation, x.astype(dtype), w.astype(dtype), preferred_element_type=x.dtype
                )
            return y if self.w_scale is None else y * self._scale_for_output(y.dtype)
        scale = None if self.w_scale is None else self.w_scale[...].reshape(-1)
        return self._matvec_product(
            x, lambda x2: matmul_t(x2, lambda d: self.w[...].astype(d), self.w[...].dtype, scale)
        )

    def _matvec_product(self, x: jax.Array, product) -> jax.Array:
        """The einsum as product(x2 [M, I]) -> [M, O] on the matvec layout's [O, I] matrix (a
        plain x2 @ W.T contracting W's contiguous axis, the form matmul_t's fast paths need),
        reshaped and transposed to the equation's output."""
        kept = "".join(c for c in self.w_spec if c not in self.contracted)
        batch = self.x_spec[: len(self.x_spec) - len(self.contracted)]
        assert self.matvec_shape is not None, "only the matvec layout takes this path"
        y = product(flatten_rows(x, len(self.contracted)))
        y = y.reshape(*x.shape[: len(batch)], *self.matvec_shape[: len(kept)])
        return jnp.transpose(y, [(batch + kept).index(c) for c in self.out_spec])

    def _scale_for_output(self, dtype) -> jax.Array:
        """The int8 scale (w's shape, contracted axes of size 1) arranged to broadcast against
        the einsum's output: kept letters in output order, size 1 for x's batch letters."""
        kept = "".join(c for c in self.w_spec if c not in self.contracted)
        scale = (
            self.w_scale[...]
            .astype(dtype)
            .reshape([n for c, n in zip(self.w_spec, self.w[...].shape) if c in kept])
        )
        in_out_order = "".join(c for c in self.out_spec if c in kept)
        scale = jnp.einsum(f"{kept}->{in_out_order}", scale)
        return scale.reshape(
            [scale.shape[in_out_order.index(c)] if c in kept else 1 for c in self.out_spec]
        )

    def matvec_rows(self) -> int:
        """O: the product of the kept (not contracted) axes of w."""
        shape = self.matvec_shape or tuple(self.w[...].shape[i] for i in self.matvec_permutation())
        return int(np.prod(shape[: len(shape) - len(self.contracted)]))

    def matvec_permutation(self) -> tuple[int, ...]:
        """Axes of the official `w` in matvec-layout order: kept axes, then contracted ones."""
        kept = [i for i, c in enumerate(self.w_spec) if c not in self.contracted]
        return tuple(kept) + tuple(self.w_spec.index(c) for c in self.contracted)


def to_matvec_layout(model: ModuleT) -> ModuleT:
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
            layouts = {
                name: matvec_layout_of(module, name)
                for name in ("w", "w_scale")
                if getattr(module, name) is not None
            }
            perm = module.matvec_permutation()
            module.matvec_shape = tuple(module.w[...].shape[i] for i in perm)
            for name, layout in layouts.items():
                # type(...) keeps the variable kind (an int8 weight stays an int8 weight).
                variable = getattr(module, name)
                setattr(module, name, type(variable)(layout.to_stored(variable[...])))
            module.matvec = True
    return copy


@dataclasses.dataclass(frozen=True)
class MatvecLayout:
    """How the matvec layout stores one variable of an Einsum ("w" or "w_scale"): the
    official value transposed by `permutation`, then (w) flattened to [rows, -1]."""

    permutation: tuple[int, ...]
    official_shape: tuple[int, ...]
    rows: int | None  # None: not flattened (w_scale)

    def to_stored(self, value: jax.Array) -> jax.Array:
        """A value in the official layout -> as the matvec layout stores it."""
        value = jnp.transpose(value, self.permutation)
        return value if self.rows is None else value.reshape(self.rows, -1)


def matvec_layout_of(module: Einsum, name: str) -> MatvecLayout:
    """The MatvecLayout of `module.<name>` ("w" or a dense weight's "w_scale")."""
    perm = module.matvec_permutation()
    if module.matvec:
        stored = module.matvec_shape if name == "w" else getattr(module, name)[...].shape
        assert stored is not None, "matvec_shape is set with the matvec layout"
        official = [0] * len(perm)
        for stored_axis, official_axis in enumerate(perm):
            official[official_axis] = stored[stored_axis]
    else:
        official = getattr(module, name)[...].shape
    return MatvecLayout(
        perm, tuple(int(n) for n in official), module.matvec_rows() if name == "w" else None
    )


def to_matvec_value(module: Einsum, name: str, value: jax.Array) -> jax.Array:
    """A value of `module.<name>` in the official layout -> as the matvec layout stores it."""
    return matvec_layout_of(module, name).to_stored(value)


def flatten_rows(x: jax.Array, contracted: int) -> jax.Array:
    """x [batch axes..., `contracted` axes...] -> [M, I]: the rows a matvec-layout product
    takes, row-major over the contracted axes.

    With several contracted axes (the attention's output projection, over heads and head
    dim) and few rows, the rows are built by concatenating slices instead of a reshape: XLA
    folds such a reshape into the product's loop as a bitcast whose index arithmetic
    (division and remainder per element) the loop vectorizer cannot see through, and the loop
    then loads x one element at a time (that projection took 4-5x longer per weight byte than
    the others in a batch-1 decode step, measured). The concatenation writes the flat rows
    once (a few KB).
    """
    n_batch = x.ndim - contracted
    rows = int(np.prod(x.shape[:n_batch]))
    if contracted == 1 or rows > MAX_UPCAST_ROWS:
        return x.reshape(rows, -1)
    x3 = x.reshape(rows, -1, x.shape[-1])
    return jnp.concatenate([x3[:, i] for i in range(x3.shape[1])], axis=-1)


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


def apply_rope(x: jax.Array, positions: jax.Array, *, base: float, scale: float = 1.0) -> jax.Array:
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
