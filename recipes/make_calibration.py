"""Calibration file for `avgguf convert --fit distill` from the DPO training data of one domain.

    python recipes/make_calibration.py --domain medical --rows 64 --out runs/medical/calibration.jsonl

Evenly spaced rows of data/preferences/train.jsonl (train split only: the eval topics stay unseen), each as
{"query", "responses"}: the fit sees the prompt with all three answers (expert, generic, avoidance) plus an
answer sampled from the aligned model.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

DATA = Path(__file__).resolve().parent.parent / "data" / "preferences" / "train.jsonl"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--domain", required=True, choices=["medical", "legal", "financial"])
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    rows = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r["domain"] == args.domain and r["split"] == "train"]
    picked = rows[:: max(1, len(rows) // args.rows)][: args.rows]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(json.dumps({"query": r["query"], "responses": r["responses"]}) + "\n" for r in picked))
    print(f"{args.out}: {len(picked)} rows of {args.domain}")


if __name__ == "__main__":
    main()
