"""Issue #20's robustness table: per surface, how many bad inputs and faults were tried and how each ended;
and the server's requests/s for 8 normal clients under a hostile client mix, relative to the 8 alone.

    python bench/robustness.py [--seconds 20] [--rounds 3] [--skip-cases] [--skip-load]

Surfaces: the case tables of the test suite, run here again and sorted by outcome: "clear" (one error in
the expected shape: a 4xx with a message in OpenAI's error object, or exit status 2 with one line and no
traceback), "500", "traceback", "crash" (a signal or a dead server), "accepted" (no error at all).
- HTTP API: tests/test_server_trust.py's CASES against a live `avgguf serve` (tiny synthetic model).
- modelfile YAML: tests/test_modelfile_errors.py's cases through `avgguf profiles FILE`.
- adapter GGUF: tests/test_adapter_validation.py's cases through `avgguf inspect FILE` against a base.
- CLI arguments: tests/test_cli_errors.py's cases.

Hostile mix (SmolLM2-135M + the three demo AVs, `serve --parallel 8`): 8 normal clients asking for 32 tokens
in a loop, alone and then beside one client sending 64 000 stop strings, one sending 16 MiB chunked bodies
and one holding 50 half-sent requests open (slowloris), each repeating its attack --pauses s after the last
one ended (0: as fast as it can); rounds alternate, medians reported.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from avgguf.testing.server import start_server

ROOT = Path(__file__).resolve().parent.parent


# --- hostile mix -------------------------------------------------------------------------------------------

QUESTIONS = ["What should I do about a cough?", "Can my landlord keep my deposit?", "How do index funds work?"]


def normal_clients(url: str, seconds: float, n: int = 8) -> float:
    """Requests/s of `n` clients asking in a loop for `seconds`."""
    stop = time.monotonic() + seconds
    done = [0] * n

    def client(i: int) -> None:
        with httpx.Client(timeout=120) as c:
            while time.monotonic() < stop:
                r = c.post(
                    url + "/v1/chat/completions",
                    json={
                        "model": "demo",
                        "max_tokens": 32,
                        "temperature": 0,
                        "seed": i,
                        "messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
                        "avgguf": {"coefficients": {"medical": 1.0}},
                    },
                )
                done[i] += r.status_code == 200

    t0 = time.monotonic()
    with ThreadPoolExecutor(n) as pool:
        list(pool.map(client, range(n)))
    return sum(done) / (time.monotonic() - t0)


def hostile(url: str, stop: threading.Event, pause: float) -> dict[str, list[int]]:
    """Three hostile clients until `stop`, each repeating its attack `pause` s after the last one ended (0: a
    flood): what status each of their attempts got."""
    host, port = url.removeprefix("http://").split(":")
    seen: dict[str, list[int]] = {"64k stops": [], "16 MiB chunked": [], "slowloris": []}
    body = json.dumps(
        {
            "model": "demo",
            "max_tokens": 900,
            "stop": [f"{i:011d}e" for i in range(64000)],
            "messages": [{"role": "user", "content": "write a story"}],
        }
    ).encode()

    def many_stops():
        with httpx.Client(timeout=60) as c:
            while not stop.is_set():
                r = c.post(url + "/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
                seen["64k stops"].append(r.status_code)
                stop.wait(pause)

    def oversize():
        piece = b"10000\r\n" + b" " * 65536 + b"\r\n"
        while not stop.is_set():
            with socket.create_connection((host, int(port))) as s:
                s.sendall(
                    b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json"
                    b"\r\nTransfer-Encoding: chunked\r\n\r\n"
                )
                try:
                    for _ in range(256):
                        s.sendall(piece)
                    s.settimeout(10)
                    head = s.recv(64)
                    seen["16 MiB chunked"].append(int(head.split()[1]) if head else 0)
                except (BrokenPipeError, ConnectionResetError, socket.timeout):
                    seen["16 MiB chunked"].append(413)  # cut off mid-body
            stop.wait(pause)

    def slowloris():
        while not stop.is_set():
            socks = [socket.create_connection((host, int(port))) for _ in range(50)]
            for s in socks:
                s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            stop.wait(12)
            closed = 0
            for s in socks:
                s.settimeout(0.5)
                try:
                    closed += s.recv(1) == b""
                except (socket.timeout, OSError):
                    pass
                s.close()
            seen["slowloris"] += [408] * closed + [0] * (50 - closed)  # 408: dropped by the header deadline

    threads = [threading.Thread(target=f, daemon=True) for f in (many_stops, oversize, slowloris)]
    [t.start() for t in threads]
    return seen


def hostile_process(url: str, seconds: float, pause: float) -> subprocess.Popen:
    """The hostile clients in a process of their own (they must not share the normal clients' GIL)."""
    return subprocess.Popen(
        [sys.executable, __file__, "--hostile", url, "--seconds", str(seconds), "--pause", str(pause)],
        stdout=subprocess.PIPE,
        text=True,
    )


def run_hostile(url: str, seconds: float, pause: float) -> None:
    stop = threading.Event()
    seen = hostile(url, stop, pause)
    time.sleep(seconds)
    stop.set()
    time.sleep(1)
    print(json.dumps(seen))


def load_table(seconds: float, rounds: int, pauses: list[float]) -> None:
    mf = ROOT / "bench" / "out" / "robustness" / "demo.yaml"
    mf.parent.mkdir(parents=True, exist_ok=True)
    avs = {n: str(ROOT / "modelfiles" / "avs" / f"{n}.gguf") for n in ("medical", "legal", "financial")}
    mf.write_text(
        json.dumps({"base": "builtin:smollm2-135m-instruct", "avs": avs, "defaults": {"n_ctx": 1024, "temperature": 0.0}})
    )
    # --threads 2: every core, as bench/server_load.py (the adaptive policy would yield cores to the clients)
    srv = start_server(["serve", str(mf), "--parallel", "8", "--merge", "off", "--threads", str(os.cpu_count())], timeout=90)
    url = srv.url
    try:
        normal_clients(url, 3)  # warm-up
        alone, mixed, outcomes = [], {p: [] for p in pauses}, {}
        for _ in range(rounds):
            for pause in pauses:  # alternate: alone, mixed, alone, mixed, ...
                alone.append(normal_clients(url, seconds))
                attacker = hostile_process(url, seconds + 2, pause)
                time.sleep(1)  # the hostile clients are under way
                mixed[pause].append(normal_clients(url, seconds))
                seen = json.loads(attacker.communicate(timeout=120)[0])
                for k, v in seen.items():
                    outcomes.setdefault(k, []).extend(v)
        alone.append(normal_clients(url, seconds))
        a = statistics.median(alone)
        print(
            f"\n8 normal clients (32 tokens each, SmolLM2-135M + 3 AVs, serve --parallel 8 --threads "
            f"{os.cpu_count()}), {rounds} rounds of {seconds:.0f} s, medians; the hostile clients run in a "
            f"process of their own on the same {os.cpu_count()} cores"
        )
        print(f"| {'clients':<62} | req/s | vs alone |\n|{'-' * 64}|------:|---------:|")
        print(f"| {'8 normal alone':<62} | {a:5.2f} | {1:8.2f} |")
        for pause, xs in mixed.items():
            m = statistics.median(xs)
            how = f"each again {pause:g} s after its answer" if pause else "each as fast as it can (a flood)"
            print(f"| {'+ 64k stops, 16 MiB chunked, slowloris: ' + how:<62} | {m:5.2f} | {m / a:8.2f} |")
        print("\nhostile clients' answers: " + "; ".join(f"{k}: {len(v)} tries, {_statuses(v)}" for k, v in outcomes.items()))
        print(f"server alive after the mix: {srv.proc.poll() is None}")
    finally:
        srv.stop()


def _statuses(codes: list[int]) -> str:
    counts: dict[int, int] = {}
    for c in codes:
        counts[c] = counts.get(c, 0) + 1
    return ", ".join(f"{n}x {'kept open' if c == 0 else c}" for c, n in sorted(counts.items()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--skip-cases", action="store_true")
    ap.add_argument("--skip-load", action="store_true")
    ap.add_argument("--pauses", default="0.5,0", help="hostile clients' pause between attacks, s (0: flood)")
    ap.add_argument("--hostile", metavar="URL", help=argparse.SUPPRESS)
    ap.add_argument("--pause", type=float, default=0.5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.hostile:
        return run_hostile(args.hostile, args.seconds, args.pause)
    if not args.skip_cases:
        from robustness_cases import case_table

        case_table()
    if not args.skip_load:
        load_table(args.seconds, args.rounds, [float(x) for x in args.pauses.split(",")])


if __name__ == "__main__":
    main()
