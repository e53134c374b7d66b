"""A free TCP port on 127.0.0.1: for the demo's servers and jax.distributed's coordinator."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (just now: the OS may hand it out again
    before the caller binds it, which on a test machine it does not in practice)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
