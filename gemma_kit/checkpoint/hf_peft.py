"""gemma_kit LoRA adapters -> PEFT LoRA adapters (adapter_config.json + adapter_model.safetensors).

    export_hf(base_model, "base/")                      # the base, as a Hugging Face folder
    export_peft(model_with_lora, "adapter/")             # its adapter, for peft on that base
    export_peft("run/adapter", "adapter/", preset="gemma3-1b")   # a saved gemma_kit adapter

A gemma_kit LoRA factorises an Einsum's update as A [contracted axes..., R] B [R, kept axes...]
(gemma_kit.lora); PEFT factorises a Linear's update as B' [out, r] A' [r, in]. A Linear's `in`
is the Einsum's contracted axes and `out` its kept ones, so the name table of
gemma_kit.checkpoint.hf (the same Rule that exports the base weight) fixes how A and B are
reordered and flattened. A fused weight (kv_einsum, qkv_einsum, gating_einsum: several HF
Linears stacked on C) shares A across its Linears, and each Linear gets its own slice of B.
The scaling alpha / r is the same in both, so the adapted logits are the same.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Iterator

import numpy as np
from flax import nnx

from gemma_kit import lora
from gemma_kit.checkpoint import hf
from gemma_kit.checkpoint.adapter import read_adapter_config
from gemma_kit.checkpoint.safetensors_io import write_safetensors
from gemma_kit.checkpoint.staging import check_target, staged_folder, write_json
from gemma_kit.config import Config, get_preset
from gemma_kit.errors import AdapterError
from gemma_kit.transformer import Transformer

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_BASENAME = "adapter_model"  # -> adapter_model.safetensors, the name peft looks for
_PREFIX = "base_model.model."  # where PeftModel puts the wrapped causal LM
_WHAT = "PEFT adapter folder"


def _looks_like_adapter(folder: pathlib.Path) -> bool:
    return all(
        p.is_file() and p.name in (ADAPTER_CONFIG, f"{ADAPTER_BASENAME}.safetensors", "README.md")
        for p in folder.iterdir()
    )


def _model_with_adapter(source, preset):
    """(model carrying LoRA, config): a Transformer as given, or an adapter folder read onto
    an abstract base (its weights are never allocated: only the factors are needed)."""
    if isinstance(source, nnx.Module):
        return source, get_preset(preset) if preset is not None else source.config
    meta = read_adapter_config(source)
    name = preset if preset is not None else meta.get("base_preset")
    if name is None:
        raise AdapterError(f"adapter {str(source)!r} names no base model; pass preset=")
    config = get_preset(name)
    model = nnx.eval_shape(lambda: Transformer(config))
    lora.load_adapter(model, source)
    return model, config


def peft_tensors(
    model, config: Config, dtype=None
) -> tuple[dict, list[tuple[str, tuple[int, ...], np.dtype]], Iterator]:
    """(adapter_config.json dict, tensor specs, iterator of (name, array)) for `model`'s LoRA."""
    info = lora.adapter_info(model)  # one rank and alpha, or an AdapterError
    modules = dict(lora.einsums(model))
    rules = {rule.path[:-1]: rule for rule in hf.text_rules(config)}
    plan = []  # (HF module name, einsum path, slot in a fused weight or None, rule)
    for path in info["modules"]:
        key = tuple(path.split("/"))
        if key not in rules:
            raise AdapterError(f"{path} has LoRA but no Hugging Face counterpart")
        rule = rules[key]
        for slot, name in enumerate(rule.hf):
            module = hf.EXPORT_PREFIX + name.removesuffix(".weight")
            plan.append((module, path, slot if len(rule.hf) > 1 else None, rule))
    sizes = hf.sizes_of(config, hf.hf_vocab_size(config))
    first = modules[plan[0][1]].lora
    dtype = np.dtype(dtype) if dtype is not None else np.dtype(first.a[...].dtype)
    r = info["rank"]
    specs: list[tuple[str, tuple[int, ...], np.dtype]] = []
    for module, _, _, rule in plan:
        out_shape, in_shape = rule.hf_shape(sizes)
        specs.append((f"{_PREFIX}{module}.lora_A.weight", (r, in_shape), dtype))
        specs.append((f"{_PREFIX}{module}.lora_B.weight", (out_shape, r), dtype))

    def tensors():
        for module, path, slot, rule in plan:
            einsum = modules[path]
            _, _, _, a_spec, b_spec = lora.lora_equations(einsum.equation)
            (out_group, in_group), _ = hf.parse_layout(rule.layout)
            a = np.asarray(einsum.lora.a[...], np.float32)  # [contracted..., R]
            b = np.asarray(einsum.lora.b[...], np.float32)  # [R, kept...]
            if slot is not None:  # a fused weight: this Linear's slice of the stacked axis
                b = np.take(b, slot, axis=b_spec.index("C"))
                b_spec = b_spec.replace("C", "")
            if sorted(a_spec[:-1]) != sorted(in_group) or sorted(b_spec[1:]) != sorted(out_group):
                raise AdapterError(  # the table and the einsum disagree: a bug, not bad input
                    f"{path}: LoRA axes {a_spec}/{b_spec} do not match the HF layout {rule.layout}"
                )
            lora_a = a.transpose([a_spec.index(c) for c in ("R", *in_group)]).reshape(r, -1)
            lora_b = b.transpose([b_spec.index(c) for c in (*out_group, "R")]).reshape(-1, r)
            yield f"{_PREFIX}{module}.lora_A.weight", np.ascontiguousarray(lora_a, dtype)
            yield f"{_PREFIX}{module}.lora_B.weight", np.ascontiguousarray(lora_b, dtype)

    # gemma_kit adapts a projection in every layer, so the short names (q_proj, ...) say
    # exactly which Linears are adapted, in the form vLLM and peft both expect.
    short = sorted({module.rsplit(".", 1)[-1] for module, *_ in plan})
    every_layer = len(plan) == len(short) * config.num_layers
    adapter_config = dict(
        peft_type="LORA",
        task_type="CAUSAL_LM",
        r=r,
        lora_alpha=info["alpha"],
        lora_dropout=0.0,
        bias="none",
        fan_in_fan_out=False,
        use_rslora=False,
        use_dora=False,
        init_lora_weights=True,
        inference_mode=True,
        modules_to_save=None,
        target_modules=short if every_layer else sorted(module for module, *_ in plan),
        base_model_name_or_path=None,
    )
    return adapter_config, specs, tensors()


def export_peft(
    source,
    out: str | os.PathLike,
    *,
    preset: str | Config | None = None,
    base_model_name_or_path: str | None = None,
    dtype=None,
    overwrite: bool = False,
) -> pathlib.Path:
    """Writes the LoRA adapter of `source` as a PEFT adapter folder at `out`.

    Args:
      source: a Transformer carrying LoRA (gemma_kit.lora.apply_lora / load_model(lora=)), or
        a gemma_kit adapter folder (gemma_kit.lora.save_adapter, `gemma-kit finetune`).
      preset: the base model's preset; default: the model's config, or the base the adapter
        folder names.
      base_model_name_or_path: recorded in adapter_config.json (the exported base's folder or
        Hub name), for peft's AutoPeftModel.
      dtype: dtype of the factors; default: as stored (float32).
    Apply it with peft to the base exported by gemma_kit.checkpoint.hf_export.export_hf:
    `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out)`.
    """
    target = pathlib.Path(out).expanduser().absolute()
    check_target(target, overwrite, _looks_like_adapter, _WHAT)
    model, config = _model_with_adapter(source, preset)
    adapter_config, specs, tensors = peft_tensors(model, config, dtype)
    adapter_config["base_model_name_or_path"] = base_model_name_or_path
    with staged_folder(
        target, overwrite=overwrite, replaceable=_looks_like_adapter, what=_WHAT
    ) as staging:
        write_safetensors(staging, specs, tensors, max_shard_size=2**62, basename=ADAPTER_BASENAME)
        write_json(staging / ADAPTER_CONFIG, adapter_config)
    return target
