"""Helpers of the test suite, imported as `from tests.support import tiny`: pytest makes the
repository root importable for the `tests` package (rootdir-based "prepend" import mode), and the
workers run from the repository root as `python -m tests.support.NAME`.

Models and references:
  tiny         tiny Gemma 2 / Gemma 3 configs, random models and params from a seed, and a small
               real SentencePiece tokenizer (conftest.py wraps them as fixtures)
  vision_tiny  a tiny random Gemma 3 vision model, its tokenizer, test images and pixels
  logits       one jitted forward pass as numpy logits (ours), and transformers' (theirs)
  real_model   the real Gemma 3 270M GGUF and transformers' loader of it, opened once a session

Child processes (a process fixes its device count when JAX starts, and SIGKILL needs a process):
  workers            starts the workers below (`python -m tests.support.NAME JOB.json` from the
                     repository root), reads their JSON reports, watches their metrics.jsonl
  ports              a free TCP port on 127.0.0.1 (the demo's servers, jax.distributed)
  training_worker    the training core: an anchored objective, resume after SIGINT, the 8-device
                     mesh and two-process runs
  finetune_worker    fine-tuning runs killed and resumed, and on an 8-device mesh
  sharding_worker    sharded tiny models and the sampler on 8 fake CPU devices
  distill_worker     GKD distillation: resume after SIGKILL, 8 devices, two processes
  rl_worker          RL with a KL penalty: resume after SIGKILL, 8 devices (and WARP's pieces)
  preference_worker  toy preference pairs for reward models, WARM and DPO; a killed reward-model
                     run and DPO on 8 devices
"""
