"""LoRA on Gemma's einsum projections: apply, merge, and save or load an adapter alone.

A LoRA pair (A, B) is derived mechanically from an Einsum's equation. The weight's letters split
into the ones contracted with x (they go to A) and the kept ones (they go to B), with a rank
axis R between them:

    Einsum  "BTD,NDH->BTNH"    w [N, D, H]
    down    "BTD,DR->BTR"      A [D, R]        normal(0, 1 / sqrt(D))
    up      "BTR,RNH->BTNH"    B [R, N, H]     zeros, so an adapted model starts unchanged
    delta   "DR,RNH->NDH"      (alpha / r) * A B, in the einsum's own layout

so every projection (q, kv, fused qkv, attention output, gating, linear), in either gating
orientation, is covered by one rule. LoRA factors are their own variable type, `LoRAParam`,
not `nnx.Param`: "train only LoRA" is the filter `LoRAParam`, and code that handles base weights
(save_checkpoint, the sharding rules) never sees them.

    apply_lora(model, rank=8, alpha=16, targets=("attn", "mlp"))   # in place
    save_adapter(model, "out/adapter")                             # LoRA factors only (small)
    model = load_model(base, lora="out/adapter")                   # unmerged, for sampling
    merged = merge(model)                                          # a plain Transformer

The adapter folder's format lives in gemma_kit.checkpoint.adapter; merging an adapter into a
checkpoint on disk in gemma_kit.checkpoint.merge.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Iterable, Sequence
from typing import TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gemma_kit.checkpoint import adapter as adapter_io
from gemma_kit.checkpoint.adapter import read_adapter_config
from gemma_kit.errors import AdapterError, ConfigError
from gemma_kit.layers import Einsum, to_matvec_value

ModuleT = TypeVar("ModuleT", bound=nnx.Module)

# Einsum attribute names (the official checkpoint names) and the groups a user may name.
ATTENTION_TARGETS = ("q_einsum", "kv_einsum", "qkv_einsum", "attn_vec_einsum")
MLP_TARGETS = ("gating_einsum", "linear")
TARGET_GROUPS = {
    "all": ATTENTION_TARGETS + MLP_TARGETS,
    "attn": ATTENTION_TARGETS,
    "mlp": MLP_TARGETS,
    # Short names for single projections.
    "q": ("q_einsum",),
    "kv": ("kv_einsum",),
    "qkv": ("qkv_einsum",),
    "o": ("attn_vec_einsum",),
    "attn_vec": ("attn_vec_einsum",),
    "gating": ("gating_einsum",),
}


class LoRAParam(nnx.Variable):
    """A LoRA factor (A or B): trainable, and apart from the frozen base's `nnx.Param`s."""


def lora_equations(equation: str) -> tuple[str, str, str, str, str]:
    """(down, up, delta, a_spec, b_spec) for an Einsum equation "x,w->out" (see module doc).

    A holds w's contracted letters then R; B holds R then w's kept letters, both in w's order,
    so `delta` writes A B straight into w's layout.
    """
    inputs, out_spec = equation.replace(" ", "").split("->")
    x_spec, w_spec = inputs.split(",")
    if "R" in equation:
        raise ConfigError(f"{equation!r} already uses R, the letter LoRA reserves for its rank")
    contracted = "".join(c for c in w_spec if c in x_spec and c not in out_spec)
    kept = "".join(c for c in w_spec if c not in contracted)
    if not contracted or any(c in x_spec for c in kept):
        raise ConfigError(f"LoRA needs an einsum that contracts x with w, got {equation!r}")
    batch = "".join(c for c in x_spec if c not in w_spec)
    a_spec, b_spec = contracted + "R", "R" + kept
    return (
        f"{x_spec},{a_spec}->{batch}R",
        f"{batch}R,{b_spec}->{out_spec}",
        f"{a_spec},{b_spec}->{w_spec}",
        a_spec,
        b_spec,
    )


class LoRA(nnx.Module):
    """The low-rank update of one Einsum: x -> (alpha / rank) * (x A) B.

    Factors are stored in `dtype` (f32 by default, also under a bf16 base) and computed in the
    activation dtype.
    """

    def __init__(
        self,
        einsum: Einsum,
        rank: int,
        alpha: float,
        *,
        dtype=jnp.float32,
        rng: np.random.Generator,
    ):
        if not (isinstance(rank, (int, np.integer)) and rank >= 1):
            raise ConfigError(f"LoRA rank must be an integer >= 1, got {rank!r}")
        self.down_eq, self.up_eq, self.delta_eq, a_spec, b_spec = lora_equations(einsum.equation)
        sizes = dict(zip(einsum.w_spec, self._official_shape(einsum)))
        sizes["R"] = int(rank)
        a_shape = tuple(sizes[c] for c in a_spec)
        fan_in = int(np.prod(a_shape[:-1]))
        # Values from numpy, not jax.random: an eager random kernel per distinct shape would
        # compile for seconds on a large model, for nothing.
        self.a = LoRAParam(jnp.asarray(rng.normal(0.0, fan_in**-0.5, a_shape), dtype))
        self.b = LoRAParam(jnp.zeros(tuple(sizes[c] for c in b_spec), dtype))
        self.rank = int(rank)
        self.alpha = float(alpha)
        self.scaling = self.alpha / self.rank

    @staticmethod
    def _official_shape(einsum: Einsum) -> tuple[int, ...]:
        shape = einsum.matvec_shape or einsum.w.shape  # matvec: the unflattened layout
        if not einsum.matvec:
            return tuple(shape)
        perm = einsum.matvec_permutation()
        out = [0] * len(shape)
        for stored_axis, official_axis in enumerate(perm):
            out[official_axis] = shape[stored_axis]
        return tuple(out)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = jnp.einsum(self.down_eq, x, self.a[...].astype(x.dtype))
        h = h * jnp.asarray(self.scaling, h.dtype)  # scale the rank-sized tensor: the cheapest
        return jnp.einsum(self.up_eq, h, self.b[...].astype(x.dtype))

    def delta(self) -> jax.Array:
        """(alpha / rank) * A B in float32, in the Einsum's official weight layout."""
        a = self.a[...].astype(jnp.float32)
        b = self.b[...].astype(jnp.float32)
        return jnp.einsum(self.delta_eq, a, b, precision=jax.lax.Precision.HIGHEST) * self.scaling


# ------------------------------------------------------------------------------------------
# Choosing and applying


def resolve_targets(targets: str | Iterable[str]) -> tuple[str, ...]:
    """Target names and groups ("all", "attn", "mlp", "q", "o", "linear", ...) -> Einsum names."""
    if isinstance(targets, str):
        targets = [t for t in targets.replace(",", " ").split() if t]
    names: list[str] = []
    for target in targets:
        expanded = TARGET_GROUPS.get(target, (target,) if target in TARGET_GROUPS["all"] else None)
        if expanded is None:
            known = sorted(set(TARGET_GROUPS) | set(TARGET_GROUPS["all"]))
            raise ConfigError(f"unknown LoRA target {target!r}; known: {', '.join(known)}")
        names.extend(n for n in expanded if n not in names)
    if not names:
        raise ConfigError("no LoRA targets given; use e.g. 'all', 'attn' or 'mlp'")
    return tuple(names)


def einsums(model: nnx.Module) -> list[tuple[str, Einsum]]:
    """("layer_0/attn/q_einsum", module) for every Einsum of `model`, in a stable order."""
    return [
        ("/".join(map(str, path)), m) for path, m in model.iter_modules() if isinstance(m, Einsum)
    ]


def apply_lora(
    model: nnx.Module,
    rank: int = 8,
    alpha: float = 16.0,
    targets: str | Iterable[str] = "all",
    *,
    seed: int = 0,
    dtype=jnp.float32,
) -> nnx.Module:
    """Adds LoRA to every targeted Einsum of `model`, in place; returns the model.

    B starts at zero, so the adapted model computes exactly what the base did.
    """
    names = resolve_targets(targets)
    rng = np.random.default_rng(seed)
    chosen = [(path, m) for path, m in einsums(model) if path.rsplit("/", 1)[-1] in names]
    if not chosen:
        present = sorted({p.rsplit("/", 1)[-1] for p, _ in einsums(model)})
        raise ConfigError(
            f"LoRA targets {list(names)} match no projection of this model (it has "
            f"{', '.join(present)}; models with N == K heads have a fused qkv_einsum)"
        )
    for path, module in chosen:
        if module.lora is not None:
            raise ConfigError(f"{path} already has LoRA; merge or remove it first")
        module.lora = LoRA(module, rank, alpha, dtype=dtype, rng=rng)
    return model


def has_lora(model: nnx.Module) -> bool:
    return any(m.lora is not None for _, m in einsums(model))


def lora_state(model: nnx.Module) -> nnx.State:
    """The LoRA factors of `model` (the trainable part of a LoRA fine-tune)."""
    return nnx.state(model, LoRAParam)


def adapter_info(model: nnx.Module) -> dict:
    """Rank, alpha and the adapted modules of a model carrying LoRA."""
    adapted = [(path, m.lora) for path, m in einsums(model) if m.lora is not None]
    if not adapted:
        raise AdapterError("the model has no LoRA to describe; apply_lora() or load an adapter")
    ranks = {lora.rank for _, lora in adapted}
    alphas = {lora.alpha for _, lora in adapted}
    if len(ranks) != 1 or len(alphas) != 1:
        raise AdapterError(f"mixed LoRA ranks {ranks} / alphas {alphas} cannot be one adapter")
    dtypes = {str(lora.a[...].dtype) for _, lora in adapted}
    return dict(
        rank=ranks.pop(),
        alpha=alphas.pop(),
        dtype=dtypes.pop(),
        targets=sorted({p.rsplit("/", 1)[-1] for p, _ in adapted}),
        modules=[p for p, _ in adapted],
    )


# ------------------------------------------------------------------------------------------
# Merging


def merge(model: ModuleT) -> ModuleT:
    """A copy of `model` with every LoRA folded into its weight: w + (alpha / r) * A B.

    The sum is taken in float32 and cast to w's dtype; the copy has no LoRA left and can be
    saved with gemma_kit.save_checkpoint. The given model is not changed.
    """
    graphdef, state = nnx.split(model)
    copy = nnx.merge(graphdef, state)
    for path, module in einsums(copy):
        if module.lora is None:
            continue
        if module.w_scale is not None:
            raise AdapterError(
                f"{path} has an int8 base: merge the adapter into the original weights instead "
                "(gemma-kit merge --base CKPT --lora ADAPTER, or load the base unquantized)"
            )
        delta = module.lora.delta()
        if module.matvec:
            delta = to_matvec_value(module, "w", delta)
        w = module.w[...]
        module.w = type(module.w)((w.astype(jnp.float32) + delta).astype(w.dtype))
        module.lora = None
    return copy


def remove_lora(model: nnx.Module) -> nnx.Module:
    """Drops every LoRA from `model` in place (the base weights are untouched)."""
    for _, module in einsums(model):
        module.lora = None
    return model


# ------------------------------------------------------------------------------------------
# Saving and loading an adapter alone (the folder format: gemma_kit.checkpoint.adapter)


def save_adapter(
    model: nnx.Module,
    path: str | os.PathLike,
    *,
    overwrite: bool = False,
    extra: dict | None = None,
) -> pathlib.Path:
    """Writes the LoRA factors of `model` (and nothing of the base) to the folder `path`.

    The folder holds `adapter_config.json` (rank, alpha, adapted modules, base preset, and
    `extra`) and `params/`, the factors (see gemma_kit.checkpoint.adapter). It is written into
    a temporary folder renamed at the end, and only an earlier adapter folder is ever replaced.
    """
    config = getattr(model, "config", None)
    meta = dict(base_preset=getattr(config, "name", None), **adapter_info(model), **(extra or {}))
    return adapter_io.write_adapter(
        path, meta, nnx.to_pure_dict(lora_state(model)), overwrite=overwrite
    )


def load_adapter(model: nnx.Module, path: str | os.PathLike) -> nnx.Module:
    """Adds the saved adapter at `path` to `model` in place (unmerged); returns the model.

    An adapter that does not fit (another preset, another size, a module the model lacks)
    raises AdapterError and leaves the model without LoRA.
    """
    path = pathlib.Path(path).expanduser().absolute()
    meta = read_adapter_config(path)
    config = getattr(model, "config", None)
    base = meta.get("base_preset")
    if base and config is not None and base != config.name:
        raise AdapterError(
            f"adapter {str(path)!r} was trained on {base!r}, but the model is {config.name!r}"
        )
    present = {p for p, _ in einsums(model)}
    missing = [m for m in meta["modules"] if m not in present]
    if missing:
        raise AdapterError(f"adapter {str(path)!r} adapts {missing[0]}, which this model lacks")
    apply_lora(
        model,
        meta["rank"],
        meta["alpha"],
        meta["targets"],
        dtype=jnp.dtype(meta.get("dtype", "float32")),
    )
    try:
        adapted = {p for p, m in einsums(model) if m.lora is not None}
        if adapted != set(meta["modules"]):
            raise AdapterError(f"adapter {str(path)!r} does not cover the modules its targets name")
        state = lora_state(model)
        target = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nnx.to_pure_dict(state)
        )
        restored = adapter_io.read_adapter_params(path, target)
    except AdapterError:
        remove_lora(model)
        raise
    nnx.replace_by_pure_dict(state, restored)
    nnx.update(model, state)
    return model


def trainable_count(model: nnx.Module, kind=LoRAParam) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, kind))))


__all__: Sequence[str] = (
    "LoRA",
    "LoRAParam",
    "apply_lora",
    "merge",
    "remove_lora",
    "save_adapter",
    "load_adapter",
    "read_adapter_config",
    "lora_state",
    "adapter_info",
    "has_lora",
    "resolve_targets",
    "lora_equations",
    "einsums",
    "trainable_count",
)
