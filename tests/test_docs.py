"""The documentation: links that resolve, no paths outside the repository, and examples that
still compile and name things that exist (scripts/run_doc_snippets.py runs them for real)."""

from __future__ import annotations

import ast
import builtins
import importlib
import importlib.util
import pathlib
import re
import subprocess

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _script(name: str):
    """scripts/NAME.py as a module (scripts/ holds programs, not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


run_doc_snippets = _script("run_doc_snippets")

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def _code_blocks(path: pathlib.Path) -> list[tuple[int, str]]:
    """(line, code) of every ```python block of a Markdown page."""
    lines = path.read_text().splitlines()
    blocks, start = [], None
    for i, line in enumerate(lines):
        if start is None and re.fullmatch(r"```python\s*", line):
            start = i + 1
        elif start is not None and line.startswith("```"):
            blocks.append((start + 1, "\n".join(lines[start:i])))
            start = None
    return blocks


def test_relative_links_resolve():
    broken = []
    for page in PAGES:
        for target in LINK.findall(page.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            if not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not broken, f"links to files that do not exist: {broken}"


def test_no_placeholder_left_in_a_page():
    """A section written before its figures existed holds a line like WORKED_EXAMPLE or TODO:
    none may reach the pages."""
    placeholder = re.compile(r"[A-Z][A-Z_]{3,}|TODO|TBD|XXX")
    found = [
        f"{page.relative_to(ROOT)}:{i}: {line}"
        for page in PAGES
        for i, line in enumerate(page.read_text().splitlines(), 1)
        if placeholder.fullmatch(line.strip())
    ]
    assert not found, found


def test_nothing_points_outside_the_repository():
    """No tracked file cites a path of the machine it was written on (notes, mirrors)."""
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    pattern = re.compile(r"/work/|\.\./shared\b|\bshared/(docs|tools)/")
    found = []
    for name in tracked:
        path = ROOT / name
        if path.suffix not in (".py", ".md", ".toml", ".json", ".txt", "") or not path.is_file():
            continue
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if pattern.search(line) and name != "tests/test_docs.py":
                found.append(f"{name}:{number}: {line.strip()}")
    assert not found, "\n".join(found)


def _defined(tree: ast.AST) -> set[str]:
    """Names a block binds: assignments and loop targets, imports, functions, arguments."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            names.add(node.name)
    return names


def test_python_examples_compile_and_name_real_things():
    """Every ```python block parses and uses no undefined name (a page's blocks read as one
    session); what it imports exists; attributes it reads from the gemma_kit package
    (gemma_kit.X) exist. The runnable ones are run by scripts/run_doc_snippets.py."""
    problems, runnable = [], 0
    for page in PAGES:
        runnable += len(run_doc_snippets.snippets(page))
        defined = set(dir(builtins))
        for line, code in _code_blocks(page):
            where = f"{page.relative_to(ROOT)}:{line}"
            try:
                tree = ast.parse(code)
            except SyntaxError as err:
                problems.append(f"{where}: {err}")
                continue
            defined |= _defined(tree)
            undefined = sorted(
                {
                    node.id
                    for node in ast.walk(tree)
                    if isinstance(node, ast.Name)
                    and isinstance(node.ctx, ast.Load)
                    and node.id not in defined
                }
            )
            if undefined:
                problems.append(f"{where}: undefined names {undefined}")
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and node.module:
                    module = importlib.import_module(node.module)
                    for alias in node.names:
                        if not hasattr(module, alias.name):
                            try:
                                importlib.import_module(f"{node.module}.{alias.name}")
                            except ImportError:
                                problems.append(f"{where}: {node.module} has no {alias.name}")
                elif isinstance(node, ast.Import):
                    for alias in node.names:
                        importlib.import_module(alias.name)
                elif (
                    isinstance(node, ast.Attribute)
                    and isinstance(node.value, ast.Name)
                    and node.value.id == "gemma_kit"
                ):
                    if not hasattr(importlib.import_module("gemma_kit"), node.attr):
                        problems.append(f"{where}: gemma_kit has no {node.attr}")
    assert runnable >= 2  # the README's quickstart, docs/fine-tuning.md's example
    assert not problems, "\n".join(problems)
