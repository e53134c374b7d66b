"""Merging parameters: EMA anchors, task-vector LERP and SLERP, LITI, weight averages, and their
exact LoRA versions.

The functions take pytrees of PARAMETERS (nested dicts of arrays, or nnx.State, read as
nnx.to_pure_dict: results are nested dicts) and compute the task vectors delta = params - init
themselves. Every leaf is merged as one tensor ("per tensor"), in float32, and cast back to the
dtype of the first tree's leaf. Trees of different structure or shapes (runs of different base
models, different LoRA settings) are refused with one CheckpointError naming the first path that
differs; a fraction (lam, eta, rate) outside [0, 1] is a ConfigError.

WARP (2406.16768) merges policies at three stages, which map to these functions: the
exponential moving average of the policy as the KL anchor (`ema`), the spherical interpolation
of independently fine-tuned policies' task vectors (`slerp`), and the linear interpolation of
the merge towards the initialisation (`liti`), iterated with each chosen point as the next
initialisation (abstract and Figure 1 of the paper). The SLERP formula is

    Omega = arccos(<d_a, d_b> / (|d_a| |d_b|)),      d = theta - theta_init, per tensor
    slerp = theta_init + sin((1 - lam) Omega) / sin Omega * d_a + sin(lam Omega) / sin Omega * d_b

falling back to LERP when the task vectors are (anti-)collinear or one of them is zero, where
the formula is 0 / 0. For orthogonal task vectors of equal norm SLERP keeps the norm where LERP
shrinks it by 1 / sqrt 2. (Verification: the paper's method section could not be read past its
abstract here; the formula is the one of the project's reference notes and of mergekit's
task-vector SLERP, "nuslerp" with a base model, and is pinned by the closed-form tests.) WARM
(2401.12187) averages reward models fine-tuned from one shared initialisation (`average`).

LoRA runs (from the base, B = 0 at the start) merge exactly without materialising the deltas.
In gemma_kit.lora's layout, A [contracted..., R], B [R, kept...] and delta = s * A B with
s = alpha / rank:

    sum_i c_i s A_i B_i = s [A_1 ... A_M] [c_1 B_1; ...; c_M B_M]   (concatenation along R)

a LoRA of rank M * r applied with the SAME scaling s (save it with alpha' = alpha * M, rank'
= M * r). Inner products of deltas come from r x r Gram matrices,
<A_i B_i, A_j B_j>_F = sum(((A_i^T A_j) * (B_i B_j^T))), enough for SLERP's angle; LITI towards
the base scales B. A LoRA pair is any dict {"a": A, "b": B}.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from gemma_kit.errors import CheckpointError, ConfigError
from gemma_kit.posttrain.losses import check_fraction

PyTree = Any

# Below this sin(Omega) the task vectors count as collinear and SLERP falls back to LERP. For
# parallel vectors the two agree to O(Omega^2) (1e-8 relative here); for anti-parallel ones
# SLERP's path is undefined, and its formula cancels catastrophically in float32 near pi.
COLLINEAR_SIN = 1e-4


# ------------------------------------------------------------------------------------------
# Structure checks


def _path_name(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path) or "<root>"


def check_same_structure(
    trees: Sequence[PyTree], names: Sequence[str] | None = None
) -> list[PyTree]:
    """Raises CheckpointError unless all trees have the same paths and leaf shapes; returns the
    trees, each in the first one's container types. An nnx.State is read as its pure dict, so
    states and dicts mix freely."""
    names = list(names) if names is not None else [f"tree {i}" for i in range(len(trees))]
    trees = [nnx.to_pure_dict(t) if isinstance(t, nnx.State) else t for t in trees]
    flat0, def0 = jax.tree_util.tree_flatten_with_path(trees[0])
    paths0 = [_path_name(p) for p, _ in flat0]
    out = [trees[0]]
    for tree, name in zip(trees[1:], names[1:]):
        flat = jax.tree_util.tree_flatten_with_path(tree)[0]
        paths = [_path_name(p) for p, _ in flat]
        if paths != paths0:
            missing = sorted(set(paths0) ^ set(paths))
            where = (
                missing[0]
                if missing
                else next((a for a, b in zip(paths0, paths) if a != b), "<structure>")
            )
            raise CheckpointError(
                f"{name} and {names[0]} have different parameters (first difference at "
                f"{where}): only runs of one base model with the same settings can be merged"
            )
        for path, (_, x), (_, y) in zip(paths0, flat0, flat):
            if tuple(jnp.shape(x)) != tuple(jnp.shape(y)):
                raise CheckpointError(
                    f"{name} and {names[0]} differ at {path}: shapes {tuple(jnp.shape(y))} and "
                    f"{tuple(jnp.shape(x))}; only runs of one base model with the same "
                    "settings can be merged"
                )
        out.append(jax.tree.unflatten(def0, [x for _, x in flat]))
    return out


def _map(fn, *trees: PyTree, names: Sequence[str]) -> PyTree:
    return jax.tree.map(fn, *check_same_structure(trees, names))


# ------------------------------------------------------------------------------------------
# Dense parameters


def task_vector(init: PyTree, params: PyTree) -> PyTree:
    """params - init per leaf, in float32."""
    return _map(
        lambda x0, x: x.astype(jnp.float32) - x0.astype(jnp.float32),
        init,
        params,
        names=("init", "params"),
    )


def slerp_coefficients(inner, norm_a, norm_b, lam) -> tuple[jax.Array, jax.Array]:
    """(c_a, c_b) with slerp = init + c_a d_a + c_b d_b, from <d_a, d_b>, |d_a|, |d_b|.

    sin((1 - lam) Omega) / sin Omega and sin(lam Omega) / sin Omega; (1 - lam, lam) (LERP) when
    sin Omega < COLLINEAR_SIN or a task vector is zero. Never NaN.
    """
    lam = jnp.asarray(lam, jnp.float32)
    denom = norm_a * norm_b
    cos = jnp.clip(inner / jnp.where(denom > 0, denom, 1.0), -1.0, 1.0)
    omega = jnp.arccos(cos)
    sin = jnp.sin(omega)
    curved = (denom > 0) & (sin >= COLLINEAR_SIN)
    safe = jnp.where(curved, sin, 1.0)
    c_a = jnp.where(curved, jnp.sin((1.0 - lam) * omega) / safe, 1.0 - lam)
    c_b = jnp.where(curved, jnp.sin(lam * omega) / safe, lam)
    return c_a, c_b


@jax.jit
def _slerp_leaf(x0, xa, xb, lam):
    base = x0.astype(jnp.float32)
    da, db = xa.astype(jnp.float32) - base, xb.astype(jnp.float32) - base
    inner = jnp.sum(da * db)
    c_a, c_b = slerp_coefficients(
        inner, jnp.sqrt(jnp.sum(da * da)), jnp.sqrt(jnp.sum(db * db)), lam
    )
    return (base + c_a * da + c_b * db).astype(x0.dtype)


def slerp(init: PyTree, a: PyTree, b: PyTree, lam: float) -> PyTree:
    """Spherical interpolation of the task vectors of runs `a` and `b` from `init`, per tensor
    (WARP's second stage; see the module docstring). lam = 0 gives a, 1 gives b."""
    check_fraction("lam", lam)
    return _map(
        lambda x0, xa, xb: _slerp_leaf(x0, xa, xb, lam),
        init,
        a,
        b,
        names=("init", "run a", "run b"),
    )


def lerp(init: PyTree, a: PyTree, b: PyTree, lam: float) -> PyTree:
    """init + (1 - lam) d_a + lam d_b = (1 - lam) a + lam b, per tensor."""
    check_fraction("lam", lam)

    def leaf(x0, xa, xb):
        base = x0.astype(jnp.float32)
        return (
            base
            + (1.0 - lam) * (xa.astype(jnp.float32) - base)
            + lam * (xb.astype(jnp.float32) - base)
        ).astype(x0.dtype)

    return _map(leaf, init, a, b, names=("init", "run a", "run b"))


def liti(init: PyTree, merged: PyTree, eta: float) -> PyTree:
    """Linear interpolation towards the initialisation (WARP's third stage):
    (1 - eta) init + eta merged. eta = 0 gives init, 1 the merge; sweeping eta traces the
    KL-reward front, and the chosen point initialises the next WARP iteration."""
    check_fraction("eta", eta)
    return _map(
        lambda x0, xm: ((1.0 - eta) * x0.astype(jnp.float32) + eta * xm.astype(jnp.float32)).astype(
            x0.dtype
        ),
        init,
        merged,
        names=("init", "merged"),
    )


def ema(anchor: PyTree, params: PyTree, rate: float) -> PyTree:
    """One EMA step of an anchor towards the current parameters: (1 - rate) anchor + rate
    params (WARP's anchor, mu = rate, every step; J-BOND's anchor likewise). Against a constant
    target theta, k steps give theta + (1 - rate)^k (anchor_0 - theta). On LoRA factors this
    averages A and B separately: a valid moving anchor, not the EMA of the merged weights."""
    check_fraction("the EMA rate", rate)
    return _map(
        lambda xa, xp: (
            (1.0 - rate) * xa.astype(jnp.float32) + rate * xp.astype(jnp.float32)
        ).astype(xa.dtype),
        anchor,
        params,
        names=("anchor", "params"),
    )


def _normalised_weights(count: int, weights: Sequence[float] | None) -> list[float]:
    if count < 1:
        raise ConfigError("nothing to average: give at least one tree")
    if weights is None:
        return [1.0 / count] * count
    weights = [float(w) for w in weights]
    if len(weights) != count:
        raise ConfigError(f"{len(weights)} weights for {count} trees")
    if any(not w >= 0 for w in weights) or sum(weights) <= 0:
        raise ConfigError(f"averaging weights must be >= 0 with a positive sum, got {weights}")
    total = sum(weights)
    return [w / total for w in weights]


def average(trees: Sequence[PyTree], weights: Sequence[float] | None = None) -> PyTree:
    """The weighted average of M trees (WARM's weight average of reward models fine-tuned
    from one initialisation); weights >= 0, normalised to sum 1, uniform by default."""
    trees = list(trees)
    w = _normalised_weights(len(trees), weights)

    def leaf(*xs):
        return sum(wi * x.astype(jnp.float32) for wi, x in zip(w, xs)).astype(xs[0].dtype)

    return _map(leaf, *trees, names=[f"tree {i}" for i in range(len(trees))])


# ------------------------------------------------------------------------------------------
# LoRA factors, exactly


def is_lora_pair(node) -> bool:
    return isinstance(node, Mapping) and set(node.keys()) == {"a", "b"}


def _map_pairs(fn, *trees: PyTree, names: Sequence[str]) -> PyTree:
    trees = tuple(check_same_structure(trees, names))
    if not any(True for _ in _pairs(trees[0])):
        raise ConfigError(
            "no LoRA factors found: give dicts with {'a': A, 'b': B} pairs, "
            "e.g. nnx.to_pure_dict(gemma_kit.lora.lora_state(model))"
        )
    return jax.tree.map(fn, *trees, is_leaf=is_lora_pair)


def _pairs(tree: PyTree):
    leaves = jax.tree.leaves(tree, is_leaf=is_lora_pair)
    return (leaf for leaf in leaves if is_lora_pair(leaf))


def lora_delta(pair: Mapping) -> jax.Array:
    """A B contracted over R, [contracted..., kept...] float32, unscaled (the einsum layout of
    gemma_kit.lora is a permutation of these axes; LoRA.delta() also multiplies by s)."""
    a = pair["a"].astype(jnp.float32)
    b = pair["b"].astype(jnp.float32)
    return jnp.tensordot(a, b, axes=1, precision=jax.lax.Precision.HIGHEST)


def lora_inner(x: Mapping, y: Mapping) -> jax.Array:
    """<A_x B_x, A_y B_y>_F from r x r Gram matrices, never forming a delta."""
    ax = x["a"].astype(jnp.float32).reshape(-1, x["a"].shape[-1])  # [C, R]
    ay = y["a"].astype(jnp.float32).reshape(-1, y["a"].shape[-1])  # [C, S]
    bx = x["b"].astype(jnp.float32).reshape(x["b"].shape[0], -1)  # [R, K]
    by = y["b"].astype(jnp.float32).reshape(y["b"].shape[0], -1)  # [S, K]
    hi = jax.lax.Precision.HIGHEST
    gram_a = jnp.einsum("CR,CS->RS", ax, ay, precision=hi)
    gram_b = jnp.einsum("RK,SK->RS", bx, by, precision=hi)
    return jnp.sum(gram_a * gram_b)


def _concat(pairs: Sequence[Mapping], coefficients: Sequence) -> dict:
    # sum_i c_i A_i B_i = [A_1 ... A_M] [c_1 B_1; ...; c_M B_M]
    a = jnp.concatenate([p["a"] for p in pairs], axis=-1)
    b = jnp.concatenate(
        [
            (c * p["b"].astype(jnp.float32)).astype(p["b"].dtype)
            for c, p in zip(coefficients, pairs)
        ],
        axis=0,
    )
    return {"a": a, "b": b}


def lora_average(runs: Sequence[PyTree], weights: Sequence[float] | None = None) -> PyTree:
    """The exact weighted average of M LoRA runs' deltas, as one LoRA of rank M * r (factor
    concatenation; see the module docstring for its scaling). Averaging A and B separately
    would NOT average the models: mean(A_i B_i) != mean(A_i) mean(B_i)."""
    runs = list(runs)
    w = _normalised_weights(len(runs), weights)
    return _map_pairs(
        lambda *pairs: _concat(pairs, w), *runs, names=[f"run {i}" for i in range(len(runs))]
    )


def lora_lerp(a: PyTree, b: PyTree, lam: float) -> PyTree:
    """(1 - lam) delta_a + lam delta_b exactly, as a rank-2r LoRA."""
    check_fraction("lam", lam)
    return _map_pairs(
        lambda pa, pb: _concat((pa, pb), (1.0 - lam, lam)), a, b, names=("run a", "run b")
    )


def lora_slerp(a: PyTree, b: PyTree, lam: float) -> PyTree:
    """SLERP of two LoRA runs' deltas (task vectors from the base), per adapted tensor, exactly:
    the angle from Gram matrices, the result c_a delta_a + c_b delta_b as a rank-2r LoRA."""
    check_fraction("lam", lam)

    def pair(pa, pb):
        c_a, c_b = slerp_coefficients(
            lora_inner(pa, pb), jnp.sqrt(lora_inner(pa, pa)), jnp.sqrt(lora_inner(pb, pb)), lam
        )
        return _concat((pa, pb), (c_a, c_b))

    return _map_pairs(pair, a, b, names=("run a", "run b"))


def lora_liti(merged: PyTree, eta: float) -> PyTree:
    """LITI towards the base for a LoRA merge: base + eta * delta, i.e. B scaled by eta."""
    check_fraction("eta", eta)
    return _map_pairs(
        lambda p: {"a": p["a"], "b": (eta * p["b"].astype(jnp.float32)).astype(p["b"].dtype)},
        merged,
        names=("merged",),
    )
