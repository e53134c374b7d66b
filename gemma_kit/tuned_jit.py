"""jax.jit with the XLA compiler options probed for this CPU: the decode programs' wrapper.

    @functools.partial(tuned_jit, static_argnames=("settings",))
    def decode_step(params, state, *, settings): ...

compiles `decode_step` with layers.decode_compiler_options(), the vector width
gemma_kit.cpu_paths chose for this CPU (probed once per CPU and cached on disk; {} off CPU and on
CPUs without AVX-512, where the program is jax.jit's own). The options are looked up at each call
(a dictionary lookup once answered), so GEMMA_KIT_VECTOR_WIDTH set later still takes effect; each
set of options keeps its own jitted function and compiled programs.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax

from gemma_kit import layers


class TunedJit:
    """A function jitted with this CPU's compiler options (module docstring)."""

    def __init__(self, fun: Callable, jit_kwargs: dict[str, Any]):
        functools.update_wrapper(self, fun)
        self.fun = fun
        self.jit_kwargs = jit_kwargs
        self.jitted: dict[tuple, Callable] = {}

    def __call__(self, *args, **kwargs):
        options = layers.decode_compiler_options()
        key = tuple(sorted(options.items()))
        jitted = self.jitted.get(key)
        if jitted is None:
            jitted = jax.jit(self.fun, compiler_options=options or None, **self.jit_kwargs)
            self.jitted[key] = jitted
        return jitted(*args, **kwargs)


def tuned_jit(fun: Callable, **jit_kwargs) -> TunedJit:
    """`fun` jitted (jax.jit's keyword arguments) with this CPU's compiler options."""
    return TunedJit(fun, jit_kwargs)
