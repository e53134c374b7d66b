"""Static model configuration: a frozen `Config` and the registry of official presets.

Sizes are data, not subclasses: every Gemma 2 and Gemma 3 text model is one `Config` value.
The numbers come from the official code (google-deepmind/gemma, `gemma/gm/nn/_gemma.py`) and
are checked against the checkpoint shapes by `tests/test_presets.py` and its golden table.

Each layer's attention kind is a small value that carries its own parameters (a sliding
window layer knows its window and RoPE base), so a block never needs a dozen loose arguments.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Union

from gemma_kit.errors import ConfigError


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


AttentionKind = Union[GlobalAttention, LocalAttention]


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
        for cap in ("attn_logit_softcap", "final_logit_softcap"):
            value = getattr(self, cap)
            if value is not None and not value > 0:
                raise ConfigError(f"Config {self.name!r}: {cap} must be > 0 or None, got {value}")

    @property
    def num_layers(self) -> int:
        return len(self.layers)

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


def _gemma3(name, *, D, F, N, K, H, L, window, query_pre_attn_scalar, vision, context,
            global_rope_scale=1.0):
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
        _gemma2("gemma2-2b", D=2304, F=9216, N=8, K=4, H=256, L=26,
                query_pre_attn_scalar=256, transpose_gating=False),
        _gemma2("gemma2-9b", D=3584, F=14336, N=16, K=8, H=256, L=42,
                query_pre_attn_scalar=256),
        _gemma2("gemma2-27b", D=4608, F=36864, N=32, K=16, H=128, L=46,
                query_pre_attn_scalar=4608 // 32),
        _gemma3("gemma3-270m", D=640, F=2048, N=4, K=1, H=256, L=18, window=512,
                query_pre_attn_scalar=256, vision=False, context=32_768),
        _gemma3("gemma3-1b", D=1152, F=6912, N=4, K=1, H=256, L=26, window=512,
                query_pre_attn_scalar=256, vision=False, context=32_768),
        _gemma3("gemma3-4b", D=2560, F=10240, N=8, K=4, H=256, L=34, window=1024,
                query_pre_attn_scalar=256, vision=True, context=131_072, global_rope_scale=8.0),
        _gemma3("gemma3-12b", D=3840, F=15360, N=16, K=8, H=256, L=48, window=1024,
                query_pre_attn_scalar=256, vision=True, context=131_072, global_rope_scale=8.0),
        _gemma3("gemma3-27b", D=5376, F=21504, N=32, K=16, H=128, L=62, window=1024,
                query_pre_attn_scalar=5376 // 32, vision=True, context=131_072,
                global_rope_scale=8.0),
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
