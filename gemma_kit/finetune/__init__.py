"""Fine-tuning Gemma: LoRA, QLoRA (int8 base) and full, from JSONL data.

    from gemma_kit.finetune import TrainConfig, train
    config = TrainConfig.from_file("finetune/configs/lora_270m.toml")
    result = train(config)                       # or train(config, resume=True)

The command line is `gemma-kit finetune --config FILE [--resume] [--set key=value ...]`.
Fine-tuning is one objective (train.FineTuning) on the training core, gemma_kit.training, which
holds the settings (TrainConfig), the step, the loop and the metrics. Modules: data (JSONL ->
packed rows), train (the objective and train()); config and metrics re-export the core's.
Needs the [finetune] extra (optax; matplotlib for the loss curve).
"""

from gemma_kit.finetune.config import TrainConfig
from gemma_kit.finetune.train import TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "train"]
