"""Hugging Face Gemma3ForConditionalGeneration's vision tower -> the gemma_kit parameter tree.

The text model goes through gemma_kit.checkpoint.hf; this module adds the SigLIP encoder
(transformers' SiglipVisionModel) and the multimodal projector, with one declarative table.

Layout facts (transformers stores nn.Linear weights as [out, in], Conv2d as [out, in, kh, kw]):
    patch_embedding [W, c, p, p]        -> embedding/kernel [p, p, c, W]
    position_embedding [P, W]           -> pos_embedding [1, P, W]
    q/k/v_proj [N*H, W], bias [N*H]     -> query/key/value kernel [W, N, H], bias [N, H]
    out_proj [W, N*H]                   -> out kernel [N, H, W]
    fc1 [F, W], fc2 [W, F]              -> Dense_0 [W, F], Dense_1 [F, W]
    layer_norm1/2, post_layernorm       -> LayerNorm_0/1, encoder_norm (scale = weight)
    mm_input_projection_weight [W, D]   -> embedder/mm_input_projection/w (same layout)
    mm_soft_emb_norm.weight [W]         -> embedder/mm_soft_embedding_norm/scale (both 1 + w)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from gemma_kit.checkpoint import hf
from gemma_kit.checkpoint.official import abstract_vision_params, flatten, unflatten
from gemma_kit.config import Config, VisionConfig
from gemma_kit.errors import ConversionError

Params = dict[str, Any]
_ENCODER = ("vision_encoder", "siglip_encoder")
_GELU_TANH = ("gelu_pytorch_tanh", "gelu_tanh")


def _get(config: Any, key: str, default=None):
    if isinstance(config, Mapping):
        return config.get(key, default)
    return getattr(config, key, default)


def vision_config_from_hf(hf_config: Any) -> VisionConfig:
    """VisionConfig of a transformers Gemma3Config (object or config.json dict)."""
    vision = _get(hf_config, "vision_config")
    if vision is None:
        raise ConversionError(
            "this Hugging Face config has no vision_config: it is not a multimodal Gemma 3 "
            "(Gemma3ForConditionalGeneration) config"
        )
    act = _get(vision, "hidden_act", "gelu_pytorch_tanh")
    if act not in _GELU_TANH:
        raise ConversionError(
            f"vision hidden_act {act!r} is not supported; SigLIP in Gemma 3 uses gelu_pytorch_tanh"
        )
    if _get(vision, "vision_use_head", False):
        raise ConversionError(
            "vision_use_head=True: Gemma 3's SigLIP has no pooling head (vision_use_head=False)"
        )
    return VisionConfig(
        width=int(_get(vision, "hidden_size", 1152)),
        depth=int(_get(vision, "num_hidden_layers", 27)),
        mlp_dim=int(_get(vision, "intermediate_size", 4304)),
        num_heads=int(_get(vision, "num_attention_heads", 16)),
        patch_size=int(_get(vision, "patch_size", 14)),
        image_size=int(_get(vision, "image_size", 896)),
        num_soft_tokens=int(_get(hf_config, "mm_tokens_per_image", 256)),
        norm_eps=float(_get(vision, "layer_norm_eps", 1e-6)),
    )


def config_from_hf(hf_config: Any, name: str = "hf") -> Config:
    """The Config (text and vision) of a transformers Gemma3Config.

    The official SigLIP sizes are left implicit (vision_config=None, as in the presets), so a
    real 4B/12B/27B config still comes out as its preset.
    """
    vision = vision_config_from_hf(hf_config)
    text = hf.config_from_hf(hf_config, name)
    return text.replace(has_vision=True, vision_config=None if vision == VisionConfig() else vision)


def _table(vision: VisionConfig) -> list[tuple[tuple[str, ...], str, Callable]]:
    """(canonical path, HF name below the vision tower, HF tensor -> gemma_kit array)."""
    W, N, H = vision.width, vision.num_heads, vision.head_dim

    def same(w):
        return w

    def heads_in(w):  # [N*H, W] -> [W, N, H]
        return w.T.reshape(W, N, H)

    def heads_bias(b):  # [N*H] -> [N, H]
        return b.reshape(N, H)

    def heads_out(w):  # [W, N*H] -> [N, H, W]
        return w.T.reshape(N, H, W)

    table = [
        (
            (*_ENCODER, "embedding", "kernel"),
            "embeddings.patch_embedding.weight",
            lambda w: w.transpose(2, 3, 1, 0),
        ),
        ((*_ENCODER, "embedding", "bias"), "embeddings.patch_embedding.bias", same),
        ((*_ENCODER, "pos_embedding"), "embeddings.position_embedding.weight", lambda w: w[None]),
        ((*_ENCODER, "Transformer", "encoder_norm", "scale"), "post_layernorm.weight", same),
        ((*_ENCODER, "Transformer", "encoder_norm", "bias"), "post_layernorm.bias", same),
    ]
    for j in range(vision.depth):
        block, hf_layer = (*_ENCODER, "Transformer", f"encoderblock_{j}"), f"encoder.layers.{j}."
        attn = (*block, "MultiHeadDotProductAttention_0")
        for ours, theirs in (("LayerNorm_0", "layer_norm1"), ("LayerNorm_1", "layer_norm2")):
            table.append(((*block, ours, "scale"), f"{hf_layer}{theirs}.weight", same))
            table.append(((*block, ours, "bias"), f"{hf_layer}{theirs}.bias", same))
        for ours, theirs in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
            table.append(
                ((*attn, ours, "kernel"), f"{hf_layer}self_attn.{theirs}.weight", heads_in)
            )
            table.append(((*attn, ours, "bias"), f"{hf_layer}self_attn.{theirs}.bias", heads_bias))
        table.append(((*attn, "out", "kernel"), f"{hf_layer}self_attn.out_proj.weight", heads_out))
        table.append(((*attn, "out", "bias"), f"{hf_layer}self_attn.out_proj.bias", same))
        for ours, theirs in (("Dense_0", "fc1"), ("Dense_1", "fc2")):
            table.append(
                (
                    (*block, "MlpBlock_0", ours, "kernel"),
                    f"{hf_layer}mlp.{theirs}.weight",
                    lambda w: w.T,
                )
            )
            table.append(
                ((*block, "MlpBlock_0", ours, "bias"), f"{hf_layer}mlp.{theirs}.bias", same)
            )
    return table


_PROJECTOR = (
    (("embedder", "mm_input_projection", "w"), "mm_input_projection_weight"),
    (("embedder", "mm_soft_embedding_norm", "scale"), "mm_soft_emb_norm.weight"),
)


def _find_roots(names) -> tuple[str, str]:
    """(prefix of the SigLIP tensors, prefix of the projector's) among the state dict's names."""
    towers = [
        n[: -len("embeddings.patch_embedding.weight")]
        for n in names
        if n.endswith("embeddings.patch_embedding.weight")
    ]
    projectors = [
        n[: -len("mm_input_projection_weight")]
        for n in names
        if n.endswith("mm_input_projection_weight")
    ]
    if len(towers) != 1 or len(projectors) != 1:
        raise ConversionError(
            "the Hugging Face state dict has no (or more than one) vision tower and "
            "multi_modal_projector: it is not a Gemma3ForConditionalGeneration checkpoint"
        )
    return towers[0], projectors[0]


def vision_params_from_hf(
    state_dict: Mapping[str, Any], config: Config, *, dtype=np.float32
) -> Params:
    """The canonical vision subtree ({"vision_encoder": ..., "embedder": {mm_*}}) of a
    Gemma3ForConditionalGeneration state dict; every vision tensor must be consumed and every
    shape must be the config's."""
    if config.vision is None:
        raise ConversionError(f"config {config.name!r} has no vision encoder (has_vision=False)")
    tower, projector = _find_roots(state_dict.keys())
    used: set[str] = set()
    flat: dict[tuple[str, ...], np.ndarray] = {}
    entries = [(path, tower + name, fn) for path, name, fn in _table(config.vision)]
    entries += [(path, projector + name, lambda w: w) for path, name in _PROJECTOR]
    for path, name, fn in entries:
        if name not in state_dict:
            raise ConversionError(f"Hugging Face tensor {name!r} is missing from the checkpoint")
        used.add(name)
        flat[path] = np.ascontiguousarray(fn(hf.as_numpy(state_dict[name])), dtype=dtype)
    unused = sorted(
        k for k in state_dict.keys() if k.startswith((tower, projector)) and k not in used
    )
    if unused:
        raise ConversionError(
            f"{len(unused)} Hugging Face vision tensors were not consumed, e.g. {unused[:5]}; the "
            "checkpoint does not match the config"
        )
    _check_shapes(flat, config)
    return unflatten(flat)


def _check_shapes(flat: dict, config: Config) -> None:
    want = {p: tuple(x.shape) for p, x in flatten(abstract_vision_params(config)).items()}
    for path, value in flat.items():
        if tuple(value.shape) != want.get(path):
            raise ConversionError(
                f"{'/'.join(path)} converted to shape {tuple(value.shape)}, but the config "
                f"implies {want.get(path)}: the checkpoint does not match its config"
            )


def params_from_hf(state_dict: Mapping[str, Any], config: Config, *, dtype=np.float32) -> Params:
    """Text and vision parameters of a Gemma3ForConditionalGeneration state dict, one tree."""
    params = hf.params_from_hf(state_dict, config, dtype=dtype)
    vision = vision_params_from_hf(state_dict, config, dtype=dtype)
    params["embedder"].update(vision.pop("embedder"))
    params.update(vision)
    return params
