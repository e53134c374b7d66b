"""Starting the test workers (tests/support/*_worker.py) as child processes, and watching them.

A worker runs as `python -m tests.support.NAME JOB.json` with the repository root as its working
directory, so it imports this package, and gemma_kit, as the parent does (the environment,
PYTHONPATH included, passes through). It reads its job from the JSON file and prints its report
as one JSON line, the last line of its output that starts with "{".
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import time
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[2]


def command(worker: str, *args: str) -> list[str]:
    """The command line that runs tests/support/`worker`.py (from ROOT)."""
    return [sys.executable, "-m", f"{__package__}.{worker}", *args]


def cpu_env(devices: int = 1, cache: pathlib.Path | None = None) -> dict[str, str]:
    """This environment for a child on the CPU with `devices` (fake) devices. With `cache`,
    every compilation goes to JAX's persistent cache there: the children of one test file
    compile the same steps once."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    if devices > 1:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    if cache is not None:
        env.update(
            JAX_COMPILATION_CACHE_DIR=str(cache),
            JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
            JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
        )
    return env


def write_job(job: dict[str, Any], folder: pathlib.Path) -> pathlib.Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"job-{time.monotonic_ns()}.json"
    path.write_text(json.dumps(job))
    return path


def report(stdout: str) -> dict[str, Any] | None:
    """A worker's report: the last line of its output that starts with "{" (None if none)."""
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else None


def start(
    worker: str, job: dict[str, Any], folder: pathlib.Path, env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    """Starts `worker` on `job` (written as a file into `folder`); env defaults to cpu_env()."""
    return subprocess.Popen(
        command(worker, str(write_job(job, folder))),
        cwd=ROOT,
        env=cpu_env() if env is None else env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(
    proc: subprocess.Popen[str], timeout: float = 600
) -> tuple[int, dict[str, Any] | None, str]:
    """Waits for a started worker: (exit status, report or None, stderr)."""
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, report(out), err


def run(
    worker: str,
    job: dict[str, Any],
    folder: pathlib.Path,
    *,
    devices: int = 1,
    timeout: float = 900,
) -> dict[str, Any]:
    """Runs `worker` on `job` on `devices` CPU devices to the end; its report. A worker that
    fails, or prints no report, fails the test with the end of its stderr."""
    code, result, err = finish(start(worker, job, folder, cpu_env(devices)), timeout)
    if code != 0 or result is None:
        raise AssertionError(f"{worker} exited with {code}:\n{err[-3000:]}")
    return result


def run_together(
    worker: str, jobs: list[dict[str, Any]], folder: pathlib.Path, timeout: float = 600
) -> list[dict[str, Any]]:
    """Runs one `worker` per job at once (the processes of one jax.distributed run, each on one
    CPU device); their reports in the jobs' order. Any still running when one fails is killed."""
    procs = [start(worker, job, folder) for job in jobs]
    reports = []
    try:
        for proc in procs:
            code, result, err = finish(proc, timeout)
            if code != 0 or result is None:
                raise AssertionError(f"{worker} exited with {code}:\n{err[-3000:]}")
            reports.append(result)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return reports


def read_jsonl(path: pathlib.Path) -> list[dict[str, Any]]:
    """The rows of a JSON-lines file (metrics.jsonl), blank lines skipped."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def logged_steps(out_dir: pathlib.Path) -> list[int]:
    """The training steps a run in `out_dir` has logged so far (rows of metrics.jsonl with a
    loss)."""
    path = out_dir / "metrics.jsonl"
    return [r["step"] for r in read_jsonl(path) if "loss" in r] if path.exists() else []


def wait_for_step(
    proc: subprocess.Popen[str], out_dir: pathlib.Path, step: int, timeout: float = 300
) -> int:
    """Waits until the run `proc` writes to `out_dir` has logged `step` (or a later one); the
    last step logged. Fails if the run ends first or nothing arrives within `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        steps = logged_steps(out_dir)
        if steps and steps[-1] >= step:
            return steps[-1]
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before step {step}: {proc.communicate()[1]}")
        time.sleep(0.02)
    proc.kill()
    raise AssertionError(f"no step {step} within {timeout} s")
