"""How much of a real full-parameter DPO alignment a compact AV keeps, per size budget and method.

    pip install -e '.[train]'
    python recipes/train_dpo.py --domain medical --out runs/medical-full --all-tensors    # ~2-4 min
    python bench/fidelity.py --pair runs/medical-full [--budgets 2.5MB 5MB 10MB 20MB] [--fit-steps 200]
        [--mergekit-bin DIR --convert-lora PATH]     # community baseline rows (see README)

Scored in llama.cpp on f32 copies of SmolLM2 (f32 KV cache) against the aligned model itself, over the
held-out eval queries of the domain (data/preferences/eval.jsonl):
- margin recovery = (margin(base+AV) - margin(base)) / (margin(aligned) - margin(base)), where margin =
  mean log p(expert) - mean(log p(generic), log p(avoidance)) per token (1 = perfect);
- KL ratio = KL(aligned || base+AV) / KL(aligned || base), next-token distributions along prompt + each of
  the three reference answers (0 = perfect);
- convert seconds and peak RSS of the conversion process, file size;
- generation speed of base + AV at scale 1 on the shipped Q4_1 SmolLM2, relative to the base alone
  (alternating runs, medians).
Prints a Markdown table (and writes it as JSON beside --out).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from avgguf.testing.reference import f32_gguf

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data" / "preferences" / "eval.jsonl"
# runs a command as a child and reports its peak RSS (the largest child's, in KB)
RSS_WRAPPER = (
    "import resource, subprocess, sys\np = subprocess.run(sys.argv[1:])\n"
    "print('MAXRSS_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr)\n"
    "sys.exit(p.returncode)"
)
SPEED_PROMPT = "<|im_start|>user\nWhat should I do about a persistent cough?<|im_end|>\n<|im_start|>assistant\n"


def kl(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    def log_softmax(x):
        x = x - x.max(axis=-1, keepdims=True)
        return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))

    lp, lq = log_softmax(p_logits.astype(np.float64)), log_softmax(q_logits.astype(np.float64))
    return float(np.mean(np.sum(np.exp(lp) * (lp - lq), axis=-1)))


def measure(model: Path, adapter: Path | None, rows: list[dict]) -> tuple[float, list[np.ndarray]]:
    """Mean preference margin and the logits along prompt + each reference answer."""
    from avgguf.runtime.engine import Engine
    from avgguf.eval.judge import LEVELS, Judge

    eng = Engine(model, n_ctx=1024, logits_all=True, type_k=0, type_v=0)
    if adapter is not None:
        eng.load_adapter("av", adapter)
        eng.set_coefficients({"av": 1.0})
    judge = Judge(eng)
    margins, dists = [], []
    for r in rows:
        s = judge.scores(r)
        margins.append(s[2] - (s[0] + s[1]) / 2)
        prompt = judge.tokens(eng.format_chat([{"role": "user", "content": r["query"]}]))
        for level in LEVELS:
            dists.append(eng.all_logits(prompt + judge.tokens(r["responses"][level])))
    eng.close()
    return float(np.mean(margins)), dists


def speed_ratio(adapter: Path, repeats: int) -> float:
    """Generation tok/s of base + adapter over base alone on the shipped Q4_1 model (alternating, medians)."""
    from avgguf.runtime.engine import Engine
    from avgguf.config.builtin import builtin_path

    eng = Engine(builtin_path(), n_ctx=512, threads=2)
    eng.load_adapter("av", adapter)
    rates = {0.0: [], 1.0: []}
    for _ in range(repeats):
        for scale in (0.0, 1.0):
            eng.set_coefficients({"av": scale})
            eng.reset()
            t0 = time.perf_counter()
            out = eng.completion(SPEED_PROMPT, max_tokens=64, temperature=0.0)
            rates[scale].append(out["usage"]["completion_tokens"] / (time.perf_counter() - t0))
    eng.close()
    return statistics.median(rates[1.0]) / statistics.median(rates[0.0])


def timed(cmd: list[str]) -> tuple[float, float]:
    """Runs a command in its own process: (seconds, peak RSS in MB)."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", RSS_WRAPPER, *cmd], capture_output=True, text=True, cwd=ROOT)
    secs = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    rss = next(int(line.split()[1]) for line in proc.stderr.splitlines() if line.startswith("MAXRSS_KB"))
    return secs, rss / 1024


def run_convert(args: list[str]) -> tuple[float, float]:
    return timed([sys.executable, "-m", "avgguf.cli", "convert", *args])


def mergekit_adapter(pair: Path, rank: int, out: Path, bin_dir: Path, convert_lora: Path) -> tuple[float, float]:
    """mergekit-extract-lora -> llama.cpp convert_lora_to_gguf.py (the community pipeline): seconds, peak RSS.
    `-e embed_tokens -e lm_head`: without them llama.cpp refuses (or crashes on) the tied-embedding result."""
    work = out.parent / f"mk-r{rank}"
    s1, r1 = timed(
        [
            str(bin_dir / "mergekit-extract-lora"),
            "--model",
            str(pair / "aligned"),
            "--base-model",
            str(pair / "base"),
            "--out-path",
            str(work),
            "--max-rank",
            str(rank),
            "-e",
            "embed_tokens",
            "-e",
            "lm_head",
        ]
    )
    s2, r2 = timed(
        [
            str(bin_dir / "python"),
            str(convert_lora),
            str(work),
            "--base",
            str(pair / "base"),
            "--outtype",
            "f16",
            "--outfile",
            str(out),
        ]
    )
    return s1 + s2, max(r1, r2)


RANK_FOR_BUDGET = {"2.5MB": 4, "5MB": 8, "10MB": 16, "20MB": 32}  # largest uniform f16 rank within the budget


def settings(
    budgets: list[str], distill_budgets: list[str], steps: int, calibration: str | None
) -> list[tuple[str, str, list[str]]]:
    fit = ["--fit", "distill", "--fit-steps", str(steps)] + (["--calibration", calibration] if calibration else [])
    out = []
    for b in budgets:
        r = str(RANK_FOR_BUDGET[b])
        out.append((b, f"SVD, rank {r} f16", ["--rank", r]))
        out.append((b, "mixed precision", ["--max-size", b]))
        if b in distill_budgets:
            out.append((b, f"distill, rank {r} f16", ["--rank", r, *fit]))
            out.append((b, "mixed precision + distill", ["--max-size", b, *fit]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pair", type=Path, required=True, help="directory with base/ and aligned/ HF checkpoints")
    ap.add_argument("--domain", default="medical")
    ap.add_argument("--limit", type=int, default=16, help="eval queries (evenly spaced)")
    ap.add_argument("--budgets", nargs="+", default=list(RANK_FOR_BUDGET), choices=list(RANK_FOR_BUDGET))
    ap.add_argument(
        "--distill-budgets",
        nargs="*",
        default=list(RANK_FOR_BUDGET),
        choices=list(RANK_FOR_BUDGET),
        help="budgets that also get the two --fit distill rows (each costs minutes)",
    )
    ap.add_argument("--fit-steps", type=int, default=200)
    ap.add_argument("--calibration", help="--calibration for the distill rows (default: the built-in set)")
    ap.add_argument("--speed-repeats", type=int, default=3)
    ap.add_argument("--full-rank", action="store_true", help="also score a full-rank f32 adapter (633 MB)")
    ap.add_argument("--mergekit-bin", type=Path, help="bin/ of a venv with mergekit (torch 2.13.0)")
    ap.add_argument("--convert-lora", type=Path, help="llama.cpp's convert_lora_to_gguf.py")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "fidelity.json")
    args = ap.parse_args()

    from avgguf.gguf import adapter_format as fmt
    from avgguf.eval.judge import read_eval_data

    work = Path(tempfile.mkdtemp(prefix="avgguf-fidelity-"))
    rows = read_eval_data(DATA, args.domain)
    rows = rows[:: max(1, -(-len(rows) // args.limit))][: args.limit]
    base_gguf = f32_gguf(args.pair / "base", work / "base.gguf")
    aligned_gguf = f32_gguf(args.pair / "aligned", work / "aligned.gguf")
    m_base, d_base = measure(base_gguf, None, rows)
    m_aligned, d_aligned = measure(aligned_gguf, None, rows)
    kl_base = float(np.mean([kl(a, b) for a, b in zip(d_aligned, d_base)]))
    print(
        f"{args.domain}, {len(rows)} held-out queries: margin base {m_base:.3f}, aligned {m_aligned:.3f}; "
        f"KL(aligned || base) {kl_base:.4f} nats/token",
        file=sys.stderr,
    )

    def score(label: str, budget: str, adapter: Path, secs: float, rss: float) -> dict:
        m, d = measure(base_gguf, adapter, rows)
        row = {
            "budget": budget,
            "method": label,
            "size_mb": adapter.stat().st_size / 1e6,
            "margin_recovery": (m - m_base) / (m_aligned - m_base),
            "kl_ratio": float(np.mean([kl(a, b) for a, b in zip(d_aligned, d)])) / kl_base,
            "convert_s": secs,
            "peak_rss_mb": rss,
            "speed": speed_ratio(adapter, args.speed_repeats),
            "fit": fmt.read_adapter(adapter).meta.get(fmt.KEY_FIT_KL_AFTER),
        }
        print(f"  {row}", file=sys.stderr, flush=True)
        return row

    results = []
    common = ["--base", str(args.pair / "base"), "--aligned", str(args.pair / "aligned")]
    for budget, label, conv in settings(args.budgets, args.distill_budgets, args.fit_steps, args.calibration):
        out = work / "av.gguf"
        secs, rss = run_convert([*common, "--out", str(out), *conv])
        results.append(score(f"`{' '.join(conv)}` ({label})", budget, out, secs, rss))
    if args.mergekit_bin and args.convert_lora:
        for rank in (16, 64):
            out = work / f"mk{rank}.gguf"
            secs, rss = mergekit_adapter(args.pair, rank, out, args.mergekit_bin, args.convert_lora)
            results.append(score(f"mergekit-extract-lora → convert_lora_to_gguf.py, rank {rank} f16", "-", out, secs, rss))
    if args.full_rank:
        out = work / "full.gguf"
        secs, rss = run_convert([*common, "--out", str(out), "--rank", "576", "--dtype", "f32"])
        results.append(score("full rank f32", "-", out, secs, rss))

    print("| budget | adapter | size (MB) | margin recovery | KL ratio | convert (s) | peak RSS (MB) | tok/s vs base |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['budget']} | {r['method']} | {r['size_mb']:.2f} | {r['margin_recovery']:.3f} | "
            f"{r['kl_ratio']:.3f} | {r['convert_s']:.1f} | {r['peak_rss_mb']:.0f} | {r['speed']:.2f} |"
        )
    args.out.write_text(
        json.dumps(
            {
                "domain": args.domain,
                "n_queries": len(rows),
                "kl_aligned_base": kl_base,
                "margin_base": m_base,
                "margin_aligned": m_aligned,
                "rows": results,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
