"""`avgguf convert` at real model sizes: synthetic bf16 pairs shaped like Llama-3.2-1B, Llama-3.2-3B and
Llama-3.1-8B (sharded safetensors, one layer per shard, written streamed: no side is ever whole in memory),
and a Qwen3-30B-A3B-shaped MoE with fewer layers. Per pair: the time to read both checkpoints (every tensor
to float32, the floor of any converter), then wall time, peak RSS (VmHWM of the converting process) and
output size of each conversion: `--rank R`, `--max-size SIZE`, the same pair as two GGUFs (made by
llama.cpp's convert_hf_to_gguf.py, `--gguf`), and mergekit-extract-lora at the same rank (`--mergekit EXE`).
Each repeat runs every variant once, in turn (the machine is shared and noisy: compare the medians and the
per-repeat ratios of one run, not numbers from different runs).

    python bench/convert_scale.py --work /work/scale --keep --shapes 1b 3b moe --repeats 2 \
        --mergekit /work/mkvenv/bin/mergekit-extract-lora --gguf --md bench/results/convert_scale.md

mergekit goes in its own venv (`python3 -m venv V && V/bin/pip install torch==2.13.0 mergekit`); without
--mergekit (or when EXE is missing) its rows are skipped with the reason. It runs with the embeddings
excluded on tied pairs (`-e embed_tokens`: avgguf books a tied embedding's delta as not applicable, so
both convert the same 7 matmuls per layer) and `--embed-lora` on untied ones. Needs the `convert` extra;
the 8B pair takes ~32 GB of disk under --work (x2 with --gguf).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from convert_speed import run_convert  # the same child process and VmHWM reading as bench/convert_speed.py

ROOT = Path(__file__).resolve().parent.parent
# name: (n_embd, n_ff, n_head, n_head_kv, n_vocab, n_layer, tied, n_expert, n_ff_expert)
SHAPES = {
    "1b": (2048, 8192, 32, 8, 128256, 16, True, 0, 0),
    "3b": (3072, 8192, 24, 8, 128256, 28, True, 0, 0),
    "8b": (4096, 14336, 32, 8, 128256, 32, False, 0, 0),
    "moe": (2048, 6144, 32, 4, 151936, 4, False, 128, 768),  # Qwen3-30B-A3B's widths, 4 of its 48 layers
    "1b-2l": (2048, 8192, 32, 8, 128256, 2, True, 0, 0),  # 1B widths, 2 of its 16 layers: a quick look
    "tiny": (256, 512, 4, 2, 1000, 2, True, 0, 0),  # a smoke test of the bench itself
}
LABEL = {
    "1b": "Llama-3.2-1B",
    "3b": "Llama-3.2-3B",
    "8b": "Llama-3.1-8B",
    "moe": "Qwen3-30B-A3B (4 layers)",
    "1b-2l": "Llama-3.2-1B widths, 2 layers",
    "tiny": "tiny",
}
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
        save_file(base, str(work / "base" / shard), metadata={"format": "pt"})
        aligned = {n: (t.float() + torch.randn(*t.shape, generator=g) * 0.001).to(torch.bfloat16) for n, t in base.items()}
        save_file(aligned, str(work / "aligned" / shard), metadata={"format": "pt"})
        index |= dict.fromkeys(group, shard)
        del base, aligned
    config = {
        "architectures": ["Qwen3MoeForCausalLM" if n_expert else "LlamaForCausalLM"],
        "model_type": "qwen3_moe" if n_expert else "llama",  # transformers' AutoConfig (mergekit) needs it
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
    size = sum(f.stat().st_size for f in (work / "base").glob("*.safetensors"))  # transformers wants metadata
    for side in ("base", "aligned"):
        (work / side / "config.json").write_text(json.dumps(config))
        index_json = {"metadata": {"total_size": size}, "weight_map": index}
        (work / side / "model.safetensors.index.json").write_text(json.dumps(index_json))
    return size / 1e9


# mergekit-extract-lora in its own interpreter (the EXE's shebang), reporting VmHWM like convert_speed's CHILD
MERGEKIT_CHILD = (
    "import json, runpy, sys\n"
    "exe = sys.argv[1]; sys.argv = sys.argv[1:]; rc = 0\n"
    "try:\n"
    "    runpy.run_path(exe, run_name='__main__')\n"
    "except SystemExit as e:\n"
    "    rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)\n"
    "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM:')][0].split()[1]\n"
    "print('BENCH', json.dumps({'rc': rc, 'maxrss_kb': int(hwm)}))"
)


def pair(work: Path, name: str, keep: bool) -> tuple[Path, float, float]:
    """The pair's directory, GB per side and seconds to write it (0 when an earlier --keep run left it)."""
    d = work / name
    done = d / ".done"
    if keep and done.is_file():
        for side in ("base", "aligned"):  # pairs written before model_type was added
            cfg = json.loads((d / side / "config.json").read_text())
            if "model_type" not in cfg:
                cfg["model_type"] = "qwen3_moe" if SHAPES[name][7] else "llama"
                (d / side / "config.json").write_text(json.dumps(cfg))
        return d, float(done.read_text()), 0.0
    shutil.rmtree(d, ignore_errors=True)
    t0 = time.perf_counter()
    gb = write_pair(d, name)
    done.write_text(str(gb))
    return d, gb, time.perf_counter() - t0


def read_seconds(work: Path) -> float:
    out = subprocess.run(
        [sys.executable, "-c", READ, str(work / "base"), str(work / "aligned")], capture_output=True, text=True, check=True
    )
    return float(out.stdout.strip())


def to_gguf(work: Path, llama_cpp: Path) -> tuple[float, str]:
    """base.gguf / aligned.gguf (bf16) by llama.cpp's own convert_hf_to_gguf.py; a synthetic pair has no
    tokenizer, so tests/llama_converter.py stands a synthetic vocabulary in for set_vocab (every tensor goes
    through the converter's own code). Seconds for both, or (nan, why not)."""
    script = llama_cpp / "convert_hf_to_gguf.py"
    if not script.is_file():
        return float("nan"), f"no {script}"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(llama_cpp), str(llama_cpp / "gguf-py"), str(ROOT)]))
    t0 = time.perf_counter()
    for side in ("base", "aligned"):
        out = work / f"{side}.gguf"
        if out.is_file() and (work / f".{side}.gguf.done").is_file():
            continue
        proc = subprocess.run(
            [
                sys.executable,
                str(ROOT / "tests" / "llama_converter.py"),
                str(work / side),
                "--outfile",
                str(out),
                "--outtype",
                "bf16",
            ],
            capture_output=True,
            text=True,
            env=env,
        )
        if proc.returncode:
            return float("nan"), f"convert_hf_to_gguf.py failed: {proc.stderr.strip().splitlines()[-1:]}"
        (work / f".{side}.gguf.done").write_text("")
    return time.perf_counter() - t0, ""


def run_mergekit(exe: Path, work: Path, rank: int, tied: bool) -> tuple[float, float, float]:
    """wall s, peak RSS MB, output MB of mergekit-extract-lora at --max-rank `rank`."""
    python = exe.read_text(errors="replace").splitlines()[0].removeprefix("#!").strip()
    out = work / "mergekit-lora"
    shutil.rmtree(out, ignore_errors=True)
    embed = ["-e", "embed_tokens", "-e", "lm_head"] if tied else ["--embed-lora"]
    args = ["--model", str(work / "aligned"), "--base-model", str(work / "base"), "--out-path", str(out)]
    args += ["--max-rank", str(rank), *embed, "--no-copy-tokenizer", "--no-write-model-card", "--quiet"]
    t0 = time.perf_counter()
    proc = subprocess.run([python, "-c", MERGEKIT_CHILD, str(exe), *args], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    line = [x for x in proc.stdout.splitlines() if x.startswith("BENCH ")]
    if proc.returncode or not line or json.loads(line[0][6:])["rc"]:
        raise SystemExit(f"mergekit-extract-lora failed: {proc.stderr[-3000:]}")
    size = sum(f.stat().st_size for f in out.rglob("*.safetensors")) / 1e6
    return wall, json.loads(line[0][6:])["maxrss_kb"] / 1024, size


def variants(args, name: str, d: Path) -> list[tuple[str, str, list[str] | None]]:
    """(tool, options label, avgguf convert arguments or None for mergekit)."""
    hf = ["--base", str(d / "base"), "--aligned", str(d / "aligned")]
    out = [("avgguf", f"--rank {args.rank}", [*hf, "--rank", str(args.rank)])]
    if args.mergekit:
        out.append(("mergekit-extract-lora", f"--max-rank {args.rank}", None))
    if args.max_size and name not in args.rank_only:
        out.append(("avgguf", f"--max-size {args.max_size}", [*hf, "--max-size", args.max_size]))
    if args.gguf and name not in args.rank_only:
        gg = ["--base", str(d / "base.gguf"), "--aligned", str(d / "aligned.gguf")]
        out.append(("avgguf (GGUF pair)", f"--rank {args.rank}", [*gg, "--rank", str(args.rank)]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, help="scratch directory (default: a temp dir, removed afterwards)")
    ap.add_argument("--keep", action="store_true", help="keep the pairs under --work and reuse them in later runs")
    ap.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=["1b", "3b", "8b", "moe"])
    ap.add_argument("--repeats", type=int, default=2, help="times each variant runs, alternating (default 2)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--max-size", default="20MB", help="the --max-size variant's budget ('' to skip it)")
    ap.add_argument("--gguf", action="store_true", help="also convert the pair as two GGUFs (llama.cpp's converter)")
    ap.add_argument("--llama-cpp", type=Path, default=ROOT / ".cache" / "llama-cpp-sdist", help="has convert_hf_to_gguf.py")
    ap.add_argument("--mergekit", type=Path, help="mergekit-extract-lora executable (its rows are skipped without it)")
    ap.add_argument("--rank-only", nargs="*", default=[], metavar="SHAPE", help="shapes that get only --rank (+ mergekit)")
    ap.add_argument("--md", type=Path, help="write the markdown table here (and the raw runs next to it as .json)")
    ap.add_argument("--append", action="store_true", help="append to --md (and its .json) instead of replacing them")
    ap.add_argument("--table-from", type=Path, help="only print the table of a raw .json this bench wrote")
    args = ap.parse_args()
    if args.table_from:
        raw = json.loads(args.table_from.read_text())
        for run in raw if isinstance(raw, list) else [raw]:
            sys.argv = run["argv"]
            again = ap.parse_args(run["argv"][1:])
            derived = ("avgguf / mergekit-extract-lora wall time", "making the GGUF pair")  # table() adds these
            print(table(run["runs"], again, [n for n in run["notes"] if not any(d in n for d in derived)]))
        return
    notes = []
    if args.mergekit and not args.mergekit.is_file():
        notes.append(f"mergekit-extract-lora skipped: {args.mergekit} not found")
        args.mergekit = None
    elif not args.mergekit:
        notes.append("mergekit-extract-lora skipped: no --mergekit EXE given")
    root = args.work or Path(tempfile.mkdtemp(prefix="avgguf-scale-"))
    root.mkdir(parents=True, exist_ok=True)
    runs = []  # one dict per measured run
    try:
        for name in args.shapes:
            d, gb, wrote = pair(root, name, args.keep)
            print(f"{name}: 2 x {gb:.2f} GB (written in {wrote:.0f} s)", file=sys.stderr)
            tied = SHAPES[name][6]
            gguf_s = float("nan")
            if args.gguf:
                gguf_s, why = to_gguf(d, args.llama_cpp)
                if why:
                    notes.append(f"{LABEL[name]}: GGUF-pair route skipped: {why}")
                print(f"  GGUF pair: {gguf_s:.0f} s {why}", file=sys.stderr)
            todo = [v for v in variants(args, name, d) if not (v[0].startswith("avgguf (GGUF") and gguf_s != gguf_s)]
            for rep in range(args.repeats):
                read = read_seconds(d)
                runs.append({"shape": name, "repeat": rep, "tool": "read both", "options": "", "wall_s": read})
                print(f"  [{rep}] read both: {read:.1f} s", file=sys.stderr)
                for tool, label, conv in todo:
                    if conv is None:
                        wall, rss, mb = run_mergekit(args.mergekit, d, args.rank, tied)
                    else:
                        out = d / "av.gguf"
                        wall, rss = run_convert([*conv, "--out", str(out), "--force"])
                        mb = out.stat().st_size / 1e6
                    run = {"shape": name, "repeat": rep, "tool": tool, "options": label, "wall_s": wall, "rss_mb": rss}
                    runs.append(run | {"out_mb": mb, "read_s": read, "gb": gb, "gguf_s": gguf_s})
                    print(f"  [{rep}] {tool} {label}: {wall:.1f} s, {rss:.0f} MB, {mb:.1f} MB", file=sys.stderr)
            if not args.keep:
                shutil.rmtree(d, ignore_errors=True)
    finally:
        if args.work is None:
            shutil.rmtree(root, ignore_errors=True)
        text = table(runs, args, notes)
        print(text)
        if args.md:
            raw = args.md.with_suffix(".json")
            old = json.loads(raw.read_text()) if args.append and raw.is_file() else []
            old = old if isinstance(old, list) else [old]
            args.md.write_text((args.md.read_text() + "\n" if args.append and args.md.is_file() else "") + text)
            raw.write_text(json.dumps(old + [{"argv": sys.argv, "notes": notes, "runs": runs}], indent=1))


def table(runs: list[dict], args, notes: list[str]) -> str:
    med = statistics.median
    notes = list(notes)
    lines = [
        "## `avgguf convert` at scale (bench/convert_scale.py)",
        "",
        "    python " + " ".join(["bench/convert_scale.py", *sys.argv[1:]]),
        "",
        f"Up to {args.repeats} repeat(s), every variant once per repeat in turn; medians (min-max) over `runs`. "
        "`read both`: every tensor of both checkpoints read to float32 by safetensors, in its own process.",
        "",
        "| shape | GB/side (bf16) | tool | options | runs | time (s) | / read both | peak RSS (MB) | output (MB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in dict.fromkeys(r["shape"] for r in runs):
        mine = [r for r in runs if r["shape"] == name]
        reads = [r["wall_s"] for r in mine if r["tool"] == "read both"]
        done = [r for r in mine if r["tool"] != "read both"]
        gb = done[0]["gb"] if done else float("nan")
        spread = f"{med(reads):.1f} ({min(reads):.0f}-{max(reads):.0f})"
        lines.append(f"| {LABEL[name]} | {gb:.2f} | read both | | {len(reads)} | {spread} | 1 | | |")
        for key in dict.fromkeys((r["tool"], r["options"]) for r in done):
            rs = [r for r in done if (r["tool"], r["options"]) == key]
            walls = [r["wall_s"] for r in rs]
            ratio = med([r["wall_s"] / r["read_s"] for r in rs])
            spread = f"{med(walls):.1f} ({min(walls):.0f}-{max(walls):.0f})"
            lines.append(
                f"| {LABEL[name]} | {gb:.2f} | {key[0]} | `{key[1]}` | {len(walls)} | {spread} "
                f"| {ratio:.2f} | {max(r['rss_mb'] for r in rs):.0f} | {rs[0]['out_mb']:.1f} |"
            )
        mk = {r["repeat"]: r["wall_s"] for r in done if r["tool"] == "mergekit-extract-lora"}
        av = {r["repeat"]: r["wall_s"] for r in done if r["tool"] == "avgguf" and r["options"] == f"--rank {args.rank}"}
        both = sorted(set(mk) & set(av))
        if both:
            ratios = [av[i] / mk[i] for i in both]
            notes.append(
                f"{LABEL[name]}: avgguf / mergekit-extract-lora wall time at rank {args.rank}, per repeat: "
                + ", ".join(f"{x:.2f}" for x in ratios)
                + f" (median {med(ratios):.2f})"
            )
        gg = [r["gguf_s"] for r in done if r.get("gguf_s") == r.get("gguf_s") and r["tool"].startswith("avgguf (GGUF")]
        if gg:
            notes.append(f"{LABEL[name]}: making the GGUF pair (convert_hf_to_gguf.py, bf16, both sides) took {gg[0]:.0f} s")
    lines += ["", "peak RSS: the largest VmHWM over the repeats. Output: the adapter file (mergekit: its safetensors).", ""]
    lines += [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
