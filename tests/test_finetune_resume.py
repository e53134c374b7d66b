"""Stopping and resuming a run (Ctrl-C, SIGKILL), and one step on 8 devices, in child processes.

Each child (tests/support/finetune_worker.py) trains the tiny model from seeds and reports JSON. The
children share a persistent JAX compilation cache, so only the first one compiles the step.
"""

from __future__ import annotations

import json
import pathlib
import signal

import numpy as np
import pytest

from tests.support import tiny, workers

WORKER = "finetune_worker"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The children's environment: one JAX compilation cache for all children of this file."""
    return workers.cpu_env(cache=tmp_path_factory.mktemp("jax-cache"))


def _checkpoints(out_dir: pathlib.Path) -> list[int]:
    return sorted(int(p.name) for p in (out_dir / "checkpoints").iterdir() if p.name.isdigit())


def _adapter(path: pathlib.Path) -> list[np.ndarray]:
    import jax
    import orbax.checkpoint as ocp

    restored = ocp.PyTreeCheckpointer().restore(path / "params")
    return [np.asarray(x) for x in jax.tree.leaves(restored)]


def _data(folder: pathlib.Path) -> pathlib.Path:
    lines = [line.strip() for line in tiny.SMALL_TEXT.splitlines() if len(line.strip()) > 20]
    rows: list[dict] = []
    for i, line in enumerate(lines[:48]):
        if i % 3:
            rows.append({"text": line[:80]})
        else:
            rows.append(
                {
                    "messages": [
                        {"role": "user", "content": f"Quote line {i}."},
                        {"role": "model", "content": line[:40]},
                    ]
                }
            )
    path = folder / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _config(data: pathlib.Path, out: pathlib.Path) -> dict:
    return dict(
        train_file=str(data),
        out_dir=str(out),
        steps=12,
        batch_size=4,
        grad_accum=2,
        max_length=64,
        learning_rate=3e-3,
        warmup_steps=2,
        save_every=4,
        keep_checkpoints=2,
        eval_every=100,
        eval_fraction=0.1,
        progress=False,
    )


def test_interrupted_and_killed_runs_resume_to_the_same_parameters(tmp_path, env):
    """Ctrl-C saves and stops; SIGKILL loses only the steps since the last save; resuming both
    ends bit-identical to an uninterrupted run (same batches in the same order)."""
    data = _data(tmp_path)

    # The reference: 12 steps without interruption.
    code, ref, err = workers.finish(
        workers.start(
            WORKER, dict(kind="train", config=_config(data, tmp_path / "ref")), tmp_path, env
        )
    )
    assert code == 0, err
    assert ref["step"] == 12 and not ref["interrupted"]
    assert ref["eval_after"] < ref["eval_before"]

    out = tmp_path / "run"
    # 0.8 s after each step: the parent, polling every 20 ms, has seconds to interrupt the run
    # between two given steps, even on a loaded machine.
    job = dict(kind="train", config=_config(data, out), step_sleep=0.8)

    # Ctrl-C after step 2: the step in flight finishes, a checkpoint is written, exit 130.
    proc = workers.start(WORKER, job, tmp_path, env)
    workers.wait_for_step(proc, out, 2)
    proc.send_signal(signal.SIGINT)
    code, result, err = workers.finish(proc)
    assert code == 130, err
    stopped = result["step"]
    assert result["interrupted"] and stopped >= 2
    assert _checkpoints(out)[-1] == stopped == workers.logged_steps(out)[-1]
    assert not (out / "adapter").exists()  # an interrupted run does not look finished

    # Resumed, then killed with SIGKILL past the save at step 8: steps 9+ are lost.
    proc = workers.start(WORKER, dict(job, resume=True), tmp_path, env)
    reached = workers.wait_for_step(proc, out, 9)
    proc.send_signal(signal.SIGKILL)
    code, _, _ = workers.finish(proc)
    assert code == -signal.SIGKILL
    assert reached < 12 and _checkpoints(out) == [4, 8]  # keep_checkpoints=2
    assert not (out / "adapter").exists()

    # Resumed again: continues from step 8 to the end.
    code, result, err = workers.finish(
        workers.start(
            WORKER, dict(kind="train", config=_config(data, out), resume=True), tmp_path, env
        )
    )
    assert code == 0, err
    assert result["step"] == 12 and result["eval_before"] == ref["eval_before"]
    for a, b in zip(_adapter(out / "adapter"), _adapter(tmp_path / "ref" / "adapter"), strict=True):
        np.testing.assert_array_equal(a, b)
    # The metrics describe one run: each step once, with the reference's losses.
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    ref_rows = [
        json.loads(line) for line in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 13))
    assert [r["loss"] for r in rows if "loss" in r] == [r["loss"] for r in ref_rows if "loss" in r]


def test_resume_refuses_changed_data(tmp_path, env):
    """A resumed run must see the same rows: changed data or data settings stop it."""
    from gemma_kit.errors import TrainingError
    from gemma_kit.finetune import TrainConfig, train

    data = _data(tmp_path)
    out = tmp_path / "run"
    config = TrainConfig(**_config(data, out))
    (out / "checkpoints" / "4").mkdir(parents=True)
    (out / "config.json").write_text(json.dumps(config.to_dict()))
    with pytest.raises(TrainingError, match="already holds checkpoints"):
        train(config)
    with pytest.raises(TrainingError, match=r"max_length: 64 -> 96"):
        train(config.replace(max_length=96), resume=True)
    with pytest.raises(TrainingError, match="nothing to resume"):
        train(config.replace(out_dir=str(tmp_path / "empty")), resume=True)


def test_sharded_step_equals_single_device(tmp_path):
    """LoRA and full fine-tuning, two steps on a data=2 x fsdp=4 mesh of 8 CPU devices with 2
    micro-batches of 8 rows, against one device with one batch of 16 rows.

    Loss and gradient norm: <= 1e-5 relative. Adam's first moment (linear in the gradients):
    <= 1e-4 of its largest entry (observed 1e-6 LoRA, 1.4e-5 full). Parameters: <= 2% of the
    learning rate (observed 0.007% LoRA, 1.1% full): Adam divides each gradient by its own
    running magnitude, so an entry whose gradient is ~1e-6 of the largest moves by a visibly
    different fraction of the learning rate when f32 sums are taken in another order.
    """
    job = dict(kind="sharded", seed=0, layouts=dict(single=[1, 1, 1], mesh=[2, 4, 2]))
    report = workers.run(WORKER, job, tmp_path, devices=8)
    assert report["devices"] == 8
    assert {c["method"] for c in report["cases"]} == {"lora", "full"}
    lr = 1e-2
    for case in report["cases"]:
        np.testing.assert_allclose(case["loss"], case["reference_loss"], rtol=1e-5)
        np.testing.assert_allclose(case["grad_norm"], case["reference_grad_norm"], rtol=1e-5)
        assert case["mu_rel_diff"] <= 1e-4, case
        assert case["max_param_diff"] <= 2e-2 * lr, case
        assert case["max_param_change"] > lr  # the steps did move the parameters
        # The weights really were split: fsdp splits D of the base (and, for full fine-tuning,
        # of the trained weights); LoRA factors stay whole.
        assert any("fsdp" in spec for spec in case["shardings"]) == (case["method"] == "full")
