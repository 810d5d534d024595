"""Load on `avgguf serve` and on stock llama-server side by side (127.0.0.1 only): requests/s, generated tok/s
and latency percentiles with 1, 4 and 8 concurrent clients, one coefficient set vs four alternating ones, on
SmolLM2-135M with the three demo AVs. Every request names its adapter scales with llama-server's per-request
`lora` field, which both servers accept.

    python bench/server_load.py [--requests 24] [--max-tokens 32] [--parallel 1,2]
        [--llama-server /path/to/llama-server]
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
SETS = [[1.0, 0.0, 0.0], [-1.0, 0.0, 1.0], [-1.0, -1.0, -1.0], [0.5, 0.5, 0.5]]  # demo profiles, AV order


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_up(url: str, proc: subprocess.Popen) -> None:
    for _ in range(900):
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.1)
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
    raise SystemExit("server did not start")


def load(url: str, requests: int, max_tokens: int) -> list[tuple]:
    def one(i: int, alternate: bool) -> tuple[float, int]:
        scales = SETS[i % len(SETS)] if alternate else SETS[0]
        t0 = time.perf_counter()
        r = httpx.post(url + "/v1/chat/completions", timeout=600, json={
            "model": "demo", "messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
            "max_tokens": max_tokens, "temperature": 0.0, "lora": [{"id": k, "scale": v} for k, v in enumerate(scales)]})
        r.raise_for_status()
        return time.perf_counter() - t0, r.json()["usage"]["completion_tokens"]

    one(0, False)  # warm-up
    rows = []
    for clients in (1, 4, 8):
        for alternate in (False, True):
            t0 = time.perf_counter()
            with ThreadPoolExecutor(clients) as pool:
                out = list(pool.map(lambda i: one(i, alternate), range(requests)))
            wall = time.perf_counter() - t0
            lat = [x for x, _ in out]
            rows.append((clients, "4 alternating sets" if alternate else "one set", requests / wall,
                         sum(n for _, n in out) / wall, statistics.median(lat), percentile(lat, 0.99)))
            print(f"  {rows[-1]}", file=sys.stderr, flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=24, help="requests per scenario")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--parallel", default="1,2", help="avgguf serve --parallel values to measure")
    ap.add_argument("--llama-server", help="a llama-server binary to measure side by side (--parallel 8)")
    args = ap.parse_args()
    from avgguf.models import builtin_path

    servers = [(f"avgguf serve --parallel {n}", [sys.executable, "-m", "avgguf.cli", "serve",
                                                 str(ROOT / "modelfiles" / "demo.yaml"), "--parallel", n])
               for n in args.parallel.split(",")]
    if args.llama_server:
        avs = ",".join(f"{ROOT / 'modelfiles' / 'avs' / n}.gguf:0" for n in ("medical", "legal", "financial"))
        servers.append(("llama-server --parallel 8", [args.llama_server, "-m", str(builtin_path()), "--lora-scaled", avs,
                                                      "--parallel", "8", "-t", str(os.cpu_count()), "-c", "8192"]))
    table = []
    for label, cmd in servers:
        port = free_port()
        proc = subprocess.Popen([*cmd, "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_up(f"http://127.0.0.1:{port}", proc)
            table += [(label, *row) for row in load(f"http://127.0.0.1:{port}", args.requests, args.max_tokens)]
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    print(f"SmolLM2-135M Q4_1 + the 3 demo AVs, {args.requests} greedy chat requests per row, max_tokens "
          f"{args.max_tokens}, {os.cpu_count()} cores, servers one after another:\n")
    print("| server | clients | coefficient sets | requests/s | generated tok/s | p50 latency (s) | p99 latency (s) |")
    print("|---|---|---|---|---|---|---|")
    for label, clients, mode, rps, tps, p50, p99 in table:
        print(f"| {label} | {clients} | {mode} | {rps:.2f} | {tps:.1f} | {p50:.2f} | {p99:.2f} |")


if __name__ == "__main__":
    main()
