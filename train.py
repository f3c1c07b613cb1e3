"""The spec's entry point: `python train.py --config configs/my_lora.yaml` (same as `lora-scripts train`)."""

import sys

from lora_scripts.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
