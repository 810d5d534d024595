"""Which factor type a fused adapter should use: the three demo AVs fused natively (block concatenation),
in f16 and in f32, against three separate adapters and the base, in one run, alternating, median of 5.

    python bench/fused_types.py [--tokens 96] [--repeats 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from gguf import GGMLQuantizationType as QType

from avgguf.runtime.engine import Engine
from avgguf.gguf.fuse import write_fused
from avgguf.config.modelfile import load_modelfile

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "<|im_start|>user\nWhat should I do about a persistent cough?<|im_end|>\n<|im_start|>assistant\n"


def gen_tps(eng: Engine, tokens: int) -> float:
    eng.reset()
    eng.perf_reset()
    eng.completion(PROMPT, max_tokens=tokens, temperature=0.0)
    p = eng.perf()
    return 1000 * p.gen_tokens / p.gen_ms


def adapter_engine(model: Path, adapter: Path | None, threads: int) -> Engine:
    """The model with one adapter at scale 1 (none: the model alone)."""
    eng = Engine(model, n_ctx=512, threads=threads, fuse="off")
    if adapter is not None:
        eng.load_adapter("x", adapter)
        eng.set_coefficients({"x": 1.0})
    return eng


def alternate(engines: dict[str, Engine], tokens: int, repeats: int) -> dict[str, list[float]]:
    """Generation tok/s of every engine, `repeats` rounds, the engines in turn within each round; closes them."""
    runs = {k: [] for k in engines}
    for _ in range(repeats):
        for label, eng in engines.items():
            runs[label].append(gen_tps(eng, tokens))
    for eng in engines.values():
        eng.close()
    return runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    mf = load_modelfile(ROOT / "modelfiles" / "demo.yaml")
    sources = [(n, p, 1.0) for n, p in mf.av_paths.items()]
    engines, sizes = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, float_type in (("fused, native blocks", None), ("fused, f16", QType.F16), ("fused, f32", QType.F32)):
            path = write_fused(sources, Path(tmp) / f"{len(engines)}.gguf", "llama", float_type=float_type)
            sizes[label] = path.stat().st_size / 1e6
            engines[label] = adapter_engine(mf.base_path, path, args.threads)
        separate = Engine(mf.base_path, n_ctx=512, threads=args.threads, fuse="off")
        for name, path in mf.av_paths.items():
            separate.load_adapter(name, path)
        separate.set_coefficients({n: 1.0 for n in mf.av_paths})
        engines["three separate adapters"] = separate
        engines["base"] = adapter_engine(mf.base_path, None, args.threads)
        runs = alternate(engines, args.tokens, args.repeats)
    base = statistics.median(runs["base"])
    print(
        f"Three demo AVs at 1 on SmolLM2 Q4_1, {args.threads} threads, {args.tokens} tokens greedy, median of "
        f"{args.repeats}, alternating:\n"
    )
    print("| path | gen tok/s | vs base | adapter file |")
    print("|---|---|---|---|")
    for label, values in runs.items():
        size = f"{sizes[label]:.0f} MB" if label in sizes else ""
        print(f"| {label} | {statistics.median(values):.1f} | {statistics.median(values) / base:.2f} | {size} |")


if __name__ == "__main__":
    main()
