"""Memory over many knob changes: fused adapters are built, swapped in and freed, so RSS stays bounded.

    python bench/knob_churn.py [--changes 1000] [--fuse async|sync]

Three demo AVs on the embedded SmolLM2; every change sets new coefficients, generates 4 tokens, marks the
answer done (`settle`: the fused adapter is built in the background from then on) and sets the same
coefficients again (the request boundary where a finished fused adapter replaces the separate ones).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time
from pathlib import Path

from avgguf.runtime.engine import Engine
from avgguf.config.modelfile import load_modelfile

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--changes", type=int, default=1000)
    ap.add_argument("--fuse", default="async", choices=["async", "sync", "off"])
    ap.add_argument(
        "--pause",
        type=float,
        default=0.0,
        help="seconds between an answer and the next change (a person reading; 0 = knobs moving non-stop, the worst case)",
    )
    args = ap.parse_args()
    mf = load_modelfile(ROOT / "modelfiles" / "demo.yaml")
    eng = Engine(mf.base_path, n_ctx=256, fuse=args.fuse)
    for name, path in mf.av_paths.items():
        eng.load_adapter(name, path)
    names = list(mf.av_paths)
    marks, first_token, fused = {}, [], 0
    for i in range(args.changes):
        coefs = {n: round(0.1 + ((i * (k + 3)) % 19) / 10, 3) for k, n in enumerate(names)}
        eng.set_coefficients(coefs)
        t0 = time.perf_counter()
        for _ in eng.completion(PROMPT, max_tokens=4, temperature=0.0, stream=True):
            first_token.append(1000 * (time.perf_counter() - t0))
            break
        eng.settle()  # the answer is done (what the runtime does after each answer)
        time.sleep(args.pause)
        eng.set_coefficients(coefs)  # a later request with the same set: the fused adapter, when built
        fused += eng.fused
        if i + 1 in (1, 10, 100, args.changes // 2, args.changes):
            marks[i + 1] = rss_mb()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    eng.close()
    print(
        f"{args.changes} knob changes, fuse={args.fuse}, pause {args.pause:g} s, 3 demo AVs: requests served fused "
        f"{fused}/{args.changes}; knob change to first token median {statistics.median(first_token):.0f} ms, "
        f"p95 {sorted(first_token)[int(0.95 * len(first_token))]:.0f} ms\n"
    )
    print("| after changes | " + " | ".join(str(k) for k in marks) + " | peak |")
    print("|---" * (len(marks) + 2) + "|")
    print("| RSS (MB) | " + " | ".join(f"{v:.0f}" for v in marks.values()) + f" | {peak:.0f} |")


if __name__ == "__main__":
    main()
