"""gemma_kit models and official checkpoints -> a Hugging Face folder for transformers, vLLM, ...

    export_hf(model, "out/", tokenizer=tokenizer)          # a Transformer in memory
    export_hf("checkpoints/gemma3-1b", "out/")              # an Orbax checkpoint, read per layer

The folder holds model.safetensors (or shards + index), config.json, generation_config.json
and, given a tokenizer, tokenizer.model + tokenizer_config.json (with a Gemma chat template) +
special_tokens_map.json: what `AutoModelForCausalLM.from_pretrained` and
`AutoTokenizer.from_pretrained` read. The model is written as Gemma2ForCausalLM or
Gemma3ForCausalLM: text only, an image encoder is left out.

Streaming: tensors are converted and written one at a time; a checkpoint on disk is restored
one layer at a time, so peak memory is about one layer plus one tensor. Everything is written
into a temporary folder renamed at the end (gemma_kit.checkpoint.staging).
"""

from __future__ import annotations

import itertools
import os
import pathlib
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from gemma_kit.checkpoint import hf, official
from gemma_kit.checkpoint.safetensors_io import (
    DEFAULT_MAX_SHARD_SIZE,
    tensor_bytes,
    write_safetensors,
)
from gemma_kit.checkpoint.staging import check_target, staged_folder, write_json
from gemma_kit.config import Config, get_preset
from gemma_kit.errors import CheckpointError, ConversionError
from gemma_kit.layers import Einsum
from gemma_kit.quant import is_quantized
from gemma_kit.tokenizer import Tokenizer
from gemma_kit.transformer import Transformer

# Gemma's chat format (gemma_kit.tokenizer.format_chat) as a Jinja template for transformers'
# apply_chat_template: no system role, so a system message is folded into the first user turn;
# "assistant" is spelled "model"; turn contents are trimmed.
CHAT_TEMPLATE = (
    "{%- set ns = namespace(prefix='') -%}"
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{%- if not loop.first -%}{{- raise_exception('a system message may only come first') -}}"
    "{%- endif -%}"
    "{%- set ns.prefix = message['content'] + '\\n\\n' -%}"
    "{%- else -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{- '<start_of_turn>' + role + '\\n' + ns.prefix + (message['content'] | trim)"
    " + '<end_of_turn>\\n' -}}"
    "{%- set ns.prefix = '' -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<start_of_turn>model\\n' -}}{%- endif -%}"
)
_WHAT = "Hugging Face model folder"
# The class a folder with a scalar head (export_hf's `score`) is written as, per family.
SEQUENCE_CLASSIFIERS = {
    "gemma2": "Gemma2ForSequenceClassification",
    "gemma3": "Gemma3TextForSequenceClassification",
}
# Files an export writes; an existing folder holding only these may be replaced (--overwrite).
_OUR_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "adapter_config.json",
)


def looks_exported(folder: pathlib.Path) -> bool:
    """True when every entry of `folder` is a file an export writes (safe to replace)."""
    return all(
        p.is_file()
        and (p.name in _OUR_FILES or p.name.endswith((".safetensors", ".safetensors.index.json")))
        for p in folder.iterdir()
    )


def check_export_target(out: str | os.PathLike, overwrite: bool) -> None:
    """Raises CheckpointError where export_hf would refuse `out`, before any slow work."""
    check_target(pathlib.Path(out).expanduser().absolute(), overwrite, looks_exported, _WHAT)


def _tokenizer_bytes(tokenizer) -> bytes | None:
    if tokenizer is None or isinstance(tokenizer, bytes):
        return tokenizer
    if isinstance(tokenizer, (str, os.PathLike)):
        Tokenizer(tokenizer)  # clear error for a missing or foreign file
        return pathlib.Path(tokenizer).expanduser().read_bytes()
    return tokenizer.to_bytes()  # a gemma_kit.Tokenizer


def _check_paths(config: Config, flat: Mapping[tuple[str, ...], Any]) -> None:
    wanted = {rule.path for rule in hf.text_rules(config)}
    extra = sorted("/".join(p) for p in flat.keys() - wanted)
    missing = sorted("/".join(p) for p in wanted - flat.keys())
    if extra:
        raise ConversionError(
            f"the model has parameters a Hugging Face Gemma has no place for ({extra[:3]}); "
            "if they are LoRA adapters, merge them into the weights first, or export the "
            "adapter on its own in PEFT format"
        )
    if missing:
        raise ConversionError(f"the parameters lack {missing[:3]} for {config.name!r}")


class _LayerByLayer:
    """A lazy parameter source over an Orbax checkpoint: restores one top-level group
    (embedder, layer_i, final_norm) when one of its parameters is first asked for, and drops
    the previous group."""

    def __init__(self, folder: pathlib.Path, layout: official.Layout, shapes: dict):
        self.folder, self.layout, self.shapes = folder, layout, shapes
        self.group: str | None = None
        self.tree: dict | None = None

    def __call__(self, path: tuple[str, ...]):
        if path[0] != self.group:
            self.tree = None
            target = {path[0]: self.shapes[path[0]]}
            self.tree = official.restore_params(self.folder, self.layout, target)
            self.group = path[0]
        node: Any = self.tree
        for key in path:
            node = node[key]
        return node


def _source(source, preset) -> tuple[Config, Callable, np.dtype, Any]:
    """(config, path -> array, stored dtype, tokenizer found beside a checkpoint)."""
    if isinstance(source, (str, os.PathLike)):
        folder = official.find_checkpoint(source)
        layout, shapes, _ = official.split_layout(official.read_metadata(folder))
        config = official.checkpoint_config(folder, shapes, preset)
        stored = shapes["embedder"]["input_embedding"].dtype
        return (
            config,
            _LayerByLayer(folder, layout, shapes),
            np.dtype(stored),
            official.find_tokenizer(source),
        )
    if isinstance(source, Transformer):
        einsums = [m for _, m in source.iter_modules() if isinstance(m, Einsum)]
        if any(m.matvec for m in einsums):
            raise CheckpointError(
                "this model's weights are in the sampler's transposed decode layout "
                "(gemma_kit.layers.to_matvec_layout); export the original model instead"
            )
        if is_quantized(source):
            raise CheckpointError(
                "this model's weights are int8 (gemma_kit.quant); export the original model"
            )
        if any(m.lora is not None for m in einsums):
            raise CheckpointError(
                "this model carries an unmerged LoRA adapter: export gemma_kit.lora.merge(model) "
                "for full weights, or the adapter alone in PEFT format"
            )
        config = get_preset(preset) if preset is not None else source.config
        flat = official.flatten(nnx.to_pure_dict(nnx.state(source, nnx.Param)))
    elif isinstance(source, Mapping):
        if preset is None:
            raise ConversionError("exporting a parameter tree needs its config: pass preset=")
        config = get_preset(preset)
        flat = official.flatten(dict(source))
    else:
        raise TypeError(
            f"cannot export a {type(source).__name__}: pass a Transformer, a "
            "parameter tree or a checkpoint folder"
        )
    # The export is a causal LM: an image encoder (and its projection) is left out.
    flat = {
        p: v
        for p, v in flat.items()
        if not (p[0] == "vision_encoder" or (p[0] == "embedder" and p[1].startswith("mm_")))
    }
    _check_paths(config, flat)
    official.check_shapes(config, official.unflatten(flat))
    stored = flat[("embedder", "input_embedding")].dtype
    return config, flat.__getitem__, np.dtype(stored), None


def export_hf(
    source,
    out: str | os.PathLike,
    *,
    preset: str | Config | None = None,
    tokenizer=None,
    dtype=None,
    overwrite: bool = False,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
    progress: bool = True,
    score: np.ndarray | None = None,
) -> pathlib.Path:
    """Writes `source` as a Hugging Face model folder at `out`.

    Args:
      source: a gemma_kit Transformer, a canonical parameter tree (with preset=), or an Orbax
        checkpoint folder (official layouts; preset inferred from the shapes unless given).
      tokenizer: a gemma_kit Tokenizer, a tokenizer.model path, or its bytes. Default: the
        tokenizer.model in or beside a checkpoint folder; without one only the weights and
        configs are written.
      dtype: dtype of the written tensors (float32, bfloat16, float16); default: as stored.
      overwrite: replace an existing export at `out` (never a folder holding other files).
      max_shard_size: bytes per safetensors file before the weights are split into shards.
      score: a [1, D] head (a reward model's, gemma_kit.posttrain.reward_model): the folder is
        then the sequence-classification class (SEQUENCE_CLASSIFIERS, one label) with the
        head as `score.weight`, which AutoModelForSequenceClassification loads.
    Returns:
      The folder written.
    """
    target = pathlib.Path(out).expanduser().absolute()
    check_export_target(target, overwrite)  # before any slow work
    config, get, stored, found_tokenizer = _source(source, preset)
    dtype = np.dtype(dtype) if dtype is not None else stored
    serialized = _tokenizer_bytes(tokenizer if tokenizer is not None else found_tokenizer)
    eos_ids, bos_id, pad_id = [1, 107 if config.family == "gemma2" else 106], 2, 0
    if serialized is not None:
        tok = Tokenizer.from_bytes(serialized)
        if tok.vocab_size > hf.hf_vocab_size(config):
            raise ConversionError(
                f"the tokenizer has {tok.vocab_size} pieces but the model only "
                f"{hf.hf_vocab_size(config)} embedding rows: they do not belong together"
            )
        eos_ids = [tok.eos_id] + ([tok.end_of_turn_id] if tok.end_of_turn_id is not None else [])
        bos_id, pad_id = tok.bos_id, tok.pad_id
    # Everything that can refuse the input is checked before the first byte is written.
    hf_config = hf.config_to_hf(
        config, dtype=dtype.name, bos_id=bos_id, eos_ids=eos_ids, pad_id=pad_id
    )
    specs = hf.hf_tensor_specs(config, dtype)
    tensors = hf.params_to_hf(get, config, dtype)
    if score is not None:
        score = np.asarray(score)
        if score.shape != (1, config.embed_dim):
            raise ConversionError(
                f"the score head has shape {score.shape}; a model of width "
                f"{config.embed_dim} needs (1, {config.embed_dim})"
            )
        hf_config = dict(
            hf_config,
            architectures=[SEQUENCE_CLASSIFIERS[config.family]],
            id2label={"0": "LABEL_0"},
            label2id={"LABEL_0": 0},
        )
        specs = specs + [("score.weight", score.shape, dtype)]
        tensors = itertools.chain(tensors, [("score.weight", score.astype(dtype))])
    with staged_folder(
        target, overwrite=overwrite, replaceable=looks_exported, what=_WHAT
    ) as staging:
        with tqdm(
            total=tensor_bytes(specs),
            desc="gemma_kit -> Hugging Face",
            unit="B",
            unit_scale=True,
            disable=not progress,
        ) as bar:
            write_safetensors(staging, specs, tensors, max_shard_size=max_shard_size, progress=bar)
        write_json(staging / "config.json", hf_config, sort_keys=True)
        write_json(
            staging / "generation_config.json",
            dict(bos_token_id=bos_id, eos_token_id=eos_ids, pad_token_id=pad_id),
            sort_keys=True,
        )
        if serialized is not None:
            write_tokenizer(staging, serialized, max_length=config.max_context)
    return target


def write_tokenizer(folder: pathlib.Path, serialized: bytes, *, max_length: int) -> None:
    """tokenizer.model + the JSON files transformers' GemmaTokenizer reads beside it."""
    (folder / "tokenizer.model").write_bytes(serialized)
    special = dict(bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")
    write_json(folder / "special_tokens_map.json", special, sort_keys=True)
    write_json(
        folder / "tokenizer_config.json",
        dict(
            tokenizer_class="GemmaTokenizer",
            **special,
            add_bos_token=True,
            add_eos_token=False,
            model_max_length=max_length,
            clean_up_tokenization_spaces=False,
            chat_template=CHAT_TEMPLATE,
        ),
        sort_keys=True,
    )
