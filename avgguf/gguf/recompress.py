"""A (fused) adapter re-compressed to one low rank per tensor: each pair's B @ A truncated by an exact SVD of the
small core after QR of both factors (never the full product). Used by `avgguf bake --format adapter --rank R`
and by the live path between a knob change and a merged set (`defaults: fused_rank:` in a modelfile)."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

from avgguf.gguf import adapter_format as fmt
from avgguf.gguf.fuse import Cancelled


def write_recompressed(src: Path, out: Path, arch: str, rank: int, extra: dict | None = None, stop=None) -> float:
    """Write `src` truncated to `rank` per tensor (f16 factors) to `out`; the share of the adapter's energy
    (squared Frobenius norm of every B @ A, summed) kept, 1.0 = exact. `stop`: checked per tensor (Cancelled)."""
    info = fmt.read_adapter(src)
    tensors = {t.name: t for t in gguf.GGUFReader(src).tensors}
    writer = fmt.AdapterWriter(out, arch, f"{info.name} rank {rank}")
    kept = total = 0.0
    try:
        for base in info.pairs:
            if stop is not None and stop():
                raise Cancelled
            a, b = (fmt.tensor_floats(tensors[base + s], np.float64) for s in (fmt.LORA_A, fmt.LORA_B))
            delta_left, delta_right = (a, b.T) if base == fmt.TOKEN_EMBD else (b, a)  # delta = left @ right
            left, right, energy = truncated_product(delta_left, delta_right, rank)
            kept, total = kept + energy[0], total + energy[1]
            la, lb = fmt.pair_from_factors(base, left, right)
            writer.add_pair(base, la, lb, "f16")
        writer.add_metadata("avgguf.recompress.rank", rank)
        writer.add_metadata("avgguf.recompress.energy_kept", kept / total if total else 1.0)
        for key, value in (extra or {}).items():
            writer.add_metadata(key, value)
        writer.commit()
    except BaseException:
        writer.abort()
        raise
    return kept / total if total else 1.0


def truncated_product(left: np.ndarray, right: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray, tuple[float, float]]:
    """left @ right truncated to `rank`, and (energy kept, energy) of the product; a MoE expert stack
    (E, out, r) @ (E, r, in) per expert, at one rank."""
    if left.ndim == 3:
        parts = [truncated_product(le, ri, rank) for le, ri in zip(left, right)]
        energy = (sum(p[2][0] for p in parts), sum(p[2][1] for p in parts))
        return np.stack([p[0] for p in parts]), np.stack([p[1] for p in parts]), energy
    ql, rl = np.linalg.qr(left)
    qr_, rr = np.linalg.qr(right.T)
    u, s, vt = np.linalg.svd(rl @ rr.T)
    k = min(rank, len(s))
    root = np.sqrt(s[:k])
    return (ql @ u[:, :k]) * root, (root[:, None] * vt[:k]) @ qr_.T, (float(np.sum(s[:k] ** 2)), float(np.sum(s**2)))
