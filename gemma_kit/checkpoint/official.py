"""Orbax checkpoints in the two official Gemma layouts.

The released checkpoints use a "flat" tree, one key per module path:

    {'transformer/layer_0/attn/q_einsum': {'w': ...}, 'transformer/final_norm': {'scale': ...},
     'SigLiPFromPatches_0/siglip_encoder/...': {...}}                       (vision, Gemma 3 4B+)

and the official library also writes a "nested" one, the Flax parameter tree itself, where the
feed-forward weights are bare arrays (`layer_0/mlp/gating_einsum`, no `w`) and the vision
encoder sits under `vision_encoder`.

Inside gemma_kit parameters live in the "canonical" tree: the NNX state of `Transformer`,
nested, with every Einsum holding `w` (`layer_0/mlp/gating_einsum/w`) and the image encoder,
when loaded, under `vision_encoder` (`vision_encoder/siglip_encoder/...`, the nested layout's
name; `embedder/mm_*` hold its projection). This module converts
between the three, finds a checkpoint inside a downloaded folder, infers or checks the preset
from shapes, and restores straight into an abstract target so no second copy of the weights is
ever held in memory.
"""

from __future__ import annotations

import functools
import os
import pathlib
import shutil
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from gemma_kit.config import (
    PRESETS,
    Config,
    VisionConfig,
    config_from_dict,
    config_to_dict,
    get_preset,
    is_preset,
)
from gemma_kit.errors import CheckpointError, CheckpointNotFoundError
from gemma_kit.transformer import Embedder, Transformer
from gemma_kit.vision.siglip import SigLiPFromPatches

Layout = Literal["flat", "nested"]
Tree = dict[str, Any]

_FLAT_TEXT_ROOT = "transformer"
_FLAT_VISION_ROOT = "SigLiPFromPatches_0"
_NESTED_VISION_KEY = "vision_encoder"
# Multimodal projection weights that live in the embedder; dropped when loading text-only.
_EMBEDDER_MM_KEYS = ("mm_input_projection", "mm_soft_embedding_norm")
# Files that mark a folder as an Orbax checkpoint (old and new Orbax versions). Files, never
# folders: a model folder holds its checkpoint in a subfolder that may well be named "checkpoint".
_ORBAX_MARKERS = ("_METADATA", "_CHECKPOINT_METADATA", "manifest.ocdbt", "checkpoint")
# Written by Orbax itself, so only these make it safe to delete a folder we are replacing.
_ORBAX_OWN_MARKERS = ("_METADATA", "_CHECKPOINT_METADATA")
# The config of a checkpoint whose size is no preset (a shrunk student, a custom conversion),
# stored in the checkpoint folder beside Orbax's own files (write_config / read_config).
CONFIG_FILE = "gemma_config.json"


# --------------------------------------------------------------------------------------------
# Layout conversion (works on any leaves: arrays, ShapeDtypeStructs, metadata)


def _is_mlp_weight(path: tuple[str, ...]) -> bool:
    return len(path) >= 2 and path[-2] == "mlp" and path[-1] in ("gating_einsum", "linear")


def flatten(tree: Tree, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    """Nested dict -> {path tuple: leaf}."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, (*prefix, key)))
        else:
            out[(*prefix, key)] = value
    return out


def unflatten(flat: dict[tuple[str, ...], Any]) -> Tree:
    """{path tuple: leaf} -> nested dict."""
    tree: Tree = {}
    for path, value in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


def canonical_to_flat(params: Tree) -> Tree:
    """Canonical tree -> the released checkpoints' flat tree.

    Text modules go under `transformer/`, the image encoder under `SigLiPFromPatches_0/`.
    """
    out: Tree = {}
    for path, leaf in flatten(params).items():
        if path[0] == _NESTED_VISION_KEY:
            module = "/".join((_FLAT_VISION_ROOT, *path[1:-1]))
        else:
            module = "/".join((_FLAT_TEXT_ROOT, *path[:-1]))
        out.setdefault(module, {})[path[-1]] = leaf
    return out


def canonical_to_nested(params: Tree) -> Tree:
    """Canonical tree -> the official library's nested tree (bare feed-forward arrays)."""
    flat = {}
    for path, leaf in flatten(params).items():
        if path[-1] == "w" and _is_mlp_weight(path[:-1]):
            path = path[:-1]
        flat[path] = leaf
    return unflatten(flat)


def split_layout(tree: Tree) -> tuple[Layout, Tree, Tree]:
    """Checkpoint tree in either layout -> (layout, canonical text tree, canonical vision tree).

    The vision tree holds the SigLIP encoder (`vision_encoder/...`) and the embedder's
    multimodal projection (`embedder/mm_*`), empty for a text-only checkpoint; text-only
    loading ignores it.
    """
    if tree and all("/" in key for key in tree):
        layout: Layout = "flat"
        text, vision = {}, {}
        for module, leaves in tree.items():
            root, _, rest = module.partition("/")
            if root == _FLAT_TEXT_ROOT:
                for leaf, value in leaves.items():
                    text[(*rest.split("/"), leaf)] = value
            elif root == _FLAT_VISION_ROOT:
                for leaf, value in leaves.items():
                    vision[(_NESTED_VISION_KEY, *rest.split("/"), leaf)] = value
            else:
                raise CheckpointError(
                    f"unexpected key {module!r} in a flat Gemma checkpoint (expected keys under "
                    f"'{_FLAT_TEXT_ROOT}/' or '{_FLAT_VISION_ROOT}/')"
                )
    else:
        layout = "nested"
        vision = flatten(
            {_NESTED_VISION_KEY: tree[_NESTED_VISION_KEY]} if _NESTED_VISION_KEY in tree else {}
        )
        text = {}
        text_tree = {k: v for k, v in tree.items() if k != _NESTED_VISION_KEY}
        for path, value in flatten(text_tree).items():
            if _is_mlp_weight(path):
                path = (*path, "w")
            text[path] = value
    for path in list(text):
        if path[0] == "embedder" and path[1] in _EMBEDDER_MM_KEYS:
            vision[path] = text.pop(path)
    return layout, unflatten(text), unflatten(vision)


def merge(*trees: Tree) -> Tree:
    """Nested dicts -> one nested dict holding every leaf (e.g. text and vision trees)."""
    flat: dict[tuple[str, ...], Any] = {}
    for tree in trees:
        flat.update(flatten(tree))
    return unflatten(flat)


def canonical_to_layout(params: Tree, layout: Layout) -> Tree:
    return canonical_to_flat(params) if layout == "flat" else canonical_to_nested(params)


# --------------------------------------------------------------------------------------------
# Finding a checkpoint


def is_orbax_dir(path: pathlib.Path) -> bool:
    """Whether `path` is a folder holding an Orbax checkpoint (one of its marker files)."""
    return path.is_dir() and any((path / marker).is_file() for marker in _ORBAX_MARKERS)


def _written_by_orbax(path: pathlib.Path) -> bool:
    return path.is_dir() and any((path / marker).is_file() for marker in _ORBAX_OWN_MARKERS)


def find_checkpoint(path: str | os.PathLike) -> pathlib.Path:
    """The Orbax checkpoint folder at `path` or one level below it.

    Released archives unpack to a folder holding `tokenizer.model` beside the checkpoint
    folder, so pointing at the download is enough.
    """
    path = pathlib.Path(path).expanduser()
    if not path.exists():
        raise CheckpointNotFoundError(
            f"checkpoint path {str(path)!r} does not exist; pass the folder of an Orbax "
            "checkpoint (or the unpacked download that contains one)"
        )
    if not path.is_dir():
        raise CheckpointError(
            f"{str(path)!r} is a file, not a checkpoint folder; an Orbax checkpoint is a "
            "folder with a _METADATA file (for a GGUF file use `gemma-kit convert --gguf`)"
        )
    if is_orbax_dir(path):
        return path
    found = sorted(p for p in path.iterdir() if is_orbax_dir(p))
    if len(found) == 1:
        return found[0]
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise CheckpointError(
            f"{str(path)!r} holds several checkpoints ({names}); pass one of them"
        )
    listing = ", ".join(sorted(p.name for p in path.iterdir())[:10]) or "nothing"
    raise CheckpointError(
        f"no Orbax checkpoint in {str(path)!r} or its subfolders (it contains: {listing}). "
        "A checkpoint folder holds a _METADATA file; convert other formats with "
        "`gemma-kit convert`."
    )


def find_tokenizer(path: str | os.PathLike) -> pathlib.Path | None:
    """tokenizer.model in or beside the checkpoint folder, if there is one."""
    path = pathlib.Path(path).expanduser()
    for candidate in (path / "tokenizer.model", path.parent / "tokenizer.model"):
        if candidate.is_file():
            return candidate
    return None


# --------------------------------------------------------------------------------------------
# Shapes: presets inferred and checked


def abstract_params(config: Config, param_dtype=jnp.float32, *, vision: bool = False) -> Tree:
    """The canonical tree of ShapeDtypeStructs for `config`, without allocating anything.

    Text weights only, unless `vision` (then the image encoder too, in float32).
    """
    model = nnx.eval_shape(lambda: Transformer(config, param_dtype=param_dtype, with_vision=vision))
    return nnx.to_pure_dict(nnx.state(model))


def abstract_vision_params(config: Config) -> Tree:
    """The canonical vision tree (encoder and embedder/mm_*) of `config`, as ShapeDtypeStructs.

    Built without the text layers, so it costs nothing for the largest presets either.
    """
    vision = config.vision
    if vision is None:
        return {}
    embedder = nnx.eval_shape(
        lambda: Embedder(
            config.vocab_size,
            config.embed_dim,
            param_dtype=jnp.float32,
            rngs=nnx.Rngs(0),
            vision_width=vision.width,
        )
    )
    mm = {k: v for k, v in nnx.to_pure_dict(nnx.state(embedder)).items() if k in _EMBEDDER_MM_KEYS}
    encoder = jax.tree.map(lambda x: x, _abstract_encoder(vision))  # a copy of the cache
    return {_NESTED_VISION_KEY: encoder, "embedder": mm}


@functools.lru_cache(maxsize=4)
def _abstract_encoder(vision: VisionConfig) -> Tree:
    # Tracing the 27 blocks' initialisers takes seconds, and every vision preset shares them.
    return nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: SigLiPFromPatches(vision))))


def _signature(shapes: dict[tuple[str, ...], tuple[int, ...]]) -> dict[str, Any]:
    """The dimensions that together identify a model size (no single one does)."""
    V, D = shapes[("embedder", "input_embedding")]
    L = len({path[0] for path in shapes if path[0].startswith("layer_")})
    attn = {
        path[2]: shape
        for path, shape in shapes.items()
        if path[0] == "layer_0" and path[1] == "attn"
    }
    if "qkv_einsum" in attn:
        _, N, _, H = attn["qkv_einsum"]
        K = N
    else:
        N, _, H = attn["q_einsum"]
        K = attn["kv_einsum"][1]
    gating = shapes[("layer_0", "mlp", "gating_einsum", "w")]
    return dict(V=V, D=D, N=N, K=K, H=H, L=L, gating=tuple(gating), qk_norm="_query_norm" in attn)


def _config_signature(config: Config) -> dict[str, Any]:
    D, F = config.embed_dim, config.hidden_dim
    return dict(
        V=config.vocab_size,
        D=D,
        N=config.num_heads,
        K=config.num_kv_heads,
        H=config.head_dim,
        L=config.num_layers,
        gating=(2, F, D) if config.transpose_gating else (2, D, F),
        qk_norm=config.use_qk_norm,
    )


def _describe(sig: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sig.items())


def infer_preset(params_shapes: Tree) -> Config:
    """The official preset whose shapes match a canonical tree of arrays/ShapeDtypeStructs."""
    shapes = {path: tuple(leaf.shape) for path, leaf in flatten(params_shapes).items()}
    try:
        sig = _signature(shapes)
    except (KeyError, ValueError) as err:
        raise CheckpointError(
            f"the checkpoint does not have the Gemma parameter tree (missing {err}); "
            "is it a Gemma 2/3 checkpoint?"
        ) from None
    for config in PRESETS.values():
        if _config_signature(config) == sig:
            return config
    raise CheckpointError(
        f"no preset matches the checkpoint's shapes ({_describe(sig)}). Known presets: "
        f"{', '.join(PRESETS)}. For a custom size pass preset=gemma_kit.Config(...)."
    )


def _shape_mismatches(config: Config, expected_tree: Tree, found_tree: Tree) -> str | None:
    """The first few differences between two trees of shapes, as one sentence (None if equal)."""
    expected = {p: tuple(v.shape) for p, v in flatten(expected_tree).items()}
    found = {p: tuple(v.shape) for p, v in flatten(found_tree).items()}
    problems = []
    for path in sorted(expected.keys() | found.keys()):
        name = "/".join(path)
        if path not in found:
            problems.append(f"{name} missing from the checkpoint")
        elif path not in expected:
            problems.append(f"{name} in the checkpoint is not a parameter of {config.name}")
        elif expected[path] != found[path]:
            problems.append(
                f"{name} has shape {found[path]}, {config.name} expects {expected[path]}"
            )
    if not problems:
        return None
    more = f"; and {len(problems) - 4} more" if len(problems) > 4 else ""
    return "; ".join(problems[:4]) + more


def check_vision_shapes(config: Config, vision_shapes: Tree) -> None:
    """Raises CheckpointError naming the first mismatches of a checkpoint's vision tree."""
    shown = _shape_mismatches(config, abstract_vision_params(config), vision_shapes)
    if shown:
        raise CheckpointError(
            f"the image encoder in the checkpoint does not match {config.name!r}: {shown}. "
            "Load it text-only (load_model(..., text_only=True)) or pass the right preset."
        )


def check_shapes(config: Config, params_shapes: Tree) -> None:
    """Raises CheckpointError naming the first mismatches between config and checkpoint."""
    shown = _shape_mismatches(config, abstract_params(config), params_shapes)
    if shown:
        try:
            hint = f" The shapes match preset {infer_preset(params_shapes).name!r}."
        except CheckpointError:
            hint = ""
        raise CheckpointError(f"checkpoint does not match preset {config.name!r}: {shown}.{hint}")


# --------------------------------------------------------------------------------------------
# Stored configs: sizes that are no preset


def write_config(folder: str | os.PathLike, config: Config) -> pathlib.Path:
    """Stores `config` in the checkpoint folder `folder` (JSON, written atomically), so that
    load_model, `gemma-kit info` and the exports know a size no preset describes."""
    from gemma_kit.checkpoint.staging import write_json

    return write_json(
        pathlib.Path(folder) / CONFIG_FILE,
        {"format": "gemma_kit.config", "version": 1, "config": config_to_dict(config)},
    )


def read_config(folder: str | os.PathLike) -> Config | None:
    """The config write_config stored in checkpoint folder `folder` (None when there is none)."""
    path = pathlib.Path(folder) / CONFIG_FILE
    if not path.is_file():
        return None
    import json

    try:
        stored = json.loads(path.read_text())
        if not isinstance(stored, dict) or stored.get("format") != "gemma_kit.config":
            raise ValueError("it is not a gemma_kit config file")
        return config_from_dict(stored["config"])
    except (ValueError, KeyError) as err:  # ConfigError is a ValueError
        raise CheckpointError(
            f"{path} is damaged ({err}); delete it to infer the size from "
            "the weights (official sizes only), or write it again"
        ) from None


def checkpoint_config(
    folder: pathlib.Path, shapes: Tree, preset: str | Config | None = None
) -> Config:
    """The config of the checkpoint in `folder` whose text weights have `shapes`: the preset
    given, else the config stored with it, else the preset its shapes match. Whichever it is,
    it is checked against the shapes."""
    config = get_preset(preset) if preset is not None else read_config(folder)
    if config is None:
        return infer_preset(shapes)
    check_shapes(config, shapes)
    return config


# --------------------------------------------------------------------------------------------
# Reading and writing


def _checkpointer() -> ocp.PyTreeCheckpointer:
    """Orbax's checkpointer. Its paths must be absolute: given a relative one, its metadata
    read returns nothing (and a restore fails), so every call here passes path.absolute()."""
    return ocp.PyTreeCheckpointer()


def read_metadata(path: pathlib.Path) -> Tree:
    """Tree of ShapeDtypeStructs of the checkpoint, in its own layout."""
    try:
        meta = _checkpointer().metadata(pathlib.Path(path).absolute())
        item = getattr(meta, "item_metadata", meta)
        tree = getattr(item, "tree", item)
        if tree is None:  # orbax returns None, rather than raising, when array metadata is gone
            raise CheckpointError(
                f"the array metadata of {str(path)!r} is missing or damaged: the checkpoint is "
                "incomplete or corrupt. Download or convert it again."
            )
        return jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), dict(tree))
    except CheckpointError:
        raise
    except Exception as err:  # orbax raises many types; the user needs one clear message
        raise CheckpointError(
            f"cannot read the Orbax metadata of {str(path)!r}: the checkpoint is incomplete or "
            f"corrupt ({type(err).__name__}: {_short(err)}). Download or convert it again."
        ) from err


def _short(err: Exception) -> str:
    """The first line of an orbax/tensorstore error, without its debugging appendix."""
    text = str(err).split("See full TensorStore details")[0].strip()
    return text.splitlines()[0][:200] if text else type(err).__name__


def restore_params(path: pathlib.Path, layout: Layout, target: Tree, *, sharding=None) -> Tree:
    """Restores the canonical `target` (ShapeDtypeStructs, dtypes to cast to) from `path`.

    Only the target's parameters are read (a partial restore), so a text-only load of a
    multimodal checkpoint never touches the vision encoder.
    """
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])
    item = canonical_to_layout(target, layout)
    restore_args = jax.tree.map(
        lambda s: ocp.ArrayRestoreArgs(dtype=s.dtype, sharding=sharding), item
    )
    try:
        restored = _checkpointer().restore(
            pathlib.Path(path).absolute(),
            args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True),
        )
    except Exception as err:
        raise CheckpointError(
            f"cannot restore the weights of {str(path)!r}: the checkpoint is incomplete or "
            f"corrupt ({type(err).__name__}: {_short(err)}). Download or convert it again."
        ) from err
    _, params, vision = split_layout(restored)
    return merge(params, vision)


def save_params(
    params: Tree,
    path: str | os.PathLike,
    *,
    layout: Layout = "flat",
    overwrite: bool = False,
    config: Config | None = None,
) -> pathlib.Path:
    """Writes a canonical tree as an official Orbax checkpoint.

    Orbax writes into a temporary folder and renames it when every array is on disk, so an
    interrupted save never leaves a folder that looks like a complete checkpoint. A `config`
    that is no official preset is stored with it (write_config).
    """
    path = pathlib.Path(path).expanduser().absolute()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(
                f"{str(path)!r} is a file; a checkpoint is a folder, choose another path"
            )
        if not overwrite:
            raise CheckpointError(
                f"{str(path)!r} already exists; choose a new folder or pass overwrite=True"
            )
        if not _written_by_orbax(path) and any(path.iterdir()):
            raise CheckpointError(
                f"refusing to overwrite {str(path)!r}: it is not empty and not an Orbax "
                "checkpoint, so it may hold data that is not ours to delete"
            )
        shutil.rmtree(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tree = canonical_to_layout(jax.tree.map(np.asarray, params), layout)
    _checkpointer().save(pathlib.Path(path).absolute(), tree)
    if config is not None and not is_preset(config):
        write_config(path, config)
    return path


def load_params(
    path: str | os.PathLike,
    preset: str | Config | None = None,
    dtype=None,
    *,
    vision: bool = False,
) -> tuple[Config, Tree, dict[str, Any]]:
    """Finds, checks and restores a checkpoint.

    With `vision`, an image encoder stored in the checkpoint is restored too (in float32,
    whatever `dtype` says, as released), provided the config has one (Gemma 3 4B/12B/27B).
    Returns (config, canonical params as jax arrays, info) where info holds the folder, layout,
    stored dtypes of the text weights, whether a vision encoder was present (has_vision) and
    whether it was loaded (vision_loaded).
    """
    folder = find_checkpoint(path)
    layout, shapes, vision_shapes = split_layout(read_metadata(folder))
    config = checkpoint_config(folder, shapes, preset)
    stored = sorted({str(leaf.dtype) for leaf in flatten(shapes).values()})
    target = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, jnp.dtype(dtype) if dtype is not None else s.dtype),
        shapes,
    )
    load_vision = bool(vision and vision_shapes and config.vision is not None)
    if load_vision:
        check_vision_shapes(config, vision_shapes)
        target = merge(
            target,
            jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.float32), vision_shapes),
        )
    params = restore_params(folder, layout, target)
    info = dict(
        path=folder,
        layout=layout,
        stored_dtypes=stored,
        has_vision=bool(vision_shapes),
        vision_loaded=load_vision,
    )
    return config, params, info
