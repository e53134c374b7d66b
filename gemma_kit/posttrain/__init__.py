"""Post-training: distillation (GKD), reward models and WARM, Best-of-N, DPO, RL with KL
penalties (REINFORCE / RLOO), BOND / J-BOND and WARP merging.

Each method is a loss on the one training core (gemma_kit.training) plus the data or rollouts it
needs. The pure pieces are tested against oracles and closed forms:

    losses.py     pure loss functions on arrays (divergences, DPO, Bradley-Terry, advantages)
    logprobs.py   chunked per-token log-probs and divergences ([B, T, V] never exists whole)
    merging.py    EMA, task vectors, LERP / SLERP / LITI, averages (LoRA-exact)
    rollout.py    K completions per prompt from the current parameters (stop token kept)

Needs the [finetune] extra (optax).
"""
