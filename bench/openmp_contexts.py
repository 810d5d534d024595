"""Two batching contexts on one model, decoding from two threads one after the other: seconds per 32-token
greedy answer with libgomp's defaults (llama.cpp loaded before avgguf could set anything: what avgguf did
before) and with avgguf's OpenMP settings (avgguf.runtime.threads.openmp_defaults), each in a fresh process.

    python bench/openmp_contexts.py [--answers 5]

Context A answers alone, then B (a second thread, so a second OpenMP team), then A again, then both in turn;
the table gives each phase's median.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PHASES = ("A alone", "B after A", "A after B", "A and B in turn")


def child(setting: str, answers: int) -> dict[str, float]:
    if setting == "libgomp defaults":
        import llama_cpp  # noqa: F401  (libgomp reads its environment now, before avgguf sets anything)
    from avgguf.runtime.batching import Batcher, BatchRequest, Sampling
    from avgguf.config.modelfile import load_modelfile
    from avgguf.runtime.session import Runtime

    rt = Runtime(load_modelfile(ROOT / "modelfiles" / "demo.yaml"), fuse="sync", merge="off", threads=2)
    key = rt.engine.coefficient_key({})
    tokens = rt.engine.tokenize(rt.engine.format_chat([{"role": "user", "content": "What should I do about a cough?"}]))

    def answer(batcher: Batcher) -> float:
        events: queue.Queue = queue.Queue()
        t0 = time.perf_counter()
        batcher.submit(BatchRequest(tokens, key, Sampling(max_tokens=32, temperature=0.0), events.put))
        while events.get(timeout=120).kind == "piece":
            pass
        return time.perf_counter() - t0

    a, b = Batcher(rt.engine, n_seq=8), Batcher(rt.engine, n_seq=8)
    answer(a)  # warm-up
    out = {
        "A alone": [answer(a) for _ in range(answers)],
        "B after A": [answer(b) for _ in range(answers)],
        "A after B": [answer(a) for _ in range(answers)],
        "A and B in turn": [answer(x) for _ in range(answers) for x in (a, b)],
    }
    a.close()
    b.close()
    rt.close()
    return {k: statistics.median(v) for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--answers", type=int, default=5)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.answers)))
        return
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    rows = {}
    for setting in ("libgomp defaults", "avgguf: OMP_WAIT_POLICY=active GOMP_SPINCOUNT=300000"):
        out = subprocess.run(
            [sys.executable, __file__, "--child", setting, "--answers", str(args.answers)],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        rows[setting] = json.loads(out.strip().splitlines()[-1])
    print(f"SmolLM2 Q4_1 (no AVs), 2 threads, 32-token greedy answers, seconds, median of {args.answers}:\n")
    print("| OpenMP | " + " | ".join(PHASES) + " |")
    print("|---" * (len(PHASES) + 1) + "|")
    for setting, r in rows.items():
        print(f"| {setting} | " + " | ".join(f"{r[p]:.2f}" for p in PHASES) + " |")


if __name__ == "__main__":
    main()
