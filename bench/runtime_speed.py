"""Generation speed with live AVs, and what a knob change costs, on the embedded SmolLM2-135M Q4_1.

    python bench/runtime_speed.py [--threads 2] [--tokens 128] [--repeats 3]
    python bench/runtime_speed.py --under-load [--repeats 3]

Uses modelfiles/demo.yaml (three AVs). Prints Markdown tables. --under-load compares thread policies idle
and with two competing busy processes (each measurement in a fresh process, policies alternating).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

from avgguf.runtime.engine import Engine
from avgguf.config.modelfile import load_modelfile

PROMPT = "<|im_start|>user\nWhat should I do about a persistent cough?<|im_end|>\n<|im_start|>assistant\n"


def first_token_seconds(eng: Engine, prompt: str) -> float:
    t0 = time.perf_counter()
    for _ in eng.completion(prompt, max_tokens=1, temperature=0.0, stream=True):
        break
    return time.perf_counter() - t0


def tokens_per_second(eng: Engine, n: int, repeats: int) -> tuple[float, float]:
    rates, prompt_rates = [], []
    for _ in range(repeats):
        eng.reset()
        t0 = time.perf_counter()
        out = eng.completion(PROMPT, max_tokens=n, temperature=0.0)
        total = time.perf_counter() - t0
        n_gen = out["usage"]["completion_tokens"]
        n_prompt = out["usage"]["prompt_tokens"]
        # prompt eval measured separately so the generation rate is not diluted by it
        tokens = eng.tokenize(PROMPT)
        t1 = time.perf_counter()
        eng.next_logits(tokens)
        prompt_s = time.perf_counter() - t1
        rates.append(n_gen / max(total - prompt_s, 1e-9))
        prompt_rates.append(n_prompt / prompt_s)
    return statistics.median(rates), statistics.median(prompt_rates)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--under-load", action="store_true", help="thread policies idle vs two busy processes")
    ap.add_argument("--child", choices=sorted(POLICIES), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.tokens)
    if args.under_load:
        return under_load(args.tokens, args.repeats)
    mf = load_modelfile(Path(__file__).resolve().parent.parent / "modelfiles" / "demo.yaml")
    names = list(mf.av_paths)

    def engine(load_avs: bool = True) -> Engine:
        e = Engine(mf.base_path, n_ctx=1024, threads=args.threads)
        if load_avs:
            for name, path in mf.av_paths.items():
                e.load_adapter(name, path)
        return e

    eng = engine()
    rows = []
    for label, coefs in [
        ("base (AVs loaded, all 0)", {}),
        ("1 AV (medical=1)", {names[0]: 1.0}),
        ("3 AVs (all 1)", {n: 1.0 for n in names}),
        ("3 AVs (0.8, -0.5, 0.3)", dict(zip(names, (0.8, -0.5, 0.3)))),
    ]:
        eng.set_coefficients(coefs)
        gen, prompt = tokens_per_second(eng, args.tokens, args.repeats)
        rows.append((label, gen, prompt))
    base_gen = rows[0][1]
    print(
        f"Generation speed, SmolLM2-135M-Instruct Q4_1, {args.threads} threads, {args.tokens} tokens greedy, "
        f"median of {args.repeats}:\n"
    )
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


# --- under load ------------------------------------------------------------------------------------------

# policy -> (label, environment, how the child builds its model)
POLICIES = {
    "old": ("old default: llama-cpp-python's threads (1 generation, 2 batch)", {}, "llama"),
    "all": ("all cores (2 threads)", {"AVGGUF_THREADS": "2"}, "avgguf"),
    "passive": ("2 threads + OMP_WAIT_POLICY=passive", {"AVGGUF_THREADS": "2", "OMP_WAIT_POLICY": "passive"}, "avgguf"),
    "adaptive": ("**adaptive (new default)**", {"AVGGUF_THREADS": "0"}, "avgguf"),
}
CHAT = [{"role": "user", "content": "Write a short essay about the history of Rome."}]


def child(policy: str, tokens: int) -> None:
    """One answer in this fresh process; prints generation tok/s and end-to-end tok/s as JSON."""
    import json

    from avgguf.config.builtin import builtin_path

    _, _, how = POLICIES[policy]
    if how == "llama":
        from llama_cpp import Llama

        llm = Llama(model_path=str(builtin_path()), n_ctx=1024, verbose=False)
        run = lambda: llm.create_chat_completion(CHAT, max_tokens=tokens, temperature=0.0, stream=True)  # noqa: E731
    else:
        from avgguf.runtime.session import GenerationRequest, Runtime

        mf = load_modelfile(Path(__file__).resolve().parent.parent / "modelfiles" / "smollm2.yaml")
        rt = Runtime(mf, n_ctx=1024)
        req = GenerationRequest(messages=CHAT, max_tokens=tokens, temperature=0.0)
        run = lambda: rt.stream_chat_text(req, {})  # noqa: E731
    time.sleep(0.3)  # let the thread policy see the machine as it is
    t0 = time.perf_counter()
    first, n = None, 0
    for _ in run():
        first = first or time.perf_counter()
        n += 1
    end = time.perf_counter()
    print(json.dumps({"gen_tps": (n - 1) / (end - first), "e2e_tps": n / (end - t0)}))


def _measure(policy: str, tokens: int) -> dict:
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "GOMP_", "AVGGUF_THREADS"))}
    env.update(POLICIES[policy][1])
    out = subprocess.run(
        [sys.executable, __file__, "--child", policy, "--tokens", str(tokens)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def under_load(tokens: int, repeats: int) -> None:
    import subprocess
    import sys

    results: dict[tuple[str, str], list[dict]] = {}
    for state in ("idle", "loaded"):
        hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2 if state == "loaded" else 0)]
        try:
            time.sleep(0.5)
            for _ in range(repeats):
                for policy in POLICIES:  # alternating, so drift hits every policy alike
                    results.setdefault((policy, state), []).append(_measure(policy, tokens))
        finally:
            for h in hogs:
                h.kill()
                h.wait()
    med = {k: {m: statistics.median(r[m] for r in v) for m in ("gen_tps", "e2e_tps")} for k, v in results.items()}
    old_idle = med[("old", "idle")]["gen_tps"]
    print(
        f"Generation under load: SmolLM2-135M-Instruct Q4_1, {tokens} tokens greedy, chat prompt, "
        f"{os.cpu_count()} cores; loaded = two other processes spinning; median of {repeats} fresh processes "
        f"per cell, policies alternating:\n"
    )
    print("| thread policy | idle tok/s | loaded tok/s | loaded / idle | idle vs old default | loaded end-to-end tok/s |")
    print("|---|---|---|---|---|---|")
    for policy, (label, _, _) in POLICIES.items():
        idle, loaded = med[(policy, "idle")], med[(policy, "loaded")]
        print(
            f"| {label} | {idle['gen_tps']:.1f} | {loaded['gen_tps']:.1f} | {loaded['gen_tps'] / idle['gen_tps']:.2f} | "
            f"{idle['gen_tps'] / old_idle:.2f} | {loaded['e2e_tps']:.1f} |"
        )


if __name__ == "__main__":
    main()
