"""Reward functions: the protocol, loading one by name, checking what it returns, and rewards that
need no learned model.

A reward is any callable

    reward(prompts, completions) -> a sequence of len(completions) floats

where prompts[i] is the prompt that completions[i] answers (Best-of-N repeats each prompt once
per candidate). Three ways to name one:

    call_reward(my_function, prompts, completions)     # a Python callable, run in-process
    load_reward("my_rewards:sentiment")                # a spec: runs in a worker process
    load_reward("rm:runs/rm")                          # a reward model folder (reward_model.py)

A spec "pkg.module:function" is imported in a separate worker process (reward_worker.py) and
called there with a timeout, so a user's function that hangs or crashes becomes one RewardError
instead of a stuck or dead run. Every result goes through `check_rewards`: a function that
raises, returns the wrong number of values, a NaN or infinity, or something that is not a
number gets one RewardError that names the function and the first bad value.

Rule-based rewards (no model): RegexMatch, LengthTarget, KeywordPresence, vader_sentiment (VADER
sentiment, the [rewards] extra), and PythonVerifier, which runs a candidate program and tests in
a sandboxed subprocess (gemma_kit.posttrain.sandbox) and gives `success` or `failure`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import selectors
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from gemma_kit.errors import RewardError
from gemma_kit.posttrain import reward_worker, sandbox

RewardFn = Callable[[Sequence[str], Sequence[str]], Sequence[float]]
RM_PREFIX = "rm:"  # a spec naming a reward model folder
DEFAULT_TIMEOUT = 120.0  # seconds a worker may take for one call


# --------------------------------------------------------------------------------------------
# The protocol


def reward_name(reward) -> str:
    """How errors name a reward: its spec, its `name`, or module:qualname."""
    name = getattr(reward, "name", None)
    if isinstance(name, str) and name:
        return name
    qualname = getattr(reward, "__qualname__", None)
    if qualname:
        return f"{getattr(reward, '__module__', '?')}:{qualname}"
    return repr(reward)


def check_rewards(values, n: int, name: str) -> np.ndarray:
    """A reward function's result -> float64 [n]; RewardError naming `name` if it is not that.

    Accepts any sequence of real numbers (Python, numpy or torch scalars); refuses strings,
    booleans, None, nested sequences, NaN and infinities, and a count other than n.
    ({"value", "type"} entries are how reward_worker reports a value that is not a number.)
    """
    if isinstance(values, (str, bytes, dict)) or not hasattr(values, "__len__"):
        raise RewardError(
            f"reward function {name} returned a {type(values).__name__}; it must "
            f"return a sequence of {n} floats, one per completion"
        )
    values = list(values)
    if len(values) != n:
        raise RewardError(
            f"reward function {name} returned {len(values)} value(s) for {n} "
            "completions; it must return one float per completion"
        )
    out = np.empty(n, np.float64)
    for i, value in enumerate(values):
        if isinstance(value, dict) and set(value) == {"value", "type"}:
            shown, kind = value["value"], value["type"]
        elif isinstance(value, (bool, str, bytes)) or not hasattr(value, "__float__"):
            shown, kind = repr(value)[:80], type(value).__name__
        else:
            try:
                out[i] = float(value)
            except (TypeError, ValueError):
                shown, kind = repr(value)[:80], type(value).__name__
            else:
                if not np.isfinite(out[i]):
                    raise RewardError(
                        f"reward function {name} returned {out[i]} for completion "
                        f"{i}; rewards must be finite numbers"
                    )
                continue
        raise RewardError(
            f"reward function {name} returned {shown} ({kind}) for completion "
            f"{i}; rewards must be numbers"
        )
    return out


def call_reward(reward: RewardFn, prompts: Sequence[str], completions: Sequence[str]) -> np.ndarray:
    """reward(prompts, completions), checked: float64 [len(completions)].

    Whatever the function raises becomes one RewardError naming it (and where it raised).
    """
    name = reward_name(reward)
    prompts, completions = list(prompts), list(completions)
    if len(prompts) != len(completions):
        raise RewardError(
            f"{len(prompts)} prompts for {len(completions)} completions: give "
            "one prompt per completion (repeat a prompt for each of its candidates)"
        )
    try:
        values = reward(prompts, completions)
    except RewardError:
        raise
    except Exception as err:
        raise RewardError(f"reward function {name} raised {type(err).__name__}: {err}") from err
    return check_rewards(values, len(completions), name)


# --------------------------------------------------------------------------------------------
# Loading by name


def import_reward(spec: str) -> RewardFn:
    """Imports "pkg.module:function" in this process (trusted code; load_reward isolates)."""
    try:
        return reward_worker.resolve_spec(spec)
    except ValueError as err:
        raise RewardError(str(err)) from None


class SubprocessReward:
    """A reward function named by a spec, running in a worker process (reward_worker.py).

    The worker starts at construction, so a spec that does not import fails here. A call that
    takes longer than `timeout` seconds kills the worker and raises RewardError; the next call
    starts a new one. The worker sees this process's sys.path and environment, so it imports
    what this process could.
    """

    _process: subprocess.Popen | None = None

    def __init__(self, spec: str, *, timeout: float = DEFAULT_TIMEOUT):
        if not isinstance(spec, str) or spec.count(":") != 1:
            raise RewardError(f"a reward spec is 'pkg.module:function', got {spec!r}")
        self.spec = self.name = spec
        self.timeout = float(timeout)
        self._buffer = b""
        self._start()

    def _start(self) -> None:
        paths = [os.path.abspath(p or os.curdir) for p in sys.path]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths))
        self._process = subprocess.Popen(
            [sys.executable, reward_worker.__file__, self.spec],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )
        self._buffer = b""
        reply = self._receive("start")
        if "error" in reply:
            self.close()
            raise RewardError(reply["error"])

    def _receive(self, what: str) -> dict:
        """The worker's next JSON line, within the timeout."""
        assert self._process is not None and self._process.stdout is not None
        fd = self._process.stdout.fileno()
        deadline = time.monotonic() + self.timeout
        with selectors.DefaultSelector() as selector:
            selector.register(fd, selectors.EVENT_READ)
            while b"\n" not in self._buffer:
                left = deadline - time.monotonic()
                if left <= 0 or not selector.select(left):
                    self.close()
                    raise RewardError(
                        f"reward function {self.spec} did not answer within {self.timeout:g} s "
                        f"({what}); it was stopped (pass a larger timeout if it needs longer)"
                    )
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    code = self._process.wait()
                    self._process = None
                    raise RewardError(
                        f"reward function {self.spec}'s worker process ended "
                        f"(exit status {code}) during {what}; its stderr says why"
                    )
                self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)

    def __call__(self, prompts: Sequence[str], completions: Sequence[str]) -> list:
        if self._process is None:
            self._start()
        assert self._process is not None and self._process.stdin is not None
        request = json.dumps({"prompts": list(prompts), "completions": list(completions)})
        try:
            self._process.stdin.write(request.encode() + b"\n")
            self._process.stdin.flush()
        except BrokenPipeError:
            pass  # _receive reports the dead worker
        reply = self._receive("a call")
        if "error" in reply:
            raise RewardError(f"reward function {self.spec} {reply['error']}")
        return reply["rewards"]

    def close(self) -> None:
        """Stops the worker (a later call starts another)."""
        process, self._process = self._process, None
        if process is not None:
            process.kill()
            process.wait()
            for stream in (process.stdin, process.stdout):
                if stream is not None:
                    stream.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 (at interpreter exit, modules may be gone)
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def load_reward(spec: str, *, isolate: bool = True, timeout: float = DEFAULT_TIMEOUT, **rm_options):
    """A reward from its spec.

    "pkg.module:function": the function, in a worker process with `timeout` per call
      (isolate=False imports it here instead: faster, for code you trust not to hang).
    "rm:DIR": a reward model folder (gemma_kit.posttrain.reward_model.load_reward_model,
      `rm_options` passed on, e.g. preset=, dtype=; merge=True by default: a LoRA adapter is
      folded into the weights, ~2x faster scoring), scoring in this process.
    """
    if not isinstance(spec, str) or not spec:
        raise RewardError(f"a reward spec is 'pkg.module:function' or 'rm:DIR', got {spec!r}")
    if spec.startswith(RM_PREFIX):
        from gemma_kit.posttrain.reward_model import load_reward_model

        rm_options.setdefault("merge", True)
        return load_reward_model(spec[len(RM_PREFIX) :], **rm_options).as_reward()
    if rm_options:
        raise RewardError(f"options {sorted(rm_options)} apply to 'rm:DIR' specs only")
    return SubprocessReward(spec, timeout=timeout) if isolate else import_reward(spec)


def as_reward(reward) -> RewardFn:
    """A spec (str), a reward model (anything with as_reward()), or a callable -> a callable."""
    if isinstance(reward, str):
        return load_reward(reward)
    if hasattr(reward, "as_reward"):
        return reward.as_reward()
    if not callable(reward):
        raise RewardError(
            f"a reward must be a callable (prompts, completions) -> floats, a "
            f"'pkg.module:function' spec or a reward model, got "
            f"{type(reward).__name__}"
        )
    return reward


# --------------------------------------------------------------------------------------------
# Rule-based rewards


@dataclasses.dataclass(frozen=True)
class RegexMatch:
    """`hit` where the completion matches `pattern` (re.search; re.fullmatch of the stripped
    completion with full=True), else `miss`. E.g. a format check: RegexMatch(r"\\d+\\.$")."""

    pattern: str
    full: bool = False
    flags: int = 0
    hit: float = 1.0
    miss: float = 0.0

    def __post_init__(self):
        try:
            re.compile(self.pattern, self.flags)
        except re.error as err:
            raise RewardError(
                f"RegexMatch: {self.pattern!r} is not a regular expression ({err})"
            ) from None

    @property
    def name(self) -> str:
        return f"RegexMatch({self.pattern!r})"

    def __call__(self, prompts, completions) -> list[float]:
        regex = re.compile(self.pattern, self.flags)
        match = (lambda c: regex.fullmatch(c.strip())) if self.full else regex.search
        return [self.hit if match(c) else self.miss for c in completions]


@dataclasses.dataclass(frozen=True)
class LengthTarget:
    """1 at `target` words (or characters), falling linearly to 0 at 0 and at 2 x target:
    max(0, 1 - |n - target| / target)."""

    target: int
    unit: str = "words"

    def __post_init__(self):
        if not (isinstance(self.target, int) and self.target >= 1):
            raise RewardError(f"LengthTarget: target must be an integer >= 1, got {self.target!r}")
        if self.unit not in ("words", "chars"):
            raise RewardError(f"LengthTarget: unit must be 'words' or 'chars', got {self.unit!r}")

    @property
    def name(self) -> str:
        return f"LengthTarget({self.target} {self.unit})"

    def __call__(self, prompts, completions) -> list[float]:
        sizes = [len(c.split()) if self.unit == "words" else len(c) for c in completions]
        return [max(0.0, 1.0 - abs(n - self.target) / self.target) for n in sizes]


@dataclasses.dataclass(frozen=True)
class KeywordPresence:
    """The fraction of `keywords` the completion contains as whole words ("fraction"), or 1/0
    for any of them ("any") or all of them ("all"). Case-insensitive unless asked."""

    keywords: tuple[str, ...]
    mode: str = "fraction"
    case_sensitive: bool = False

    def __post_init__(self):
        if isinstance(self.keywords, str):
            object.__setattr__(self, "keywords", (self.keywords,))
        object.__setattr__(self, "keywords", tuple(self.keywords))
        if not self.keywords or not all(isinstance(k, str) and k.strip() for k in self.keywords):
            raise RewardError("KeywordPresence needs at least one non-empty keyword")
        if self.mode not in ("fraction", "any", "all"):
            raise RewardError(
                f"KeywordPresence: mode must be 'fraction', 'any' or 'all', got {self.mode!r}"
            )

    @property
    def name(self) -> str:
        return f"KeywordPresence({list(self.keywords)}, {self.mode})"

    def __call__(self, prompts, completions) -> list[float]:
        flags = 0 if self.case_sensitive else re.IGNORECASE
        # \b only where the keyword itself starts or ends with a word character.
        regexes = [
            re.compile(
                ("\\b" if re.match(r"\w", k) else "")
                + re.escape(k)
                + ("\\b" if re.search(r"\w$", k) else ""),
                flags,
            )
            for k in self.keywords
        ]
        out = []
        for c in completions:
            found = sum(bool(r.search(c)) for r in regexes)
            if self.mode == "fraction":
                out.append(found / len(regexes))
            else:
                out.append(float(found == len(regexes) if self.mode == "all" else found > 0))
        return out


_VADER: list = []


def vader_sentiment(prompts, completions) -> list[float]:
    """VADER's compound sentiment of each completion, in [-1, 1] (vaderSentiment, MIT; ships its
    lexicon). Needs the [rewards] extra."""
    if not _VADER:
        try:
            from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
        except ImportError:
            raise RewardError(
                "vader_sentiment needs the vaderSentiment package: pip install 'gemma-kit[rewards]'"
            ) from None
        _VADER.append(SentimentIntensityAnalyzer())
    analyzer = _VADER[0]
    return [analyzer.polarity_scores(c)["compound"] for c in completions]


# --------------------------------------------------------------------------------------------
# Programs


_FENCE = re.compile(r"```[ \t]*(?:python|py|python3)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)


def extract_code(completion: str) -> str:
    """The first fenced code block of a completion (```python ... ```), or the whole text."""
    match = _FENCE.search(completion)
    return match.group(1) if match else completion


@dataclasses.dataclass(frozen=True)
class PythonVerifier:
    """`success` where the completion's program, followed by `tests`, runs to the end in the
    sandbox (gemma_kit.posttrain.sandbox: subprocess, timeout, rlimits, scratch folder, clean
    environment, no network); `failure` otherwise (a failed test, an exception, a timeout, a
    blocked operation, an early exit).

    tests: Python source run after the candidate (e.g. asserts), or a function prompt -> source.
    extract: take the first fenced code block of the completion (else the whole text).
    workers: candidates run at once (default: the CPU count).
    network, strict, site_packages: as for sandbox.run_python.
    """

    tests: str | Callable[[str], str] = ""
    timeout: float = 5.0
    memory_mb: int = 512
    success: float = 1.0
    failure: float = 0.0
    extract: bool = True
    workers: int | None = None
    network: str = "auto"
    strict: bool = True
    site_packages: bool = False

    @property
    def name(self) -> str:
        return "PythonVerifier"

    def verify(
        self, prompts: Sequence[str], completions: Sequence[str]
    ) -> list[sandbox.VerifierResult]:
        """Runs every candidate; the sandbox's result for each (passed, reason, output)."""

        def one(pair):
            prompt, completion = pair
            tests = self.tests(prompt) if callable(self.tests) else self.tests
            code = extract_code(completion) if self.extract else completion
            return sandbox.run_python(
                code,
                tests,
                timeout=self.timeout,
                memory_mb=self.memory_mb,
                network=self.network,
                strict=self.strict,
                site_packages=self.site_packages,
            )

        workers = self.workers or os.cpu_count() or 1
        with ThreadPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(one, zip(prompts, completions)))

    def __call__(self, prompts, completions) -> list[float]:
        return [
            self.success if r.passed else self.failure for r in self.verify(prompts, completions)
        ]
