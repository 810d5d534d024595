"""Generation speed with live AVs, and what a knob change costs, on the embedded SmolLM2-135M Q4_1.

    python bench/runtime_speed.py [--threads 2] [--tokens 128] [--repeats 3]

Uses modelfiles/demo.yaml (three rank-16 q8_0 AVs). Prints Markdown tables.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from avgguf.engine import Engine
from avgguf.modelfile import load_modelfile

PROMPT = "<|im_start|>user\nWhat should I do about a persistent cough?<|im_end|>\n<|im_start|>assistant\n"


def first_token_seconds(eng: Engine, prompt: str) -> float:
    t0 = time.perf_counter()
    for _ in eng.llm.create_completion(prompt, max_tokens=1, temperature=0.0, stream=True):
        break
    return time.perf_counter() - t0


def tokens_per_second(eng: Engine, n: int, repeats: int) -> tuple[float, float]:
    rates, prompt_rates = [], []
    for _ in range(repeats):
        eng.llm.reset()
        t0 = time.perf_counter()
        out = eng.llm.create_completion(PROMPT, max_tokens=n, temperature=0.0)
        total = time.perf_counter() - t0
        n_gen = out["usage"]["completion_tokens"]
        n_prompt = out["usage"]["prompt_tokens"]
        # prompt eval measured separately so the generation rate is not diluted by it
        eng.llm.reset()
        t1 = time.perf_counter()
        eng.llm.eval(eng.llm.tokenize(PROMPT.encode(), add_bos=False, special=True))
        prompt_s = time.perf_counter() - t1
        rates.append(n_gen / max(total - prompt_s, 1e-9))
        prompt_rates.append(n_prompt / prompt_s)
    return statistics.median(rates), statistics.median(prompt_rates)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    mf = load_modelfile(Path(__file__).resolve().parent.parent / "modelfiles" / "demo.yaml")
    names = list(mf.av_paths)

    def engine(load_avs: bool = True) -> Engine:
        e = Engine(mf.base_path, n_ctx=1024, n_threads=args.threads)
        if load_avs:
            for name, path in mf.av_paths.items():
                e.load_adapter(name, path)
        return e

    eng = engine()
    rows = []
    for label, coefs in [("base (AVs loaded, all 0)", {}), ("1 AV (medical=1)", {names[0]: 1.0}),
                         ("3 AVs (all 1)", {n: 1.0 for n in names}),
                         ("3 AVs (0.8, -0.5, 0.3)", dict(zip(names, (0.8, -0.5, 0.3))))]:
        eng.set_coefficients(coefs)
        gen, prompt = tokens_per_second(eng, args.tokens, args.repeats)
        rows.append((label, gen, prompt))
    base_gen = rows[0][1]
    print(f"Generation speed, SmolLM2-135M-Instruct Q4_1, {args.threads} threads, {args.tokens} tokens greedy, "
          f"median of {args.repeats}:\n")
    print("| setting | generation tok/s | relative | prompt tok/s |")
    print("|---|---|---|---|")
    for label, gen, prompt in rows:
        print(f"| {label} | {gen:.1f} | {gen / base_gen:.2f} | {prompt:.0f} |")

    # knob change cost: time to the first new token
    change, same = [], []
    for i in range(args.repeats * 2):
        eng.set_coefficients({names[0]: 0.5 + 0.1 * i})  # a new set: KV cache reset
        change.append(first_token_seconds(eng, PROMPT))
        eng.set_coefficients({names[0]: 0.5 + 0.1 * i})  # same set again: free, prefix reused
        same.append(first_token_seconds(eng, PROMPT))
    eng.close()
    reload_ = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        e = engine()
        e.set_coefficients({names[0]: 0.7})
        first_token_seconds(e, PROMPT)
        reload_.append(time.perf_counter() - t0)
        e.close()
    print("\nKnob change cost (time to the first new token, median):\n")
    print("| what | ms |")
    print("|---|---|")
    print(f"| same coefficients again (no-op, prompt prefix reused) | {1000 * statistics.median(same):.0f} |")
    print(f"| new coefficients (`llama_set_adapters_lora` + KV reset + prompt) | {1000 * statistics.median(change):.0f} |")
    print(f"| reload base + 3 AVs, then prompt | {1000 * statistics.median(reload_):.0f} |")


if __name__ == "__main__":
    main()
