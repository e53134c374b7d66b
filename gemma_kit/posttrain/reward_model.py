"""Reward models: a Gemma backbone with a scalar head, the Bradley-Terry loss, save, load, export.

The network is transformers' `Gemma2ForSequenceClassification` /
`Gemma3TextForSequenceClassification` with one label: the final-normed hidden state of the last
token that is not padding (the rightmost id != pad id, so left- and right-padded batches agree)
times a [1, D] weight, no bias. Its parameter tree has the same two parts as theirs: `model`
(the Transformer, whose names map onto transformers' `model.*` through gemma_kit.checkpoint.hf)
and `score/weight` (`score.weight`), so export and parity are one-to-one.

    rm = RewardModel.from_base("default", method="lora")     # the 270M + LoRA + a zero head
    rm.score(prompts, completions)                            # float32 [N], batched, progress
    rm.save("runs/rm"); rm = load_reward_model("runs/rm")
    rm.export_hf("runs/rm-hf")     # AutoModelForSequenceClassification.from_pretrained(...)
    best_of_n(sampler, prompts, 8, rm)                        # a reward model is a reward

Training is a loss on the one training core: `reward_loss(network, batch, frozen)` returns
(loss sum, number of pairs, metric sums) for a batch of preference pairs
(gemma_kit.posttrain.preferences). With LoRA the backbone trains its LoRA factors and the head
trains in full (`TRAINABLE["lora"]`: LoRA on a [1, D] head would make no sense).

A reward model folder holds reward_model.json (format, backbone kind, base, pad id), score.npy
(the head, [1, D] float32), tokenizer.model, and either checkpoint/ (a full backbone, official
Orbax layout) or adapter/ (a LoRA adapter over the base the JSON names). It is written through
gemma_kit.checkpoint.staging, so an interrupted save never leaves a folder that looks complete.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from gemma_kit.errors import CheckpointError, CheckpointNotFoundError, RewardError
from gemma_kit.lora import LoRAParam, apply_lora, has_lora
from gemma_kit.posttrain.losses import (
    bradley_terry_loss,
    bradley_terry_losses,
    reward_centering,
)
from gemma_kit.posttrain.preferences import Preferences, encode_pair, pad_right
from gemma_kit.tokenizer import Tokenizer
from gemma_kit.transformer import Transformer

FORMAT = "gemma_kit-reward-model"
VERSION = 1
CONFIG_FILE = "reward_model.json"
HEAD_FILE = "score.npy"
CHECKPOINT_DIR = "checkpoint"
ADAPTER_DIR = "adapter"
TOKENIZER_FILE = "tokenizer.model"
DEFAULT_BASE = "default"  # the embedded Gemma 3 270M


class HeadParam(nnx.Param):
    """The reward head's weight: an nnx.Param (full fine-tuning trains it) of its own type, so
    that LoRA training can train it in full beside the LoRA factors."""


# What the training core differentiates for each method.
TRAINABLE = {"lora": nnx.Any(LoRAParam, HeadParam), "full": nnx.Param}


class ScoreHead(nnx.Module):
    """transformers' `score = nn.Linear(D, 1, bias=False)`: `weight` [1, D], HF's layout.

    Initialised to zeros unless init_std > 0: every pair then starts at reward 0 (the
    Bradley-Terry loss at log 2), and models trained from one initialisation (WARM) share it
    trivially.
    """

    def __init__(self, embed_dim: int, *, init_std: float = 0.0, seed: int = 0):
        rng = np.random.default_rng(seed)
        weight = (
            rng.normal(0.0, init_std, (1, embed_dim)) if init_std > 0 else np.zeros((1, embed_dim))
        )
        self.weight = HeadParam(jnp.asarray(weight, jnp.float32))

    def __call__(self, pooled: jax.Array) -> jax.Array:
        """[B, D] -> [B] float32 (the product is taken in float32)."""
        return jnp.einsum(
            "BD,D->B", pooled.astype(jnp.float32), self.weight[...][0].astype(jnp.float32)
        )


def last_token_index(tokens: jax.Array, pad_id: int) -> jax.Array:
    """[B, T] -> [B]: the rightmost position holding a real token (0 for an all-pad row), as
    transformers' GenericForSequenceClassification pools."""
    T = tokens.shape[1]
    return jnp.max(jnp.where(tokens != pad_id, jnp.arange(T), 0), axis=1)


class RewardTransformer(nnx.Module):
    """A Gemma Transformer (`model`) with a scalar head (`score`): tokens [B, T] -> rewards [B].

    Padding is recognised by pad_id, left or right; positions count the real tokens of each row
    (gemma_kit.transformer.default_positions).
    """

    def __init__(
        self, model: Transformer, *, pad_id: int = 0, init_std: float = 0.0, seed: int = 0
    ):
        self.model = model
        self.score = ScoreHead(model.config.embed_dim, init_std=init_std, seed=seed)
        self.pad_id = int(pad_id)

    @property
    def config(self):
        """The backbone's Config (what the training core reports and checks)."""
        return self.model.config

    def __call__(self, tokens: jax.Array) -> jax.Array:
        tokens = jnp.asarray(tokens)
        valid = tokens != self.pad_id
        hidden = self.model.hidden_states(tokens, mask=valid)  # [B, T, D]
        last = last_token_index(tokens, self.pad_id)
        pooled = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]  # [B, D]
        return self.score(pooled)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _forward(state, tokens, *, graphdef):
    return nnx.merge(graphdef, state)(tokens)


# --------------------------------------------------------------------------------------------
# The Bradley-Terry loss (core convention)


def pair_metric_sums(
    chosen: jax.Array, rejected: jax.Array, valid: jax.Array | None = None
) -> dict[str, jax.Array]:
    """Sums over pairs (divide by the pair count): accuracy counts chosen > rejected strictly,
    as TRL's RewardTrainer does. valid [B]: each pair's weight (0 for padding pairs)."""
    v = jnp.ones_like(chosen) if valid is None else valid.astype(jnp.float32)
    return dict(
        accuracy=jnp.sum(v * (chosen > rejected).astype(jnp.float32)),
        margin=jnp.sum(v * (chosen - rejected)),
        chosen_reward=jnp.sum(v * chosen),
        rejected_reward=jnp.sum(v * rejected),
    )


def reward_loss(
    network: RewardTransformer,
    batch: dict,
    frozen=None,
    *,
    use_margin: bool = True,
    center_coefficient: float | None = None,
):
    """(loss sum, number of pairs, metric sums) of a batch of pairs, in the training core's
    convention `(model, batch, frozen) -> (loss_sum, normaliser, metrics)`.

    batch: "chosen", "rejected" int32 [b, T] (one length T: chosen and rejected run as one
    [2b, T] forward pass), optionally "margin" [b] (used when use_margin) and "valid" [b] (each
    pair's weight: 0 for the padding pairs of a held-out batch; default all 1). The loss is
    TRL's RewardTrainer's (gemma_kit.posttrain.losses.bradley_terry_losses): -log sigmoid(r_c -
    r_r - margin), plus center_coefficient * (r_c + r_r)^2 per pair (the summand of
    losses.reward_centering: Eisenstein et al. 2023; TRL's center_rewards_coefficient, 0.01
    suggested) when given. `frozen` is unused: no reference model.
    """
    del frozen
    b = batch["chosen"].shape[0]
    rewards = network(jnp.concatenate([batch["chosen"], batch["rejected"]]))
    chosen, rejected = rewards[:b], rewards[b:]
    margin = batch.get("margin") if use_margin else None
    per_pair = bradley_terry_losses(chosen, rejected, margin=margin)
    if center_coefficient:
        per_pair = per_pair + center_coefficient * (chosen + rejected) ** 2
    valid = batch.get("valid")
    v = jnp.ones((b,), jnp.float32) if valid is None else valid.astype(jnp.float32)
    return jnp.sum(v * per_pair), jnp.sum(v), pair_metric_sums(chosen, rejected, v)


# --------------------------------------------------------------------------------------------
# The user-facing model


class RewardModel:
    """A RewardTransformer with its tokenizer: scoring text, the reward protocol, save, export.

    base: where the backbone came from (a checkpoint folder, or "default" for the embedded
      270M); a LoRA reward model saves its adapter over this base and reloads it from there.
    """

    def __init__(
        self,
        network: RewardTransformer,
        tokenizer: Tokenizer | None = None,
        *,
        base: str | os.PathLike | None = None,
        name: str | None = None,
    ):
        self.network = network
        self.tokenizer = tokenizer
        self.base = (
            None
            if base is None
            else (
                base
                if str(base) == DEFAULT_BASE
                else str(pathlib.Path(base).expanduser().absolute())
            )
        )
        self.name = name or "reward model"
        # The checkpoint training started from, for both backbone kinds: what WARM checks its
        # members share (a LoRA model's `base` is that too; a full one reloads from itself).
        self.trained_from = self.base

    @classmethod
    def from_base(
        cls,
        base="default",
        *,
        method: str = "lora",
        rank: int = 8,
        alpha: float = 16.0,
        targets="all",
        dtype=None,
        init_std: float = 0.0,
        seed: int = 0,
        preset=None,
    ) -> RewardModel:
        """A new reward model: the base checkpoint ("default": the embedded 270M), LoRA on
        `targets` (method "lora") or every weight trainable ("full"), and a fresh head."""
        if method not in TRAINABLE:
            raise RewardError(f"method must be one of {sorted(TRAINABLE)}, got {method!r}")
        model, tokenizer = _load_base(base, preset, dtype)
        if method == "lora":
            apply_lora(model, rank, alpha, targets, seed=seed)
        network = RewardTransformer(model, pad_id=tokenizer.pad_id, init_std=init_std, seed=seed)
        return cls(network, tokenizer, base=base)

    @property
    def config(self):
        return self.network.model.config

    @property
    def method(self) -> str:
        return "lora" if has_lora(self.network.model) else "full"

    def as_reward(self) -> RewardModel:
        return self  # __call__ is the reward protocol

    def merged(self) -> RewardModel:
        """A copy for scoring with the LoRA adapter folded into the backbone's weights
        (gemma_kit.lora.merge): ~2x faster on CPU than the unmerged adapter (bench_bon), with
        rewards that differ by the rounding of the fold to the weights' dtype. Itself if there
        is no adapter. It saves as a full reward model."""
        if self.method != "lora":
            return self
        from gemma_kit.lora import merge

        network = RewardTransformer(merge(self.network.model), pad_id=self.network.pad_id)
        network.score.weight = HeadParam(self.network.score.weight[...])
        merged = RewardModel(network, self.tokenizer, name=self.name)
        merged.trained_from = self.trained_from
        return merged

    def __call__(self, prompts: Sequence, completions: Sequence[str]) -> np.ndarray:
        return self.score(prompts, completions, progress=False)

    def score(
        self,
        prompts: Sequence,
        completions: Sequence[str],
        *,
        batch_size: int = 16,
        progress: bool = True,
    ) -> np.ndarray:
        """float32 [N]: the reward of each (prompt, completion), tokenised as preference pairs
        are (preferences.encode_pair: plain text ends with <eos>, a chat reply with
        <end_of_turn>). prompts[i] is text or a message list."""
        if self.tokenizer is None:
            raise RewardError(
                "this reward model has no tokenizer; pass tokenizer= when making "
                "it, or score token ids with score_ids()"
            )
        prompts, completions = list(prompts), list(completions)
        if len(prompts) != len(completions):
            raise RewardError(f"{len(prompts)} prompts for {len(completions)} completions")
        seqs = [encode_pair(self.tokenizer, p, c)[0] for p, c in zip(prompts, completions)]
        return self.score_ids(seqs, batch_size=batch_size, progress=progress)

    def score_ids(
        self, seqs: Sequence[Sequence[int]], *, batch_size: int = 16, progress: bool = False
    ) -> np.ndarray:
        """float32 [N]: the reward of each id sequence (no padding inside).

        Sequences are run in batches of similar length, right-padded to a multiple of 16 (few
        compiled shapes, little padding); every batch has the same number of rows.
        """
        n = len(seqs)
        out = np.zeros(n, np.float32)
        if n == 0:
            return out
        limit = self.config.max_context
        longest = max(len(s) for s in seqs)
        if longest > limit:
            raise RewardError(
                f"a sequence of {longest} tokens is longer than the model's context ({limit})"
            )
        if min(len(s) for s in seqs) == 0:
            raise RewardError("an empty token sequence cannot be scored")
        graphdef, state = nnx.split(self.network)
        rows = min(batch_size, n)
        order = sorted(range(n), key=lambda i: len(seqs[i]))
        filler = [seqs[order[0]][0]]  # a one-token row fills a short last batch
        batches = [order[i : i + rows] for i in range(0, n, rows)]
        for chunk in tqdm(
            batches, desc="scoring", unit="batch", disable=not progress or len(batches) < 2
        ):
            batch = [list(seqs[i]) for i in chunk] + [filler] * (rows - len(chunk))
            length = min(-(-max(map(len, batch)) // 16) * 16, limit)
            tokens = pad_right(batch, length, self.network.pad_id)
            rewards = _forward(state, jnp.asarray(tokens), graphdef=graphdef)
            out[chunk] = np.asarray(rewards)[: len(chunk)]
        return out

    def evaluate(
        self,
        pairs: Preferences,
        *,
        batch_size: int = 16,
        progress: bool = False,
        center_coefficient: float | None = None,
    ) -> dict[str, float]:
        """Held-out metrics of preference pairs: pairwise accuracy (chosen scored strictly
        above rejected), the Bradley-Terry loss (margins included), mean margin and rewards."""
        seqs = []
        for side in ("chosen", "rejected"):
            tokens = getattr(pairs, side)
            ends = np.asarray(last_token_index(jnp.asarray(tokens), self.network.pad_id)) + 1
            seqs += [row[:end].tolist() for row, end in zip(tokens, ends)]
        rewards = self.score_ids(seqs, batch_size=batch_size, progress=progress)
        chosen, rejected = jnp.asarray(rewards[: len(pairs)]), jnp.asarray(rewards[len(pairs) :])
        loss = bradley_terry_loss(chosen, rejected, margin=jnp.asarray(pairs.margin))
        if center_coefficient:
            loss = loss + center_coefficient * reward_centering(chosen, rejected)
        sums = pair_metric_sums(chosen, rejected)
        return dict(
            loss=float(loss),
            pairs=len(pairs),
            **{k: float(v) / len(pairs) for k, v in sums.items()},
        )

    # -- files --------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> pathlib.Path:
        """Writes the reward model folder (module docstring); returns its absolute path."""
        from gemma_kit.checkpoint import official, staging
        from gemma_kit.lora import save_adapter

        lora = self.method == "lora"
        if lora and self.base is None:
            raise RewardError(
                "a LoRA reward model is saved as an adapter over its base, but "
                "this one does not know its base: make it with base=PATH (the "
                "checkpoint its backbone was loaded from, or 'default')"
            )
        out = pathlib.Path(path).expanduser().absolute()
        meta = dict(
            format=FORMAT,
            version=VERSION,
            backbone="lora" if lora else "full",
            base=self.base if lora else None,
            trained_from=self.trained_from,
            preset=self.config.name,
            param_dtype=weights_dtype(self.network.model),
            config=config_to_json(self.config),
            pad_id=self.network.pad_id,
            embed_dim=self.config.embed_dim,
        )
        head = np.asarray(self.network.score.weight[...], np.float32)
        with staging.staged_folder(
            out,
            overwrite=overwrite,
            what="gemma_kit reward model folder",
            replaceable=is_reward_model_folder,
        ) as folder:
            if lora:
                save_adapter(self.network.model, folder / ADAPTER_DIR)
            else:
                from gemma_kit.layers import Einsum

                if any(
                    isinstance(m, Einsum) and m.matvec for _, m in self.network.model.iter_modules()
                ):
                    raise RewardError(
                        "the backbone is in the sampler's transposed layout; save "
                        "the original model"
                    )
                params = nnx.to_pure_dict(nnx.state(self.network.model, nnx.Param))
                official.save_params(params, folder / CHECKPOINT_DIR)
            np.save(folder / HEAD_FILE, head, allow_pickle=False)
            if self.tokenizer is not None:
                (folder / TOKENIZER_FILE).write_bytes(self.tokenizer.to_bytes())
            (folder / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        return out

    def export_hf(
        self, path: str | os.PathLike, *, dtype=None, overwrite: bool = False, progress: bool = True
    ) -> pathlib.Path:
        """A transformers folder of the sequence-classification class (LoRA merged in), which
        AutoModelForSequenceClassification loads and which scores as this model does."""
        from gemma_kit.checkpoint.hf_export import export_hf
        from gemma_kit.lora import merge

        model = merge(self.network.model) if self.method == "lora" else self.network.model
        head = np.asarray(self.network.score.weight[...], np.float32)
        return export_hf(
            model,
            path,
            tokenizer=self.tokenizer,
            dtype=dtype,
            overwrite=overwrite,
            progress=progress,
            score=head,
        )


def weights_dtype(model) -> str | None:
    """The dtype of a backbone's weights (of its embedding table, the largest of them); None
    for int8 weights (QLoRA: its adapter reloads over the base as stored)."""
    dtype = jnp.dtype(model.embedder.input_embedding[...].dtype)
    return str(dtype) if jnp.issubdtype(dtype, jnp.floating) else None


def config_to_json(config) -> dict | None:
    """The backbone's Config as JSON (transformers' config.json keys, gemma_kit.checkpoint.hf,
    plus the one storage detail they lack), so a custom size reloads without preset=; None
    for a config transformers cannot express (load it with preset=)."""
    from gemma_kit.checkpoint import hf
    from gemma_kit.errors import ConversionError

    try:
        return dict(hf=hf.config_to_hf(config), transpose_gating=config.transpose_gating)
    except ConversionError:
        return None


def config_from_json(data: dict, name: str):
    from gemma_kit.checkpoint import hf

    return hf.config_from_hf(data["hf"], name=name).replace(
        transpose_gating=bool(data["transpose_gating"])
    )


def is_reward_model_folder(path: pathlib.Path) -> bool:
    return (path / CONFIG_FILE).is_file()


def _load_base(base, preset, dtype):
    """(model, tokenizer) of a base: "default" (the embedded 270M) or a checkpoint folder."""
    from gemma_kit.checkpoint.official import find_tokenizer
    from gemma_kit.loading import load_model

    if str(base) == DEFAULT_BASE:
        from gemma_kit.embedded import default_model

        return default_model(dtype)
    tokenizer_path = find_tokenizer(base)
    if tokenizer_path is None:
        raise CheckpointError(
            f"no tokenizer.model in or beside {str(base)!r}; a reward model "
            "needs the base's tokenizer"
        )
    return load_model(base, preset, dtype, text_only=True), Tokenizer(tokenizer_path)


def load_reward_model(
    path: str | os.PathLike, *, preset=None, dtype=None, merge: bool = False
) -> RewardModel:
    """Reads a folder written by RewardModel.save (a LoRA one loads its base first).

    merge: fold a LoRA adapter into the weights (RewardModel.merged), for scoring only.
    preset: the backbone's size; default: the official preset or the config the folder
      records (a checkpoint's shapes are checked against it).
    dtype: the backbone's weights; default: the dtype they had when saved (a LoRA model's base
      is cast to it, so that it scores as it did when trained, e.g. over a bfloat16 base).
    """
    from gemma_kit.config import PRESETS
    from gemma_kit.loading import load_model

    folder = pathlib.Path(path).expanduser().absolute()
    file = folder / CONFIG_FILE
    if not folder.is_dir():
        raise CheckpointNotFoundError(f"no reward model folder at {str(folder)!r}")
    if not file.is_file():
        raise CheckpointError(
            f"{str(folder)!r} is not a reward model folder (no {CONFIG_FILE}); "
            "pass a folder RewardModel.save wrote"
        )
    try:
        meta = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{file} is not valid JSON ({err}); the folder is damaged") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{file} is not a {FORMAT} config")
    if meta.get("version", 0) > VERSION:
        raise CheckpointError(f"{file} has format version {meta['version']}; upgrade gemma_kit")
    if preset is None and meta.get("preset") in PRESETS:
        preset = meta["preset"]
    elif preset is None and isinstance(meta.get("config"), dict):
        preset = config_from_json(meta["config"], str(meta.get("preset") or "custom"))
    if dtype is None and meta.get("param_dtype"):
        dtype = jnp.dtype(meta["param_dtype"])
    if meta.get("backbone") == "lora":
        base = meta.get("base")
        model, tokenizer = _load_base(base, preset, dtype)
        from gemma_kit.lora import load_adapter

        load_adapter(model, folder / ADAPTER_DIR)
    elif meta.get("backbone") == "full":
        model = load_model(folder / CHECKPOINT_DIR, preset, dtype, text_only=True)
        tokenizer = None
    else:
        raise CheckpointError(
            f"{file}: backbone must be 'lora' or 'full', got {meta.get('backbone')!r}"
        )
    if (folder / TOKENIZER_FILE).is_file():
        tokenizer = Tokenizer(folder / TOKENIZER_FILE)
    head_file = folder / HEAD_FILE
    if not head_file.is_file():
        raise CheckpointError(
            f"{str(folder)!r} lacks its head ({HEAD_FILE}); the folder is incomplete"
        )
    try:
        head = np.load(head_file, allow_pickle=False)
    except ValueError as err:
        raise CheckpointError(f"{head_file} cannot be read ({err})") from None
    if head.shape != (1, model.config.embed_dim):
        raise CheckpointError(
            f"{head_file} has shape {head.shape}; the backbone needs (1, {model.config.embed_dim})"
        )
    network = RewardTransformer(model, pad_id=int(meta.get("pad_id", 0)))
    network.score.weight = HeadParam(jnp.asarray(head, jnp.float32))
    base = meta.get("base") if meta.get("backbone") == "lora" else folder / CHECKPOINT_DIR
    rm = RewardModel(network, tokenizer, base=base, name=f"rm:{folder}")
    rm.trained_from = meta.get("trained_from", rm.base)
    return rm.merged() if merge else rm
