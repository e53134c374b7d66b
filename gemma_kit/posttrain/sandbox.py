"""Running a candidate Python program (a model's output) where it cannot hang or harm the run.

    result = run_python("def add(a, b):\\n    return a + b", tests="assert add(2, 3) == 5")
    result.passed, result.reason      # True, "passed"

The candidate and then the tests run in a child process, as `python -I -S -B` (isolated: no
user site, no PYTHON* variables, no script folder on sys.path, no site-packages unless asked, no
bytecode writes) with:

* a fresh temporary working folder, deleted afterwards, and an environment holding only PATH,
  LANG, HOME and TMPDIR (both pointing into that folder): no inherited secrets;
* resource limits (setrlimit, set by the harness before it reads the candidate): address
  space, CPU seconds, size of any file it writes (its captured output included), open files,
  no core dumps, and no new processes (RLIMIT_NPROC 0; the kernel does not enforce this one
  for root, the guard below does). No preexec_fn: forking a threaded parent (JAX, the
  verifier's thread pool) and then running Python in the child can deadlock;
* a wall-clock timeout after which its whole process group is killed;
* no network, two ways. Where the system lets us, the child gets its own empty network namespace
  (`unshare --net`, with `--map-root-user` when not root): no interface but a loopback that is
  down, so nothing outside can be reached. Always, whether or not that worked, a guard is
  installed in the child before the candidate's first line runs: a CPython audit hook
  (sys.addaudithook; it cannot be removed once added) that ends the process at once, with
  status BLOCKED, on any socket operation, on starting processes (fork, exec, spawn,
  subprocess, os.system), on sending signals, on loading native code (ctypes) or importing the
  modules that bypass the other checks (_posixsubprocess, _ctypes), on opening files for
  writing outside the working folder or for reading outside it and the interpreter's own
  library, and on /proc; in strict mode (the default) also on frame and garbage-collector
  introspection (see below).

Passing is decided by a secret, not by the exit status: the parent hands the child a random
token on stdin, the harness reads it and closes stdin before the candidate runs, and writes it
to a private pipe only after the tests ran to the end without an exception. A candidate that
ends the process early with status 0 (sys.exit(0), os._exit(0): a known reward hack) therefore
fails; sys.exit(0) merely ends the candidate, and the tests still run. The harness keeps the
token in a local variable, and its own references to exec/compile/os.write, so rebinding
builtins does not help either. Strict mode refuses what reaches other frames (a traceback's
tb_frame, sys._getframe, settrace, gc), which is where the token lives; it also stops candidates
that format tracebacks, log (logging looks up its caller's frame), or import packages that
inspect frames: strict=False allows those, and then a candidate written to walk frames could
forge a pass. Packages that load native code through ctypes (numpy) are refused in both modes.

What this is not: CPython's audit hooks are documented as no security boundary against code
written to escape them, and reads of the interpreter's library are allowed. The process, the
rlimits, the namespace, the scratch folder and the clean environment are the OS-level layers;
for hostile code at scale, run the whole training job in a container. Tests that compare
results with `==` can still be fooled by an object whose __eq__ always answers True: write them
to check types too.

This file is also the child's harness: it runs as a script (`python -I -S -B sandbox.py`), so it
imports nothing but the standard library.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

# Exit status of a child ended by the guard, and the file names inside its working folder.
BLOCKED = 86
CANDIDATE_FILE = "candidate.py"
TESTS_FILE = "tests.py"
TOKEN_BYTES = 32

# Audit events that end the child at once (exact names, or prefixes ending in ".").
_BLOCKED_EVENTS = (
    "socket.",  # every socket operation: creation, connect, bind, DNS
    "os.system",
    "os.exec",
    "os.posix_spawn",
    "os.spawn",
    "os.fork",
    "os.forkpty",
    "subprocess.Popen",
    "pty.spawn",
    "os.startfile",
    "os.kill",
    "os.killpg",
    "signal.pthread_kill",
    "ctypes.",  # native code
    "os.symlink",
    "os.link",  # a link inside the folder could point outside it
    "sys.addaudithook",  # nothing may watch (or outlive) the guard's checks
)
# In strict mode also: what reaches other frames (hence the harness's token) or every object.
_STRICT_EVENTS = (
    "sys._getframe",
    "sys._current_frames",
    "sys.settrace",
    "sys.setprofile",
    "gc.get_objects",
    "gc.get_referrers",
    "gc.get_referents",
)
_FRAME_ATTRIBUTES = ("tb_frame", "gi_frame", "cr_frame", "ag_frame", "f_back")
# Modules whose functions act without raising the audit events above.
_BLOCKED_IMPORTS = ("_posixsubprocess", "_ctypes", "ctypes")
# Events whose first arguments are paths the child changes.
_WRITE_EVENTS = (
    "os.remove",
    "os.rename",
    "os.rmdir",
    "os.truncate",
    "os.chmod",
    "os.chown",
    "os.mkdir",
    "os.utime",
    "os.chflags",
    "os.lchown",
    "os.lchmod",
    "shutil.rmtree",
    "shutil.move",
    "shutil.copyfile",
    "shutil.copytree",
)
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


@dataclasses.dataclass(frozen=True)
class VerifierResult:
    """How one candidate ran.

    passed: the tests ran to the end without an exception (and the harness said so).
    reason: "passed", "timeout", "exception: TypeError: ... (line 3)", "blocked: socket.__new__",
      "cpu time limit", "file size limit", "killed by signal 9", ...
    """

    passed: bool
    reason: str
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float


# --------------------------------------------------------------------------------------------
# The parent side


def run_python(
    code: str,
    tests: str = "",
    *,
    timeout: float = 5.0,
    memory_mb: int = 512,
    file_size_mb: int = 4,
    network: str = "auto",
    guard: bool = True,
    strict: bool = True,
    site_packages: bool = False,
) -> VerifierResult:
    """Runs `code`, then `tests` in the same namespace, in a sandboxed child (module doc).

    Args:
      code: the candidate program.
      tests: Python run after it (typically asserts on what the candidate defined).
      timeout: wall-clock seconds before the child's process group is killed; the CPU-time
        limit is that many seconds rounded up, plus one (a backstop the timeout comes before).
      memory_mb: address-space limit (RLIMIT_AS); an allocation past it raises MemoryError.
      file_size_mb: the largest file the child may write, its captured stdout/stderr included.
      network: "auto" (an empty network namespace where permitted, and the guard) or "guard"
        (the guard alone, as on systems that forbid namespaces).
      guard: install the audit-hook guard (tests turn it off to check the namespace alone).
      strict: the guard also refuses frame and gc introspection, which protects the pass token
        (module doc). logging and some packages inspect frames: strict=False lets them, at
        the price that a candidate written to walk frames could forge a pass.
      site_packages: let the candidate import installed pure-Python packages; off by default.
    Never raises for anything the candidate does; OSError only if the child cannot start.
    """
    if network not in ("auto", "guard"):
        raise ValueError(f"network must be 'auto' or 'guard', got {network!r}")
    # The CPU-time limit is a backstop one second above the wall-clock timeout: the child has one
    # thread (no new threads or processes), so its CPU time never runs ahead of the wall clock
    # and a busy loop is stopped by the timeout ("timeout"). At equal values the two raced, and a
    # loaded machine could report the kernel's SIGKILL instead.
    cpu_seconds = math.ceil(timeout) + 1
    limits = [str(memory_mb * 2**20), str(cpu_seconds), str(file_size_mb * 2**20)]
    python = [sys.executable, "-I", "-B"] + ([] if site_packages else ["-S"])
    token = os.urandom(TOKEN_BYTES)
    scratch = tempfile.mkdtemp(prefix="gemma_kit-sandbox-")
    private = tempfile.mkdtemp(prefix="gemma_kit-sandbox-out-")  # outside the child's reach
    try:
        for name, text in ((CANDIDATE_FILE, code), (TESTS_FILE, tests)):
            with open(os.path.join(scratch, name), "w", encoding="utf-8") as f:
                f.write(text)
        env = {"PATH": os.defpath, "LANG": "C.UTF-8", "HOME": scratch, "TMPDIR": scratch}
        read_end, write_end = os.pipe()  # the private pipe the harness writes the token to
        command = (
            python
            + [os.path.abspath(__file__), str(write_end), *limits]
            + ([] if guard else ["--no-guard"])
            + ([] if strict else ["--lenient"])
        )
        if network == "auto" and network_namespace_available():
            command = _UNSHARE + command
        out_path, err_path = os.path.join(private, "stdout"), os.path.join(private, "stderr")
        start = time.monotonic()
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            try:
                child = subprocess.Popen(
                    command,
                    cwd=scratch,
                    env=env,
                    stdin=subprocess.PIPE,
                    stdout=out,
                    stderr=err,
                    pass_fds=(write_end,),
                    start_new_session=True,
                )
            finally:
                os.close(write_end)
            assert child.stdin is not None  # stdin=subprocess.PIPE
            try:
                try:
                    child.stdin.write(token)
                    child.stdin.close()
                except BrokenPipeError:
                    pass  # the child already died; its status says why
                returncode = child.wait(timeout=timeout)
                timed_out = False
            except subprocess.TimeoutExpired:
                _kill_group(child)
                returncode, timed_out = child.wait(), True
            finally:
                said = _read_all(read_end)
        seconds = time.monotonic() - start
        stdout, stderr = _text(out_path), _text(err_path)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.rmtree(private, ignore_errors=True)
    passed = not timed_out and returncode == 0 and said == token
    reason = "passed" if passed else _reason(timed_out, returncode, stderr, said == token)
    return VerifierResult(passed, reason, returncode, stdout, stderr, seconds)


_UNSHARE = ["unshare", "--net"] + ([] if os.geteuid() == 0 else ["--map-root-user"])
_NAMESPACE: list[bool] = []


def network_namespace_available() -> bool:
    """Whether `unshare --net` works here (checked once)."""
    if not _NAMESPACE:
        ok = False
        if shutil.which("unshare"):
            try:
                ok = (
                    subprocess.run(
                        _UNSHARE + ["true"], capture_output=True, timeout=5, check=False
                    ).returncode
                    == 0
                )
            except (OSError, subprocess.SubprocessError):
                ok = False
        _NAMESPACE.append(ok)
    return _NAMESPACE[0]


def set_limits(memory_bytes: int, cpu_seconds: int, file_bytes: int) -> None:
    """Lowers this process's resource limits (the child's first act; lowering needs no
    privilege)."""
    import resource

    for kind, value in (
        (resource.RLIMIT_AS, memory_bytes),
        (resource.RLIMIT_CPU, cpu_seconds),
        (resource.RLIMIT_FSIZE, file_bytes),
        (resource.RLIMIT_NOFILE, 64),
        (resource.RLIMIT_CORE, 0),
        (resource.RLIMIT_NPROC, 0),
    ):
        resource.setrlimit(kind, (value, value))


def _kill_group(child: subprocess.Popen) -> None:
    try:
        os.killpg(child.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _read_all(fd: int) -> bytes:
    chunks: list[bytes] = []
    try:
        while True:
            chunk = os.read(fd, 4096)
            if not chunk or sum(map(len, chunks)) > 4 * TOKEN_BYTES:
                break
            chunks.append(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks)


def _text(path: str, limit: int = 20_000) -> str:
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    text = data[:limit].decode("utf-8", "replace")
    return text + ("\n[... cut]" if len(data) > limit else "")


def _reason(timed_out: bool, returncode: int, stderr: str, said: bool) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    if timed_out:
        return "timeout"
    if returncode == BLOCKED and last.startswith("blocked: "):
        return last
    if returncode < 0:
        sig = -returncode
        limits: dict[int, str] = {
            signal.SIGXCPU: "cpu time limit",
            signal.SIGXFSZ: "file size limit",
        }
        return limits.get(sig, f"killed by signal {sig}")
    if returncode == 0 and not said:
        return "exited before the tests finished"
    if last.startswith("exception: "):
        return last
    return f"exit status {returncode}" + (f": {last}" if last else "")


# --------------------------------------------------------------------------------------------
# The child side (this file run as a script)


def install_guard(folder: str, read_roots: list[str], *, strict: bool = True):
    """Adds the audit hook that ends the process on a forbidden operation (module doc).

    folder: where writes (and reads) are allowed; read_roots: further folders open for reading
    (the interpreter's library). strict: also refuse frame and gc introspection. Returns a
    function that lifts the frame refusal, for the harness to describe an error just before it
    exits (only it holds that function).
    """
    folder = os.path.realpath(folder)
    roots = tuple(os.path.join(os.path.realpath(r), "") for r in read_roots)
    inside = os.path.join(folder, "")
    abspath, write, exit_now = os.path.abspath, os.write, os._exit
    allowed_devices = ("/dev/null", "/dev/urandom", "/dev/random", "/dev/zero")
    blocked = _BLOCKED_EVENTS + (_STRICT_EVENTS if strict else ())
    frames_refused = [strict]

    def refuse(what: str) -> None:
        write(2, f"\nblocked: {what}\n".encode("utf-8", "replace"))
        exit_now(BLOCKED)

    def path_of(value) -> str | None:
        if isinstance(value, int):
            return None  # an open file descriptor, not a path
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        return abspath(os.fspath(value)) if isinstance(value, (str, os.PathLike)) else None

    def hook(event: str, args: tuple) -> None:
        if event.startswith(blocked):
            if frames_refused[0] or event not in _STRICT_EVENTS:
                refuse(event)
        elif event == "import" and args and args[0] in _BLOCKED_IMPORTS:
            refuse(f"import {args[0]}")
        elif event == "object.__getattr__" and len(args) > 1 and args[1] in _FRAME_ATTRIBUTES:
            if frames_refused[0]:
                refuse(f"frame access ({args[1]})")
        elif event == "open" and args:
            path = path_of(args[0])
            if path is None:
                return
            mode, flags = (args[1] if len(args) > 1 else None), (args[2] if len(args) > 2 else 0)
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or bool(
                isinstance(flags, int) and flags & _WRITE_FLAGS
            )
            if path == folder or path.startswith(inside):
                return
            if path.startswith("/proc"):
                refuse(f"open {path}")
            if writing:
                refuse(f"open {path} for writing (outside the working folder)")
            if not (path.startswith(roots) or path in allowed_devices):
                refuse(f"open {path} (outside the working folder)")
        elif event in _WRITE_EVENTS and args:
            for value in args[:2]:
                path = path_of(value)
                if path is not None and not (path == folder or path.startswith(inside)):
                    refuse(f"{event} {path} (outside the working folder)")

    def permit_frames() -> None:
        frames_refused[0] = False

    sys.addaudithook(hook)
    return permit_frames


def _where(error: BaseException) -> str:
    """' (candidate.py, line 3)': the innermost frame of the error in one of the two files.

    Reads frames (so after permit_frames) and runs no code of the candidate's: only code and
    line attributes are read, never the traceback module (which could call a loader the
    candidate defined).
    """
    tb, found = error.__traceback__, ""
    while tb is not None:
        filename = tb.tb_frame.f_code.co_filename
        if filename in (CANDIDATE_FILE, TESTS_FILE):
            found = f" ({filename}, line {tb.tb_lineno})"
        tb = tb.tb_next
    return found


def _child_main(argv: list[str]) -> None:
    """argv: the result pipe's descriptor, the memory, CPU and file-size limits, then flags
    (--no-guard, --lenient)."""
    result_fd = int(argv[0])
    set_limits(*(int(x) for x in argv[1:4]))
    token = sys.stdin.buffer.read(TOKEN_BYTES)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)  # the token is gone from stdin before the candidate runs
    os.close(devnull)
    folder = os.getcwd()
    with open(CANDIDATE_FILE, encoding="utf-8") as f:
        candidate = f.read()
    with open(TESTS_FILE, encoding="utf-8") as f:
        tests = f.read()
    # Local references: the candidate may rebind builtins or os.* but not these.
    run, compile_, write, exit_now, where = exec, compile, os.write, os._exit, _where
    stdout, stderr = sys.stdout, sys.stderr

    def permit_frames() -> None:  # no guard installed: nothing to permit
        return None

    if "--no-guard" not in argv:
        permit_frames = install_guard(
            folder, [p for p in sys.path if p and os.path.isdir(p)], strict="--lenient" not in argv
        )

    def finish(status: int, message: str = "") -> None:
        try:  # os._exit skips Python's own flushing of what the candidate printed
            stdout.flush()
        except BaseException:  # noqa: BLE001 (e.g. the output file reached its size limit)
            pass
        try:
            if message:
                stderr.write(message)
                stderr.flush()
        finally:
            exit_now(status)

    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    for name, source in ((CANDIDATE_FILE, candidate), (TESTS_FILE, tests)):
        try:
            run(compile_(source, name, "exec"), namespace)
        except SystemExit as stop:
            # The candidate's sys.exit(0) ends the candidate, not the check: the tests still
            # run. Any other exit status, or one from the tests, is a failure.
            if name == TESTS_FILE or stop.code not in (None, 0):
                finish(1, f"\nexception: SystemExit: {str(stop.code)[:100]} (in {name})\n")
        except BaseException as error:  # noqa: BLE001 (whatever the candidate raised)
            # The candidate's own code (a __str__) runs before frames are permitted, and none
            # of it after.
            kind, text = type(error).__name__, str(error)[:300]
            permit_frames()
            finish(1, f"\nexception: {kind}: {text}{where(error)}\n")
    try:
        write(result_fd, token)
    finally:
        finish(0)


if __name__ == "__main__":
    _child_main(sys.argv[1:])
