"""The KV cache: a pytree of preallocated arrays, and the pure function that writes into it.

    cache = {"index": int32 scalar,               # tokens written so far (the next write slot)
             "layer_{i}": {"k": [B, S_i, K, H],   # keys, already rotated by RoPE
                           "v": [B, S_i, K, H],
                           "pos": [B, S_i]}}      # absolute position per slot, -1 = empty/pad

Global layers keep S_i = the cache length. Local (sliding-window) layers keep a ring of
S_i = min(window, length) slots, so their memory is O(window) rather than O(context): token
number t (counted over the whole batch, pads included) lands in slot t % S_i. Every slot
remembers its absolute position, and masks are computed from positions, so a wrapped ring and a
left-padded row are the same case to the attention.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gemma_kit.config import Config

Cache = dict


def layer_slots(config: Config, layer: int, length: int) -> int:
    kind = config.layers[layer]
    return min(kind.window, length) if kind.is_local else length


def init_cache(config: Config, batch: int, length: int, dtype=jnp.bfloat16) -> Cache:
    """An empty cache for `batch` rows of up to `length` tokens (prompt + generated)."""
    K, H = config.num_kv_heads, config.head_dim
    cache: Cache = {"index": jnp.zeros((), jnp.int32)}
    for i in range(config.num_layers):
        S = layer_slots(config, i, length)
        cache[f"layer_{i}"] = {
            "k": jnp.zeros((batch, S, K, H), dtype),
            "v": jnp.zeros((batch, S, K, H), dtype),
            "pos": jnp.full((batch, S), -1, jnp.int32),
        }
    return cache


def cache_length(cache: Cache) -> int:
    """The number of tokens the cache holds before it is full (its global length)."""
    return max(layer["pos"].shape[1] for key, layer in cache.items() if key != "index")


def write(layer: dict, k: jax.Array, v: jax.Array, positions: jax.Array, index) -> dict:
    """Writes T new entries (tokens index .. index+T-1) into one layer's slots.

    Only the last S entries can survive in S slots, so a long prefill writes just those (the
    earlier queries of that prefill attended to the fresh keys, not to the cache).
    """
    S = layer["pos"].shape[1]
    T = k.shape[1]
    k = k.astype(layer["k"].dtype)
    v = v.astype(layer["v"].dtype)
    if T >= S:
        # The last S entries fill every slot; entry index+T-S+j goes to slot (index+T-S+j) % S.
        shift = (index + T - S) % S
        return {
            "k": jnp.roll(k[:, T - S:], shift, axis=1),
            "v": jnp.roll(v[:, T - S:], shift, axis=1),
            "pos": jnp.roll(positions[:, T - S:], shift, axis=1),
        }
    if T == 1:  # the decode step: one contiguous in-place update
        slot = index % S
        return {
            "k": jax.lax.dynamic_update_slice_in_dim(layer["k"], k, slot, axis=1),
            "v": jax.lax.dynamic_update_slice_in_dim(layer["v"], v, slot, axis=1),
            "pos": jax.lax.dynamic_update_slice_in_dim(layer["pos"], positions, slot, axis=1),
        }
    slots = (index + jnp.arange(T)) % S
    return {
        "k": layer["k"].at[:, slots].set(k),
        "v": layer["v"].at[:, slots].set(v),
        "pos": layer["pos"].at[:, slots].set(positions),
    }
