"""The demo page: `python demos/chat.py [options]` is `gemma-kit demo [options]`.

    python demos/chat.py                          # the embedded 270M: text completion
    python demos/chat.py --ckpt ~/gemma3-4b-it    # an instruction-tuned checkpoint: the chat
                                                  # page (4B+: images too)
    python demos/chat.py --lora runs/my-adapter   # with a LoRA adapter from gemma_kit.finetune

Then open http://127.0.0.1:7860. See README.md beside this file.
"""

import sys

from gemma_kit.cli import main

if __name__ == "__main__":
    sys.exit(main(["demo", *sys.argv[1:]]))
