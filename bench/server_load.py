"""Load on `avgguf serve` and on stock llama-server side by side (127.0.0.1 only): requests/s, generated tok/s
and latency percentiles with 1, 4 and 8 concurrent clients, one coefficient set vs four alternating ones, on
SmolLM2-135M with the three demo AVs. Every request names its adapter scales with llama-server's per-request
`lora` field, which both servers accept. Both use every core (`--threads N` / `-t N`): the load generator runs
on the same machine, and avgguf's adaptive thread policy would otherwise yield cores to it.

    python bench/server_load.py [--requests 24] [--max-tokens 32] [--rounds 3] [--parallel 1,8]
        [--llama-server /path/to/llama-server] [--issue25]

avgguf with its exact adapters (--merge off) at each --parallel count; at the last one also on two contexts;
as it runs by default (--parallel 4, a K/V stream per request, merge auto: a set asked for by a quarter of
the recent requests is baked into merged q8_0 weights in the background and served from them,
avgguf.runtime.merged), and with --parallel 8, with and without --kv-unified (one K/V buffer); llama-server
--parallel 8 with its default (a K/V stream per slot) and with --kv-unified. Each server is warmed up with
one-set traffic, and after every cell the bench waits until no merge is under way (GET /v1/models/demo), so a
bake never runs into another server's measurement.

--issue25: issue #25's load only: `avgguf serve` default, --parallel 8, --parallel 8 --kv-unified and
llama-server --parallel 8, one set (expert-all: the three AVs at 1.0), greedy, 1 and 8 clients, all servers
up, alternating, median of --rounds; plus the agreement lines (16 concurrent greedy requests vs the same one
by one).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from avgguf.testing.server import start_server

ROOT = Path(__file__).resolve().parent.parent
QUESTIONS = [
    "What should I do about a cough?",
    "Can my landlord keep my deposit?",
    "How do index funds work?",
    "Is ibuprofen safe with lisinopril?",
]
SETS = [[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [-1.0, 0.0, 1.0], [0.5, 0.5, 0.5]]  # expert-all, expert-medical,
# cautious-medical-expert-finance, gentle (AV order: medical, legal, financial)


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def ask(url: str, i: int, scales: list[float], max_tokens: int) -> tuple[float, int, str]:
    t0 = time.perf_counter()
    r = httpx.post(
        url + "/v1/chat/completions",
        timeout=600,
        json={
            "model": "demo",
            "messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "lora": [{"id": k, "scale": v} for k, v in enumerate(scales)],
        },
    )
    r.raise_for_status()
    body = r.json()
    return time.perf_counter() - t0, body["usage"]["completion_tokens"], body["choices"][0]["message"]["content"]


def scenario(url: str, clients: int, alternate: bool, requests: int, max_tokens: int) -> tuple:
    def one(i: int):
        return ask(url, i, SETS[i % len(SETS)] if alternate else SETS[0], max_tokens)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        out = list(pool.map(one, range(requests)))
    wall = time.perf_counter() - t0
    lat = [x for x, _, _ in out]
    return requests / wall, sum(n for _, n, _ in out) / wall, statistics.median(lat), percentile(lat, 0.99)


def card(url: str) -> dict:
    """GET /v1/models/demo ({} from a server without that route)."""
    r = httpx.get(url + "/v1/models/demo", timeout=30)
    return r.json() if r.status_code == 200 else {}


def quiet(url: str) -> None:
    """Wait until no merge is under way on an avgguf server."""
    while card(url).get("avgguf", {}).get("merging"):
        time.sleep(0.5)


def agreement(url: str, max_tokens: int, one_set: bool = False) -> int:
    """Greedy answers of 16 concurrent requests (4 questions x 4 sets, or x expert-all 4 times) equal to the same
    requests one by one."""
    jobs = [(i, SETS[0 if one_set else j]) for i in range(len(QUESTIONS)) for j in range(len(SETS))]
    solo = [ask(url, i, s, max_tokens)[2] for i, s in jobs]
    with ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(lambda job: ask(url, job[0], job[1], max_tokens)[2], jobs))
    return sum(a == b for a, b in zip(solo, together))


def avgguf_servers(counts: list[str], issue25: bool) -> list[tuple[str, list[str]]]:
    """(label, command) of the avgguf servers to measure."""
    avgguf = [sys.executable, "-m", "avgguf.cli", "serve", str(ROOT / "modelfiles" / "demo.yaml")]
    avgguf += ["--threads", str(os.cpu_count())]
    p8 = ["--parallel", "8"]
    default = [("avgguf serve --parallel 4 (a K/V stream per request, merge auto)", [*avgguf, "--parallel", "4"])]
    default += [("avgguf serve --parallel 8 (the default on this model: a K/V stream per request, merge auto)", [*avgguf, *p8])]
    default += [("avgguf serve --parallel 8 --kv-unified (merge auto)", [*avgguf, *p8, "--kv-unified"])]
    if issue25:
        return default
    last, off = ["--parallel", counts[-1]], ["--merge", "off"]
    servers = [(f"avgguf serve --parallel {n} --merge off", [*avgguf, "--parallel", n, *off]) for n in counts]
    servers += [(f"avgguf serve --parallel {counts[-1]} --contexts 2 --merge off", [*avgguf, *last, "--contexts", "2", *off])]
    return servers + default


def stock_servers(binary: str | None, issue25: bool) -> list[tuple[str, list[str]]]:
    """(label, command) of llama-server --parallel 8, default K/V and (unless issue25) --kv-unified."""
    if not binary:
        return []
    from avgguf.config.builtin import builtin_path

    avs = ",".join(f"{ROOT / 'modelfiles' / 'avs' / n}.gguf:0" for n in ("medical", "legal", "financial"))
    stock = [binary, "-m", str(builtin_path()), "--lora-scaled", avs, "--parallel", "8", "-t", str(os.cpu_count())]
    stock += ["-c", "8192", "-nr"]  # no repacked/AMX weights: avgguf's own policy on AMX CPUs (there they SIGILL)
    servers = [("llama-server --parallel 8", stock)]
    return servers if issue25 else [*servers, ("llama-server --parallel 8 --kv-unified", [*stock, "-kvu"])]


def measure(urls: dict[str, str], cells: list[tuple[int, bool]], args) -> dict:
    """Warm-up, then `args.rounds` rounds of every cell with the servers alternating: {(label, cell): [runs]}."""
    for label, url in urls.items():  # warm-up: one-set traffic (makes that set hot where merging is on)
        scenario(url, 8, False, 16, args.max_tokens)
        quiet(url)
    runs = {(label, cell): [] for label in urls for cell in cells}
    for r in range(args.rounds):
        for cell in cells:
            for label, url in urls.items():
                runs[label, cell].append(scenario(url, *cell, args.requests, args.max_tokens))
                quiet(url)
                print(f"  round {r} {label} {cell}: {runs[label, cell][-1]}", file=sys.stderr, flush=True)
    return runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=24, help="requests per scenario")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3, help="rounds; each scenario alternates the servers; medians")
    ap.add_argument("--parallel", default="1,8", help="avgguf serve --parallel values to measure (--merge off)")
    ap.add_argument("--llama-server", help="a llama-server binary to measure side by side (--parallel 8)")
    ap.add_argument("--issue25", action="store_true", help="issue #25's load only (see above)")
    args = ap.parse_args()
    servers = avgguf_servers(args.parallel.split(","), args.issue25) + stock_servers(args.llama_server, args.issue25)
    cells = [(1, False), (8, False)] if args.issue25 else [(c, alt) for c in (1, 4, 8) for alt in (False, True)]
    live, urls = [], {}
    try:
        for label, cmd in servers:  # all up at once (idle servers use no CPU); measured one at a time
            live.append(start_server(cmd, program=(), timeout=90))
            urls[label] = live[-1].url
        runs = measure(urls, cells, args)
        agree = {label: agreement(url, args.max_tokens) for label, url in urls.items()}
        agree_one = {label: agreement(url, args.max_tokens, one_set=True) for label, url in urls.items()}
        merged = {label: card(url).get("avgguf", {}).get("merged_sets") for label, url in urls.items()}
    finally:
        for srv in live:
            srv.stop()
    report(args, urls, cells, runs, agree, agree_one, merged)


def report(args, urls, cells, runs, agree, agree_one, merged) -> None:
    print(
        f"SmolLM2-135M Q4_1 + the 3 demo AVs, {args.requests} greedy chat requests per cell, max_tokens "
        f"{args.max_tokens}, {os.cpu_count()} cores; servers alternate within each cell, median of "
        f"{args.rounds} rounds. One set: expert-all (all three AVs at 1); alternating: 4 profiles.\n"
    )
    print("| server | clients | coefficient sets | requests/s | generated tok/s | p50 latency (s) | p99 latency (s) |")
    print("|---|---|---|---|---|---|---|")
    for cell in cells:
        for label in urls:
            rps, tps, p50, p99 = (statistics.median(col) for col in zip(*runs[label, cell]))
            mode = "4 alternating sets" if cell[1] else "one set"
            print(f"| {label} | {cell[0]} | {mode} | {rps:.2f} | {tps:.1f} | {p50:.2f} | {p99:.2f} |")
    for title, counts in (("4 questions x expert-all, 4 times", agree_one), ("4 questions x 4 sets", agree)):
        print(f"\nGreedy answers of 16 concurrent requests ({title}) equal to the same requests one by one:\n")
        for label, n in counts.items():
            print(f"- {label}: {n}/16")
    print("\nSets on merged weights at the end:\n")
    for label, sets in merged.items():
        if sets is not None:
            print(f"- {label}: {sets}")


if __name__ == "__main__":
    main()
