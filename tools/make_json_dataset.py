"""Generate the JSON-extraction demo dataset: short English/Chinese records -> one JSON object.

Deterministic for a given seed (stdlib only). Three splits, each a JSONL file of chat samples
{"messages": [{"role": "user", ...}, {"role": "assistant", "content": "<compact JSON>"}]}:
  train.jsonl    drawn from the training half of every vocabulary and template list
  heldout.jsonl  "familiar": the same pools as train, records that training does not contain
  novel.jsonl    names, cities, items, products, symptoms, medicines, issues, urgency cues,
                 filler sentences and templates that never occur in training
Answers copy names, items, places, symptoms, medicines, products and issues verbatim from the
text; numbers, dates and priority are normalised (integers, YYYY-MM-DD, low/medium/high).

    python tools/make_json_dataset.py --out data/json_extract --train 720 --heldout 60 --novel 60 --seed 0
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from json_dataset.records import build_pools, make_split


def write_jsonl(path: Path, samples: list[dict]) -> None:
    """Write one JSON object per line, UTF-8, keeping Chinese readable."""
    with path.open("w", encoding="utf-8", newline="\n") as handle:
        for sample in samples:
            handle.write(json.dumps(sample, ensure_ascii=False) + "\n")


def main() -> None:
    """Parse the command line and write train.jsonl, heldout.jsonl and novel.jsonl under --out."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--train", type=int, default=720, help="number of training samples")
    parser.add_argument("--heldout", type=int, default=60, help="number of familiar held-out samples")
    parser.add_argument("--novel", type=int, default=60, help="number of novel held-out samples")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--compose", type=float, default=0.0, metavar="SHARE",
                        help="share of training records strung together from single-field phrases instead of a "
                             "template (0-1; the held-out splits never are; tried in docs/demo_tuning.md, not the default)")
    args = parser.parse_args()
    if min(args.train, args.heldout, args.novel) < 1:
        parser.error("--train, --heldout and --novel must be at least 1")
    if not 0 <= args.compose <= 1:
        parser.error("--compose must be between 0 and 1")
    # One random stream per split, held-out splits first: they stay the same whatever --train is,
    # so runs trained on more or less data are scored on the same records.
    seen: set[str] = set()
    familiar, novel = build_pools("train"), build_pools("novel")
    splits = {"heldout": make_split(random.Random(f"{args.seed}:heldout"), familiar, args.heldout, seen),
              "novel": make_split(random.Random(f"{args.seed}:novel"), novel, args.novel, seen)}
    splits["train"] = make_split(random.Random(f"{args.seed}:train"), familiar, args.train, seen, args.compose)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, samples in splits.items():
        write_jsonl(args.out / f"{name}.jsonl", samples)
    print(f"wrote {args.train} train, {args.heldout} held-out and {args.novel} novel samples to {args.out}")


if __name__ == "__main__":
    main()
