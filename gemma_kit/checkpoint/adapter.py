"""The gemma_kit LoRA adapter folder on disk: written, its config read, its factors restored.

    OUT_DIR/adapter/
      adapter_config.json   format, version, rank, alpha, dtype, targets, modules, base_preset
      params/               an Orbax PyTree checkpoint of {module path: {"lora": {"a", "b"}}}

This module knows the file format, not the LoRA modules: gemma_kit.lora.save_adapter and
load_adapter turn a model's factors into the trees written and read here. A folder is written
through gemma_kit.checkpoint.staging (a temporary folder renamed at the end; only an earlier
adapter folder is ever replaced), and the factors' shapes are compared from the Orbax metadata
before any array is read, so an adapter of another model size is one clear AdapterError.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from gemma_kit.checkpoint import official, staging
from gemma_kit.errors import AdapterError, CheckpointError

ADAPTER_FORMAT = "gemma_kit-lora"
ADAPTER_VERSION = 1
CONFIG_FILE = "adapter_config.json"
PARAMS_DIR = "params"


def is_adapter_folder(path: pathlib.Path) -> bool:
    """Whether `path` holds an adapter config (so an earlier adapter may be replaced)."""
    return (path / CONFIG_FILE).is_file()


def write_adapter(
    path: str | os.PathLike, meta: dict[str, Any], params: dict, *, overwrite: bool = False
) -> pathlib.Path:
    """Writes an adapter folder: `meta` (format and version added) and the factor tree `params`.

    Returns the folder's absolute path.
    """
    meta = dict(format=ADAPTER_FORMAT, version=ADAPTER_VERSION, **meta)
    params = jax.tree.map(np.asarray, params)
    with staging.staged_folder(
        path,
        overwrite=overwrite,
        what="gemma_kit LoRA adapter folder",
        replaceable=is_adapter_folder,
    ) as folder:
        # Written by this process alone (in a multi-process run, by one of them): no barrier
        # with the other processes, which do not call this.
        alone = ocp.options.MultiprocessingOptions(
            primary_host=jax.process_index(), active_processes={jax.process_index()}
        )
        ocp.Checkpointer(
            ocp.PyTreeCheckpointHandler(multiprocessing_options=alone),
            multiprocessing_options=alone,
        ).save((folder / PARAMS_DIR).absolute(), params)
        staging.write_json(folder / CONFIG_FILE, meta)
    return pathlib.Path(path).expanduser().absolute()


def read_adapter_config(path: str | os.PathLike) -> dict[str, Any]:
    """The adapter_config.json of the adapter folder `path`; AdapterError when it is not one."""
    path = pathlib.Path(path).expanduser()
    file = path / CONFIG_FILE
    if not path.exists():
        raise AdapterError(f"adapter folder {str(path)!r} does not exist")
    if not file.is_file():
        raise AdapterError(
            f"{str(path)!r} is not a gemma_kit adapter folder (no {CONFIG_FILE}); pass the "
            "folder save_adapter or `gemma-kit finetune` wrote (OUT_DIR/adapter)"
        )
    try:
        meta = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise AdapterError(f"{file} is not valid JSON ({err}); the adapter is damaged") from None
    if not isinstance(meta, dict) or meta.get("format") != ADAPTER_FORMAT:
        raise AdapterError(f"{file} is not a {ADAPTER_FORMAT} adapter config")
    if meta.get("version", 0) > ADAPTER_VERSION:
        raise AdapterError(f"{file} has format version {meta['version']}; upgrade gemma_kit")
    return meta


def read_adapter_params(path: str | os.PathLike, target: dict) -> dict:
    """Restores the factor tree of the adapter folder `path` into `target`'s shapes and dtypes.

    `target` is a tree of jax.ShapeDtypeStruct (the model's factors). Every factor must be
    stored with the target's shape: anything else is an AdapterError naming the first factor
    that differs, raised before Orbax reads any array.
    """
    folder = pathlib.Path(path).expanduser().absolute() / PARAMS_DIR
    try:
        stored = official.flatten(official.read_metadata(folder))
    except CheckpointError as err:
        raise AdapterError(f"the LoRA factors of {str(path)!r} cannot be read: {err}") from None
    for key, want in official.flatten(target).items():
        got = stored.get(key)
        if got is None or tuple(got.shape) != tuple(want.shape):
            found = "missing" if got is None else f"of shape {tuple(got.shape)}"
            raise AdapterError(
                f"adapter {str(path)!r} holds {'/'.join(key)} {found} where this model needs "
                f"{tuple(want.shape)}: it was made for another model size"
            )
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    try:
        return ocp.PyTreeCheckpointer().restore(
            pathlib.Path(folder).absolute(),  # orbax needs an absolute path
            args=ocp.args.PyTreeRestore(
                item=target,
                restore_args=jax.tree.map(
                    lambda s: ocp.ArrayRestoreArgs(dtype=s.dtype, sharding=device), target
                ),
            ),
        )
    except Exception as err:  # orbax raises many types; one clear message for the user
        raise AdapterError(
            f"cannot read the LoRA factors in {str(folder)!r} "
            f"({type(err).__name__}: {str(err).splitlines()[0][:200]}); the adapter is "
            "incomplete or was made for another model size"
        ) from err
