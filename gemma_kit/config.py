"""Static model configuration: a frozen `Config` and the registry of official presets.

Sizes are data, not subclasses: every Gemma 2 and Gemma 3 text model is one `Config` value.
The numbers come from the official code (google-deepmind/gemma, `gemma/gm/nn/_gemma.py`) and
are checked against the checkpoint shapes by `tests/test_presets.py` and its golden table.

Each layer's attention kind is a small value that carries its own parameters (a sliding
window layer knows its window and RoPE base), so a block never needs a dozen loose arguments.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from gemma_kit.errors import ConfigError

# The weight and compute dtypes gemma_kit takes by name (command line, fine-tuning configs),
# aliases included. float16 is left out on purpose: Gemma's activations overflow its range.
DTYPE_NAMES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "float32": "float32", "f32": "float32"}


def dtype_name(name: str) -> str:
    """A dtype name or alias ("bf16") -> its canonical name ("bfloat16"); ConfigError otherwise."""
    if name not in DTYPE_NAMES:
        raise ConfigError(f"unknown dtype {name!r}; use bfloat16 (bf16) or float32 (f32)")
    return DTYPE_NAMES[name]


@dataclasses.dataclass(frozen=True)
class GlobalAttention:
    """Full causal attention over every earlier position.

    rope_scale divides positions before the rotation (Gemma 3 4B+ use 8 for 128k context).
    """

    rope_base: float = 10_000.0
    rope_scale: float = 1.0

    is_local = False


@dataclasses.dataclass(frozen=True)
class LocalAttention:
    """Sliding-window attention: a query at position p sees keys at positions (p - window, p]."""

    window: int
    rope_base: float = 10_000.0
    rope_scale: float = 1.0

    is_local = True

    def __post_init__(self):
        if self.window < 1:
            raise ConfigError(f"sliding window must be >= 1, got {self.window}")


AttentionKind = GlobalAttention | LocalAttention


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """The SigLIP image encoder of Gemma 3 4B/12B/27B (ViT So400m/14) and its soft tokens.

    Defaults are the official sizes (google-deepmind/gemma `gemma/gm/nn/vision/_vision_utils.py`
    ViTModel and `_vision.py` SigLiPFromPatches): an image of `image_size`^2 pixels is cut into
    (image_size / patch_size)^2 patches (64 x 64 = 4096), encoded, and average-pooled to
    `num_soft_tokens` (256) soft tokens of `width` features, which the text model's embedder
    normalises and projects to its embed dim.
    """

    width: int = 1152  # W
    depth: int = 27
    mlp_dim: int = 4304
    num_heads: int = 16
    patch_size: int = 14
    image_size: int = 896
    num_soft_tokens: int = 256  # M, per image, after pooling
    norm_eps: float = 1e-6  # the encoder's LayerNorms (flax and transformers default)

    def __post_init__(self):
        for field in (
            "width",
            "depth",
            "mlp_dim",
            "num_heads",
            "patch_size",
            "image_size",
            "num_soft_tokens",
        ):
            if getattr(self, field) < 1:
                raise ConfigError(f"VisionConfig: {field} must be >= 1, got {getattr(self, field)}")
        if self.width % self.num_heads:
            raise ConfigError(
                f"VisionConfig: width ({self.width}) must be a multiple of num_heads "
                f"({self.num_heads})"
            )
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"VisionConfig: image_size ({self.image_size}) must be a multiple of patch_size "
                f"({self.patch_size})"
            )
        side, out = self.patches_per_side, int(round(self.num_soft_tokens**0.5))
        if out * out != self.num_soft_tokens or side % out:
            raise ConfigError(
                f"VisionConfig: num_soft_tokens ({self.num_soft_tokens}) must be a square whose "
                f"side divides the {side} patches per side (the pooling window is square)"
            )

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:  # P
        return self.patches_per_side**2

    @property
    def pool_window(self) -> int:
        """Side of the square average-pooling window (4 for 64 patches -> 16 soft tokens/side)."""
        return self.patches_per_side // int(round(self.num_soft_tokens**0.5))

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything that fixes the shapes and numerics of a Gemma text model.

    Dimension letters follow `gemma_kit.layers`: V vocab, D embed, F ffw hidden, N query heads,
    K kv heads, H head dim, L layers (= len(layers)).
    """

    name: str
    family: Literal["gemma2", "gemma3"]
    vocab_size: int  # V
    embed_dim: int  # D
    hidden_dim: int  # F, per GeGLU branch
    num_heads: int  # N
    num_kv_heads: int  # K
    head_dim: int  # H
    layers: tuple[AttentionKind, ...]
    # Queries are multiplied by query_pre_attn_scalar ** -0.5. Usually H; Gemma 2 27B and
    # Gemma 3 27B use D / N instead (the reports call this "query scaling").
    query_pre_attn_scalar: float
    attn_logit_softcap: float | None = None  # Gemma 2: 50
    final_logit_softcap: float | None = None  # Gemma 2: 30
    use_qk_norm: bool = False  # Gemma 3: RMSNorm over H on queries and keys
    # Gemma 2 2B stores the GeGLU gating weight as [2, D, F]; every later model as [2, F, D].
    transpose_gating: bool = True
    # The official checkpoint of this size also carries the SigLIP vision encoder.
    has_vision: bool = False
    # Sizes of that encoder when they are not the official ones (tiny test models); see
    # `vision`. A Transformer builds the encoder only when asked (`with_vision=True`;
    # load_model does so when the checkpoint holds one).
    vision_config: VisionConfig | None = None
    max_context: int = 8192
    norm_eps: float = 1e-6

    def __post_init__(self):
        positive = dict(
            vocab_size=self.vocab_size,
            embed_dim=self.embed_dim,
            hidden_dim=self.hidden_dim,
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            query_pre_attn_scalar=self.query_pre_attn_scalar,
            max_context=self.max_context,
        )
        for field, value in positive.items():
            if not value > 0:
                raise ConfigError(f"Config {self.name!r}: {field} must be > 0, got {value}")
        if self.family not in ("gemma2", "gemma3"):
            raise ConfigError(
                f"Config {self.name!r}: family must be 'gemma2' or 'gemma3', got {self.family!r}"
            )
        if not self.layers:
            raise ConfigError(f"Config {self.name!r}: needs at least one layer")
        if not all(isinstance(k, (GlobalAttention, LocalAttention)) for k in self.layers):
            raise ConfigError(
                f"Config {self.name!r}: layers must be GlobalAttention/LocalAttention values"
            )
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"Config {self.name!r}: num_heads ({self.num_heads}) must be a multiple of "
                f"num_kv_heads ({self.num_kv_heads}) for grouped-query attention"
            )
        if self.head_dim % 2:
            raise ConfigError(f"Config {self.name!r}: head_dim must be even for RoPE")
        if self.vision_config is not None and not self.has_vision:
            raise ConfigError(
                f"Config {self.name!r}: vision_config is set but has_vision is False; pass "
                "has_vision=True for a model with an image encoder"
            )
        for cap in ("attn_logit_softcap", "final_logit_softcap"):
            value = getattr(self, cap)
            if value is not None and not value > 0:
                raise ConfigError(f"Config {self.name!r}: {cap} must be > 0 or None, got {value}")

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def vision(self) -> VisionConfig | None:
        """The image encoder's sizes: vision_config, else the official SigLIP when has_vision."""
        if self.vision_config is not None:
            return self.vision_config
        return VisionConfig() if self.has_vision else None

    @property
    def uses_qkv_einsum(self) -> bool:
        """Official checkpoints fuse q, k and v into one `qkv_einsum` when N == K."""
        return self.num_heads == self.num_kv_heads

    @property
    def tokenizer_version(self) -> int:
        return 2 if self.family == "gemma2" else 3

    def replace(self, **changes) -> Config:
        return dataclasses.replace(self, **changes)


def gemma2_layers(num_layers: int, window: int = 4096) -> tuple[AttentionKind, ...]:
    """Gemma 2 alternates local and global layers, starting with local; RoPE base 10k."""
    pattern = (LocalAttention(window), GlobalAttention())
    return tuple(pattern[i % 2] for i in range(num_layers))


def gemma3_layers(
    num_layers: int, window: int, global_rope_scale: float = 1.0
) -> tuple[AttentionKind, ...]:
    """Gemma 3: five local layers (RoPE base 10k) then one global (base 1M), cut at L."""
    local = LocalAttention(window, rope_base=10_000.0)
    glob = GlobalAttention(rope_base=1_000_000.0, rope_scale=global_rope_scale)
    return tuple(glob if i % 6 == 5 else local for i in range(num_layers))


def _gemma2(name, *, D, F, N, K, H, L, query_pre_attn_scalar, transpose_gating=True):
    return Config(
        name=name,
        family="gemma2",
        vocab_size=256128,
        embed_dim=D,
        hidden_dim=F,
        num_heads=N,
        num_kv_heads=K,
        head_dim=H,
        layers=gemma2_layers(L),
        query_pre_attn_scalar=query_pre_attn_scalar,
        attn_logit_softcap=50.0,
        final_logit_softcap=30.0,
        transpose_gating=transpose_gating,
        max_context=8192,
    )


def _gemma3(
    name, *, D, F, N, K, H, L, window, query_pre_attn_scalar, vision, context, global_rope_scale=1.0
):
    return Config(
        name=name,
        family="gemma3",
        vocab_size=262144,
        embed_dim=D,
        hidden_dim=F,
        num_heads=N,
        num_kv_heads=K,
        head_dim=H,
        layers=gemma3_layers(L, window, global_rope_scale),
        query_pre_attn_scalar=query_pre_attn_scalar,
        use_qk_norm=True,
        has_vision=vision,
        max_context=context,
    )


# Official sizes (google-deepmind/gemma gemma/gm/nn/_gemma.py). The query scale of the two 27B
# models is (D / N) ** -0.5 (4608 / 32 = 144, 5376 / 32 = 168); every other model uses H ** -0.5.
PRESETS: dict[str, Config] = {
    c.name: c
    for c in (
        _gemma2(
            "gemma2-2b",
            D=2304,
            F=9216,
            N=8,
            K=4,
            H=256,
            L=26,
            query_pre_attn_scalar=256,
            transpose_gating=False,
        ),
        _gemma2("gemma2-9b", D=3584, F=14336, N=16, K=8, H=256, L=42, query_pre_attn_scalar=256),
        _gemma2(
            "gemma2-27b", D=4608, F=36864, N=32, K=16, H=128, L=46, query_pre_attn_scalar=4608 // 32
        ),
        _gemma3(
            "gemma3-270m",
            D=640,
            F=2048,
            N=4,
            K=1,
            H=256,
            L=18,
            window=512,
            query_pre_attn_scalar=256,
            vision=False,
            context=32_768,
        ),
        _gemma3(
            "gemma3-1b",
            D=1152,
            F=6912,
            N=4,
            K=1,
            H=256,
            L=26,
            window=512,
            query_pre_attn_scalar=256,
            vision=False,
            context=32_768,
        ),
        _gemma3(
            "gemma3-4b",
            D=2560,
            F=10240,
            N=8,
            K=4,
            H=256,
            L=34,
            window=1024,
            query_pre_attn_scalar=256,
            vision=True,
            context=131_072,
            global_rope_scale=8.0,
        ),
        _gemma3(
            "gemma3-12b",
            D=3840,
            F=15360,
            N=16,
            K=8,
            H=256,
            L=48,
            window=1024,
            query_pre_attn_scalar=256,
            vision=True,
            context=131_072,
            global_rope_scale=8.0,
        ),
        _gemma3(
            "gemma3-27b",
            D=5376,
            F=21504,
            N=32,
            K=16,
            H=128,
            L=62,
            window=1024,
            query_pre_attn_scalar=5376 // 32,
            vision=True,
            context=131_072,
            global_rope_scale=8.0,
        ),
    )
}


def get_preset(name: str | Config) -> Config:
    """Returns the preset called `name` (a Config passes through unchanged)."""
    if isinstance(name, Config):
        return name
    key = str(name).strip().lower().replace("_", "-")
    if key in PRESETS:
        return PRESETS[key]
    raise ConfigError(
        f"Unknown preset {name!r}. Known presets: {', '.join(PRESETS)}. "
        "Pass one of these names, or a gemma_kit.Config for a custom size."
    )


# --------------------------------------------------------------------------------------------
# Configs as JSON values: how a size that is no preset (a shrunk student, a converted custom
# model) is stored beside its checkpoint (gemma_kit.checkpoint.official.write_config).

_ATTENTION_KINDS = {"global": GlobalAttention, "local": LocalAttention}


def config_to_dict(config: Config) -> dict:
    """Every field of `config` as JSON values; each layer as {"attention": "global" | "local",
    and that kind's own fields}. config_from_dict reads it back to an equal Config."""
    out = {}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if field.name == "layers":
            value = [
                dict(attention="local" if kind.is_local else "global", **dataclasses.asdict(kind))
                for kind in value
            ]
        elif isinstance(value, VisionConfig):
            value = dataclasses.asdict(value)
        out[field.name] = value
    return out


def config_from_dict(values: dict) -> Config:
    """The Config that config_to_dict wrote; ConfigError naming what is missing or unknown."""

    def build(cls, fields: dict, where: str):
        if not isinstance(fields, dict):
            raise ConfigError(f"{where} must be a JSON object, got {type(fields).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ConfigError(
                f"{where} has unknown fields {unknown}; it was written by another "
                "version of gemma_kit, or edited by hand"
            )
        try:
            return cls(**fields)
        except TypeError as err:  # a missing required field
            raise ConfigError(f"{where} is incomplete: {err}") from None

    if not isinstance(values, dict):
        raise ConfigError(f"a stored config must be a JSON object, got {type(values).__name__}")
    values = dict(values)
    layers = []
    for i, layer in enumerate(values.get("layers") or []):
        layer = dict(layer) if isinstance(layer, dict) else {}
        kind = _ATTENTION_KINDS.get(layer.pop("attention", None))
        if kind is None:
            raise ConfigError(
                f'layer {i} of the stored config needs "attention": "global" or "local"'
            )
        layers.append(build(kind, layer, f"layer {i} of the stored config"))
    values["layers"] = tuple(layers)
    if values.get("vision_config") is not None:
        values["vision_config"] = build(
            VisionConfig, values["vision_config"], "the stored vision_config"
        )
    return build(Config, values, "the stored config")


def is_preset(config: Config) -> bool:
    """Whether `config` is one of the official presets (under its own name)."""
    return PRESETS.get(config.name) == config
