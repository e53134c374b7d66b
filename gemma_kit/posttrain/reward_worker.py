"""The process a reward function named by a "pkg.module:function" spec runs in.

gemma_kit.posttrain.rewards.load_reward starts `python reward_worker.py SPEC`, so that user code
cannot hang or crash the run that calls it: a call that does not answer in time, or a worker
that dies, is one RewardError in the parent, and the worker is started afresh for the next call.

Protocol, one JSON object per line: the worker first answers {"ready": true} or {"error": ...}
(the spec does not import, or names something that is not callable); then, for each request
{"prompts": [...], "completions": [...]} it answers {"rewards": [...]} or {"error": ...}.
Rewards travel as floats (NaN and infinities included, so the parent's checks see them) or, for a
value that is not a number, {"value": repr, "type": name}: the parent's checks say what is wrong.
What the function prints goes to stderr, never into the protocol.

This file imports nothing but the standard library (it also runs as a script), so a worker
starts in the time its own reward module takes to import.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import traceback


def resolve_spec(spec: str):
    """ "pkg.module:function" (or "pkg.module:obj.attr") -> the callable it names.

    Raises ValueError with one sentence saying what is wrong.
    """
    if not isinstance(spec, str) or spec.count(":") != 1:
        raise ValueError(f"a reward spec is 'pkg.module:function', got {spec!r}")
    module_name, attribute = spec.split(":")
    if not module_name or not attribute:
        raise ValueError(f"a reward spec is 'pkg.module:function', got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # noqa: BLE001 (anything a user module raises on import)
        raise ValueError(
            f"reward spec {spec!r}: module {module_name!r} does not import "
            f"({type(err).__name__}: {err})"
        ) from None
    target = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ValueError(f"reward spec {spec!r}: {module_name!r} has no {attribute!r}")
        target = getattr(target, part)
    if not callable(target):
        raise ValueError(
            f"reward spec {spec!r} names an object of type "
            f"{type(target).__name__}, not a function (prompts, completions) -> "
            "rewards"
        )
    return target


def encode_values(result) -> list:
    """A reward function's result -> JSON values: floats, or {"value", "type"} for others."""
    if isinstance(result, (str, bytes, dict)) or not hasattr(result, "__len__"):
        raise TypeError(f"returned a {type(result).__name__}, not a sequence of floats")
    out: list[float | dict[str, str]] = []
    for value in list(result):
        if isinstance(value, (bool, str, bytes)) or not hasattr(value, "__float__"):
            out.append({"value": repr(value)[:80], "type": type(value).__name__})
        else:
            try:
                out.append(float(value))
            except (TypeError, ValueError):  # e.g. a numpy array of several values
                out.append({"value": repr(value)[:80], "type": type(value).__name__})
    return out


def serve(spec: str) -> None:
    """The worker's loop (see the module docstring)."""
    channel = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)  # the function's prints go to stderr
    sys.stdout = sys.stderr

    def send(message: dict) -> None:
        channel.write(json.dumps(message) + "\n")
        channel.flush()

    try:
        function = resolve_spec(spec)
    except ValueError as err:
        send({"error": str(err)})
        return
    send({"ready": True})
    for line in sys.stdin:
        request = json.loads(line)
        try:
            result = function(request["prompts"], request["completions"])
            send({"rewards": encode_values(result)})
        except Exception as err:  # noqa: BLE001 (whatever the user's function raises)
            where = traceback.extract_tb(err.__traceback__)[-1]
            send(
                {
                    "error": f"raised {type(err).__name__}: {err} "
                    f"({os.path.basename(where.filename)}:{where.lineno})"
                }
            )


if __name__ == "__main__":
    # Run as a script, this file's folder is sys.path[0]; it must not shadow user modules.
    if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
        sys.path.pop(0)
    serve(sys.argv[1])
