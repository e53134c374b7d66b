"""Runs the Python snippets of the documentation that promise to run as written.

    python scripts/run_doc_snippets.py                  # README.md and docs/*.md
    python scripts/run_doc_snippets.py README.md --list # what would run

A snippet promises it by the line RUNNABLE_MARKER just above its ```python fence. Each runs in
a fresh interpreter, in a temporary folder holding links to the repository's finetune/ and
docs/ folders (so its relative paths resolve and what it writes is thrown away), with this
checkout's gemma_kit first on the import path. The wall time and peak memory (maximum resident
set size) of each are printed; the exit status is 1 if any snippet failed.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
RUNNABLE_MARKER = "<!-- runs as written: scripts/run_doc_snippets.py -->"
# Folders a snippet may read by relative path.
LINKED = ("finetune", "docs")
# Runs the snippet, then reports the peak resident memory of its process (Linux: kilobytes).
WRAPPER = """
import resource, runpy, sys
runpy.run_path(sys.argv[1], run_name="__main__")
print(f"PEAK_KB {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}", file=sys.stderr)
"""


def snippets(path: pathlib.Path) -> list[tuple[int, str]]:
    """(line number, code) of every marked ```python block of a Markdown file."""
    lines = path.read_text().splitlines()
    found = []
    for i, line in enumerate(lines):
        if line.strip() != RUNNABLE_MARKER:
            continue
        if i + 1 >= len(lines) or not re.fullmatch(r"```python\s*", lines[i + 1]):
            raise SystemExit(f"{path}:{i + 1}: the marker must be followed by a ```python fence")
        end = next(j for j in range(i + 2, len(lines)) if lines[j].startswith("```"))
        found.append((i + 3, "\n".join(lines[i + 2 : end]) + "\n"))
    return found


def run(code: str) -> tuple[int, float, float, str]:
    """(exit status, wall seconds, peak memory in GB, the last lines of the output)."""
    with tempfile.TemporaryDirectory(prefix="gemma_kit-snippet-") as work:
        work_path = pathlib.Path(work)
        for name in LINKED:
            (work_path / name).symlink_to(ROOT / name, target_is_directory=True)
        script = work_path / "snippet.py"
        script.write_text(code)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        start = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-c", WRAPPER, str(script)],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
        )
        seconds = time.perf_counter() - start
    peak = re.search(r"PEAK_KB (\d+)", done.stderr)
    # The snippet's own output, then what it reported on stderr (progress bars left out).
    errors = [
        line
        for line in done.stderr.splitlines()
        if line.strip() and "%|" not in line and not line.startswith("PEAK_KB")
    ]
    tail = "\n".join(done.stdout.strip().splitlines()[-15:] + errors[-15:])
    return done.returncode, seconds, int(peak.group(1)) / 2**20 if peak else float("nan"), tail


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "files",
        nargs="*",
        type=pathlib.Path,
        help="Markdown files (default: README.md and docs/*.md)",
    )
    parser.add_argument("--list", action="store_true", help="list the snippets, run nothing")
    args = parser.parse_args()
    files = args.files or [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    failed = 0
    for path in files:
        for line, code in snippets(path):
            shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
            where = f"{shown}:{line}"
            if args.list:
                print(where)
                continue
            print(f"{where}: running ({len(code.splitlines())} lines)", flush=True)
            status, seconds, peak_gb, tail = run(code)
            print(tail)
            verdict = "ok" if status == 0 else f"FAILED (exit status {status})"
            print(
                f"{where}: {verdict}, {seconds:.0f} s, peak memory {peak_gb:.1f} GB\n", flush=True
            )
            failed += status != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
