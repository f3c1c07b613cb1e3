"""`python -m lora_scripts …`, the form launchers take: `accelerate launch -m lora_scripts train --config x.yaml`."""

import sys

from lora_scripts.cli import main

if __name__ == "__main__":
    sys.exit(main())
