"""WARM (Ramé et al. 2024, 2401.12187): weight-averaged reward models, and the prediction
ensemble they approximate.

    folders = train_warm(config, members=4)             # 4 reward models from one init
    warm = average_reward_models(folders, out="runs/warm")       # one model, the mean weights
    ensemble = RewardEnsemble([load_reward_model(f) for f in folders])  # the mean of scores

WARM fine-tunes M reward models from ONE shared initialisation with diverse runs (here: data
orders, `data_seed`, or any other setting, e.g. learning rates) and averages their weights,
phi_WARM = (1/M) sum_i phi_i. From a shared initialisation the members stay linearly mode
connected, so the weight average (WA) scores close to the ensemble of their predictions (ENS,
(1/M) sum_i r_phi_i) to first order, at the cost of one model, and the paper finds it more
robust than ENS under label noise. With a frozen backbone and a linear head both are the same
number exactly (the score is linear in the head); tests/test_warm.py checks that.

Members share their initialisation when they differ only in data_seed, learning rate or the
like: `seed` (LoRA A factors, the head's draw, the held-out split) stays the same. The head
starts at zero by default, so any seed shares it.

Averaging, exactly:
  * LoRA members: the mean of their deltas, (1/M) sum_i s A_i B_i, NOT of their factors
    (mean(A_i B_i) != mean(A_i) mean(B_i)): gemma_kit.posttrain.merging.lora_average
    concatenates the factors into one LoRA of rank M * r with alpha M * alpha (the same
    scaling s = alpha / r), over the members' shared base. Merged, it equals the mean of the
    members' merged weights.
  * full members: the mean of every backbone parameter (gemma_kit.posttrain.merging.average),
    accumulated one member at a time in float32.
  * heads: the mean of the [1, D] weights.
Members of different bases, backbone kinds, sizes or LoRA settings are refused with one
CheckpointError naming the first difference.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import sys
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gemma_kit.errors import CheckpointError, ConfigError
from gemma_kit.posttrain import merging
from gemma_kit.posttrain.reward_model import (
    ADAPTER_DIR,
    CONFIG_FILE,
    HEAD_FILE,
    HeadParam,
    RewardModel,
    RewardTransformer,
    load_reward_model,
)

# reward_model.json keys that members must share (besides the backbone kind).
SHARED_KEYS = ("base", "trained_from", "config", "preset", "pad_id", "embed_dim")


def read_member(folder: str | os.PathLike) -> dict[str, Any]:
    """The reward_model.json of a reward model folder (CheckpointError if it is not one)."""
    path = pathlib.Path(folder).expanduser().absolute()
    file = path / CONFIG_FILE
    if not file.is_file():
        raise CheckpointError(f"{str(path)!r} is not a reward model folder (no {CONFIG_FILE})")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{file} is not valid JSON ({err})") from None


def check_members(folders: Sequence[pathlib.Path]) -> list[dict]:
    """The members' configs; CheckpointError naming the first setting two members differ in."""
    metas = [read_member(f) for f in folders]
    first = metas[0]
    for folder, meta in zip(folders[1:], metas[1:]):
        for key in ("backbone",) + SHARED_KEYS:
            if key == "trained_from" and (first.get(key) is None or meta.get(key) is None):
                continue  # older folders do not record it
            if meta.get(key) != first.get(key):
                raise CheckpointError(
                    f"cannot average reward models of different {key}s: {folders[0]} has "
                    f"{first.get(key)!r} and {folder} has {meta.get(key)!r}. WARM averages "
                    "models fine-tuned from one shared initialisation (same base, backbone "
                    "kind, size and LoRA settings)"
                )
        if first["backbone"] == "lora":
            a = _adapter_settings(folders[0])
            b = _adapter_settings(folder)
            if a != b:
                raise CheckpointError(
                    f"cannot average LoRA reward models with different adapters: {folders[0]} "
                    f"has {a} and {folder} has {b}"
                )
    return metas


def _adapter_settings(folder: pathlib.Path) -> dict:
    from gemma_kit.checkpoint.adapter import read_adapter_config

    meta = read_adapter_config(folder / ADAPTER_DIR)
    return {k: meta.get(k) for k in ("rank", "alpha", "targets", "modules", "dtype")}


def read_head(folder: pathlib.Path) -> np.ndarray:
    return np.load(folder / HEAD_FILE, allow_pickle=False).astype(np.float32)


def average_reward_models(
    folders: Sequence[str | os.PathLike],
    out: str | os.PathLike | None = None,
    *,
    weights: Sequence[float] | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> RewardModel:
    """The weight average of the reward models in `folders` (see the module docstring), saved
    to `out` when given. weights: one per member (>= 0, normalised; default uniform)."""
    paths = [pathlib.Path(f).expanduser().absolute() for f in folders]
    if len(paths) < 1:
        raise ConfigError("give at least one reward model folder to average")
    w = [1.0] * len(paths) if weights is None else [float(x) for x in weights]
    metas = check_members(paths)
    # merging.average checks the weights (one per member, >= 0, a positive sum) and
    # normalises them; the heads are averaged first, so bad weights fail before any loading.
    head = merging.average([{"score": read_head(p)} for p in paths], w)["score"]

    def say(text: str) -> None:
        if progress:
            print(text, file=sys.stderr)

    say(f"averaging {len(paths)} reward models ({metas[0]['backbone']} backbones)")
    first = load_reward_model(paths[0])
    if metas[0]["backbone"] == "lora":
        rm = _average_lora(first, paths, w)
    else:
        rm = _average_full(first, paths, w, say)
    rm.network.score.weight = HeadParam(jnp.asarray(head, jnp.float32))
    rm.name = f"WARM average of {len(paths)}"
    if out is not None:
        rm.save(out, overwrite=overwrite)
        say(f"wrote {pathlib.Path(out).expanduser().absolute()}")
    return rm


def _average_lora(
    first: RewardModel, paths: Sequence[pathlib.Path], w: Sequence[float]
) -> RewardModel:
    """The members' LoRA deltas averaged exactly, as one rank M * r adapter over the base."""
    from gemma_kit.checkpoint.adapter import read_adapter_params
    from gemma_kit.lora import adapter_info, apply_lora, lora_state, remove_lora

    model = first.network.model
    info = adapter_info(model)
    state = lora_state(model)
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nnx.to_pure_dict(state))
    runs = [nnx.to_pure_dict(state)] + [
        read_adapter_params(p / ADAPTER_DIR, target) for p in paths[1:]
    ]
    averaged = merging.lora_average(runs, w)
    m = len(paths)
    remove_lora(model)
    # Rank M * r with alpha M * alpha: the scaling alpha / r each member was trained with.
    apply_lora(
        model, info["rank"] * m, info["alpha"] * m, info["targets"], dtype=jnp.dtype(info["dtype"])
    )
    merged_state = lora_state(model)
    nnx.replace_by_pure_dict(merged_state, averaged)
    nnx.update(model, merged_state)
    rm = RewardModel(
        RewardTransformer(model, pad_id=first.network.pad_id), first.tokenizer, base=first.base
    )
    rm.trained_from = first.trained_from
    return rm


def _average_full(
    first: RewardModel, paths: Sequence[pathlib.Path], w: Sequence[float], say
) -> RewardModel:
    """The members' backbone parameters averaged, one member loaded at a time (float32 sums)."""
    model = first.network.model
    params = nnx.state(model, nnx.Param)
    dtypes = jax.tree.map(lambda x: x.dtype, nnx.to_pure_dict(params))
    total = jax.tree.map(lambda x: x.astype(jnp.float32), nnx.to_pure_dict(params))
    seen = w[0]
    for k, (path, wi) in enumerate(zip(paths[1:], w[1:]), start=2):
        say(f"  member {k} of {len(paths)}: {path}")
        member = nnx.to_pure_dict(nnx.state(load_reward_model(path).network.model, nnx.Param))
        # The running weighted mean, with merging.average's structure checks.
        total = merging.average([total, member], [seen, wi]) if seen + wi > 0 else total
        seen += wi
    averaged = jax.tree.map(lambda x, d: x.astype(d), total, dtypes)
    nnx.replace_by_pure_dict(params, averaged)
    nnx.update(model, params)
    rm = RewardModel(
        RewardTransformer(model, pad_id=first.network.pad_id), first.tokenizer, base=first.base
    )
    rm.trained_from = first.trained_from
    return rm


class RewardEnsemble:
    """The prediction ensemble of reward models: the mean of their scores (WARM's ENS). A
    reward (the protocol of gemma_kit.posttrain.rewards): ensemble(prompts, completions)."""

    def __init__(self, models: Sequence[RewardModel], weights: Sequence[float] | None = None):
        self.models = list(models)
        if not self.models:
            raise ConfigError("an ensemble needs at least one reward model")
        self.weights = None if weights is None else [float(x) for x in weights]
        self.name = f"ensemble of {len(self.models)}"

    def member_scores(
        self,
        prompts: Sequence,
        completions: Sequence[str],
        *,
        batch_size: int = 16,
        progress: bool = False,
    ) -> np.ndarray:
        """float32 [M, N]: each member's rewards."""
        return np.stack(
            [
                m.score(prompts, completions, batch_size=batch_size, progress=progress)
                for m in self.models
            ]
        )

    def score(
        self,
        prompts: Sequence,
        completions: Sequence[str],
        *,
        batch_size: int = 16,
        progress: bool = False,
    ) -> np.ndarray:
        scores = self.member_scores(prompts, completions, batch_size=batch_size, progress=progress)
        return np.asarray(merging.average([{"r": r} for r in scores], self.weights)["r"])

    def __call__(self, prompts: Sequence, completions: Sequence[str]) -> np.ndarray:
        return self.score(prompts, completions)


@dataclasses.dataclass
class WarmResult:
    members: list[pathlib.Path]  # each member's reward model folder
    average: pathlib.Path  # the weight average's folder
    results: list[Any]  # each member's TrainResult, without .model (None: trained before)


def member_settings(config, members: int | Sequence[dict]) -> list[dict]:
    """Each member's setting changes: M members differing in data order (data_seed = the
    config's order seed + i), or the given list of changes."""
    if isinstance(members, int):
        if members < 1:
            raise ConfigError(f"members must be >= 1, got {members}")
        return [{"data_seed": config.order_seed + i} for i in range(members)]
    members = [dict(m) for m in members]
    if not members:
        raise ConfigError("give at least one member")
    for changes in members:
        config.check_names(changes, "a WARM member")
        for key in (
            "seed",
            "method",
            "lora_rank",
            "lora_alpha",
            "lora_targets",
            "base",
            "head_init_std",
        ):
            if key in changes and changes[key] != getattr(config, key):
                raise ConfigError(
                    f"WARM members share their initialisation: a member may not change {key!r} "
                    "(vary data_seed, learning_rate, steps and the like instead)"
                )
    return members


def train_warm(
    config,
    members: int | Sequence[dict] = 4,
    *,
    model=None,
    tokenizer=None,
    resume: bool = False,
    average: bool = True,
) -> WarmResult:
    """Trains the WARM members (config.out_dir/member-i, i = 0..M-1) from one initialisation,
    one after another, then writes their weight average to config.out_dir/average.

    config: a RewardConfig. members: M (data orders data_seed + i) or a list of setting changes,
    one per member (e.g. [{"learning_rate": 1e-4}, {"learning_rate": 3e-4}]).
    resume: members whose reward model folder exists are kept; a stopped member is resumed.
    """
    from gemma_kit.posttrain.reward_train import RESULT_DIR, train_reward_model

    root = pathlib.Path(config.out_dir).expanduser().absolute()
    settings = member_settings(config, members)
    folders: list[pathlib.Path] = []
    results: list[Any] = []
    for i, changes in enumerate(settings):
        member = config.replace(out_dir=str(root / f"member-{i}"), **changes).validate()
        folder = pathlib.Path(member.out_dir) / RESULT_DIR
        done = (folder / CONFIG_FILE).is_file() and (
            pathlib.Path(member.out_dir) / "summary.json"
        ).is_file()
        if resume and done:
            folders.append(folder)
            results.append(None)
            continue
        can_resume = resume and (pathlib.Path(member.out_dir) / "checkpoints").is_dir()
        result = train_reward_model(member, model=model, tokenizer=tokenizer, resume=can_resume)
        if result.interrupted:
            raise KeyboardInterrupt(f"WARM member {i} was interrupted; continue with resume")
        assert result.model_dir is not None  # RewardTraining.save_result wrote it
        result.model = None  # each member holds its own copy of the base: the folder suffices
        folders.append(pathlib.Path(result.model_dir))
        results.append(result)
    out = root / "average"
    if average:
        average_reward_models(folders, out, overwrite=True, progress=config.progress)
    return WarmResult(folders, out, results)
