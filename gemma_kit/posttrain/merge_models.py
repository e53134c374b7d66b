"""Merging several fine-tuned runs of one base into one model folder (`gemma-kit merge
--method`): LoRA adapters exactly on their factors, model folders per tensor.

    merge_models("base/", ["runs/a/adapter", "runs/b/adapter"], "merged/", method="slerp")

methods (gemma_kit.posttrain.merging does the arithmetic; runs are parameters of one base, whose
task vectors the merges take themselves):
    lora     one adapter folded into the base (gemma_kit.checkpoint.merge, the default)
    average  the mean of M runs (WARM's weight average; for adapters the exact mean of their
             deltas, a LoRA of rank M r)
    lerp     (1 - lam) a + lam b of two runs
    slerp    spherical interpolation of two runs' task vectors, per tensor
    liti     (1 - eta) base + eta run, of one run
and every method but lora and liti takes eta too: LITI of the merge towards the base (eta = 1:
the merge itself).

Runs must come from one base: adapters record the base they were trained on (the folder, or
"default") and its preset; adapters of different bases, presets, ranks or targets, and model
folders of other shapes, are one CheckpointError before anything is written. The result is a
model folder (checkpoint/ in the official layout + tokenizer.model) written through a staging
folder renamed at the end.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from gemma_kit.checkpoint import convert
from gemma_kit.checkpoint.adapter import is_adapter_folder, read_adapter_config
from gemma_kit.checkpoint.official import find_checkpoint, find_tokenizer
from gemma_kit.config import Config
from gemma_kit.errors import CheckpointError, ConfigError
from gemma_kit.posttrain import merging

METHODS = ("lora", "average", "lerp", "slerp", "liti")
RUNS = {"lora": (1, 1), "average": (2, None), "lerp": (2, 2), "slerp": (2, 2), "liti": (1, 1)}


def check_method(method: str, count: int, lam: float, eta: float) -> None:
    """ConfigError for an unknown method, a wrong number of runs, or lam / eta outside [0, 1]."""
    if method not in METHODS:
        raise ConfigError(f"unknown merge method {method!r}; use one of {', '.join(METHODS)}")
    low, high = RUNS[method]
    if count < low or (high is not None and count > high):
        want = f"exactly {low}" if low == high else f"at least {low}"
        raise ConfigError(f"--method {method} merges {want} run(s), got {count}")
    merging.check_fraction("lambda", lam)
    merging.check_fraction("eta", eta)
    if method == "lora" and eta != 1.0:
        raise ConfigError("--eta applies to average, lerp, slerp and liti, not to lora")


def check_adapters(paths: Sequence[str | os.PathLike]) -> list[dict]:
    """The adapters' configs; CheckpointError unless they share base, preset, rank, alpha and
    adapted modules."""
    metas = [read_adapter_config(p) for p in paths]
    first = metas[0]
    for path, meta in zip(paths[1:], metas[1:]):
        for key, what in (
            ("base", "base model"),
            ("base_preset", "model size"),
            ("rank", "LoRA rank"),
            ("alpha", "LoRA alpha"),
            ("modules", "adapted modules"),
        ):
            if meta.get(key) != first.get(key):
                raise CheckpointError(
                    f"{path} and {paths[0]} are runs of different {what}s ({meta.get(key)!r} "
                    f"and {first.get(key)!r}); only runs of one base model with the same LoRA "
                    "settings can be merged"
                )
    return metas


def merge_models(
    base: str | os.PathLike,
    runs: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    method: str = "average",
    lam: float = 0.5,
    eta: float = 1.0,
    preset: str | Config | None = None,
    overwrite: bool = False,
) -> pathlib.Path:
    """Merges `runs` (all adapter folders, or all model folders) of the base checkpoint `base`
    into the model folder `out` (see the module docstring)."""
    runs = list(runs)
    check_method(method, len(runs), lam, eta)
    if method == "lora":
        from gemma_kit.checkpoint.merge import merge_checkpoint

        return merge_checkpoint(base, runs[0], out, preset=preset, overwrite=overwrite)
    adapters = [is_adapter_folder(pathlib.Path(p).expanduser()) for p in runs]
    if any(adapters) and not all(adapters):
        raise CheckpointError("give only adapter folders or only model folders to merge, not both")
    find_checkpoint(base)
    convert.check_model_folder_target(out, overwrite)
    from gemma_kit.loading import load_model

    if all(adapters):
        metas = check_adapters(runs)
        model = load_model(base, preset)
        params = _merge_adapters(model, runs, metas[0], method, lam, eta)
    else:
        model = load_model(base, preset)
        init = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        trees = [nnx.to_pure_dict(nnx.state(load_model(p, model.config), nnx.Param)) for p in runs]
        names = [str(p) for p in runs]
        merging.check_same_structure([init, *trees], ["the base", *names])
        if method == "average":
            merged = merging.average(trees)
        elif method in ("lerp", "slerp"):
            merged = getattr(merging, method)(init, trees[0], trees[1], lam)
        else:
            merged = trees[0]
        params = merging.liti(init, merged, eta) if (eta != 1.0 or method == "liti") else merged
    tokenizer = find_tokenizer(base)
    return convert.write_model_folder(
        out, params, tokenizer.read_bytes() if tokenizer else None, overwrite=overwrite
    )


def _merge_adapters(model, runs, meta: dict, method: str, lam: float, eta: float) -> dict:
    """The base's parameters with the exact merge of the adapters' deltas folded in."""
    from gemma_kit.checkpoint.adapter import read_adapter_params
    from gemma_kit.lora import apply_lora, load_adapter, lora_state, merge

    if meta.get("base_preset") and meta["base_preset"] != model.config.name:
        raise CheckpointError(
            f"the adapters were trained on {meta['base_preset']!r}, but the "
            f"base is {model.config.name!r}"
        )
    template = nnx.merge(*nnx.split(model))
    load_adapter(template, runs[0])  # checks that the adapter fits this base
    target = nnx.to_pure_dict(lora_state(template))
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), target)
    factors = [read_adapter_params(p, shapes) for p in runs]
    if method == "average":
        merged = merging.lora_average(factors)
    elif method == "lerp":
        merged = merging.lora_lerp(factors[0], factors[1], lam)
    elif method == "slerp":
        merged = merging.lora_slerp(factors[0], factors[1], lam)
    else:
        merged = factors[0]
    if eta != 1.0 or method == "liti":
        merged = merging.lora_liti(merged, eta)
    rank = jax.tree.leaves(merged)[0].shape[-1]
    carrier = nnx.merge(*nnx.split(model))
    # The merged factors have rank M r; alpha scaled with it keeps the runs' alpha / r.
    apply_lora(
        carrier, rank, meta["alpha"] * rank / meta["rank"], meta["targets"], dtype=jnp.float32
    )
    state = lora_state(carrier)
    nnx.replace_by_pure_dict(state, merged)
    nnx.update(carrier, state)
    return nnx.to_pure_dict(nnx.state(merge(carrier), nnx.Param))
