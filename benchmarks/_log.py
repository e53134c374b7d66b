"""Timestamped progress lines on stderr, shared by the benchmark scripts.

The scripts run as `python benchmarks/NAME.py`, so this folder is on sys.path; T0 is the moment
the first script imported this module (its start, as far as the log is concerned).
"""

from __future__ import annotations

import sys
import time

T0 = time.perf_counter()


def log(msg: str) -> None:
    print(
        f"[{time.strftime('%H:%M:%S')} +{time.perf_counter() - T0:6.1f}s] {msg}",
        file=sys.stderr,
        flush=True,
    )
