"""Run benchmark rows in this process: `python -m bench.row '<JSON list of row specs>'`.

The bench scripts start this module in a fresh process per row, so peak memory and start-up
belong to that row alone. Each spec's `kind` names the function that runs it; each result is
printed as one `BENCH_RESULT {json}` line. A row that raises gives a result with "error".
"""

from __future__ import annotations

import importlib
import json
import sys
import time
import traceback

import torch

from bench.common import RESULT_MARK

KINDS = {
    "text_export": "bench.text_rows:export_gguf",
    "text_trainer": "bench.text_rows:run_trainer",
    "text_loop": "bench.text_rows:run_plain_loop",
    "text_lora_scripts": "bench.text_rows:run_lora_scripts",
    "image_diffusers": "bench.image_rows:run_diffusers_style",
    "image_lora_scripts": "bench.image_rows:run_lora_scripts",
    "image_parity": "bench.image_rows:check_step1_parity",
}


def main(argv: list[str]) -> int:
    """Run every spec in order; 1 if any failed."""
    failed = False
    for index, spec in enumerate(json.loads(argv[1])):
        if index:  # later rows of a shared process start when the previous one ends
            spec["spawned_at"] = time.time()
        torch.set_num_threads(spec.get("threads", torch.get_num_threads()))
        module_name, function_name = KINDS[spec["kind"]].split(":")
        try:
            result = getattr(importlib.import_module(module_name), function_name)(spec)
        except Exception:  # the parent reports the row as failed and goes on with the others
            failed = True
            result = {"error": traceback.format_exc(limit=-6)}
        print(RESULT_MARK + json.dumps({"name": spec["name"], **result}), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
