"""`avgguf inspect`: what a GGUF LoRA adapter holds, for avgguf's and other tools' adapters."""

from __future__ import annotations

import os

from . import adapter_format as fmt


def describe(path: str) -> dict:
    info = fmt.read_adapter(path)
    meta = info.meta
    per_tensor = {}
    names = meta.get(fmt.KEY_T_NAME) or []
    for i, name in enumerate(names):
        per_tensor[name] = {
            "energy": _at(meta.get(fmt.KEY_T_ENERGY), i),
            "energy_kept": _at(meta.get(fmt.KEY_T_KEPT), i),
            "rel_error": _at(meta.get(fmt.KEY_T_ERROR), i),
        }
    tensors = []
    for name, p in info.pairs.items():
        row = {"name": name, "rank": p.rank, "lora_a": list(p.a_shape), "lora_b": list(p.b_shape),
               "types": f"{p.a_type.lower()}/{p.b_type.lower()}"}
        row.update(per_tensor.get(name, {}))
        tensors.append(row)
    skipped = [{"name": n, "energy": _at(meta.get(fmt.KEY_S_ENERGY), i), "reason": _at(meta.get(fmt.KEY_S_REASON), i)}
               for i, n in enumerate(meta.get(fmt.KEY_S_NAME) or [])]
    # tensors in the file that llama.cpp loads and then skips (e.g. norms written by convert_lora_to_gguf.py)
    skipped += [{"name": n, "energy": None, "shape": list(shape),
                 "reason": "in the file but not applied: llama.cpp skips *_norm.weight tensors in adapters"}
                for n, shape in info.ignored.items()]
    ranks = [p.rank for p in info.pairs.values()]
    return {
        "file": str(info.path),
        "size_bytes": os.path.getsize(info.path),
        "architecture": info.arch,
        "alpha": info.alpha,
        "name": info.name,
        "made_by_avgguf": fmt.KEY_VERSION in meta,
        "n_pairs": len(info.pairs),
        "rank_min": min(ranks) if ranks else 0,
        "rank_max": max(ranks) if ranks else 0,
        "metadata": {k: v for k, v in meta.items() if not k.startswith(("avgguf.tensors.", "avgguf.skipped."))},
        "tensors": tensors,
        "skipped": skipped,
    }


def _at(values, i):
    return values[i] if values is not None and i < len(values) else None


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def render_table(d: dict) -> str:
    lines = [f"{d['file']}  ({d['size_bytes'] / 1e6:.2f} MB)",
             f"  architecture {d['architecture']}, alpha {d['alpha']:g}, {d['n_pairs']} pairs, "
             f"rank {d['rank_min']}..{d['rank_max']}"]
    for key, value in d["metadata"].items():
        if isinstance(value, float):
            value = f"{value:.6g}"
        lines.append(f"  {key} = {value}")
    if not d["made_by_avgguf"]:
        lines.append("  (not made by avgguf: no energy bookkeeping)")
    lines.append("")
    width = max([len(t["name"]) for t in d["tensors"]] + [6])
    lines.append(f"{'tensor':<{width}}  {'rank':>5}  {'lora_a':>12}  {'lora_b':>12}  {'types':<9}  "
                 f"{'kept':>8}  {'rel err':>9}")
    for t in d["tensors"]:
        err = "-" if t.get("rel_error") is None else f"{t['rel_error']:.2e}"
        lines.append(f"{t['name']:<{width}}  {t['rank']:>5}  {'x'.join(map(str, t['lora_a'])):>12}  "
                     f"{'x'.join(map(str, t['lora_b'])):>12}  {t['types']:<9}  {_pct(t.get('energy_kept')):>8}  "
                     f"{err:>9}")
    if d["skipped"]:
        lines.append("")
        lines.append("not applied by llama.cpp (reported, not dropped silently):")
        for s in d["skipped"]:
            energy = "" if s["energy"] is None else f"energy {s['energy']:.4g}  "
            lines.append(f"  {s['name']:<{width}}  {energy}{s['reason']}")
    return "\n".join(lines)
