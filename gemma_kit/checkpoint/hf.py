"""Hugging Face transformers Gemma 2 / Gemma 3 weights <-> the gemma_kit parameter tree.

One declarative table says where every Hugging Face tensor goes; `params_from_hf` checks that
every tensor of the state dict is consumed and every parameter is produced, so a renamed or
forgotten weight is an error, never a silently random layer.

Layout facts (transformers stores nn.Linear weights as [out, in]):
    q_proj [N*H, D] -> q_einsum [N, D, H];   k_proj, v_proj [K*H, D] -> kv_einsum [2, K, D, H]
    o_proj [D, N*H] -> attn_vec_einsum [N, H, D]
    gate_proj, up_proj [F, D] -> gating_einsum [2, F, D] (or [2, D, F]);  down_proj [D, F] -> linear [F, D]
Norm weights are zero-centred in both (out = normed * (1 + w)), so they copy unchanged.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np

from gemma_kit.config import Config, GlobalAttention, LocalAttention
from gemma_kit.errors import ConversionError

Params = dict[str, Any]


def config_from_hf(hf_config: Any, name: str = "hf") -> Config:
    """Builds a Config from a transformers Gemma2Config / Gemma3TextConfig (or its dict)."""
    get = (hf_config.get if isinstance(hf_config, Mapping)
           else lambda key, default=None: getattr(hf_config, key, default))
    if get("text_config") is not None:  # Gemma3Config of the multimodal model
        return config_from_hf(get("text_config"), name).replace(has_vision=True)
    model_type = get("model_type")
    if model_type not in ("gemma2", "gemma3_text", "gemma3"):
        raise ConversionError(
            f"Hugging Face model_type {model_type!r} is not a Gemma 2 or Gemma 3 text model; "
            "gemma_kit converts model_type 'gemma2', 'gemma3_text' and 'gemma3'."
        )
    family = "gemma2" if model_type == "gemma2" else "gemma3"
    num_layers = get("num_hidden_layers")
    period = 6 if family == "gemma3" else 2  # the last layer of each period is global
    layer_types = get("layer_types") or [
        "full_attention" if (i + 1) % period == 0 else "sliding_attention"
        for i in range(num_layers)
    ]
    rope = get("rope_parameters") or {}
    layers = []
    for kind in layer_types:
        params = rope.get(kind, rope) if isinstance(rope, Mapping) else {}
        base = float(params.get("rope_theta", get("rope_theta", 10_000.0)))
        scale = float(params.get("factor", 1.0)) if params.get("rope_type") == "linear" else 1.0
        if kind == "sliding_attention":
            layers.append(LocalAttention(int(get("sliding_window")), rope_base=base,
                                         rope_scale=scale))
        elif kind == "full_attention":
            layers.append(GlobalAttention(rope_base=base, rope_scale=scale))
        else:
            raise ConversionError(f"unknown Hugging Face layer type {kind!r}")
    return Config(
        name=name,
        family=family,
        vocab_size=int(get("vocab_size")),
        embed_dim=int(get("hidden_size")),
        hidden_dim=int(get("intermediate_size")),
        num_heads=int(get("num_attention_heads")),
        num_kv_heads=int(get("num_key_value_heads")),
        head_dim=int(get("head_dim")),
        layers=tuple(layers),
        query_pre_attn_scalar=float(get("query_pre_attn_scalar")),
        # transformers' Gemma 3 keeps attn_logit_softcapping in its config but never applies
        # it (no Gemma 3 model uses one), so the converted model must not either.
        attn_logit_softcap=get("attn_logit_softcapping") if family == "gemma2" else None,
        final_logit_softcap=get("final_logit_softcapping"),
        use_qk_norm=family == "gemma3",
        max_context=int(get("max_position_embeddings", 8192)),
        norm_eps=float(get("rms_norm_eps", 1e-6)),
    )


def _layer_table(config: Config) -> dict[tuple[str, ...], tuple[tuple[str, ...], Callable]]:
    """Canonical path inside `layer_{i}` -> (HF names inside `layers.{i}.`, combine function)."""
    N, K, D, H = config.num_heads, config.num_kv_heads, config.embed_dim, config.head_dim

    def heads(w, n):  # [n*H, D] -> [n, D, H]
        return w.reshape(n, H, D).transpose(0, 2, 1)

    table = {
        ("pre_attention_norm", "scale"): (("input_layernorm.weight",), lambda w: w),
        ("post_attention_norm", "scale"): (("post_attention_layernorm.weight",), lambda w: w),
        ("pre_ffw_norm", "scale"): (("pre_feedforward_layernorm.weight",), lambda w: w),
        ("post_ffw_norm", "scale"): (("post_feedforward_layernorm.weight",), lambda w: w),
        ("attn", "attn_vec_einsum", "w"): (
            ("self_attn.o_proj.weight",), lambda w: w.reshape(D, N, H).transpose(1, 2, 0)),
        ("mlp", "gating_einsum", "w"): (
            ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
            lambda g, u: np.stack([g, u]) if config.transpose_gating
            else np.stack([g.T, u.T])),
        ("mlp", "linear", "w"): (("mlp.down_proj.weight",), lambda w: w.T),
    }
    qkv = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight")
    if config.uses_qkv_einsum:
        table[("attn", "qkv_einsum", "w")] = (
            qkv, lambda q, k, v: np.stack([heads(q, N), heads(k, N), heads(v, N)]))
    else:
        table[("attn", "q_einsum", "w")] = (qkv[:1], lambda q: heads(q, N))
        table[("attn", "kv_einsum", "w")] = (
            qkv[1:], lambda k, v: np.stack([heads(k, K), heads(v, K)]))
    if config.use_qk_norm:
        table[("attn", "_query_norm", "scale")] = (("self_attn.q_norm.weight",), lambda w: w)
        table[("attn", "_key_norm", "scale")] = (("self_attn.k_norm.weight",), lambda w: w)
    return table


def _find_prefix(state_dict: Mapping[str, Any]) -> str:
    for prefix in ("model.language_model.", "model.", "language_model.model.", ""):
        if f"{prefix}embed_tokens.weight" in state_dict:
            return prefix
    raise ConversionError(
        "no 'embed_tokens.weight' in the Hugging Face state dict: this is not a Gemma "
        "causal-LM checkpoint (looked for model.embed_tokens.weight and "
        "model.language_model.embed_tokens.weight)"
    )


def params_from_hf(state_dict: Mapping[str, Any], config: Config, *,
                   dtype=np.float32) -> Params:
    """Maps a transformers Gemma state dict (numpy or torch tensors) onto the gemma_kit tree.

    Vision-tower tensors, if any, are left alone (text-only conversion); every other tensor
    must be consumed.
    """
    def as_numpy(value):
        if hasattr(value, "detach"):  # a torch tensor; keep torch an optional dependency
            value = value.detach().float().cpu().numpy()
        return np.asarray(value)

    prefix = _find_prefix(state_dict)
    used: set[str] = set()

    def take(name):
        if name not in state_dict:
            raise ConversionError(f"Hugging Face tensor {name!r} is missing from the checkpoint")
        used.add(name)
        return as_numpy(state_dict[name])

    params: Params = {
        "embedder": {"input_embedding": take(f"{prefix}embed_tokens.weight")},
        "final_norm": {"scale": take(f"{prefix}norm.weight")},
    }
    table = _layer_table(config)
    for i in range(config.num_layers):
        layer: Params = {}
        for path, (names, combine) in table.items():
            value = combine(*(take(f"{prefix}layers.{i}.{n}") for n in names))
            node = layer
            for key in path[:-1]:
                node = node.setdefault(key, {})
            node[path[-1]] = value
        params[f"layer_{i}"] = layer

    for head in ("lm_head.weight",):
        if head in state_dict:  # tied: must equal the embedding, else we would drop weights
            used.add(head)
            if not np.array_equal(as_numpy(state_dict[head]), params["embedder"]["input_embedding"]):
                raise ConversionError(
                    "lm_head.weight differs from the input embedding; Gemma ties them and "
                    "gemma_kit cannot represent an untied output projection"
                )
    text_keys = {k for k in state_dict if k.startswith(prefix) and not _is_vision_key(k, prefix)}
    unused = sorted(text_keys - used)
    if unused:
        raise ConversionError(
            f"{len(unused)} Hugging Face tensors were not consumed, e.g. {unused[:5]}; the "
            "checkpoint does not match the config"
        )
    return _cast_tree(params, dtype)


def _is_vision_key(key: str, prefix: str) -> bool:
    rest = key[len(prefix):]
    return rest.startswith(("vision_tower", "multi_modal_projector")) or "vision" in key


def _cast_tree(tree, dtype):
    if isinstance(tree, dict):
        return {k: _cast_tree(v, dtype) for k, v in tree.items()}
    return np.asarray(tree).astype(dtype)
