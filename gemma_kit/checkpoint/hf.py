"""Hugging Face transformers Gemma 2 / Gemma 3 names and layouts <-> the gemma_kit parameter tree.

One declarative table (`text_rules`) says which Hugging Face tensor(s) make each gemma_kit
parameter and how their axes relate, written with the dimension letters of gemma_kit.layers:

    q_proj.weight   "(N H) D -> N D H"   HF's [N*H, D] Linear weight split into heads, reordered
    o_proj.weight   "D (N H) -> N H D"
    k_proj, v_proj  "(K H) D -> K D H"   two HF tensors stacked on a new leading axis (C)

Both directions are derived from that one string, so import and export cannot disagree. Import
checks that every tensor of the checkpoint is consumed and every parameter produced, so a
renamed or forgotten weight is an error, never a silently random layer. Norm weights are
zero-centred in both worlds (out = normed * (1 + w)), so they copy unchanged.

Another table for another part of a checkpoint (the vision tower) can be written with the same
`Rule` and applied with the same functions.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal

import numpy as np

from gemma_kit.checkpoint.official import unflatten
from gemma_kit.config import PRESETS, AttentionKind, Config, GlobalAttention, LocalAttention
from gemma_kit.errors import ConversionError

Params = dict[str, Any]

# Where the text model's tensors live in each Hugging Face class. The second and fourth are the
# two namings of Gemma3ForConditionalGeneration (transformers >= 4.52 in memory; what
# save_pretrained writes and the Hub holds), the first and last the causal LMs' own.
TEXT_PREFIXES = ("model.", "model.language_model.", "language_model.model.", "")
EXPORT_PREFIX = "model."
# Gemma3ForConditionalGeneration's vision encoder and projector, under either naming.
VISION_ROOTS = (
    "vision_tower.",
    "multi_modal_projector.",
    "model.vision_tower.",
    "model.multi_modal_projector.",
)
# transformers ties the output projection to the embedding; a checkpoint may still store it.
TIED_HEAD = ("lm_head.weight", "language_model.lm_head.weight")

# Official vocabulary rows <-> Hugging Face rows. Gemma 2's official table has 128 unused rows
# past the 256000 tokens HF keeps; the multimodal Gemma 3 HF checkpoints add 64 rows (the image
# soft token and padding) to the 262144 of the official table, which carries images otherwise.
VOCAB_ROWS = {"gemma2": {256000: 256128}, "gemma3": {262208: 262144}}


# --------------------------------------------------------------------------------------------
# The rule: one gemma_kit parameter from one or more HF tensors


@functools.cache
def parse_layout(layout: str) -> tuple[tuple[tuple[str, ...], ...], tuple[str, ...]]:
    """A layout string -> (the left side's axis groups, the right side's axes).

    "(N H) D -> N D H" -> (((N, H), (D,)), (N, D, H)): the left side is the foreign tensor, whose
    axis "(N H)" holds N*H entries, N outer; the right side is the gemma_kit parameter.
    """
    left, right = layout.split("->")
    groups: list[tuple[str, ...]] = []
    current: list[str] | None = None
    for token in re.findall(r"\(|\)|[A-Z]", left):
        if token == "(":
            current = []
        elif token == ")":
            groups.append(tuple(current or ()))
            current = None
        elif current is not None:
            current.append(token)
        else:
            groups.append((token,))
    out = tuple(re.findall(r"[A-Z]", right))
    if sorted(a for g in groups for a in g) != sorted(out):
        raise ValueError(f"layout {layout!r} must use the same letters on both sides")
    return tuple(groups), out


@dataclasses.dataclass(frozen=True)
class Rule:
    """One gemma_kit parameter and the Hugging Face tensor(s) it is made of.

    path: the parameter's path in the canonical tree, e.g. ("layer_0", "attn", "q_einsum", "w").
    hf: the HF tensor names, relative to the text model's prefix. With several, the gemma_kit
      parameter stacks them on a new leading axis (C), in this order.
    layout: "HF axes -> gemma_kit axes" in dimension letters; "(N H)" is one HF axis of N*H.
    vocab_rows: the first axis is the vocabulary, padded or cut between the two worlds
      (see VOCAB_ROWS).
    """

    path: tuple[str, ...]
    hf: tuple[str, ...]
    layout: str
    vocab_rows: bool = False

    def hf_shape(self, sizes: Mapping[str, int]) -> tuple[int, ...]:
        groups, _ = parse_layout(self.layout)
        return tuple(math.prod(sizes[a] for a in g) for g in groups)

    def shape(self, sizes: Mapping[str, int]) -> tuple[int, ...]:
        _, out = parse_layout(self.layout)
        return ((len(self.hf),) if len(self.hf) > 1 else ()) + tuple(sizes[a] for a in out)

    def part_to_gemma(self, tensor: np.ndarray, sizes: Mapping[str, int]) -> np.ndarray:
        """One HF tensor (already checked against hf_shape) -> its part of the parameter: the
        whole parameter, or one slice of the stacked axis C when the rule has several."""
        groups, out = parse_layout(self.layout)
        flat = [a for g in groups for a in g]
        return tensor.reshape([sizes[a] for a in flat]).transpose([flat.index(a) for a in out])

    def to_gemma(self, tensors: Sequence[np.ndarray], sizes: Mapping[str, int]) -> np.ndarray:
        """HF tensors (already checked against hf_shape) -> the gemma_kit parameter."""
        parts = [self.part_to_gemma(t, sizes) for t in tensors]
        return np.stack(parts) if len(parts) > 1 else parts[0]

    def to_hf(self, value: np.ndarray, sizes: Mapping[str, int]) -> list[np.ndarray]:
        """The gemma_kit parameter -> its HF tensors (views where possible)."""
        groups, out = parse_layout(self.layout)
        flat = [a for g in groups for a in g]
        perm = [out.index(a) for a in flat]
        parts = list(value) if len(self.hf) > 1 else [value]
        return [p.transpose(perm).reshape(self.hf_shape(sizes)) for p in parts]


# The tensors of layer i: (path inside "layer_{i}", HF names inside "layers.{i}.", layout).
_NORMS = (
    (("pre_attention_norm", "scale"), ("input_layernorm.weight",), "D -> D"),
    (("post_attention_norm", "scale"), ("post_attention_layernorm.weight",), "D -> D"),
    (("pre_ffw_norm", "scale"), ("pre_feedforward_layernorm.weight",), "D -> D"),
    (("post_ffw_norm", "scale"), ("post_feedforward_layernorm.weight",), "D -> D"),
)
_QK_NORMS = (  # Gemma 3
    (("attn", "_query_norm", "scale"), ("self_attn.q_norm.weight",), "H -> H"),
    (("attn", "_key_norm", "scale"), ("self_attn.k_norm.weight",), "H -> H"),
)
_Q, _K, _V = "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"
_QKV_FUSED = (("attn", "qkv_einsum", "w"), (_Q, _K, _V), "(N H) D -> N D H")  # when N == K
_QKV_SPLIT = (
    (("attn", "q_einsum", "w"), (_Q,), "(N H) D -> N D H"),
    (("attn", "kv_einsum", "w"), (_K, _V), "(K H) D -> K D H"),
)
_OUT = (("attn", "attn_vec_einsum", "w"), ("self_attn.o_proj.weight",), "D (N H) -> N H D")
_GATE_UP = ("mlp.gate_proj.weight", "mlp.up_proj.weight")
_GATING = {  # keyed by Config.transpose_gating
    True: (("mlp", "gating_einsum", "w"), _GATE_UP, "F D -> F D"),
    False: (("mlp", "gating_einsum", "w"), _GATE_UP, "F D -> D F"),  # Gemma 2 2B
}
_DOWN = (("mlp", "linear", "w"), ("mlp.down_proj.weight",), "D F -> F D")


def text_rules(config: Config) -> list[Rule]:
    """Every parameter of the text model, in the order they are written on export."""
    per_layer = [
        *_NORMS,
        *(_QK_NORMS if config.use_qk_norm else ()),
        *((_QKV_FUSED,) if config.uses_qkv_einsum else _QKV_SPLIT),
        _OUT,
        _GATING[config.transpose_gating],
        _DOWN,
    ]
    rules = [
        Rule(
            ("embedder", "input_embedding"), ("embed_tokens.weight",), "V D -> V D", vocab_rows=True
        )
    ]
    for i in range(config.num_layers):
        rules += [
            Rule((f"layer_{i}", *path), tuple(f"layers.{i}.{n}" for n in names), layout)
            for path, names, layout in per_layer
        ]
    rules.append(Rule(("final_norm", "scale"), ("norm.weight",), "D -> D"))
    return rules


def sizes_of(config: Config, vocab_size: int | None = None) -> dict[str, int]:
    """Dimension letter -> size; V is the HF vocabulary when given."""
    return dict(
        V=vocab_size or config.vocab_size,
        D=config.embed_dim,
        F=config.hidden_dim,
        N=config.num_heads,
        K=config.num_kv_heads,
        H=config.head_dim,
    )


def hf_vocab_size(config: Config) -> int:
    """Rows of the exported (causal-LM) embedding: Gemma 2's 128 unused rows are dropped."""
    if config.family == "gemma2" and config.vocab_size == 256128:
        return 256000
    return config.vocab_size


def resize_rows(table: np.ndarray, rows: int) -> np.ndarray:
    """Cuts or zero-pads the vocabulary axis of an embedding table to `rows`."""
    if table.shape[0] >= rows:
        return table[:rows]
    pad = np.zeros((rows - table.shape[0], *table.shape[1:]), table.dtype)
    return np.concatenate([table, pad])


# --------------------------------------------------------------------------------------------
# Configs


# transformers' defaults for fields a config.json may omit (Gemma2Config, Gemma3TextConfig;
# tests/test_interop.py checks them against the installed transformers). The multimodal
# Gemma 3 configs on the Hub give only a handful of their text_config's fields.
HF_DEFAULTS = {
    "gemma2": dict(
        vocab_size=256000,
        hidden_size=2304,
        intermediate_size=9216,
        num_hidden_layers=26,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=256,
        hidden_activation="gelu_pytorch_tanh",
        max_position_embeddings=8192,
        rms_norm_eps=1e-6,
        query_pre_attn_scalar=256,
        sliding_window=4096,
        final_logit_softcapping=30.0,
        attn_logit_softcapping=50.0,
        rope_theta=10_000.0,
        sliding_window_pattern=2,
    ),
    "gemma3_text": dict(
        vocab_size=262208,
        hidden_size=2304,
        intermediate_size=9216,
        num_hidden_layers=26,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=256,
        hidden_activation="gelu_pytorch_tanh",
        max_position_embeddings=131072,
        rms_norm_eps=1e-6,
        query_pre_attn_scalar=256,
        sliding_window=4096,
        final_logit_softcapping=None,
        attn_logit_softcapping=None,
        rope_theta=1_000_000.0,
        rope_local_base_freq=10_000.0,
        sliding_window_pattern=6,
    ),
}
_GELU_TANH = ("gelu_pytorch_tanh", "gelu_tanh")


def _as_dict(hf_config: Any) -> dict:
    if isinstance(hf_config, Mapping):
        return dict(hf_config)
    if hasattr(hf_config, "to_dict"):  # a transformers PretrainedConfig
        return hf_config.to_dict()
    return dict(vars(hf_config))


def text_config_dict(hf_config: Any) -> tuple[dict, bool]:
    """(the text model's config dict with defaults filled in, whether it is multimodal)."""
    top = _as_dict(hf_config)
    multimodal = top.get("text_config") is not None or top.get("model_type") == "gemma3"
    raw = _as_dict(top["text_config"]) if top.get("text_config") is not None else top
    model_type = raw.get("model_type") or ("gemma3_text" if multimodal else None)
    if model_type == "gemma3":  # a multimodal config without text_config: all defaults
        model_type = "gemma3_text"
    if model_type not in HF_DEFAULTS:
        raise ConversionError(
            f"Hugging Face model_type {top.get('model_type')!r} is not a Gemma 2 or Gemma 3 model; "
            "gemma_kit converts Gemma2ForCausalLM, Gemma3ForCausalLM and "
            "Gemma3ForConditionalGeneration checkpoints (model_type 'gemma2', 'gemma3_text', "
            "'gemma3')"
        )
    merged = {
        **HF_DEFAULTS[model_type],
        **{k: v for k, v in raw.items() if v is not None or k.endswith("softcapping")},
    }
    merged["model_type"] = model_type
    if "_sliding_window_pattern" in raw and "sliding_window_pattern" not in raw:
        merged["sliding_window_pattern"] = raw["_sliding_window_pattern"]
    return merged, multimodal


def _rope(c: dict, family: str, kind: str) -> tuple[float, float]:
    """(base, position scale) of one layer kind, from the new or the legacy config format."""
    params = c.get("rope_parameters")
    if isinstance(params, Mapping) and kind in params:  # Gemma 3, transformers >= 5
        p = dict(params[kind] or {})
    elif isinstance(params, Mapping) and params:  # Gemma 2, transformers >= 5: one for all
        p = dict(params)
    elif family == "gemma3" and kind == "sliding_attention":  # legacy: local base, no scaling
        p = {"rope_theta": c["rope_local_base_freq"]}
    else:
        p = {"rope_theta": c["rope_theta"], **(c.get("rope_scaling") or {})}
    if "rope_theta" not in p:
        p["rope_theta"] = (
            c["rope_local_base_freq"]
            if family == "gemma3" and kind == "sliding_attention"
            else c["rope_theta"]
        )
    rope_type = p.get("rope_type", p.get("type", "default"))
    if rope_type == "default":
        return float(p["rope_theta"]), 1.0
    if rope_type == "linear":
        return float(p["rope_theta"]), float(p["factor"])
    raise ConversionError(
        f"RoPE type {rope_type!r} ({kind}) is not supported; Gemma uses 'default' and 'linear'"
    )


def config_from_hf(hf_config: Any, name: str = "hf") -> Config:
    """Builds a Config from a transformers Gemma config object or a config.json dict.

    Gemma2Config, Gemma3TextConfig and the multimodal Gemma3Config (its text part) are read,
    in both the transformers 5 format (rope_parameters, layer_types) and the older one on the
    Hub (rope_theta, rope_local_base_freq, rope_scaling, sliding_window_pattern). The
    vocabulary is the official one (VOCAB_ROWS). A config that matches an official preset in
    everything but the gating orientation (which HF's separate gate/up weights do not fix) and
    the presence of a vision tower (a text-only export of a 4B+ model) returns that preset,
    so the converted checkpoint has the official shapes.
    """
    c, multimodal = text_config_dict(hf_config)
    family: Literal["gemma2", "gemma3"] = "gemma2" if c["model_type"] == "gemma2" else "gemma3"
    unsupported = []
    if c.get("hidden_activation", c.get("hidden_act")) not in _GELU_TANH:
        unsupported.append(
            f"hidden_activation {c.get('hidden_activation')!r} (Gemma: gelu_pytorch_tanh)"
        )
    if c.get("attention_bias"):
        unsupported.append("attention_bias=True")
    if c.get("use_bidirectional_attention"):
        unsupported.append("use_bidirectional_attention=True (an embedding model)")
    if c.get("tie_word_embeddings") is False:
        unsupported.append("tie_word_embeddings=False")
    if unsupported:
        raise ConversionError(
            f"this {c['model_type']} config has {', '.join(unsupported)}, which gemma_kit's "
            "Gemma model does not implement"
        )
    num_layers = int(c["num_hidden_layers"])
    period = int(c["sliding_window_pattern"])
    layer_types = c.get("layer_types") or [
        "full_attention" if (i + 1) % period == 0 else "sliding_attention"
        for i in range(num_layers)
    ]
    if len(layer_types) != num_layers:
        raise ConversionError(
            f"layer_types lists {len(layer_types)} layers but num_hidden_layers is {num_layers}"
        )
    layers: list[AttentionKind] = []
    for kind in layer_types:
        base, scale = _rope(c, family, kind)
        if kind == "sliding_attention":
            layers.append(
                LocalAttention(int(c["sliding_window"]), rope_base=base, rope_scale=scale)
            )
        elif kind == "full_attention":
            layers.append(GlobalAttention(rope_base=base, rope_scale=scale))
        else:
            raise ConversionError(f"unknown Hugging Face layer type {kind!r}")
    hf_vocab = int(c["vocab_size"])
    config = Config(
        name=name,
        family=family,
        vocab_size=VOCAB_ROWS[family].get(hf_vocab, hf_vocab),
        embed_dim=int(c["hidden_size"]),
        hidden_dim=int(c["intermediate_size"]),
        num_heads=int(c["num_attention_heads"]),
        num_kv_heads=int(c["num_key_value_heads"]),
        head_dim=int(c["head_dim"]),
        layers=tuple(layers),
        query_pre_attn_scalar=float(c["query_pre_attn_scalar"]),
        # transformers' Gemma 3 keeps attn_logit_softcapping in its config but never applies
        # it (no Gemma 3 model uses one), so the converted model must not either.
        attn_logit_softcap=c.get("attn_logit_softcapping") if family == "gemma2" else None,
        final_logit_softcap=c.get("final_logit_softcapping"),
        use_qk_norm=family == "gemma3",
        has_vision=multimodal,
        max_context=int(c["max_position_embeddings"]),
        norm_eps=float(c["rms_norm_eps"]),
    )
    for preset in PRESETS.values():
        if (
            config.replace(
                name=preset.name,
                transpose_gating=preset.transpose_gating,
                has_vision=preset.has_vision,
            )
            == preset
        ):
            return preset
    return config


def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def config_to_hf(
    config: Config, *, dtype: str = "float32", bos_id: int = 2, eos_ids=(1,), pad_id: int = 0
) -> dict:
    """The config.json of the Gemma2ForCausalLM / Gemma3ForCausalLM holding `config`.

    Written in the transformers 5 format plus the legacy keys older readers (transformers 4,
    vLLM) look for. Raises ConversionError for what the HF classes cannot express.
    """
    problems = []
    local = {k for k in config.layers if isinstance(k, LocalAttention)}
    windows = {k.window for k in local}
    if len(windows) > 1:
        problems.append(f"sliding windows differ between layers ({sorted(windows)})")
    if config.family == "gemma3" and config.attn_logit_softcap is not None:
        problems.append("an attention logit soft-cap (transformers' Gemma 3 never applies one)")
    if config.use_qk_norm != (config.family == "gemma3"):
        problems.append(f"use_qk_norm={config.use_qk_norm} for a {config.family} model")

    def rope_of(kinds) -> dict:
        ropes = {(k.rope_base, k.rope_scale) for k in kinds}
        if len(ropes) > 1:
            problems.append(f"RoPE settings differ between layers of one kind ({sorted(ropes)})")
        base, scale = next(iter(ropes))
        p = {"rope_type": "default", "rope_theta": _number(base)}
        if scale != 1.0:
            p = {"rope_type": "linear", "factor": _number(scale), "rope_theta": _number(base)}
        return p

    glob = [k for k in config.layers if not k.is_local]
    out: dict[str, Any] = {}
    if config.family == "gemma2":
        rope = rope_of(config.layers)
        out.update(
            architectures=["Gemma2ForCausalLM"],
            model_type="gemma2",
            rope_parameters=rope,
            rope_theta=rope["rope_theta"],
            attn_logit_softcapping=config.attn_logit_softcap,
        )
    else:
        ropes = {}
        if local:
            ropes["sliding_attention"] = rope_of([k for k in config.layers if k.is_local])
        if glob:
            ropes["full_attention"] = rope_of(glob)
        legacy_local = ropes.get("sliding_attention", {}).get("rope_theta", 10_000)
        legacy_global = ropes.get("full_attention", {"rope_theta": 1_000_000})
        out.update(
            architectures=["Gemma3ForCausalLM"],
            model_type="gemma3_text",
            rope_parameters=ropes,
            rope_theta=legacy_global["rope_theta"],
            rope_local_base_freq=legacy_local,
            rope_scaling=(
                {"rope_type": "linear", "factor": legacy_global["factor"]}
                if "factor" in legacy_global
                else None
            ),
            attn_logit_softcapping=None,
            use_bidirectional_attention=False,
        )
    if problems:
        raise ConversionError(
            f"config {config.name!r} cannot be written as a Hugging Face "
            f"{out['architectures'][0]}: {'; '.join(problems)}"
        )
    out.update(
        vocab_size=hf_vocab_size(config),
        hidden_size=config.embed_dim,
        intermediate_size=config.hidden_dim,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        hidden_activation="gelu_pytorch_tanh",
        hidden_act="gelu_pytorch_tanh",
        max_position_embeddings=config.max_context,
        rms_norm_eps=config.norm_eps,
        query_pre_attn_scalar=_number(config.query_pre_attn_scalar),
        sliding_window=next(iter(windows)) if windows else 4096,
        layer_types=[
            "sliding_attention" if k.is_local else "full_attention" for k in config.layers
        ],
        final_logit_softcapping=config.final_logit_softcap,
        attention_bias=False,
        attention_dropout=0.0,
        tie_word_embeddings=True,
        bos_token_id=bos_id,
        eos_token_id=list(eos_ids) if len(eos_ids) > 1 else eos_ids[0],
        pad_token_id=pad_id,
        dtype=dtype,
        torch_dtype=dtype,
        use_cache=True,
    )
    return out


# --------------------------------------------------------------------------------------------
# State dicts


def find_prefix(names) -> str:
    """The prefix of the text model's tensors among `names` (see TEXT_PREFIXES)."""
    for prefix in TEXT_PREFIXES:
        if f"{prefix}embed_tokens.weight" in names:
            return prefix
    raise ConversionError(
        "no 'embed_tokens.weight' among the Hugging Face tensors: this is not a Gemma "
        "causal-LM checkpoint (looked for model.embed_tokens.weight and "
        "model.language_model.embed_tokens.weight)"
    )


def is_vision_key(name: str) -> bool:
    return name.startswith(VISION_ROOTS)


def as_numpy(value) -> np.ndarray:
    """A state dict's tensor as a numpy array (torch tensors as float32)."""
    if hasattr(value, "detach"):  # a torch tensor; keep torch an optional dependency
        value = value.detach().float().cpu().numpy()
    return np.asarray(value)


def _shape_of(state_dict: Mapping[str, Any], name: str) -> tuple[int, ...]:
    if hasattr(state_dict, "shape"):  # a lazy HFFolder: from the header, nothing read
        return tuple(state_dict.shape(name))
    return tuple(state_dict[name].shape)


def check_state_dict(state_dict: Mapping[str, Any], config: Config) -> str:
    """Checks names and shapes against the rules before any tensor is read; returns the prefix.

    Every rule's tensors must be present with the shapes the config implies (the vocabulary
    axis may be the HF partner of the official size, see VOCAB_ROWS), and every tensor that is
    neither one of them, nor the vision tower's, nor a tied output head, is an error.
    """
    prefix = find_prefix(state_dict.keys())
    sizes = sizes_of(config)
    used = set()
    for rule in text_rules(config):
        expected = rule.hf_shape(sizes)
        for name in rule.hf:
            full = prefix + name
            if full not in state_dict:
                raise ConversionError(
                    f"Hugging Face tensor {full!r} is missing from the checkpoint"
                )
            shape = _shape_of(state_dict, full)
            resizable = (
                rule.vocab_rows
                and shape[1:] == expected[1:]
                and (VOCAB_ROWS[config.family].get(shape[0]) == config.vocab_size)
            )
            if shape != expected and not resizable:
                raise ConversionError(
                    f"Hugging Face tensor {full!r} has shape {shape}, but the config implies "
                    f"{expected}: the checkpoint does not match its config.json"
                )
            used.add(full)
    used.update(h for h in TIED_HEAD if h in state_dict)
    unused = sorted(k for k in state_dict.keys() if k not in used and not is_vision_key(k))
    if unused:
        raise ConversionError(
            f"{len(unused)} Hugging Face tensors were not consumed, e.g. {unused[:5]}; the "
            "checkpoint does not match the config"
        )
    return prefix


def params_from_hf(
    state_dict: Mapping[str, Any],
    config: Config,
    *,
    dtype=np.float32,
    place: Callable[[np.ndarray], Any] | None = None,
    progress: Callable[[list], Any] | None = None,
) -> Params:
    """Maps a transformers Gemma state dict (numpy or torch tensors) onto the gemma_kit tree.

    `state_dict` may be lazy (gemma_kit.checkpoint.safetensors_io.HFFolder reads a tensor when
    it is looked up): after check_state_dict, each rule's tensors are read, converted, cast to
    `dtype` and handed to `place` (e.g. jax.device_put) one rule at a time, so at most one
    rule's inputs are held besides the output. Vision-tower tensors are left alone (text-only
    conversion). `progress` wraps the list of rules (e.g. tqdm).
    """
    prefix = check_state_dict(state_dict, config)
    sizes = sizes_of(config)
    for head in TIED_HEAD:
        if head in state_dict:  # tied: must equal the embedding, else we would drop weights
            if not np.array_equal(
                as_numpy(state_dict[head]), as_numpy(state_dict[prefix + "embed_tokens.weight"])
            ):
                raise ConversionError(
                    f"{head} differs from the input embedding; Gemma ties them and "
                    "gemma_kit cannot represent an untied output projection"
                )
    flat: dict[tuple[str, ...], Any] = {}
    rules = text_rules(config)
    for rule in progress(rules) if progress else rules:
        tensors = [as_numpy(state_dict[prefix + name]) for name in rule.hf]
        if rule.vocab_rows:
            tensors = [resize_rows(t, config.vocab_size) for t in tensors]
        value = np.ascontiguousarray(rule.to_gemma(tensors, sizes), dtype=dtype)
        del tensors
        flat[rule.path] = place(value) if place else value
    return unflatten(flat)


def hf_tensor_specs(config: Config, dtype) -> list[tuple[str, tuple[int, ...], np.dtype]]:
    """(name, shape, dtype) of every tensor the export writes, in order, before any data."""
    sizes = sizes_of(config, hf_vocab_size(config))
    return [
        (EXPORT_PREFIX + name, rule.hf_shape(sizes), np.dtype(dtype))
        for rule in text_rules(config)
        for name in rule.hf
    ]


def params_to_hf(
    get: Callable[[tuple[str, ...]], Any],
    config: Config,
    dtype,
) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (HF name, tensor) one at a time, in hf_tensor_specs order.

    `get(path)` returns one canonical parameter (a numpy or jax array); it is called once per
    rule, so a lazy source keeps only the current parameter in memory.
    """
    hf_vocab = hf_vocab_size(config)
    sizes = sizes_of(config, hf_vocab)
    for rule in text_rules(config):
        value = np.asarray(get(rule.path))
        if rule.vocab_rows:
            value = resize_rows(value, hf_vocab)
        for name, tensor in zip(rule.hf, rule.to_hf(value, sizes)):
            yield EXPORT_PREFIX + name, np.ascontiguousarray(tensor, dtype=dtype)
        del value, tensor  # before the next get(), which may restore the next layer
