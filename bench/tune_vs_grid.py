"""`avgguf tune` vs the paper's grid search on the demo AVs, for three target mixes.

    python bench/tune_vs_grid.py [--limit 6] [--grid 1.0] [--budget 60]

Both run the same level judge on the same held-out queries (--limit per domain). The full grid of the paper
(21^3 = 9261 points) is extrapolated from the measured seconds per evaluation; the grid run here uses --grid
(step 1.0: 5^3 = 125 points).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MIXES = [
    "legal=expert,financial=avoidance,medical=generic",
    "medical=expert,legal=expert,financial=expert",
    "medical=avoidance,legal=generic,financial=expert",
]


def run(*args: str) -> dict:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "avgguf.cli",
            "tune",
            str(ROOT / "modelfiles" / "demo.yaml"),
            "--data",
            str(ROOT / "data" / "preferences" / "eval.jsonl"),
            *args,
            "--json",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout)


def targets(mix: str) -> list[tuple[str, str]]:
    return [tuple(p.split("=")) for p in mix.split(",")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=4)
    ap.add_argument("--mixes", type=int, default=3, help="how many of the three target mixes to run")
    ap.add_argument("--grid", type=float, default=1.0)
    ap.add_argument("--budget", type=int, default=40)
    args = ap.parse_args()
    print(f"Demo AVs, {args.limit} held-out queries per domain, level judge; grid step {args.grid:g} over [-2, 2]^3:\n")
    print("| target mix | search | evaluations | seconds | target shares (per domain) | mean | coefficients |")
    print("|---|---|---|---|---|---|---|")
    for mix in MIXES[: args.mixes]:
        common = ("--target", mix, "--limit", str(args.limit))
        results = {"grid": run(*common, "--grid", str(args.grid)), "avgguf tune": run(*common, "--budget", str(args.budget))}
        for label, r in results.items():
            shares = [r["achieved"][d][lvl] for d, lvl in targets(mix)]
            coefs = " ".join(f"{k}={v:g}" for k, v in r["coefficients"].items())
            print(
                f"| {mix} | {label} | {r['evaluations']} | {r['seconds']:.0f} | "
                f"{' / '.join(f'{s:.2f}' for s in shares)} | {sum(shares) / len(shares):.2f} | {coefs} |",
                flush=True,
            )
        per_eval = results["grid"]["seconds"] / results["grid"]["evaluations"]
        print(f"| {mix} | paper's grid 21^3 (extrapolated) | 9261 | {9261 * per_eval:.0f} | | | |", flush=True)


if __name__ == "__main__":
    main()
