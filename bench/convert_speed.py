"""Conversion time and peak RSS of `avgguf convert` on synthetic bf16 checkpoint pairs.

    python bench/convert_speed.py [--work DIR] [--large-layers 4 8 16]

Each conversion runs in its own process; peak RSS is that process's VmHWM. The large model
(n_embd 2048, n_ff 5632, GQA 16/4) is converted at 4, 8 and 16 layers to show that peak memory
does not grow with the number of layers (one tensor pair and its factors are held at a time).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

# VmHWM (this process image's peak RSS), not ru_maxrss: Linux carries the parent's peak across fork + exec.
CHILD = (
    "import json, sys; from avgguf.cli import main; rc = main(sys.argv[1:]); "
    "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM:')][0].split()[1]; "
    "print('BENCH', json.dumps({'rc': rc, 'maxrss_kb': int(hwm)}))"
)

SHAPES = {
    # name: (n_embd, n_ff, n_head, n_head_kv, n_vocab, tied)
    "smollm2-size": (576, 1536, 9, 3, 49152, True),
    "large": (2048, 5632, 16, 4, 32000, False),
}


def write_checkpoint(path: Path, shape, n_layer: int, seed: int, base: dict | None = None) -> dict:
    n_embd, n_ff, n_head, n_kv, n_vocab, tied = shape
    g = torch.Generator().manual_seed(seed)
    kv = n_kv * (n_embd // n_head)

    shapes = {"model.embed_tokens.weight": (n_vocab, n_embd), "model.norm.weight": (n_embd,)}
    if not tied:
        shapes["lm_head.weight"] = (n_vocab, n_embd)
    for i in range(n_layer):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "input_layernorm.weight": (n_embd,),
                p + "post_attention_layernorm.weight": (n_embd,),
                p + "self_attn.q_proj.weight": (n_embd, n_embd),
                p + "self_attn.k_proj.weight": (kv, n_embd),
                p + "self_attn.v_proj.weight": (kv, n_embd),
                p + "self_attn.o_proj.weight": (n_embd, n_embd),
                p + "mlp.gate_proj.weight": (n_ff, n_embd),
                p + "mlp.up_proj.weight": (n_ff, n_embd),
                p + "mlp.down_proj.weight": (n_embd, n_ff),
            }
        )
    if base is None:
        tensors = {k: (torch.randn(*s, generator=g) * 0.02).to(torch.bfloat16) for k, s in shapes.items()}
    else:  # aligned = base + a small dense delta
        tensors = {k: (base[k].float() + torch.randn(*s, generator=g) * 0.001).to(torch.bfloat16) for k, s in shapes.items()}
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "model.safetensors"))
    (path / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["LlamaForCausalLM"],
                "hidden_size": n_embd,
                "intermediate_size": n_ff,
                "num_hidden_layers": n_layer,
                "num_attention_heads": n_head,
                "num_key_value_heads": n_kv,
                "vocab_size": n_vocab,
                "tie_word_embeddings": tied,
                "torch_dtype": "bfloat16",
            }
        )
    )
    return tensors


def run_convert(args: list[str]) -> tuple[float, float]:
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", CHILD, "convert", *args], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    line = [x for x in out.stdout.splitlines() if x.startswith("BENCH ")]
    if out.returncode != 0 or not line:
        raise SystemExit(f"convert failed: {out.stderr}")
    return wall, json.loads(line[0][6:])["maxrss_kb"] / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, help="scratch directory (default: a temp dir, removed afterwards)")
    ap.add_argument("--large-layers", type=int, nargs="+", default=[4, 8, 16])
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="avgguf-bench-"))
    rows = []
    try:
        cases = [
            ("smollm2-size", 30, ["--rank", "16"]),
            ("smollm2-size", 30, ["--rank", "16", "--svd", "full"]),
            ("smollm2-size", 30, ["--energy", "0.5", "--max-rank", "64"]),
        ]
        cases += [("large", n, ["--rank", "16"]) for n in args.large_layers]
        made = {}
        for name, n_layer, conv in cases:
            key = (name, n_layer)
            if key not in made:
                shutil.rmtree(work / "base", ignore_errors=True)
                shutil.rmtree(work / "aligned", ignore_errors=True)
                base = write_checkpoint(work / "base", SHAPES[name], n_layer, seed=0)
                write_checkpoint(work / "aligned", SHAPES[name], n_layer, seed=1, base=base)
                del base
                made = {key: sum(f.stat().st_size for f in (work / "base").iterdir())}
            out = work / "av.gguf"
            wall, rss = run_convert(["--base", str(work / "base"), "--aligned", str(work / "aligned"), "--out", str(out), *conv])
            rows.append((name, n_layer, made[key] / 1e9, " ".join(conv), wall, rss, out.stat().st_size / 1e6))
            print(f"  {rows[-1]}", file=sys.stderr)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print("| model | layers | checkpoint (GB, bf16, each) | options | time (s) | peak RSS (MB) | adapter (MB) |")
    print("|---|---|---|---|---|---|---|")
    for name, n_layer, gb, conv, wall, rss, mb in rows:
        print(f"| {name} | {n_layer} | {gb:.2f} | `{conv}` | {wall:.1f} | {rss:.0f} | {mb:.1f} |")


if __name__ == "__main__":
    main()
