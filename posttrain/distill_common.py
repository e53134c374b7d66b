"""What the distillation worked examples share (posttrain/distill_pydoc.py, distill_context.py):
the machine's description, a held-out evaluation of any student against a teacher, decode
speed, and JSON results written whole."""

from __future__ import annotations

import json
import os
import pathlib
import platform
import time

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
RESULTS = HERE / "results"
IMAGES = HERE.parent / "docs" / "images"


def machine() -> str:
    """The CPU model and core count (the numbers are this machine's, shared with others)."""
    name = platform.processor() or platform.machine()
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores"


def write_json(path: pathlib.Path, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2) + "\n")
    tmp.replace(path)


def held_out(student, teacher, rows, *, batch: int = 8, chunk: int = 512) -> dict[str, float]:
    """Per-token means over the weighted targets of packed rows (gemma_kit.finetune.data.Rows):
    forward KL(teacher || student), reverse KL(student || teacher), the student's
    cross-entropy and perplexity (gemma_kit.posttrain.distill.probe_sums, both models reading
    the same rows)."""
    import jax
    from flax import nnx

    from gemma_kit.posttrain.distill import probe_sums, same_rows

    T = rows.tokens.shape[1]
    paired = same_rows(rows.take(np.arange(len(rows))), T, T)
    gs, ss = nnx.split(student)
    gt, st = nnx.split(teacher)
    probe = jax.jit(lambda s, t, b: probe_sums(nnx.merge(gs, s), nnx.merge(gt, t), b, chunk))
    total: dict[str, float] = {}
    for start in range(0, len(rows), batch):
        index = np.arange(start, start + batch)
        real = index < len(rows)
        part = {k: v[np.where(real, index, 0)] for k, v in paired.items()}
        part["weights"] = part["weights"] * real[:, None]
        for k, v in jax.device_get(probe(ss, st, part)).items():
            total[k] = total.get(k, 0.0) + float(v)
    n = max(total["tokens"], 1.0)
    nll = total["nll"] / n
    return dict(
        forward_kl=total["forward_kl"] / n,
        reverse_kl=total["reverse_kl"] / n,
        nll=nll,
        ppl=float(np.exp(nll)),
        tokens=int(total["tokens"]),
    )


def decode_speeds(
    models: dict, tokenizer, prompt: str, *, new_tokens: int = 64, rounds: int = 5
) -> dict[str, float]:
    """Greedy batch-1 decode tokens/s of each model with gemma_kit.Sampler, in interleaved
    rounds (every other one in reverse order; the best of each after a warm-up call), so that
    the ratio holds on a shared machine. Stop ids off: every call makes `new_tokens` tokens."""
    from gemma_kit.sampler import Sampler

    samplers = {name: Sampler(model, tokenizer) for name, model in models.items()}
    best = {name: float("inf") for name in models}
    for sampler in samplers.values():
        sampler.generate(prompt, max_new_tokens=new_tokens, stop_token_ids=())  # compiles
    for r in range(rounds):
        for name in list(samplers) if r % 2 == 0 else list(samplers)[::-1]:
            start = time.perf_counter()
            samplers[name].generate(prompt, max_new_tokens=new_tokens, stop_token_ids=())
            best[name] = min(best[name], time.perf_counter() - start)
    return {name: new_tokens / seconds for name, seconds in best.items()}
