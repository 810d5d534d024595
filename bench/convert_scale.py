"""`avgguf convert` at real model sizes: synthetic bf16 pairs shaped like Llama-3.2-1B, Llama-3.2-3B and
Llama-3.1-8B (sharded safetensors, one layer per shard, written streamed: no side is ever whole in memory),
and a Qwen3-30B-A3B-shaped MoE with fewer layers. Per pair: the time to read both checkpoints (every tensor
to float32, the floor of any converter), then wall time, peak RSS (VmHWM of the converting process) and
output size of each conversion.

    python bench/convert_scale.py [--work DIR] [--shapes 1b 3b 8b moe] [--keep]

Needs the `convert` extra; the 8B pair takes ~32 GB of disk under --work.
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

from convert_speed import run_convert  # the same child process and VmHWM reading as bench/convert_speed.py

# name: (n_embd, n_ff, n_head, n_head_kv, n_vocab, n_layer, tied, n_expert, n_ff_expert)
SHAPES = {
    "1b": (2048, 8192, 32, 8, 128256, 16, True, 0, 0),
    "3b": (3072, 8192, 24, 8, 128256, 28, True, 0, 0),
    "8b": (4096, 14336, 32, 8, 128256, 32, False, 0, 0),
    "moe": (2048, 6144, 32, 4, 151936, 4, False, 128, 768),  # Qwen3-30B-A3B's widths, 4 of its 48 layers
}
LABEL = {"1b": "Llama-3.2-1B", "3b": "Llama-3.2-3B", "8b": "Llama-3.1-8B", "moe": "Qwen3-30B-A3B (4 layers)"}
READ = (
    "import sys, time; from pathlib import Path; from safetensors import safe_open\n"
    "t = time.perf_counter()\n"
    "for d in sys.argv[1:]:\n"
    "    for f in sorted(Path(d).glob('*.safetensors')):\n"
    "        with safe_open(str(f), framework='pt') as h:\n"
    "            for k in h.keys(): h.get_tensor(k).float()\n"
    "print(time.perf_counter() - t)"
)


def layer_shapes(shape, i: int) -> dict[str, tuple[int, ...]]:
    n_embd, n_ff, n_head, n_kv, _, _, _, n_expert, n_ffe = shape
    head = 128 if n_expert else n_embd // n_head
    p = f"model.layers.{i}."
    out = {
        p + "input_layernorm.weight": (n_embd,),
        p + "post_attention_layernorm.weight": (n_embd,),
        p + "self_attn.q_proj.weight": (n_head * head, n_embd),
        p + "self_attn.k_proj.weight": (n_kv * head, n_embd),
        p + "self_attn.v_proj.weight": (n_kv * head, n_embd),
        p + "self_attn.o_proj.weight": (n_embd, n_head * head),
    }
    if not n_expert:
        return out | {
            p + "mlp.gate_proj.weight": (n_ff, n_embd),
            p + "mlp.up_proj.weight": (n_ff, n_embd),
            p + "mlp.down_proj.weight": (n_embd, n_ff),
        }
    out[p + "mlp.gate.weight"] = (n_expert, n_embd)
    for e in range(n_expert):
        q = f"{p}mlp.experts.{e}."
        out |= {
            q + "gate_proj.weight": (n_ffe, n_embd),
            q + "up_proj.weight": (n_ffe, n_embd),
            q + "down_proj.weight": (n_embd, n_ffe),
        }
    return out


def write_pair(work: Path, name: str) -> float:
    """base/ and aligned/ (aligned = base + a small dense delta), one shard per layer; GB per side."""
    shape = SHAPES[name]
    n_embd, n_ff, n_head, n_kv, n_vocab, n_layer, tied, n_expert, n_ffe = shape
    g = torch.Generator().manual_seed(0)
    groups = [{"model.embed_tokens.weight": (n_vocab, n_embd), "model.norm.weight": (n_embd,)}]
    groups[0] |= {} if tied else {"lm_head.weight": (n_vocab, n_embd)}
    groups += [layer_shapes(shape, i) for i in range(n_layer)]
    for side in ("base", "aligned"):
        (work / side).mkdir(parents=True, exist_ok=True)
    index: dict[str, str] = {}
    for k, group in enumerate(groups):
        shard = f"model-{k:05d}-of-{len(groups):05d}.safetensors"
        base = {n: (torch.randn(*s, generator=g) * 0.02).to(torch.bfloat16) for n, s in group.items()}
        save_file(base, str(work / "base" / shard))
        aligned = {n: (t.float() + torch.randn(*t.shape, generator=g) * 0.001).to(torch.bfloat16) for n, t in base.items()}
        save_file(aligned, str(work / "aligned" / shard))
        index |= dict.fromkeys(group, shard)
        del base, aligned
    config = {
        "architectures": ["Qwen3MoeForCausalLM" if n_expert else "LlamaForCausalLM"],
        "hidden_size": n_embd,
        "intermediate_size": n_ff,
        "num_hidden_layers": n_layer,
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "vocab_size": n_vocab,
        "tie_word_embeddings": tied,
        "torch_dtype": "bfloat16",
    }
    if n_expert:
        config |= {"num_experts": n_expert, "moe_intermediate_size": n_ffe, "head_dim": 128, "num_experts_per_tok": 8}
    for side in ("base", "aligned"):
        (work / side / "config.json").write_text(json.dumps(config))
        (work / side / "model.safetensors.index.json").write_text(json.dumps({"weight_map": index}))
    return sum(f.stat().st_size for f in (work / "base").glob("*.safetensors")) / 1e9


def read_seconds(work: Path) -> float:
    out = subprocess.run(
        [sys.executable, "-c", READ, str(work / "base"), str(work / "aligned")], capture_output=True, text=True, check=True
    )
    return float(out.stdout.strip())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, help="scratch directory (default: a temp dir, removed afterwards)")
    ap.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=["1b", "3b", "8b", "moe"])
    args = ap.parse_args()
    rows = []
    for name in args.shapes:
        work = Path(tempfile.mkdtemp(prefix=f"avgguf-scale-{name}-", dir=args.work))
        try:
            t0 = time.perf_counter()
            gb = write_pair(work, name)
            print(f"{name}: wrote 2 x {gb:.1f} GB in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
            read = read_seconds(work)
            options = [["--rank", "16"]] + ([["--max-size", "10MB"]] if name == "1b" else [])
            for conv in options:
                out = work / "av.gguf"
                wall, rss = run_convert(
                    ["--base", str(work / "base"), "--aligned", str(work / "aligned"), "--out", str(out), "--force", *conv]
                )
                rows.append((LABEL[name], gb, " ".join(conv), read, wall, rss, out.stat().st_size / 1e6))
                print(f"  {rows[-1]}", file=sys.stderr)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    head = ["shape", "checkpoint (GB, bf16, each)", "options", "read both (s)", "convert (s)", "convert / read"]
    print("| " + " | ".join(head + ["peak RSS (MB)", "adapter (MB)"]) + " |")
    print("|---|---|---|---|---|---|---|---|")
    for label, gb, conv, read, wall, rss, mb in rows:
        print(f"| {label} | {gb:.2f} | `{conv}` | {read:.1f} | {wall:.1f} | {wall / read:.2f} | {rss:.0f} | {mb:.1f} |")


if __name__ == "__main__":
    main()
