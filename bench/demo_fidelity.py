"""How much of a trained demo AV the GGUF adapter keeps, vs the full-precision delta, at several ranks.

    python recipes/train_dpo.py --domain medical --out runs/medical      # the trained pair
    python bench/demo_fidelity.py --runs runs --domains medical [--limit 16]

For each setting, in llama.cpp on f32 copies of SmolLM2 (f32 KV cache), over held-out eval queries:
- preference margin: mean of [logp(expert) - mean(logp(generic), logp(avoidance))] (length-normalised);
  "margin kept" = (adapter - base) / (merged - base), where merged = the full-precision fine-tuned model;
- KL(merged || base+adapter) of next-token distributions along prompt + expert answer, nats/token;
- expert share of the level judge.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from fidelity import kl  # bench/fidelity.py: a script's own folder is importable

from avgguf.eval.judge import Judge, read_eval_data
from avgguf.runtime.engine import Engine
from avgguf.testing.reference import f32_gguf

DATA = Path(__file__).resolve().parent.parent / "data" / "preferences" / "eval.jsonl"
SETTINGS = [
    ["--rank", "4", "--dtype", "f16"],
    ["--rank", "8", "--dtype", "f16"],
    ["--rank", "16", "--dtype", "q8_0"],
    ["--rank", "16", "--dtype", "f16"],
    ["--rank", "64", "--dtype", "f16"],
    ["--energy", "0.9", "--dtype", "f16"],
]


def measure(model: Path, adapter: Path | None, rows: list[dict]) -> tuple[float, float, list[np.ndarray]]:
    eng = Engine(model, n_ctx=1024, logits_all=True, type_k=0, type_v=0)
    if adapter is not None:
        eng.load_adapter("av", adapter)
        eng.set_coefficients({"av": 1.0})
    judge = Judge(eng)
    margins, experts, dists = [], [], []
    for r in rows:
        s = judge.scores(r)
        margins.append(s[2] - (s[0] + s[1]) / 2)
        experts.append(int(np.argmax(s) == 2))
        tokens = judge.tokens(eng.format_chat([{"role": "user", "content": r["query"]}])) + judge.tokens(r["responses"]["expert"])
        dists.append(eng.all_logits(tokens))
    eng.close()
    return float(np.mean(margins)), float(np.mean(experts)), dists


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=Path, required=True, help="directory with <domain>/base and <domain>/aligned")
    ap.add_argument("--domains", nargs="+", default=["medical"])
    ap.add_argument("--limit", type=int, default=16)
    ap.add_argument(
        "--shipped-only", action="store_true", help="score only the shipped modelfiles/avs/<domain>.gguf (no conversions)"
    )
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="avgguf-demo-fid-"))
    print("| domain | adapter | size (MB) | AV energy kept | margin kept | KL(merged ‖ adapter) | expert share |")
    print("|---|---|---|---|---|---|---|")
    for domain in args.domains:
        rows = read_eval_data(DATA, domain)
        rows = rows[:: max(1, -(-len(rows) // args.limit))][: args.limit]
        base_dir, aligned_dir = args.runs / domain / "base", args.runs / domain / "aligned"
        base_gguf = f32_gguf(base_dir, work / "base.gguf")
        merged_gguf = f32_gguf(aligned_dir, work / "merged.gguf")
        m_base, e_base, d_base = measure(base_gguf, None, rows)
        m_merged, e_merged, d_merged = measure(merged_gguf, None, rows)

        def kl_to_merged(dists):
            return float(np.mean([kl(m, d) for m, d in zip(d_merged, dists)]))

        print(f"| {domain} | base (λ=0) | - | - | 0% | {kl_to_merged(d_base):.3f} | {e_base:.2f} |", flush=True)
        shipped = Path(__file__).resolve().parent.parent / "modelfiles" / "avs" / f"{domain}.gguf"
        from avgguf.gguf import adapter_format as fmt

        kept = fmt.read_adapter(shipped).meta[fmt.KEY_ENERGY_KEPT]
        m, e, d = measure(base_gguf, shipped, rows)
        print(
            f"| {domain} | shipped `modelfiles/avs/{domain}.gguf` | {shipped.stat().st_size / 1e6:.1f} | {kept:.1%} | "
            f"{(m - m_base) / (m_merged - m_base):.0%} | {kl_to_merged(d):.4f} | {e:.2f} |",
            flush=True,
        )
        for conv in [] if args.shipped_only else SETTINGS:
            out = work / "av.gguf"
            t0 = time.perf_counter()
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "avgguf.cli",
                    "convert",
                    "--base",
                    str(base_dir),
                    "--aligned",
                    str(aligned_dir),
                    "--out",
                    str(out),
                    *conv,
                ],
                check=True,
                capture_output=True,
            )
            from avgguf.gguf import adapter_format as fmt

            kept = fmt.read_adapter(out).meta[fmt.KEY_ENERGY_KEPT]
            m, e, d = measure(base_gguf, out, rows)
            print(
                f"| {domain} | `{' '.join(conv)}` | {out.stat().st_size / 1e6:.1f} | {kept:.1%} | "
                f"{(m - m_base) / (m_merged - m_base):.0%} | {kl_to_merged(d):.4f} | {e:.2f} |",
                flush=True,
            )
            print(f"  ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
        print(f"| {domain} | full-precision fine-tune (merged) | - | 100% | 100% | 0 | {e_merged:.2f} |", flush=True)


if __name__ == "__main__":
    main()
