"""Lists uses of gemma_kit's private names (`_name`) outside the module that defines them.

    python scripts/find_private_uses.py            # the whole repository

Two forms are found by reading the code (nothing is imported): `from gemma_kit.x import _y`,
and `m._y` where `m` names an imported gemma_kit module; the same for the test helpers
(`tests.support`). Private attributes of objects (`sampler._expand`) cannot be told apart from
others without running the code; grep for them.
A name that two modules share deserves a public name. Exit status 1 when anything is found.
"""

from __future__ import annotations

import ast
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
FOLDERS = ("gemma_kit", "tests", "benchmarks", "scripts", "finetune", "demos")
PACKAGES = ("gemma_kit", "tests")  # whose private names are found


def checked(module: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in PACKAGES)


def private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def uses(path: pathlib.Path) -> list[str]:
    tree = ast.parse(path.read_text())
    modules: dict[str, str] = {}  # local name -> the module it stands for
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and checked(node.module or ""):
            for alias in node.names:
                if private(alias.name):
                    found.append(f"{node.lineno}: from {node.module} import {alias.name}")
                else:
                    modules[alias.asname or alias.name] = f"{node.module}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if checked(alias.name):
                    modules[alias.asname or alias.name.split(".")[0]] = alias.name
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and private(node.attr)
            and isinstance(node.value, ast.Name)
            and node.value.id in modules
        ):
            found.append(f"{node.lineno}: {node.value.id}.{node.attr} ({modules[node.value.id]})")
    return sorted(found, key=lambda line: int(line.split(":")[0]))


def main() -> int:
    total = 0
    for folder in FOLDERS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            for line in uses(path):
                print(f"{path.relative_to(ROOT)}:{line}")
                total += 1
    return 1 if total else 0


if __name__ == "__main__":
    sys.exit(main())
