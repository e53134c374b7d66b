"""Option types of the `gemma-kit` commands: each refuses a bad value while parsing (one line,
exit status 2), before any model is loaded."""

from __future__ import annotations

import argparse
import math
import re

from gemma_kit.config import dtype_name
from gemma_kit.errors import ConfigError


def dtype_option(name: str) -> str:
    """--dtype: a dtype name or alias (gemma_kit.config.DTYPE_NAMES) -> its canonical name."""
    try:
        return dtype_name(name)
    except ConfigError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return value


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def non_negative_number(text: str) -> float:
    value = _number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def positive_number(text: str) -> float:
    value = _number(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def top_p_option(text: str) -> float:
    value = _number(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def min_p_option(text: str) -> float:
    value = _number(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def fraction_option(text: str) -> float:
    """A weight in [0, 1] (merge --lambda, --eta)."""
    value = _number(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def port_option(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number in 1..65535, got {value}")
    return value


def text_option(text: str) -> str:
    """A prompt or stop string: any text but the empty one."""
    if not text:
        raise argparse.ArgumentTypeError("is empty; give at least one character of text")
    return text


def size_option(text: str) -> int:
    """'5GB', '500MB', '2GiB' or a plain number of bytes (at least 1)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMG]I?)?B?\s*", text.upper())
    if not match:
        raise argparse.ArgumentTypeError(f"cannot read {text!r} as a size; e.g. 5GB, 500MB")
    factor = {None: 1, "K": 10**3, "M": 10**6, "G": 10**9, "KI": 2**10, "MI": 2**20, "GI": 2**30}[
        match.group(2)
    ]
    size = int(float(match.group(1)) * factor)
    if size < 1:
        raise argparse.ArgumentTypeError(f"must be at least one byte, got {text!r}")
    return size
