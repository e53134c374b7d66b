"""Runs sharded tiny models on 8 fake CPU devices; started by tests/test_sharding.py.

A process fixes its device count when JAX starts (the pytest process has one CPU device), so the
parent starts this script with XLA_FLAGS=--xla_force_host_platform_device_count=8. The job is a JSON
object naming tiny models by family and seed; this process builds them itself (tests/support/tiny.py
is deterministic), runs each unsharded and sharded, and prints one JSON object of observations. The
parent makes the assertions, so a failure reads as a normal test failure.

usage (from the repository root): python -m tests.support.sharding_worker JOB.json
  where JOB.json holds {"prompts": [...], "max_new_tokens": 12, "cases": [...]}
"""

from __future__ import annotations

import json
import pathlib
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gemma_kit.loading import model_from_params
from gemma_kit.sampler import Sampler
from gemma_kit.sharding import make_mesh, shard_model, shard_params
from tests.support import logits, tiny

FAMILIES = {"gemma3": tiny.tiny_gemma3, "gemma2": tiny.tiny_gemma2}


def describe(state) -> dict:
    """path -> spec, shard shape, devices and number of distinct shards of every parameter."""
    out = {}
    for path, x in jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(state))[0]:
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        spec = tuple(x.sharding.spec) if hasattr(x.sharding, "spec") else ()
        distinct = len(
            {tuple((s.start, s.stop) for s in shard.index) for shard in x.addressable_shards}
        )
        out[name] = dict(
            spec=[list(e) if isinstance(e, tuple) else e for e in spec],
            shard_shape=list(x.addressable_shards[0].data.shape),
            devices=len(x.sharding.device_set),
            distinct_shards=distinct,
        )
    return out


def main(job: dict) -> None:
    tokenizer = tiny.small_tokenizer()
    report: dict[str, Any] = dict(devices=len(jax.devices()), cases=[])
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 200, (2, 24)), jnp.int32)
    gen = dict(max_new_tokens=job["max_new_tokens"], stop_token_ids=())
    for case in job["cases"]:
        config = FAMILIES[case["family"]]().replace(vocab_size=tokenizer.vocab_size)
        params = tiny.random_params(config, seed=case["seed"])
        plain = model_from_params(config, jax.tree.map(jnp.asarray, params))
        reference = Sampler(
            plain, tokenizer, cache_dtype=jnp.float32, matvec_layout=case["matvec"]
        ).generate(job["prompts"], **gen)
        assert isinstance(reference, list)  # a batch of prompts
        ref_logits = logits.ours(plain, tokens)
        for axes in case["meshes"]:
            mesh = make_mesh(**axes)
            if case["via"] == "dict":  # a numpy checkpoint tree -> sharded arrays -> model
                model = model_from_params(config, shard_params(params, mesh))
            else:
                model = shard_model(
                    model_from_params(config, jax.tree.map(jnp.asarray, params)), mesh
                )
            sampler = Sampler(
                model, tokenizer, cache_dtype=jnp.float32, matvec_layout=case["matvec"]
            )
            results = sampler.generate(job["prompts"], **gen)
            assert isinstance(results, list)
            report["cases"].append(
                dict(
                    name=case["family"],
                    mesh=axes,
                    matvec=case["matvec"],
                    via=case["via"],
                    tokens=[r.tokens for r in results],
                    reference_tokens=[r.tokens for r in reference],
                    logprob_diff=float(
                        max(
                            np.abs(np.subtract(r.logprobs, q.logprobs)).max()
                            for r, q in zip(results, reference)
                        )
                    ),
                    logits_diff=float(np.abs(logits.ours(model, tokens) - ref_logits).max()),
                    logits_scale=float(np.abs(ref_logits).max()),
                    params=describe(nnx.state(model, nnx.Param)),
                    sampler_params=describe(sampler.params),
                )
            )
    print(json.dumps(report))


if __name__ == "__main__":
    main(json.loads(pathlib.Path(sys.argv[1]).read_text()))
