"""`avgguf inspect`: what a GGUF LoRA adapter holds, for avgguf's and other tools' adapters.

Everything read from an adapter (names, metadata strings, tensor names) is untrusted: terminal_safe escapes
control characters before anything is printed (a downloaded file could otherwise write the clipboard with
OSC 52 or rewrite the terminal title)."""

from __future__ import annotations

import os
import unicodedata

from avgguf.gguf import adapter_format as fmt


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
        row = {
            "name": name,
            "rank": p.rank,
            "lora_a": list(p.a_shape),
            "lora_b": list(p.b_shape),
            "types": f"{p.a_type.lower()}/{p.b_type.lower()}",
        }
        row.update(per_tensor.get(name, {}))
        tensors.append(row)
    skipped = [
        {"name": n, "energy": _at(meta.get(fmt.KEY_S_ENERGY), i), "reason": _at(meta.get(fmt.KEY_S_REASON), i)}
        for i, n in enumerate(meta.get(fmt.KEY_S_NAME) or [])
    ]
    # tensors in the file that llama.cpp loads and then skips (e.g. norms written by convert_lora_to_gguf.py)
    skipped += [
        {
            "name": n,
            "energy": None,
            "shape": list(shape),
            "reason": "in the file but not applied: llama.cpp skips *_norm.weight tensors in adapters",
        }
        for n, shape in info.ignored.items()
    ]
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


def terminal_safe(value) -> str:
    """`value` as text with every control or format character escaped (\\x1b, \\n, \\u202e, ...): safe to print
    to a terminal whatever an adapter's metadata holds."""
    text = value if isinstance(value, str) else str(value)
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() or ch == " " else _escape(ch) for ch in text)


def _escape(ch: str) -> str:
    code = ord(ch)
    if unicodedata.category(ch) == "Zs":  # unusual spaces are harmless
        return ch
    return f"\\x{code:02x}" if code < 0x100 else (f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")


def _at(values, i):
    return values[i] if values is not None and i < len(values) else None


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def render_table(d: dict) -> str:
    safe = terminal_safe
    lines = [
        f"{safe(d['file'])}  ({d['size_bytes'] / 1e6:.2f} MB)",
        f"  architecture {safe(d['architecture'])}, alpha {d['alpha']:g}, {d['n_pairs']} pairs, "
        f"rank {d['rank_min']}..{d['rank_max']}",
    ]
    if d["name"] is not None:
        lines.append(f"  name {safe(d['name'])}")
    for key, value in d["metadata"].items():
        if isinstance(value, float):
            value = f"{value:.6g}"
        lines.append(f"  {safe(key)} = {safe(value)}")
    if not d["made_by_avgguf"]:
        lines.append("  (not made by avgguf: no energy bookkeeping)")
    lines.append("")
    width = max([len(safe(t["name"])) for t in d["tensors"]] + [6])
    lines.append(f"{'tensor':<{width}}  {'rank':>5}  {'lora_a':>12}  {'lora_b':>12}  {'types':<9}  {'kept':>8}  {'rel err':>9}")
    for t in d["tensors"]:
        err = "-" if t.get("rel_error") is None else f"{t['rel_error']:.2e}"
        lines.append(
            f"{safe(t['name']):<{width}}  {t['rank']:>5}  {'x'.join(map(str, t['lora_a'])):>12}  "
            f"{'x'.join(map(str, t['lora_b'])):>12}  {t['types']:<9}  {_pct(t.get('energy_kept')):>8}  "
            f"{err:>9}"
        )
    if d["skipped"]:
        lines.append("")
        lines.append("not applied by llama.cpp (reported, not dropped silently):")
        for s in d["skipped"]:
            energy = "" if s["energy"] is None else f"energy {s['energy']:.4g}  "
            lines.append(f"  {safe(s['name']):<{width}}  {energy}{safe(s['reason'])}")
    return "\n".join(lines)
