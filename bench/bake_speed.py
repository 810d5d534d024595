"""Full-speed profiles: generation speed of separate live adapters, one fused live adapter, `avgguf bake`
(a merged GGUF) and llama.cpp's own llama-export-lora merge, relative to the base in the same run; what a
knob change costs on each path; and, on the real demo AVs, how much of the profile's effect each keeps.

    python bench/bake_speed.py [--models smollm2,synthetic-1b,synthetic-3b] [--repeats 3] [--tokens 64]
        [--export-lora /path/to/llama-export-lora]

smollm2: the embedded SmolLM2-135M-Instruct Q4_1 with the three demo AVs (modelfiles/demo.yaml).
synthetic-1b: a 1.2B llama-shaped GGUF with random weights (Q4_0; speed does not depend on values) and
random f16 AVs at ranks 16 and 64. synthetic-3b: the same at Llama-3.2-3B's widths, Q4_K_M.
Fidelity against the full-precision merged model ("fp": the base's
weights in float32 + Σλ·ΔW): "KL kept" = 1 - KL(fp ‖ path) / KL(fp ‖ base) over expert answers to held-out
queries (every deviation counts, noise included); "margin kept" = the path's change of the preference margin
(mean log-prob of the expert minus the avoidance answer to held-out queries of the AVs' domains) over fp's.
"live, merged hot set" is what `avgguf run/chat/serve --merge on` (auto on SmolLM2) serves once a set has
answered: its "build" is the background bake and load after the answer, "knob" a change to a new set then.
Build llama-export-lora from the llama.cpp source inside llama-cpp-python's sdist (see README).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import gguf
import numpy as np

from avgguf.gguf import adapter_format as fmt
from avgguf.export.bake import GGUF_TYPES, Bake, baked_gguf, fused_adapter, write_merged_f32
from avgguf.runtime.engine import Engine
from avgguf.gguf.fuse import write_fused
from avgguf.config.modelfile import load_modelfile, modelfile_from_gguf

ROOT = Path(__file__).resolve().parent.parent

PROMPT = "<|im_start|>user\nWhat should I do about a persistent cough?<|im_end|>\n<|im_start|>assistant\n"


# --- measurements -------------------------------------------------------------------------------------------


def gen_tps(eng: Engine, tokens: int) -> tuple[float, float]:
    """(generation tok/s from llama.cpp's timers, prompt tok/s timed around one fresh prompt evaluation)."""
    eng.reset()
    eng.perf_reset()
    eng.completion(PROMPT, max_tokens=tokens, temperature=0.0)
    p = eng.perf()
    prompt = eng.tokenize(PROMPT)
    t0 = time.perf_counter()
    eng.next_logits(prompt)
    return 1000 * p.gen_tokens / p.gen_ms, len(prompt) / (time.perf_counter() - t0)


def open_engine(model: Path, adapters: dict[str, Path], coefs: dict[str, float], fuse: str, **kw) -> Engine:
    eng = Engine(model, n_ctx=512, threads=os.cpu_count(), fuse=fuse, **kw)
    for name, path in adapters.items():
        eng.load_adapter(name, path)
    if coefs:
        eng.set_coefficients(coefs)
    return eng


def speeds(engines: dict[str, Engine], tokens: int, repeats: int) -> dict[str, tuple[float, float]]:
    runs: dict[str, list] = {k: [] for k in engines}
    for _ in range(repeats):
        for label, eng in engines.items():  # alternating: drift hits every path alike
            runs[label].append(gen_tps(eng, tokens))
    return {k: (statistics.median(g for g, _ in v), statistics.median(p for _, p in v)) for k, v in runs.items()}


def knob_ms(eng: Engine, names: list[str]) -> float:
    """A new coefficient set to the first token, median of 5."""
    out = []
    for i in range(5):
        t0 = time.perf_counter()
        eng.set_coefficients({n: 0.3 + 0.1 * i for n in names})
        for _ in eng.completion(PROMPT, max_tokens=1, temperature=0.0, stream=True):
            break
        out.append(1000 * (time.perf_counter() - t0))
    return statistics.median(out)


# --- effect kept --------------------------------------------------------------------------------------------


def eval_tokens(eng: Engine, n: int = 12) -> list[list[int]]:
    rows = [json.loads(line) for line in (ROOT / "data" / "preferences" / "eval.jsonl").read_text().splitlines()]
    rows = rows[:: max(1, len(rows) // n)][:n]
    return [
        eng.tokenize(eng.format_chat([{"role": "user", "content": r["query"]}]) + r["responses"]["expert"])[:160] for r in rows
    ]


def log_probs(eng: Engine, toks: list[int]) -> np.ndarray:
    x = eng.all_logits(toks).astype(np.float64)
    x -= x.max(1, keepdims=True)
    return x - np.log(np.exp(x).sum(1, keepdims=True))


def mean_kl(ref: list[np.ndarray], eng: Engine, texts: list[list[int]]) -> float:
    vals = []
    for r, t in zip(ref, texts):
        q = log_probs(eng, t)
        vals.append(float((np.exp(r) * (r - q)).sum(1).mean()))
    return float(np.mean(vals))


# --- the stock path -----------------------------------------------------------------------------------------


def export_lora(tool: str, base: Path, adapters: list[tuple[Path, float]], out: Path, work: Path) -> Path:
    """llama-export-lora refuses quantized LoRAs: give it exact f16 copies of ours first."""
    floats = []
    arch = fmt.read_base_model(base).arch
    for i, (path, scale) in enumerate(adapters):
        f16 = write_fused([("av", path, 1.0)], work / f"f16-{i}.gguf", arch, float_type=gguf.GGMLQuantizationType.F16)
        floats.append(f"{f16}:{scale}")
    subprocess.run(
        [tool, "-m", str(base), "--lora-scaled", ",".join(floats), "-o", str(out), "-t", str(os.cpu_count())],
        check=True,
        capture_output=True,
    )
    return out


def quantize(src: Path, out: Path, ftype_name: str) -> Path:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_{ftype_name}")
    params.nthread = os.cpu_count()
    params.allow_requantize = True
    if llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), params) != 0:
        raise SystemExit(f"quantize {src} failed")
    return out


# --- models -------------------------------------------------------------------------------------------------


# name -> (label, Spec arguments, llama.cpp file type): random weights, speed only (it does not depend on values)
SYNTHETIC = {
    "synthetic-1b": ("synthetic 1.2B Q4_0", dict(n_layer=16, n_embd=2048, n_head=32, n_head_kv=8, n_ff=8192), "MOSTLY_Q4_0"),
    # Llama-3.2-3B's widths and depth (its 128256-token vocabulary cut to 32000: the embedding is not what is timed)
    "synthetic-3b": ("synthetic 3.2B Q4_K_M", dict(n_layer=28, n_embd=3072, n_head=24, n_head_kv=8, n_ff=8192), "MOSTLY_Q4_K_M"),
}


def synthetic(work: Path, name: str) -> Path:
    """A llama-shaped model with random weights, written f16 then quantized by llama.cpp to SYNTHETIC's type."""
    from avgguf.testing.synthetic import Spec, add_vocab

    _, dims, ftype = SYNTHETIC[name]
    spec = Spec("llama", n_vocab=32000, **dims)
    rng = np.random.default_rng(0)
    f16 = work / f"{name}-f16.gguf"
    w = gguf.GGUFWriter(str(f16), "llama")
    w.add_name(name)
    for add, value in (
        (w.add_context_length, 2048),
        (w.add_embedding_length, spec.n_embd),
        (w.add_block_count, spec.n_layer),
        (w.add_feed_forward_length, spec.n_ff),
        (w.add_head_count, spec.n_head),
        (w.add_head_count_kv, spec.n_head_kv),
        (w.add_rope_dimension_count, spec.head_dim),
        (w.add_vocab_size, spec.n_vocab),
    ):
        add(value)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    add_vocab(w, spec.n_vocab)
    kv = spec.n_head_kv * spec.head_dim
    shapes = {
        "token_embd.weight": (spec.n_vocab, spec.n_embd),
        "output_norm.weight": (spec.n_embd,),
        "output.weight": (spec.n_vocab, spec.n_embd),
    }
    for i in range(spec.n_layer):
        shapes.update(
            {
                f"blk.{i}.attn_norm.weight": (spec.n_embd,),
                f"blk.{i}.ffn_norm.weight": (spec.n_embd,),
                f"blk.{i}.attn_q.weight": (spec.n_embd, spec.n_embd),
                f"blk.{i}.attn_k.weight": (kv, spec.n_embd),
                f"blk.{i}.attn_v.weight": (kv, spec.n_embd),
                f"blk.{i}.attn_output.weight": (spec.n_embd, spec.n_embd),
                f"blk.{i}.ffn_gate.weight": (spec.n_ff, spec.n_embd),
                f"blk.{i}.ffn_up.weight": (spec.n_ff, spec.n_embd),
                f"blk.{i}.ffn_down.weight": (spec.n_embd, spec.n_ff),
            }
        )
    for name, shape in shapes.items():
        dtype = np.float32 if len(shape) == 1 else np.float16
        w.add_tensor_info(name, shape, np.dtype(dtype), int(np.prod(shape)) * np.dtype(dtype).itemsize)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for name, shape in shapes.items():
        if len(shape) == 1:
            w.write_tensor_data(np.ones(shape, np.float32))
        else:
            w.write_tensor_data((rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float16))
    w.close()
    out = quantize(f16, work / f"{name}-{ftype.removeprefix('MOSTLY_').lower()}.gguf", ftype)
    f16.unlink()
    return out


def random_av(base: Path, rank: int, seed: int, out: Path) -> Path:
    info = fmt.read_base_model(base)
    rng = np.random.default_rng(seed)
    writer = fmt.AdapterWriter(out, info.arch, out.stem)
    for name, shape in info.shapes.items():
        if name.startswith("blk.") and len(shape) == 2:
            writer.add_pair(
                name,
                rng.standard_normal((rank, shape[1]), dtype=np.float32) * 0.01,
                rng.standard_normal((shape[0], rank), dtype=np.float32) * 0.01,
                "f16",
            )
    writer.commit()
    return out


# --- one model ----------------------------------------------------------------------------------------------


def run_model(label: str, base: Path, sets: dict[str, dict[str, Path]], args, work: Path, fidelity: bool) -> list:
    """One group per AV set (its own base row, so every ratio comes from the same run; engines of one group
    only in memory at a time)."""
    rows = []
    for set_name, avs in sets.items():
        group = run_set(label, base, set_name, avs, args, work)
        if fidelity:
            add_fidelity(group, base, {set_name: avs}, work)
        for r in group:
            Path(r.get("_file", "/nonexistent")).unlink(missing_ok=True)
        rows += group
        print(render(group), flush=True)
    return rows


def run_set(label: str, base: Path, set_name: str, avs: dict[str, Path], args, work: Path) -> list:
    tool = args.export_lora if args.export_lora and Path(args.export_lora).exists() else None
    coefs = {n: 1.0 for n in avs}
    engines = {
        f"{set_name}: base": open_engine(base, {}, {}, "off"),
        f"{set_name}: separate adapters": open_engine(base, avs, coefs, "off"),
    }
    extra: dict[str, dict] = {}
    if len(avs) > 1:
        fused = open_engine(base, avs, {}, "sync")
        t0 = time.perf_counter()
        fused.set_coefficients(coefs)  # builds and loads the fused adapter
        extra[f"{set_name}: fused adapter"] = {"seconds": time.perf_counter() - t0}
        engines[f"{set_name}: fused adapter"] = fused
    for r in RANKS if len(avs) > 1 else ():
        key = f"{set_name}: {RECOMPRESSED % r}"
        engines[key], extra[key] = recompressed(base, avs, r, work)
    hot_key = f"{set_name}: live, merged hot set"
    engines[hot_key], extra[hot_key] = hot_engine(base, avs, coefs)
    mf = modelfile_from_gguf(base, [(p, 1.0) for p in avs.values()])
    own = own_type(base) if args.own_type else None
    for type_ in [None, own] if own else [None]:
        out = work / f"baked-{type_}.gguf"
        t0 = time.perf_counter()
        report = baked_gguf(Bake(mf, "lora", mf.coefficients()), out, type_)
        how = ", delta-preserving" if type_ else ""
        key = f"{set_name}: avgguf bake ({type_ or 'default: ' + report['type']}{how})"
        extra[key] = {"seconds": time.perf_counter() - t0, "bytes": out.stat().st_size, "_file": str(out)}
        engines[key] = open_engine(out, {}, {}, "off")
    if own:  # today's snap-back: a fresh quantization of the merged weights to the base's own type
        t0 = time.perf_counter()
        merged = write_merged_f32(Bake(mf, "lora", mf.coefficients()), work / "merged-f32.gguf")
        out = quantize(merged, work / f"requant-{own}.gguf", GGUF_TYPES[own])
        merged.unlink()
        key = f"{set_name}: merged, plain requantization to {own}"
        extra[key] = {"seconds": time.perf_counter() - t0, "bytes": out.stat().st_size, "_file": str(out)}
        engines[key] = open_engine(out, {}, {}, "off")
    if tool:
        t0 = time.perf_counter()
        merged = export_lora(tool, base, [(p, 1.0) for p in avs.values()], work / "export-f16.gguf", work)
        seconds = time.perf_counter() - t0
        key = f"{set_name}: llama-export-lora (f16 output)"
        extra[key] = {"seconds": seconds, "bytes": merged.stat().st_size, "_file": str(merged)}
        engines[key] = open_engine(merged, {}, {}, "off")
        t0 = time.perf_counter()
        requant = quantize(merged, work / "export-q8_0.gguf", "MOSTLY_Q8_0")
        key = f"{set_name}: llama-export-lora + quantize q8_0"
        extra[key] = {"seconds": seconds + time.perf_counter() - t0, "bytes": requant.stat().st_size, "_file": str(requant)}
        engines[key] = open_engine(requant, {}, {}, "off")
    measured = speeds(engines, args.tokens, args.repeats)
    extra[f"{set_name}: separate adapters"] = {"knob_ms": knob_ms(engines[f"{set_name}: separate adapters"], list(avs))}
    extra[hot_key]["knob_ms"] = knob_ms(engines[hot_key], list(avs))
    for eng in engines.values():
        eng.close()
    base_gen, base_prompt = measured[f"{set_name}: base"]
    return [
        {"model": label, "path": k, "gen_tps": g, "gen_rel": g / base_gen, "prompt_rel": p / base_prompt, **extra.get(k, {})}
        for k, (g, p) in measured.items()
    ]


def own_type(base: Path) -> str | None:
    """The base's own --type name where it is below 8 bits (the rows a 4-bit user cares about), else None."""
    from avgguf.export.bake import KEEPS_EFFECT, stored_ftype
    import llama_cpp

    ftype = stored_ftype(gguf.GGUFReader(base))
    names = {getattr(llama_cpp, f"LLAMA_FTYPE_{v}"): k for k, v in GGUF_TYPES.items()}
    keeps = {getattr(llama_cpp, f"LLAMA_FTYPE_{v}") for v in KEEPS_EFFECT}
    return names.get(ftype) if ftype not in keeps else None


RANKS = (16, 32)  # re-compressed fused adapters (issue #25: the cheaper live path until a merge is in)
RECOMPRESSED = "fused, re-compressed to rank %d"


def recompressed(base: Path, avs: dict[str, Path], rank: int, work: Path, **kw) -> tuple[Engine, dict]:
    """The set as ONE adapter of `rank` (the exact fused sum truncated by an SVD of each product, as
    `avgguf bake --format adapter --rank`): (engine, build seconds / bytes / file)."""
    mf = modelfile_from_gguf(base, [(p, 1.0) for p in avs.values()])
    out = work / f"recompressed-{rank}.gguf"
    t0 = time.perf_counter()
    fused_adapter(Bake(mf, "lora", mf.coefficients()), out, rank)
    info = {"seconds": time.perf_counter() - t0, "bytes": out.stat().st_size, "_file": str(out)}
    return open_engine(base, {"rc": out}, {"rc": 1.0}, "off", **kw), info


def hot_engine(base: Path, avs: dict[str, Path], coefs: dict[str, float], **kw) -> tuple[Engine, dict]:
    """The live engine once a set has answered and its background merge is in: (engine, build seconds)."""
    eng = open_engine(base, avs, coefs, "async", merge="on", **kw)
    t0 = time.perf_counter()
    eng.settle()
    eng.wait_merged()
    seconds = time.perf_counter() - t0
    eng.set_coefficients(coefs)
    assert eng.merged, "the merge did not come in (see the log)"
    return eng, {"seconds": seconds}


def margins(eng: Engine, items: list[dict]) -> float:
    """Mean over items of the mean log-prob of the expert answer minus the avoidance answer's (96 tokens)."""
    out = []
    for r in items:
        prompt = eng.tokenize(eng.format_chat([{"role": "user", "content": r["query"]}]))
        expert, avoid = (eng.tokenize(r["responses"][k])[:96] for k in ("expert", "avoidance"))
        e, a = eng.score_continuations(prompt, [expert, avoid])
        out.append(float(e.mean() - a.mean()))
    return float(np.mean(out))


def domain_items(domains: set[str], n: int = 24) -> list[dict]:
    rows = [json.loads(line) for line in (ROOT / "data" / "preferences" / "eval.jsonl").read_text().splitlines()]
    return [r for r in rows if r["domain"] in domains][:n]


def path_engine(key: str, row: dict, base: Path, avs: dict[str, Path], coefs: dict[str, float]) -> Engine:
    if key.endswith("separate adapters"):
        return open_engine(base, avs, coefs, "off", logits_all=True)
    if key.endswith("fused adapter"):
        return open_engine(base, avs, coefs, "sync", logits_all=True)
    if key.endswith("merged hot set"):
        return hot_engine(base, avs, coefs, logits_all=True)[0]
    if "re-compressed" in key:
        return open_engine(base, {"rc": Path(row["_file"])}, {"rc": 1.0}, "off", logits_all=True)
    return open_engine(Path(row["_file"]), {}, {}, "off", logits_all=True)


def add_fidelity(rows: list, base: Path, sets: dict, work: Path) -> None:
    """KL kept and margin kept per path, against the full-precision merged model (see the module's doc)."""
    by_path = {r["path"]: r for r in rows}
    for set_name, avs in sets.items():
        coefs = {n: 1.0 for n in avs}
        mf = modelfile_from_gguf(base, [(p, 1.0) for p in avs.values()])
        fp_path = write_merged_f32(Bake(mf, "lora", mf.coefficients()), work / "fp.gguf")
        items = domain_items(set(avs))
        fp = open_engine(fp_path, {}, {}, "off", logits_all=True)
        texts = eval_tokens(fp)
        ref = [log_probs(fp, t) for t in texts]
        m_fp = margins(fp, items)
        fp.close()
        fp_path.unlink()
        plain = open_engine(base, {}, {}, "off", logits_all=True)
        kl_base, m_base = mean_kl(ref, plain, texts), margins(plain, items)
        plain.close()
        for key, row in by_path.items():
            if not key.startswith(set_name + ":") or key.endswith(": base"):
                continue
            eng = path_engine(key, row, base, avs, coefs)
            row["kl"] = mean_kl(ref, eng, texts)
            row["effect_kept"] = 1 - row["kl"] / kl_base
            row["margin_kept"] = (margins(eng, items) - m_base) / (m_fp - m_base)
            eng.close()


def render(rows: list) -> str:
    head = "| model | path | gen tok/s | vs base | prompt vs base | knob change / build | file | KL kept | margin kept |"
    lines = [head, "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cost = " / ".join(
            ([f"knob {r['knob_ms']:.0f} ms"] if "knob_ms" in r else [])
            + ([f"build {r['seconds']:.1f} s"] if "seconds" in r else [])
        )
        size = f"{r['bytes'] / 1e6:.0f} MB" if "bytes" in r else ""
        kept = " | ".join(f"{r[k]:.3f}" if k in r else "" for k in ("effect_kept", "margin_kept"))
        lines.append(
            f"| {r['model']} | {r['path']} | {r['gen_tps']:.1f} | {r['gen_rel']:.2f} | {r['prompt_rel']:.2f} | "
            f"{cost} | {size} | {kept} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="smollm2,synthetic-1b")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--export-lora", default=shutil.which("llama-export-lora"))
    ap.add_argument("--json", help="also write the rows as JSON here")
    ap.add_argument(
        "--own-type",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="rows merged at the base's own 4-bit type (delta-preserving and plain requantization; the former "
        "calibrates on the base in transformers: minutes above 1B)",
    )
    ap.add_argument("--work", help="directory for the large temporary files (default: the system's temp dir)")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="avgguf-bake-bench-", dir=args.work) as tmp:
        work = Path(tmp)
        if "smollm2" in args.models:
            mf = load_modelfile(ROOT / "modelfiles" / "demo.yaml")
            avs = dict(mf.av_paths)
            first = next(iter(avs))
            rows += run_model(
                "SmolLM2-135M Q4_1",
                mf.base_path,
                {"1 demo AV": {first: avs[first]}, "3 demo AVs": avs},
                args,
                work,
                fidelity=True,
            )
        for name in [m for m in args.models.split(",") if m in SYNTHETIC]:
            base = synthetic(work, name)
            sets = {}
            for rank in (16, 64) if name == "synthetic-1b" else (16,):  # 3B: rank 16 only (time)
                avs = {f"r{rank}-{i}": random_av(base, rank, i, work / f"{name}-r{rank}-{i}.gguf") for i in range(3)}
                sets[f"1 AV rank {rank}"] = {k: avs[k] for k in list(avs)[:1]}
                sets[f"3 AVs rank {rank}"] = avs
            rows += run_model(SYNTHETIC[name][0], base, sets, args, work, fidelity=False)
    print(
        f"\nGeneration speed relative to the base in the same run ({args.tokens} tokens greedy, median of "
        f"{args.repeats}, paths alternating, {os.cpu_count()} threads):\n"
    )
    print(render(rows))
    if args.json:
        Path(args.json).write_text(json.dumps([{k: v for k, v in r.items() if k != "_file"} for r in rows], indent=1))


if __name__ == "__main__":
    main()
