"""Import hygiene: no import cycles in gemma_kit, and every module imports on its own.

This file imports nothing of gemma_kit at module level: its helper runs in fresh processes that
must start without any gemma_kit module loaded.
"""

from __future__ import annotations

import ast
import concurrent.futures
import multiprocessing
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "gemma_kit"
# Third-party modules loaded once in the process the import checks fork from, so that each
# check pays for gemma_kit alone. None of them imports gemma_kit.
PRELOAD = [
    "numpy",
    "jax",
    "jax.numpy",
    "flax.nnx",
    "orbax.checkpoint",
    "sentencepiece",
    "tqdm",
    "ml_dtypes",
    "optax",
    "gguf",
    "PIL.Image",
    "safetensors",
    "gradio",
    "matplotlib",
]


def _modules() -> dict[str, pathlib.Path]:
    """Dotted name -> file of every module of the gemma_kit package."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__main__":  # runs the command line when imported
            continue
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(name: str, path: pathlib.Path, modules: dict) -> set[str]:
    """The gemma_kit modules that module `name` imports anywhere: at module level, inside a
    function, or under a condition (a cycle through a function-level import is a cycle too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([node.module] if node.module else []))
            # "from gemma_kit import lora" imports the module gemma_kit.lora, not the package.
            submodules = [f"{base}.{alias.name}" for alias in node.names]
            named = [m for m in submodules if m in modules]
            found.update(named)
            if len(named) < len(submodules):
                found.add(base)
    return {m for m in found if m in modules and m != name}


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of the directed graph as a list of nodes (first == last), or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_cycles():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycles():
    """The package is layered: no module imports, even lazily, one that imports it back.

    The package's own __init__ (which imports the public names) is left out: every submodule
    import runs it first, so it is above everything by construction.
    """
    modules = _modules()
    graph = {
        name: _imports(name, path, modules) - {"gemma_kit"}
        for name, path in modules.items()
        if name != "gemma_kit"
    }
    assert sum(map(len, graph.values())) > 50  # the graph was read (a parse bug finds nothing)
    assert "gemma_kit.checkpoint.adapter" in graph["gemma_kit.lora"]
    cycle = _find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_every_module_imports_alone():
    """Each module imports in a process where no gemma_kit module was loaded before it.

    The processes are forked from one that loaded only third-party libraries, so a module that
    works only because another was imported first (as in a test session) fails here.
    """
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)  # what cannot be imported is skipped by Python
    names = sorted(_modules())
    assert len(names) > 40
    failures = {}
    with concurrent.futures.ProcessPoolExecutor(
        max_workers=2, mp_context=context, max_tasks_per_child=1
    ) as pool:
        # exec is a builtin, so the child needs nothing of this file to run it.
        jobs = {name: pool.submit(exec, f"import {name}") for name in names}
        for name, job in jobs.items():
            try:
                job.result(timeout=300)
            except Exception as err:  # the child's exception, with its traceback as the cause
                failures[name] = f"{type(err).__name__}: {err}\n{err.__cause__ or ''}"
    assert not failures, "\n\n".join(f"{name}:\n{text}" for name, text in failures.items())
