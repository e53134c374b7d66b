"""The README's worked example: LoRA on the embedded Gemma 3 270M over CPython's reference text.

    python finetune/pydoc_example.py                 # writes runs/pydoc/, ~40 min on 2 cores
    python finetune/pydoc_example.py --steps 10      # a quick look
    python finetune/pydoc_example.py --resume        # continue a stopped run

The corpus is `pydoc_data.topics`, the language-reference topics that `help()` shows, shipped
with every CPython (79 topics, about 465,000 characters). It is part of the Python
documentation: (c) Python Software Foundation, under the PSF License Agreement (version 2); since
Python 3.8.6 the code examples in it are also under the Zero-Clause BSD licence.

Each topic becomes one {"text": ...} row (cut into 128-token pieces when packed); the held-out
split is by topic (10%, seeded), so the held-out loss is measured on reference pages the model
never trained on. The run prints, and writes to runs/pydoc/run/summary.json, the held-out loss
and perplexity before and after training.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys

HERE = pathlib.Path(__file__).resolve().parent


def write_topics(path: pathlib.Path) -> int:
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps({"text": topics[name]}) + "\n" for name in sorted(topics)))
    tmp.replace(path)
    return len(topics)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/pydoc", help="folder for the data and the run")
    parser.add_argument("--config", default=str(HERE / "configs" / "pydoc_lora.toml"))
    parser.add_argument("--steps", type=int, default=None, help="override the config's steps")
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args(argv)

    from gemma_kit.finetune import TrainConfig, train

    out = pathlib.Path(args.out).absolute()
    data = out / "data" / "topics.jsonl"
    print(f"wrote {write_topics(data)} pydoc topics to {data}", file=sys.stderr)
    config = TrainConfig.from_file(args.config).replace(
        train_file=str(data), out_dir=str(out / "run")
    )
    if args.steps is not None:
        config = config.replace(steps=args.steps)
    result = train(config, resume=args.resume)
    if result.interrupted:
        return 130
    before, after = result.eval_before, result.eval_after
    if before is None or after is None:  # a --config without held-out rows
        print("held-out loss   not measured (the config holds no rows out)")
    else:
        print(f"held-out loss   {before:.4f} -> {after:.4f} nats/token")
        print(f"held-out ppl    {math.exp(before):.2f} -> {math.exp(after):.2f}")
    print(f"adapter         {result.adapter}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
