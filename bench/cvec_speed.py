"""Generation speed with live control vectors next to live LoRA AVs, and what a knob change costs, on the
embedded SmolLM2-135M Q4_1 (issue #23: three active control vectors at >= 0.97 of base speed).

    python bench/cvec_speed.py [--threads 2] [--tokens 128] [--repeats 3] [--out bench/results/cvec_speed.md]

One engine holds the demo's three LoRA AVs (modelfiles/demo.yaml) and three control vectors (random directions
for blocks 1..29, about the norm of a fitted one; speed does not depend on the values). Settings alternate
within each round (base, 1 CV, 3 CVs, 1 AV, 3 AVs, ...) so drifting load on a shared machine hits them
alike; generation tok/s is llama.cpp's own counter (prompt excluded), median over rounds. Knob change: time
from `set_coefficients` with a new value to the first streamed token of the same prompt (KV reset + prompt
evaluation + one token), median.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from avgguf.config.modelfile import load_modelfile
from avgguf.gguf import control_vector as cvf
from avgguf.runtime.engine import Engine

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "<|im_start|>user\nWhat should I do about a persistent cough?<|im_end|>\n<|im_start|>assistant\n"


def make_vectors(root: Path, n_embd: int, n_layer: int, norm: float = 4.0) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    out = {}
    for name in ("cv1", "cv2", "cv3"):
        dirs = {}
        for layer in range(1, n_layer):
            v = rng.standard_normal(n_embd).astype(np.float32)
            dirs[layer] = v * (norm / np.linalg.norm(v))
        out[name] = cvf.write_control_vector(root / f"{name}.gguf", dirs, "llama")
    return out


def gen_rate(eng: Engine, tokens: int) -> float:
    eng.reset()
    eng.perf_reset()
    eng.completion(PROMPT, max_tokens=tokens, temperature=0.0)
    perf = eng.perf()
    return 1000 * perf.gen_tokens / perf.gen_ms


def first_token_ms(eng: Engine, coefs: dict[str, float]) -> float:
    t0 = time.perf_counter()
    eng.set_coefficients(coefs)
    for _ in eng.completion(PROMPT, max_tokens=1, temperature=0.0, stream=True):
        break
    return 1000 * (time.perf_counter() - t0)


def settings(avs: list[str]) -> list[tuple[str, dict[str, float]]]:
    return [
        ("base (all knobs loaded, all 0)", {}),
        ("1 control vector", {"cv1": 1.0}),
        ("3 control vectors", {"cv1": 1.0, "cv2": -0.5, "cv3": 0.3}),
        ("1 LoRA AV (rank 16 q8_0)", {avs[0]: 1.0}),
        ("3 LoRA AVs (separate, fuse off)", dict(zip(avs, (0.8, -0.5, 0.3)))),
        ("3 LoRA AVs + 3 control vectors", {**dict(zip(avs, (0.8, -0.5, 0.3))), "cv1": 1.0, "cv2": -0.5, "cv3": 0.3}),
    ]


def measure(eng: Engine, avs: list[str], tokens: int, repeats: int) -> list[tuple[str, float, list[float]]]:
    rates: dict[str, list[float]] = {}
    table = settings(avs)
    eng.set_coefficients({})
    gen_rate(eng, 16)  # warm up
    for _ in range(repeats):
        for label, coefs in table:  # alternating within each round
            eng.set_coefficients(coefs)
            rates.setdefault(label, []).append(gen_rate(eng, tokens))
            print(f"{label}: {rates[label][-1]:.1f} tok/s", file=sys.stderr, flush=True)
    return [(label, statistics.median(rates[label]), rates[label]) for label, _ in table]


def knob_change(eng: Engine, avs: list[str], repeats: int) -> list[tuple[str, float]]:
    kinds = [
        ("control vector (`llama_set_adapter_cvec` + KV reset + prompt)", lambda i: {"cv1": 0.5 + 0.1 * (i % 5)}),
        ("LoRA AV (`llama_set_adapters_lora` + KV reset + prompt)", lambda i: {avs[0]: 0.5 + 0.1 * (i % 5)}),
        ("same coefficients again (no-op, prompt prefix reused)", lambda i: {"cv1": 1.0}),
    ]
    times: dict[str, list[float]] = {}
    first_token_ms(eng, {"cv1": 1.0})
    for i in range(2 * repeats + 1):
        for label, coefs in kinds:
            if label.startswith("same"):
                first_token_ms(eng, coefs(i))
            times.setdefault(label, []).append(first_token_ms(eng, coefs(i)))
    return [(label, statistics.median(times[label])) for label, _ in kinds]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, help="also write the tables here (Markdown)")
    args = ap.parse_args()
    mf = load_modelfile(ROOT / "modelfiles" / "demo.yaml")
    avs = list(mf.av_paths)
    eng = Engine(mf.base_path, n_ctx=1024, threads=args.threads, fuse="off")
    with tempfile.TemporaryDirectory() as tmp:
        for name, path in mf.av_paths.items():
            eng.load_adapter(name, path)
        for name, path in make_vectors(Path(tmp), eng.control_vectors.n_embd, eng.control_vectors.n_layer).items():
            eng.load_adapter(name, path)
        rows = measure(eng, avs, args.tokens, args.repeats)
        changes = knob_change(eng, avs, args.repeats)
    eng.close()
    base = rows[0][1]
    lines = [
        f"Generation speed, SmolLM2-135M-Instruct Q4_1, {args.threads} threads, {args.tokens} tokens greedy, "
        f"median of {args.repeats} alternating rounds, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}, "
        f"load average {os.getloadavg()[0]:.1f} at the end (`python bench/cvec_speed.py`):",
        "",
        "| setting | generation tok/s | relative to base | rounds |",
        "|---|---|---|---|",
        *(f"| {label} | {rate:.1f} | {rate / base:.3f} | {', '.join(f'{r:.1f}' for r in runs)} |" for label, rate, runs in rows),
        "",
        "Knob change, time to the first new token (median):",
        "",
        "| what | ms |",
        "|---|---|",
        *(f"| {label} | {ms:.0f} |" for label, ms in changes),
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
