"""Reward functions: the protocol's checks, specs run in a worker process, the rule-based rewards,
and the sandboxed Python verifier (gemma_kit.posttrain.rewards, reward_worker, sandbox).

The verifier tests run real child processes: each candidate either passes, or gets the failure
reward with the reason the sandbox gives, never a hang (timeouts of 1 s) or an escape (a socket
listener in this process sees no connection; a file outside the scratch folder is not created).
A control run with both network layers off does connect, so those checks can fail.
"""

from __future__ import annotations

import os
import socket
import textwrap
import time

import numpy as np
import pytest

from gemma_kit.errors import GemmaKitError, RewardError
from gemma_kit.posttrain import sandbox
from gemma_kit.posttrain.rewards import (
    KeywordPresence,
    LengthTarget,
    PythonVerifier,
    RegexMatch,
    SubprocessReward,
    as_reward,
    call_reward,
    extract_code,
    import_reward,
    load_reward,
    vader_sentiment,
)

PROMPTS = ["p0", "p1", "p2"]
COMPLETIONS = ["a b c", "hello world", "x"]


def lengths(prompts, completions):
    return [len(c) for c in completions]


# --------------------------------------------------------------------------------------------
# The protocol


@pytest.mark.parametrize(
    "result, message",
    [
        ([1.0, 2.0], "returned 2 value\\(s\\) for 3 completions"),
        ([1.0, float("nan"), 0.0], "returned nan for completion 1; rewards must be finite"),
        ([1.0, 2.0, float("inf")], "returned inf for completion 2"),
        ([1.0, "2", 3.0], "returned '2' \\(str\\) for completion 1; rewards must be numbers"),
        ([None, 1.0, 2.0], "returned None \\(NoneType\\) for completion 0"),
        ([True, 1.0, 2.0], "returned True \\(bool\\)"),
        ([[1.0], 1.0, 2.0], "returned \\[1.0\\] \\(list\\)"),
        (0.5, "returned a float; it must return a sequence of 3 floats"),
        ("abc", "returned a str"),
    ],
)
def test_a_bad_result_is_one_error_naming_the_function(result, message):
    def my_reward(prompts, completions):
        return result

    with pytest.raises(RewardError, match=f"reward function .*my_reward {message}"):
        call_reward(my_reward, PROMPTS, COMPLETIONS)


def test_an_exception_inside_is_one_error_naming_the_function():
    def broken(prompts, completions):
        return {}["missing"]

    with pytest.raises(RewardError, match="reward function .*broken raised KeyError: 'missing'"):
        call_reward(broken, PROMPTS, COMPLETIONS)
    with pytest.raises(RewardError, match="3 prompts for 2 completions"):
        call_reward(lengths, PROMPTS, COMPLETIONS[:2])
    assert issubclass(RewardError, GemmaKitError)


def test_numbers_of_any_kind_are_accepted():
    torch = pytest.importorskip("torch", reason="torch scalars are one of the accepted kinds")
    got = call_reward(lambda p, c: [np.float32(0.5), 2, torch.tensor(-1.5)], PROMPTS, COMPLETIONS)
    assert got.dtype == np.float64 and got.tolist() == [0.5, 2.0, -1.5]
    got = call_reward(lambda p, c: np.arange(3, dtype=np.float32), PROMPTS, COMPLETIONS)
    assert got.tolist() == [0.0, 1.0, 2.0]


# --------------------------------------------------------------------------------------------
# Specs


USER_MODULE = """
import math, os, time

def length(prompts, completions):
    print("this print goes to stderr, not into the protocol")
    return [len(c) for c in completions]

def with_prompt(prompts, completions):
    return [float(p == "p1") for p in prompts]

def nan(prompts, completions):
    return [math.nan] * len(completions)

def short(prompts, completions):
    return [1.0]

def raises(prompts, completions):
    raise ValueError("no reward today")

def words(prompts, completions):
    return ["high"] * len(completions)

def hangs(prompts, completions):
    time.sleep(60)

def dies(prompts, completions):
    os._exit(3)

NOT_CALLABLE = 42
"""


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "user_rewards.py").write_text(USER_MODULE)
    (tmp_path / "broken_rewards.py").write_text("def f(:\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return "user_rewards"


def test_a_spec_runs_in_a_worker_process_and_equals_the_function(user_module):
    with load_reward(f"{user_module}:length") as reward:
        assert isinstance(reward, SubprocessReward) and reward.name == "user_rewards:length"
        got = call_reward(reward, PROMPTS, COMPLETIONS)
        assert got.tolist() == lengths(PROMPTS, COMPLETIONS)
        assert call_reward(reward, PROMPTS[:1], ["four"]).tolist() == [4.0]  # the worker stays
    in_process = import_reward(f"{user_module}:with_prompt")
    assert call_reward(in_process, PROMPTS, COMPLETIONS).tolist() == [0.0, 1.0, 0.0]
    assert load_reward(f"{user_module}:with_prompt", isolate=False) is in_process


@pytest.mark.parametrize(
    "spec, message",
    [
        ("broken_rewards:f", "module 'broken_rewards' does not import \\(SyntaxError"),
        ("no_such_module_xyz:f", "module 'no_such_module_xyz' does not import"),
        ("user_rewards:missing", "'user_rewards' has no 'missing'"),
        ("user_rewards:NOT_CALLABLE", "names an object of type int, not a function"),
        ("user_rewards", "a reward spec is 'pkg.module:function'"),
        ("a:b:c", "a reward spec is 'pkg.module:function'"),
    ],
)
def test_a_spec_that_does_not_import_is_one_error(user_module, spec, message):
    with pytest.raises(RewardError, match=message):
        load_reward(spec)
    with pytest.raises(RewardError, match=message):
        import_reward(spec)


@pytest.mark.parametrize(
    "name, message",
    [
        ("nan", "user_rewards:nan returned nan for completion 0"),
        ("short", "user_rewards:short returned 1 value\\(s\\) for 3 completions"),
        ("raises", "user_rewards:raises raised ValueError: no reward today \\(user_rewards.py:"),
        ("words", "user_rewards:words returned 'high' \\(str\\) for completion 0"),
        ("dies", "user_rewards:dies's worker process ended \\(exit status 3\\)"),
    ],
)
def test_a_bad_spec_function_is_one_error_naming_it(user_module, name, message):
    with load_reward(f"{user_module}:{name}") as reward, pytest.raises(RewardError, match=message):
        call_reward(reward, PROMPTS, COMPLETIONS)


def test_a_spec_that_hangs_is_stopped_and_the_next_call_starts_afresh(user_module, tmp_path):
    reward = load_reward(f"{user_module}:hangs", timeout=1.0)
    start = time.monotonic()
    with pytest.raises(RewardError, match="user_rewards:hangs did not answer within 1 s"):
        call_reward(reward, PROMPTS, COMPLETIONS)
    assert time.monotonic() - start < 10
    # The module changes on disk; the next call starts a new worker, which imports it again.
    (tmp_path / "user_rewards.py").write_text("def hangs(p, c):\n    return [7] * len(c)\n")
    assert call_reward(reward, PROMPTS, COMPLETIONS).tolist() == [7.0, 7.0, 7.0]
    reward.close()


def test_as_reward_takes_callables_specs_and_reward_models(user_module):
    assert as_reward(lengths) is lengths
    spec = as_reward(f"{user_module}:length")
    assert call_reward(spec, PROMPTS, COMPLETIONS).tolist() == [5.0, 11.0, 1.0]
    spec.close()

    class Model:  # anything with as_reward() (a RewardModel)
        def as_reward(self):
            return lengths

    assert as_reward(Model()) is lengths
    with pytest.raises(RewardError, match="a reward must be a callable"):
        as_reward(42)
    with pytest.raises(RewardError, match="apply to 'rm:DIR' specs only"):
        load_reward(f"{user_module}:length", preset="gemma3-270m")


# --------------------------------------------------------------------------------------------
# Rule-based rewards


def test_regex_length_and_keyword_rewards():
    texts = ["The answer is 42.", "no digits here", "  7  "]
    assert RegexMatch(r"\d+")(None, texts) == [1.0, 0.0, 1.0]
    assert RegexMatch(r"\d+", full=True)(None, texts) == [0.0, 0.0, 1.0]
    assert RegexMatch(r"answer", flags=0, hit=2.0, miss=-1.0)(None, texts) == [2.0, -1.0, -1.0]
    with pytest.raises(RewardError, match="not a regular expression"):
        RegexMatch("(")

    words = ["one two three four", "one", "", "one two three four five six seven eight"]
    assert LengthTarget(4)(None, words) == [1.0, 0.25, 0.0, 0.0]
    assert LengthTarget(2, unit="chars")(None, ["ab", "abc", "a"]) == [1.0, 0.5, 0.5]
    with pytest.raises(RewardError, match="target must be an integer >= 1"):
        LengthTarget(0)
    with pytest.raises(RewardError, match="unit must be 'words' or 'chars'"):
        LengthTarget(3, unit="tokens")

    # Whole words: "pizzas" is not "pizza".
    text = ["Great pizza, GREAT service!", "the pizza was fine", "pizzas in c++ and C#"]
    assert KeywordPresence(("great", "pizza"))(None, text) == [1.0, 0.5, 0.0]
    assert KeywordPresence(("great", "pizza"), mode="all")(None, text) == [1.0, 0.0, 0.0]
    assert KeywordPresence(("great", "pizza"), mode="any")(None, text) == [1.0, 1.0, 0.0]
    assert KeywordPresence(("Great",), case_sensitive=True)(None, text) == [1.0, 0.0, 0.0]
    assert KeywordPresence(("c++", "c#"))(None, text) == [0.0, 0.0, 1.0]
    assert KeywordPresence("pizza")(None, text) == [1.0, 1.0, 0.0]
    with pytest.raises(RewardError, match="at least one non-empty keyword"):
        KeywordPresence(())
    with pytest.raises(RewardError, match="mode must be"):
        KeywordPresence(("a",), mode="most")
    # Through the checks, named in errors by their settings.
    assert call_reward(LengthTarget(4), ["p"] * 4, words).tolist() == [1.0, 0.25, 0.0, 0.0]
    assert RegexMatch(r"\d").name == "RegexMatch('\\\\d')"


def test_vader_sentiment_scores_the_completion():
    vader = pytest.importorskip(
        "vaderSentiment.vaderSentiment", reason="VADER is the [rewards] extra"
    )
    completions = ["I loved it, wonderful!", "It was terrible and boring.", "It is a table."]
    got = call_reward(vader_sentiment, ["Awful awful awful."] * 3, completions)
    analyzer = vader.SentimentIntensityAnalyzer()
    expected = [analyzer.polarity_scores(c)["compound"] for c in completions]
    assert got.tolist() == expected  # the completion's score, not the (negative) prompt's
    assert got[0] > 0.5 and got[1] < -0.5 and got[2] == 0.0


# --------------------------------------------------------------------------------------------
# The Python verifier


def test_extract_code_takes_the_first_fenced_block():
    assert extract_code("Here:\n```python\nx = 1\n```\nand ```\ny\n```") == "x = 1\n"
    assert extract_code("```\nprint(2)\n```") == "print(2)\n"
    assert extract_code("```py\nz = 3") == "z = 3"  # an unclosed block runs to the end
    assert extract_code("x = 1") == "x = 1"


ADD_TESTS = "assert add(2, 3) == 5\nassert add(-1, 1) == 0\n"


def test_verifier_rewards_passing_programs_only():
    completions = [
        "Sure:\n```python\ndef add(a, b):\n    return a + b\n```",  # passes
        "```python\ndef add(a, b):\n    return a - b\n```",  # a failed assert
        "def add(a, b):\n    return a + b",  # no fence: the whole text
        "```python\ndef add(a, b):\n    raise ValueError('nope')\n```",
        "I cannot write that function.",  # a syntax error
    ]
    verifier = PythonVerifier(tests=ADD_TESTS, timeout=5.0)
    results = verifier.verify(["p"] * 5, completions)
    assert [r.passed for r in results] == [True, False, True, False, False]
    assert results[1].reason.startswith("exception: AssertionError:  (tests.py, line 1)")
    # Raised in the candidate's function, called from the tests: the innermost place counts.
    assert results[3].reason == "exception: ValueError: nope (candidate.py, line 2)"
    assert results[4].reason.startswith("exception: SyntaxError")
    assert verifier(["p"] * 5, completions) == [1.0, 0.0, 1.0, 0.0, 0.0]
    # Per-prompt tests, and the reward values it gives.
    per_prompt = PythonVerifier(
        tests=lambda p: f"assert add(1, 1) == {p}", success=2.0, failure=-1.0
    )
    assert per_prompt(["2", "3"], [completions[0]] * 2) == [2.0, -1.0]


@pytest.mark.parametrize("code", ["while True:\n    pass\n", "import time\ntime.sleep(60)\n"])
def test_verifier_timeout_is_a_failure_not_a_hang(code):
    start = time.monotonic()
    result = sandbox.run_python(code, "", timeout=1.0)
    assert time.monotonic() - start < 6
    assert not result.passed and result.reason == "timeout"


@pytest.mark.parametrize(
    "code, reason",
    [
        ("import sys\nsys.exit(0)\n", "exception: AssertionError"),  # the tests still run
        ("import os\nos._exit(0)\n", "exited before the tests finished"),
        ("import builtins\nbuiltins.exec = lambda *a, **k: None\n", "exception: AssertionError"),
        ("import sys\nsys.exit(3)\n", "exception: SystemExit: 3"),
    ],
)
def test_verifier_an_early_exit_never_passes(code, reason):
    result = sandbox.run_python(code, "assert False, 'the tests ran'", timeout=5.0)
    assert not result.passed and result.reason.startswith(reason), result


@pytest.mark.parametrize(
    "code, reason",
    [
        ("import os\nos.fork()", "blocked: os.fork"),
        ("import subprocess\nsubprocess.run(['true'])", "blocked: subprocess.Popen"),
        ("import os\nos.system('true')", "blocked: os.system"),
        ("import ctypes", "blocked: import ctypes"),
        ("import os\nos.kill(os.getppid(), 0)", "blocked: os.kill"),  # signal 0: harmless if not
        ("import sys\nsys._getframe(0)", "blocked: sys._getframe"),
        (
            "try:\n    1 / 0\nexcept Exception as e:\n    e.__traceback__.tb_frame",
            "blocked: frame access (tb_frame)",
        ),
        ("open('/etc/hostname').read()", "blocked: open /etc/hostname (outside"),
        ("open('/proc/self/environ').read()", "blocked: open /proc/self/environ"),
    ],
)
def test_verifier_forbidden_operations_end_the_candidate(code, reason):
    result = sandbox.run_python(code, "", timeout=5.0)
    assert not result.passed and result.reason.startswith(reason), result
    assert result.returncode == sandbox.BLOCKED


def test_verifier_writes_stay_in_a_fresh_scratch_folder(tmp_path, monkeypatch):
    outside = tmp_path / "escaped.txt"
    result = sandbox.run_python(f"open({str(outside)!r}, 'w').write('x')", "", timeout=5.0)
    assert not result.passed and "for writing (outside the working folder)" in result.reason
    assert not outside.exists()
    # Inside its folder it may write and read; the folder is new, private and removed after;
    # the environment holds no inherited variable (a secret set here is not seen there).
    monkeypatch.setenv("GEMMA_KIT_TEST_SECRET", "hunter2")
    code = textwrap.dedent("""
        import os
        open("notes.txt", "w").write("kept")
        assert open("notes.txt").read() == "kept"
        assert "GEMMA_KIT_TEST_SECRET" not in os.environ, "a secret leaked"
        assert sorted(os.environ) == ["HOME", "LANG", "PATH", "TMPDIR"], sorted(os.environ)
        assert sorted(os.listdir(".")) == ["candidate.py", "notes.txt", "tests.py"]
        print(os.getcwd())
    """)
    result = sandbox.run_python(code, "", timeout=5.0)
    assert result.passed, result
    scratch = result.stdout.strip()
    assert scratch.startswith(os.path.realpath(os.environ.get("TMPDIR", "/tmp")))
    assert not os.path.exists(scratch)


def test_verifier_memory_and_output_limits():
    big = sandbox.run_python("x = bytearray(4 * 1024 ** 3)", "", memory_mb=256, timeout=5.0)
    assert not big.passed and big.reason.startswith("exception: MemoryError"), big
    loud = sandbox.run_python(
        "while True:\n    print('x' * 10000)", "", file_size_mb=1, timeout=5.0
    )
    assert not loud.passed and "File too large" in loud.reason, loud
    assert len(loud.stdout) <= 20_000 + 20  # what came back is cut, not a gigabyte


def _listener():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.5)
    return server


def _connects(server) -> bool:
    try:
        connection, _ = server.accept()
    except TimeoutError:
        return False
    connection.close()
    return True


CONNECT = (
    "import socket\n"
    "s = socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
    "s.sendall(b'escaped')\n"
)


@pytest.mark.parametrize("network, guard", [("auto", True), ("guard", True), ("auto", False)])
def test_verifier_a_socket_is_a_failure_never_an_escape(network, guard):
    """auto + guard is the default; guard alone is the fallback where namespaces are not
    permitted; a namespace alone (guard off) must block the connection by itself."""
    if network == "auto" and not sandbox.network_namespace_available():
        pytest.skip("this system does not permit network namespaces (unshare --net)")
    with _listener() as server:
        port = server.getsockname()[1]
        result = sandbox.run_python(
            CONNECT.format(port=port), "", timeout=5.0, network=network, guard=guard
        )
        assert not result.passed
        assert not _connects(server), "the candidate reached a socket outside the sandbox"
    if guard:  # create_connection resolves the address first
        assert result.reason in ("blocked: socket.getaddrinfo", "blocked: socket.__new__")
    else:  # the namespace has no usable interface
        assert result.reason.startswith("exception: OSError"), result


def test_verifier_control_without_either_layer_the_connection_arrives():
    """The check above can fail: with the guard off and no namespace, the candidate connects."""
    with _listener() as server:
        port = server.getsockname()[1]
        result = sandbox.run_python(
            CONNECT.format(port=port), "", timeout=5.0, network="guard", guard=False
        )
        assert result.passed and _connects(server)


def test_verifier_site_packages_and_strict_mode():
    code = "import packaging.version as v\nassert v.Version('1.10') > v.Version('1.9')"
    plain = sandbox.run_python(code, "", timeout=5.0)
    assert plain.reason.startswith("exception: ModuleNotFoundError: No module named 'packag")
    assert sandbox.run_python(code, "", timeout=10.0, site_packages=True).passed
    # logging looks up its caller's frame: strict mode stops that, lenient mode lets it.
    log = "import logging\nlogging.warning('careful')"
    assert sandbox.run_python(log, "").reason == "blocked: sys._getframe"
    assert sandbox.run_python(log, "", strict=False).passed
    # Lenient mode still blocks processes and native code (so numpy, which loads ctypes, and
    # other compiled packages stay out of reach in either mode).
    assert sandbox.run_python("import os\nos.fork()", "", strict=False).reason == "blocked: os.fork"
    assert sandbox.run_python("import ctypes", "", strict=False).reason == "blocked: import ctypes"
    with pytest.raises(ValueError, match="network must be"):
        sandbox.run_python("", "", network="none")


def test_verifier_rewards_through_the_protocol_checks():
    verifier = PythonVerifier(tests="assert f() == 1", timeout=2.0, workers=2)
    got = call_reward(
        verifier, ["p"] * 3, ["def f(): return 1", "def f(): return 2", "while True: pass"]
    )
    assert got.tolist() == [1.0, 0.0, 0.0]
