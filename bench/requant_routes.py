"""How much of a profile's effect each way of merging it at the base's own 4-bit type keeps: a fresh
quantization of the merged weights (llama.cpp's quantizer), the base's blocks with nearest rounding, and the
base's blocks with avgguf's coordinate descent on the layer inputs (avgguf/gguf/requant.py).

    python bench/requant_routes.py [--calibration FILE.jsonl] [--tokens 4096] [--work DIR]

On the demo: SmolLM2-135M Q4_1 and its three AVs at 1.0. KL kept / margin kept against the exact f32 merge,
as bench/bake_speed.py measures them (its functions are reused)."""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import bake_speed as bs
from avgguf.config.modelfile import load_modelfile, modelfile_from_gguf
from avgguf.converters.hessians import collect
from avgguf.export.bake import GGUF_TYPES
from avgguf.export.merge import Bake, write_merged, write_merged_f32
from avgguf.export.requant_bake import keep_type

ROOT = Path(__file__).resolve().parent.parent
SET = "3 demo AVs"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calibration", help="convert's calibration format (default: the built-in set)")
    ap.add_argument("--tokens", type=int, default=4096, help="calibration tokens")
    ap.add_argument("--work", help="scratch directory")
    args = ap.parse_args()
    demo = load_modelfile(ROOT / "modelfiles" / "demo.yaml")
    base, avs = demo.base_path, dict(demo.av_paths)
    own = bs.own_type(base)
    mf = modelfile_from_gguf(base, [(p, 1.0) for p in avs.values()])
    job = Bake(mf, "bench", mf.coefficients())
    rows = []
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        hessians, seen = collect(base, args.calibration, max_tokens=args.tokens, progress=True)
        print(f"calibration: {seen} tokens in {time.perf_counter() - t0:.0f} s")
        merged = write_merged_f32(job, work / "merged.gguf")
        routes = {
            f"fresh quantization to {own}": lambda out: bs.quantize(merged, out, GGUF_TYPES[own]),
            "base's blocks, nearest rounding": lambda out: write_merged(job, out, keep_type=keep_type({})),
            "base's blocks, coordinate descent": lambda out: write_merged(job, out, keep_type=keep_type(hessians)),
        }
        for name, make in routes.items():
            t0 = time.perf_counter()
            out = make(work / f"{len(rows)}.gguf")
            seconds = time.perf_counter() - t0
            rows.append({"model": "SmolLM2-135M", "path": f"{SET}: {name}", "_file": str(out), "seconds": seconds})
        for r in rows:
            r.update(gen_tps=1.0, gen_rel=1.0, prompt_rel=1.0)
        bs.add_fidelity(rows, base, {SET: avs}, work)
    print("\n| route | build (s) | KL kept | margin kept |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['path'].split(': ', 1)[1]} | {r['seconds']:.0f} | {r['effect_kept']:.3f} | {r['margin_kept']:.3f} |")


if __name__ == "__main__":
    main()
