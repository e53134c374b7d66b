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

from gemma_kit.config import Config, LocalAttention

Cache = dict


def layer_slots(config: Config, layer: int, length: int, ring_slack: int = 0) -> int:
    """Slots of one layer: the cache length, or for a local layer a ring of its window plus
    `ring_slack` (at most the cache length)."""
    kind = config.layers[layer]
    return min(kind.window + ring_slack, length) if isinstance(kind, LocalAttention) else length


def init_cache(
    config: Config, batch: int, length: int, dtype=jnp.bfloat16, ring_slack: int = 0
) -> Cache:
    """An empty cache for `batch` rows of up to `length` tokens (prompt + generated).

    ring_slack: extra slots for every ring, so that a write of up to ring_slack + 1 tokens
    never overwrites an entry inside the window (speculative decoding writes k + 1 entries
    and may take some back; gemma_kit.speculative). Masks come from positions, so the extra,
    older entries are never attended to.
    """
    K, H = config.num_kv_heads, config.head_dim
    cache: Cache = {"index": jnp.zeros((), jnp.int32)}
    for i in range(config.num_layers):
        S = layer_slots(config, i, length, ring_slack)
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
            "k": jnp.roll(k[:, T - S :], shift, axis=1),
            "v": jnp.roll(v[:, T - S :], shift, axis=1),
            "pos": jnp.roll(positions[:, T - S :], shift, axis=1),
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


def _slots(index, count: int, S: int) -> jax.Array:
    return (index + jnp.arange(count)) % S


def save_slots(cache: Cache, count: int) -> dict:
    """What the next `count` entries will overwrite: per layer, {"k", "v", "pos"} of the slots
    tokens index .. index + count - 1 take ([B, count, ...]), for `rollback`."""
    saved = {}
    for name, layer in cache.items():
        if name == "index":
            continue
        S = layer["pos"].shape[1]
        if count >= S:
            raise ValueError(
                f"{name} has {S} slots: a write of {count} entries would wrap onto itself and "
                "could not be taken back; give the cache ring_slack >= count - 1"
            )
        slots = _slots(cache["index"], count, S)
        saved[name] = {key: layer[key][:, slots] for key in ("k", "v", "pos")}
    return saved


def rollback(cache: Cache, saved: dict, index, kept) -> Cache:
    """The cache after `count` entries were written from token `index` on -> the cache as if
    only the first `kept` (a traced scalar) had been: the slots of the later ones get their
    `saved` contents back and the index moves to index + kept."""
    out: Cache = {"index": index + kept}
    for name, old in saved.items():
        layer = cache[name]
        count = old["pos"].shape[1]
        slots = _slots(index, count, layer["pos"].shape[1])
        undo = jnp.arange(count) >= kept  # [count]
        out[name] = {}
        for key in ("k", "v", "pos"):
            mask = undo.reshape((1, count) + (1,) * (layer[key].ndim - 2))
            restored = jnp.where(mask, old[key], layer[key][:, slots])
            out[name][key] = layer[key].at[:, slots].set(restored)
    return out
