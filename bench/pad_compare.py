"""Weight-space AVs vs PAD vs pad-full vs prompting, side by side on the demo AVs (issue #11's table).

    python bench/pad_compare.py [--queries 10] [--max-tokens 96] [--weight 1.0]

Per domain: the expert share of generated answers (level classifier trained on data/preferences/train.jsonl)
and of the reference responses (the level judge), generation tok/s and the memory each method adds.
Settings: the domain's AV at λ = w = --weight (others 0); prompting = the base with an expert system prompt.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from avgguf.runtime.engine import Engine
from avgguf.eval.judge import EXPERT_PROMPT, Judge, pad_sweep, read_eval_data, sweep
from avgguf.eval.levels import LevelClassifier
from avgguf.config.modelfile import load_modelfile
from avgguf.runtime.session import GenerationRequest, Runtime

ROOT = Path(__file__).resolve().parent.parent
METHODS = ("base", "prompting", "weights", "pad", "pad-full")


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))


def generate(rt: Runtime, rows: list[dict], method: str, av: str, w: float, zero: dict, max_tokens: int):
    """Answers, generated tok/s and the RSS growth while generating (PAD's extra contexts)."""
    answers, tokens, seconds, peak = [], 0, 0.0, 0.0
    coefs = {**zero, av: w} if method in ("weights", "pad", "pad-full") else zero
    decode = method if method in ("pad", "pad-full") else "weights"
    before = rss_mb()
    for row in rows:
        messages = ([{"role": "system", "content": EXPERT_PROMPT}] if method == "prompting" else []) + [
            {"role": "user", "content": row["query"]}
        ]
        req = GenerationRequest(messages=messages, max_tokens=max_tokens, temperature=0.0, seed=0, repeat_penalty=1.0)
        t0 = time.perf_counter()
        pieces = []
        for piece in rt.stream_chat_text(req, coefs, decode=decode):
            pieces.append(piece)
            peak = max(peak, rss_mb() - before) if len(pieces) == 8 else peak
        seconds += time.perf_counter() - t0
        tokens += rt.count_tokens("".join(pieces))
        answers.append("".join(pieces))
    return answers, tokens / seconds, peak


def reference_share(eng: Engine, rows: list[dict], method: str, av: str, w: float, zero: dict) -> float:
    if method in ("pad", "pad-full"):
        return pad_sweep(eng, rows, av, [w], zero, method).shares[0]["expert"]
    if method == "prompting":
        eng.set_coefficients(zero)
        return Judge(eng).level_shares(rows, system=EXPERT_PROMPT)["expert"]
    return sweep(eng, rows, av, [w if method == "weights" else 0.0], zero).shares[0]["expert"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--queries", type=int, default=10)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--weight", type=float, default=1.0)
    args = ap.parse_args()
    mf = load_modelfile(ROOT / "modelfiles" / "demo.yaml")
    rows = read_eval_data(ROOT / "data" / "preferences" / "eval.jsonl")
    clf = LevelClassifier.train(read_eval_data(ROOT / "data" / "preferences" / "train.jsonl"))
    zero = {n: 0.0 for n in mf.av_paths}
    rt = Runtime(mf, n_ctx=1024, fuse="sync")
    eng = Engine(mf.base_path, n_ctx=1024, logits_all=True, fuse="sync")
    for name, path in mf.av_paths.items():
        eng.load_adapter(name, path)
    table = []
    try:
        for domain in mf.av_paths:
            drows = [r for r in rows if r["domain"] == domain]
            drows = drows[:: max(1, len(drows) // args.queries)][: args.queries]
            for method in METHODS:
                answers, tps, extra = generate(rt, drows, method, domain, args.weight, zero, args.max_tokens)
                table.append(
                    (
                        domain,
                        method,
                        clf.shares(answers)["expert"],
                        reference_share(eng, drows, method, domain, args.weight, zero),
                        tps,
                        extra,
                    )
                )
                print(f"{domain} {method}: {table[-1][2:]}", flush=True)
    finally:
        rt.close()
        eng.close()
    base_tps = {d: tps for d, m, _, _, tps, _ in table if m == "base"}
    print(
        f"\nDemo AVs, λ = w = {args.weight:g} for the domain's AV, {args.queries} held-out queries per domain, greedy "
        f"{args.max_tokens} tokens; level classifier accuracy on held-out references "
        f"{clf.accuracy(rows):.2f}:\n"
    )
    print("| domain | method | expert share, generated | expert share, references | gen tok/s | vs base | extra memory |")
    print("|---|---|---|---|---|---|---|")
    for domain, method, gen, ref, tps, extra in table:
        print(f"| {domain} | {method} | {gen:.2f} | {ref:.2f} | {tps:.1f} | {tps / base_tps[domain]:.2f} | {extra:.0f} MB |")


if __name__ == "__main__":
    main()
