"""Smaller students: a model that keeps a subset of its teacher's layers (`gemma-kit shrink`).

    shrink_checkpoint("gemma-3-1b/", "0,2,4-8,25", "students/1b-half")   # -> a model folder
    student = shrink_model(teacher, [0, 2, 4, 5, 6, 7, 8, 25])             # in memory

Layer j of the student is layer keep[j] of the teacher, with its weights and its attention kind
(a sliding-window layer stays one, with its window and RoPE base); the embedding, the final norm
and an image encoder are kept whole. So the student computes exactly what the teacher would
with the other layers skipped (the residual stream passes them by), a common initialisation for
a distilled student (as DistilBERT's every-other-layer start).

The student's size is no preset: its Config (named after the teacher and the kept layers, e.g.
"gemma3-270m-keep[0,2,4-8,17]") is stored with the checkpoint (official.write_config), and
load_model, `gemma-kit info`, sample, finetune, distill and export read it from there. The model
folder is written through a staging folder renamed at the end (convert.write_model_folder).
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Sequence

from flax import nnx

from gemma_kit.checkpoint import convert, official
from gemma_kit.config import Config
from gemma_kit.errors import ConfigError


def parse_layers(spec: str | Sequence[int], num_layers: int) -> tuple[int, ...]:
    """ "0,2,4-8,17" (or a list of ints) -> the kept layer indices, checked against a model of
    `num_layers` layers: each in [0, num_layers), in increasing order, none twice, at least one.
    A range a-b includes both ends."""
    if isinstance(spec, str):
        keep: list[int] = []
        for part in spec.replace(" ", "").split(","):
            first, dash, last = part.partition("-")
            try:
                if dash:
                    lo, hi = int(first), int(last)
                    if hi < lo:
                        raise ValueError
                    keep.extend(range(lo, hi + 1))
                else:
                    keep.append(int(first))
            except ValueError:
                raise ConfigError(
                    f"cannot read {part!r} in the layer list {spec!r}: write layer numbers and "
                    "ranges separated by commas, e.g. 0,2,4-8 (a range a-b has a <= b)"
                ) from None
    else:
        keep = [int(i) for i in spec]
    if not keep:
        raise ConfigError("keep at least one layer")
    bad = [i for i in keep if not 0 <= i < num_layers]
    if bad:
        raise ConfigError(
            f"layer {bad[0]} is out of range: the model has {num_layers} layers, "
            f"numbered 0 to {num_layers - 1}"
        )
    if any(b <= a for a, b in zip(keep, keep[1:])):
        raise ConfigError(
            f"list the kept layers in increasing order, each once (got {keep}): "
            "the student keeps the teacher's order"
        )
    return tuple(keep)


def describe_layers(keep: Sequence[int]) -> str:
    """(0, 2, 3, 4, 7) -> "0,2-4,7"."""
    groups: list[list[int]] = []
    for i in keep:
        if groups and i == groups[-1][-1] + 1:
            groups[-1].append(i)
        else:
            groups.append([i])
    return ",".join(str(g[0]) if len(g) == 1 else f"{g[0]}-{g[-1]}" for g in groups)


def shrink_config(config: Config, keep: Sequence[int]) -> Config:
    """The student's config: the teacher's, with layers keep[0], keep[1], ... (each with its own
    attention kind), named after the teacher and the kept layers."""
    keep = parse_layers(keep, config.num_layers)
    return config.replace(
        name=f"{config.name}-keep[{describe_layers(keep)}]",
        layers=tuple(config.layers[i] for i in keep),
    )


def shrink_params(params: dict, keep: Sequence[int]) -> dict:
    """A canonical parameter tree with layer_{keep[j]} renamed layer_j and the other layers
    dropped; everything else (embedder, final_norm, vision_encoder) kept. Arrays are shared."""
    layers = sorted(int(k.removeprefix("layer_")) for k in params if k.startswith("layer_"))
    keep = parse_layers(keep, len(layers))
    out = {k: v for k, v in params.items() if not k.startswith("layer_")}
    for j, i in enumerate(keep):
        out[f"layer_{j}"] = params[f"layer_{i}"]
    return out


def shrink_model(model, keep: Sequence[int]):
    """A Transformer of the kept layers of `model`, sharing its arrays (no copy)."""
    from gemma_kit.loading import model_from_params
    from gemma_kit.lora import has_lora

    if has_lora(model):
        raise ConfigError(
            "shrink a model without LoRA: merge the adapter first (gemma_kit.lora.merge)"
        )
    config = shrink_config(model.config, keep)
    params = shrink_params(nnx.to_pure_dict(nnx.state(model, nnx.Param)), keep)
    return model_from_params(config, params, compute_dtype=model.dtype)


def shrink_checkpoint(
    ckpt: str | os.PathLike,
    keep: str | Sequence[int],
    out: str | os.PathLike,
    *,
    tokenizer: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> tuple[pathlib.Path, Config, Config]:
    """A checkpoint (or model folder) -> a model folder `out` holding its kept layers.

    The layer list is checked against the checkpoint's metadata, and `out` against what may be
    replaced, before any weight is read. Weights keep their stored dtype; tokenizer.model is
    copied from `tokenizer` or from beside the checkpoint. Returns (out, student config,
    teacher config).
    """
    folder = official.find_checkpoint(ckpt)
    _, shapes, _ = official.split_layout(official.read_metadata(folder))
    teacher = official.checkpoint_config(folder, shapes)
    kept = parse_layers(keep, teacher.num_layers)
    student = shrink_config(teacher, kept)
    convert.check_model_folder_target(out, overwrite)
    tokenizer_path = pathlib.Path(tokenizer) if tokenizer else official.find_tokenizer(ckpt)
    if tokenizer is not None and not (tokenizer_path and tokenizer_path.is_file()):
        raise ConfigError(f"tokenizer file {str(tokenizer)!r} does not exist")
    _, params, _ = official.load_params(folder, teacher, vision=True)
    written = convert.write_model_folder(
        out,
        shrink_params(params, kept),
        tokenizer_path.read_bytes() if tokenizer_path is not None else None,
        overwrite=overwrite,
        config=student,
    )
    return written, student, teacher
