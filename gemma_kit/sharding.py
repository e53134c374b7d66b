"""Placing parameters on a device mesh by parameter name.

    mesh = make_mesh(fsdp=2, tensor=4)                 # axes ("data", "fsdp", "tensor")
    model = shard_model(model, mesh)                   # or: state = shard_params(state, mesh)
    Sampler(model, tokenizer).generate(...)            # jit partitions the computation

The mesh has three axes, any of them of size 1:
  * "data"   splits the batch; parameters are replicated along it.
  * "fsdp"   splits the embedding dimension D of every weight (each device holds a slice of each
             parameter, gathered when used: memory per device falls with the axis size).
  * "tensor" splits heads, the feed-forward dimension F and the vocabulary (Megatron style:
             each device computes its share of heads / hidden units / logits).

Each canonical parameter (gemma_kit.checkpoint.official names) gets a PartitionSpec from the
first rule whose pattern matches its path ("layer_3/attn/q_einsum/w"). A dimension is split only
where its size is divisible by the mesh axes assigned to it; otherwise that dimension stays whole
(Gemma 3 270M / 1B have one kv head, so `kv_einsum`'s K axis is never split). Parameters no rule
matches are replicated. Sharding changes where the work happens, never the result: jit inserts
the collectives, so any spec is correct and the rules only decide how fast and how small.

The rules assume the official weight layouts; shard the model before handing it to a Sampler
(its CPU matrix-vector layout is a transposed copy made from the sharded arrays).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gemma_kit.errors import ConfigError

AXES = ("data", "fsdp", "tensor")

# One entry per dimension: a mesh axis name, a tuple of names (split over their product), or
# None (not split). A rule's spec is such a tuple, or a function of the shape returning one.
DimSpec = str | tuple[str, ...] | None
Spec = tuple[DimSpec, ...]
Rule = tuple[str, Spec | Callable[[tuple[int, ...]], Spec]]


def _gating_spec(shape: tuple[int, ...]) -> Spec:
    # [2, F, D] in every release except Gemma 2 2B's [2, D, F]. F is 4-8x D in all of them, so
    # the larger axis is F; were they equal, either reading splits the weight evenly.
    if shape[1] >= shape[2]:
        return (None, "tensor", "fsdp")
    return (None, "fsdp", "tensor")


DEFAULT_RULES: tuple[Rule, ...] = (
    (r"(^|/)embedder/input_embedding$", ("tensor", "fsdp")),  # [V, D]
    (r"(^|/)embedder/input_embedding_scale$", ("tensor", None)),  # [V, 1], int8 tables only
    (r"(^|/)q_einsum/w$", ("tensor", "fsdp", None)),  # [N, D, H]
    (r"(^|/)kv_einsum/w$", (None, "tensor", "fsdp", None)),  # [2, K, D, H]
    (r"(^|/)qkv_einsum/w$", (None, "tensor", "fsdp", None)),  # [3, N, D, H]
    (r"(^|/)attn_vec_einsum/w$", ("tensor", None, "fsdp")),  # [N, H, D]
    (r"(^|/)gating_einsum/w$", _gating_spec),  # [2, F, D] or [2, D, F]
    (r"(^|/)linear/w$", ("tensor", "fsdp")),  # [F, D]
    # Norm scales ([D], [H]) are tiny and read by every device: replicated.
    (r"(^|/)scale$", ()),
)


def make_mesh(data: int = 1, fsdp: int = 1, tensor: int = 1, *, devices=None) -> Mesh:
    """A ("data", "fsdp", "tensor") mesh over the first data * fsdp * tensor devices."""
    sizes = dict(data=data, fsdp=fsdp, tensor=tensor)
    for name, size in sizes.items():
        if not (isinstance(size, (int, np.integer)) and size >= 1):
            raise ConfigError(f"mesh axis {name!r} must be an integer >= 1, got {size!r}")
    devices = list(jax.devices() if devices is None else devices)
    needed = data * fsdp * tensor
    if needed > len(devices):
        raise ConfigError(
            f"a data={data} x fsdp={fsdp} x tensor={tensor} mesh needs {needed} devices but "
            f"{len(devices)} are available; make the axes smaller (on CPU, "
            "XLA_FLAGS=--xla_force_host_platform_device_count=N before JAX starts fakes N)"
        )
    try:
        # Topology-aware order on TPU/GPU (neighbours on the fast axes); plain order elsewhere.
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh((data, fsdp, tensor), devices=devices[:needed])
    except (ValueError, NotImplementedError, AssertionError):
        grid = np.asarray(devices[:needed], dtype=object).reshape(data, fsdp, tensor)
    return Mesh(grid, AXES)


def _axis_sizes(mesh: Mesh | Mapping[str, int]) -> dict[str, int]:
    return dict(mesh.shape) if isinstance(mesh, Mesh) else dict(mesh)


def spec_for(
    path: str,
    shape: Sequence[int],
    mesh: Mesh | Mapping[str, int],
    rules: Sequence[Rule] | None = None,
) -> PartitionSpec:
    """The PartitionSpec of one parameter (path like "layer_0/attn/q_einsum/w")."""
    shape = tuple(int(n) for n in shape)
    sizes = _axis_sizes(mesh)
    for pattern, spec in (*(rules or ()), *DEFAULT_RULES):  # noqa: B007 (used after the break)
        if re.search(pattern, path):
            break
    else:
        return PartitionSpec()  # unknown parameter: replicated
    if callable(spec):
        spec = spec(shape)
    spec = tuple(spec)
    if not spec:
        return PartitionSpec()
    if len(spec) != len(shape):
        raise ConfigError(
            f"sharding rule {pattern!r} gives {len(spec)} axes for {path} of shape {shape}; "
            "give one entry (mesh axis name, tuple of names, or None) per dimension"
        )
    used: set[str] = set()
    out: list[DimSpec] = []
    for dim, entry in zip(shape, spec):
        names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        for name in names:
            if name not in sizes:
                raise ConfigError(
                    f"sharding rule {pattern!r} names mesh axis {name!r}; the mesh has "
                    f"{', '.join(map(repr, sizes))}"
                )
            if name in used:
                raise ConfigError(f"sharding rule {pattern!r} uses mesh axis {name!r} twice")
            used.add(name)
        # Size-1 axes split nothing: leaving them out keeps specs readable and comparable.
        names = tuple(n for n in names if sizes[n] > 1)
        split = int(np.prod([sizes[n] for n in names])) if names else 1
        if not names or dim % split:
            out.append(None)  # not divisible (or nothing to split over): keep the dim whole
        else:
            out.append(names[0] if len(names) == 1 else names)
    while out and out[-1] is None:  # P("tensor", None) and P("tensor") are the same layout
        out.pop()
    return PartitionSpec(*out)


def _map_tree(fn, tree, prefix: str = ""):
    """fn(path, leaf) over a nested Mapping of arrays, keeping its structure."""
    if isinstance(tree, Mapping):
        return {k: _map_tree(fn, v, f"{prefix}/{k}" if prefix else str(k)) for k, v in tree.items()}
    return fn(prefix, tree)


def param_specs(params, mesh: Mesh | Mapping[str, int], rules: Sequence[Rule] | None = None):
    """The PartitionSpec of every parameter, in the structure of `params`.

    params: a nested dict of arrays (or anything with a .shape, e.g. jax.ShapeDtypeStruct from
    nnx.eval_shape), or an nnx.State. mesh: a Mesh, or just its axis sizes {"tensor": 4, ...}.
    rules: (regex over the "/"-joined path, spec) pairs tried before DEFAULT_RULES.
    """
    if isinstance(params, nnx.State):
        params = nnx.to_pure_dict(params)
    return _map_tree(lambda path, x: spec_for(path, np.shape(x), mesh, rules), params)


def put(x, sharding: jax.sharding.Sharding) -> jax.Array:
    """jax.device_put(x, sharding), also when the sharding spans other processes' devices.

    In a multi-process run (jax.distributed) every process holds the whole array x, on its own
    device or the host; device_put cannot move a device array to another process's devices, so
    each process hands over the slices its own devices hold instead.
    """
    if isinstance(x, jax.Array) and x.is_fully_addressable and not sharding.is_fully_addressable:
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
    return jax.device_put(x, sharding)


def shard_params(params, mesh: Mesh, rules: Sequence[Rule] | None = None):
    """Places every parameter with a NamedSharding on `mesh` by its name (see the module doc).

    params: a nested dict of arrays (a canonical checkpoint tree, numpy or jax) -> the same dict
    of sharded jax arrays; or an nnx.State (nnx.state(model) / nnx.split(model)[1]) -> a new
    State with sharded arrays (the given one is left as it is). Feed the result to
    nnx.update(model, state), nnx.merge, or gemma_kit.loading.model_from_params.
    """

    def place(path, x):
        return put(x, NamedSharding(mesh, spec_for(path, np.shape(x), mesh, rules)))

    if isinstance(params, nnx.State):
        placed = _map_tree(place, nnx.to_pure_dict(params))
        state = jax.tree.map(lambda x: x, params)  # a new State: the caller's stays untouched
        nnx.replace_by_pure_dict(state, placed)
        return state
    if not isinstance(params, Mapping):
        raise TypeError(f"shard_params takes a dict of arrays or an nnx.State, got {type(params)}")
    return _map_tree(place, params)


def shard_model(model: nnx.Module, mesh: Mesh, rules: Sequence[Rule] | None = None):
    """Moves `model`'s parameters onto `mesh` in place (nnx.update) and returns the model."""
    nnx.update(model, shard_params(nnx.state(model, nnx.Param), mesh, rules))
    return model
