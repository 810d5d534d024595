"""Does a different layout make live AVs cheaper in llama.cpp? The three demo AVs fused as avgguf does (native
q4_0 blocks) against: the same factors in q8_0; and llama.cpp's fused-QKV path for llama models (base Q, K, V
rows concatenated into one `attn_qkv` tensor, byte for byte, and one adapter per layer for it with A stacked
and B block-diagonal: 5 adapted tensors per layer instead of 7). Generation tok/s relative to the base, one
run, alternating, median of 5.

    python bench/fused_layouts.py [--tokens 96] [--repeats 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import gguf
import numpy as np
from fused_types import (  # the same measurement as bench/fused_types.py
    ROOT,
    adapter_engine,
    alternate,
)
from gguf import GGMLQuantizationType as QType

from avgguf.gguf import adapter_format as fmt
from avgguf.gguf.fuse import write_fused
from avgguf.config.modelfile import load_modelfile

QKV = ("attn_q", "attn_k", "attn_v")


def qkv_base(src: Path, dst: Path) -> Path:
    """The base with blk.N.attn_q/k/v rows concatenated into blk.N.attn_qkv (exact: whole quantized rows)."""
    reader = gguf.GGUFReader(src)
    tensors = {t.name: t for t in reader.tensors}
    writer = gguf.GGUFWriter(str(dst), reader.get_field(gguf.Keys.General.ARCHITECTURE).contents())
    fmt.copy_metadata(reader, writer)
    for t in reader.tensors:
        if ".attn_k." in t.name or ".attn_v." in t.name:
            continue
        if ".attn_q." in t.name:
            parts = [np.asarray(tensors[t.name.replace("attn_q", x)].data) for x in QKV]
            writer.add_tensor(t.name.replace("attn_q", "attn_qkv"), np.concatenate(parts), raw_dtype=t.tensor_type)
        else:
            writer.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


def rewrite_adapter(src: Path, dst: Path, qkv: bool = False, q8: bool = False) -> Path:
    """The adapter with Q/K/V pairs merged for attn_qkv (f16, B block-diagonal) and/or factors in q8_0."""
    reader = gguf.GGUFReader(src)
    tensors = {t.name: t for t in reader.tensors}
    info = fmt.read_adapter(src)
    writer = fmt.AdapterWriter(dst, "llama", "layout")
    for base in sorted(info.pairs):
        if qkv and (".attn_k." in base or ".attn_v." in base):
            continue
        if qkv and ".attn_q." in base:
            a_parts = [fmt.tensor_floats(tensors[base.replace("attn_q", x) + fmt.LORA_A]) for x in QKV]
            b_parts = [fmt.tensor_floats(tensors[base.replace("attn_q", x) + fmt.LORA_B]) for x in QKV]
            b = np.zeros((sum(p.shape[0] for p in b_parts), sum(p.shape[1] for p in b_parts)), np.float32)
            r = c = 0
            for p in b_parts:
                b[r : r + p.shape[0], c : c + p.shape[1]] = p
                r, c = r + p.shape[0], c + p.shape[1]
            a = np.concatenate(a_parts).astype(np.float16)
            writer.add_raw_pair(base.replace("attn_q", "attn_qkv"), a, QType.F16, b.astype(np.float16), QType.F16)
            continue
        pair = []
        for suffix in (fmt.LORA_A, fmt.LORA_B):
            t = tensors[base + suffix]
            floats = fmt.tensor_floats(t)
            if q8 and floats.shape[-1] % 32 == 0:
                pair += [gguf.quants.quantize(floats, QType.Q8_0), QType.Q8_0]
            else:
                pair += [np.asarray(t.data), t.tensor_type]
        writer.add_raw_pair(base, *pair)
    writer.commit()
    return dst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    mf = load_modelfile(ROOT / "modelfiles" / "demo.yaml")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        fused = write_fused([(n, p, 1.0) for n, p in mf.av_paths.items()], tmp / "fused.gguf", "llama")
        base_qkv = qkv_base(mf.base_path, tmp / "base-qkv.gguf")
        medical = mf.av_paths["medical"]
        cases = {
            "base": (mf.base_path, None),
            "base, fused QKV": (base_qkv, None),
            "1 AV (medical)": (mf.base_path, medical),
            "1 AV, fused QKV": (base_qkv, rewrite_adapter(medical, tmp / "med-qkv.gguf", qkv=True)),
            "3 AVs fused (avgguf: native q4_0)": (mf.base_path, fused),
            "3 AVs fused, factors q8_0": (mf.base_path, rewrite_adapter(fused, tmp / "f-q8.gguf", q8=True)),
            "3 AVs fused, fused QKV": (base_qkv, rewrite_adapter(fused, tmp / "f-qkv.gguf", qkv=True)),
        }
        engines = {label: adapter_engine(model, adapter, args.threads) for label, (model, adapter) in cases.items()}
        runs = alternate(engines, args.tokens, args.repeats)
    base = statistics.median(runs["base"])
    print(
        f"SmolLM2 Q4_1 and the demo AVs at 1, {args.threads} threads, {args.tokens} tokens greedy, median of "
        f"{args.repeats}, alternating:\n"
    )
    print("| layout | gen tok/s | vs base |")
    print("|---|---|---|")
    for label, values in runs.items():
        print(f"| {label} | {statistics.median(values):.1f} | {statistics.median(values) / base:.2f} |")


if __name__ == "__main__":
    main()
