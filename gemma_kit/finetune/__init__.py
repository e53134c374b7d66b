"""Fine-tuning Gemma: LoRA, QLoRA (int8 base) and full, from JSONL data.

    from gemma_kit.finetune import TrainConfig, train
    config = TrainConfig.from_file("finetune/configs/lora_270m.toml")
    result = train(config)                       # or train(config, resume=True)

The command line is `gemma-kit finetune --config FILE [--resume] [--set key=value ...]`.
Modules: config (TrainConfig), data (JSONL -> packed rows), train (the loop), metrics.
Needs the [finetune] extra (optax; matplotlib for the loss curve).
"""

from gemma_kit.finetune.config import TrainConfig
from gemma_kit.finetune.train import TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "train"]
