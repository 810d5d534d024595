"""Load on `avgguf serve` (127.0.0.1 only): requests/s and latency percentiles with 1, 4 and 8 concurrent
clients, alternating profiles vs one profile, on SmolLM2-135M with the demo AVs.

    python bench/server_load.py [--requests 24] [--max-tokens 32]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
QUESTIONS = ["What should I do about a cough?", "Can my landlord keep my deposit?", "How do index funds work?",
             "Is ibuprofen safe with lisinopril?"]


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=24, help="requests per scenario")
    ap.add_argument("--max-tokens", type=int, default=32)
    args = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "avgguf.cli", "serve", str(ROOT / "modelfiles" / "demo.yaml"),
                             "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        profiles = ["demo:expert-medical", "demo:cautious-medical-expert-finance", "demo:avoid-all", "demo:gentle"]

        def one(i: int, alternate: bool) -> float:
            model = profiles[i % len(profiles)] if alternate else profiles[0]
            t0 = time.perf_counter()
            r = httpx.post(url + "/v1/chat/completions", timeout=300, json={
                "model": model, "messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
                "max_tokens": args.max_tokens, "temperature": 0.7, "seed": i})
            r.raise_for_status()
            return time.perf_counter() - t0

        one(0, False)  # warm-up
        rows = []
        for clients in (1, 4, 8):
            for alternate in (False, True):
                t0 = time.perf_counter()
                with ThreadPoolExecutor(clients) as pool:
                    lat = list(pool.map(lambda i: one(i, alternate), range(args.requests)))
                wall = time.perf_counter() - t0
                rows.append((clients, "alternating 4 profiles" if alternate else "one profile",
                             args.requests / wall, statistics.median(lat), percentile(lat, 0.99)))
                print(f"  {rows[-1]}", file=sys.stderr)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    print(f"SmolLM2-135M Q4_1 + 3 AVs (rank 16), {args.requests} chat requests per row, max_tokens "
          f"{args.max_tokens}, 2 cores:\n")
    print("| clients | profiles | requests/s | p50 latency (s) | p99 latency (s) |")
    print("|---|---|---|---|---|")
    for clients, mode, rps, p50, p99 in rows:
        print(f"| {clients} | {mode} | {rps:.2f} | {p50:.2f} | {p99:.2f} |")


if __name__ == "__main__":
    main()
