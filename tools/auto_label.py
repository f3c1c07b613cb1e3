"""CLIP zero-shot auto-labelling of a training folder (same as `lora-scripts label`).

    python tools/auto_label.py --input data/style_train --output data/style_train/metadata.csv \
        --model models/clip --labels "a photo of buildings" "a painting in cyberpunk style"
"""

import sys
from pathlib import Path

# Run from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lora_scripts.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["label", *sys.argv[1:]]))
