"""Several adapters at their coefficients as ONE adapter at scale 1: exact concatenation of the factors.

For every base tensor, A = [A_1; A_2; ...] (ranks stacked) and B = [c_1·B_1, c_2·B_2, ...], so
B @ A = Σ c_i·B_i @ A_i (per expert on a 3-D MoE expert stack, whose rank axis is the same): llama.cpp
then runs two matmuls per tensor instead of two per adapter. Where every source
stores a factor in the same quantized type, the fused factor is the byte concatenation of their
blocks (rows of A; column blocks of B, whose per-block scales are multiplied by c_i), so it is as small as
the sources together and exact up to one f16 rounding of each block scale; f16 sources stay f16 (B
rounded once after scaling); otherwise the factor is written in float32 (dequantized sources are exact in
f32).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QType

from avgguf.gguf import adapter_format as fmt
from avgguf.errors import AdapterError

log = logging.getLogger(__name__)

KEY_FUSED_NAMES = "avgguf.fused.names"
KEY_FUSED_COEFS = "avgguf.fused.coefficients"
# byte offsets of the f16 block scale d (and minimum m for the *_1 types) inside one block
_SCALE_FIELDS = {QType.Q8_0: (0,), QType.Q5_0: (0,), QType.Q4_0: (0,), QType.Q5_1: (0, 2), QType.Q4_1: (0, 2)}


@dataclass
class Factor:
    raw: np.ndarray  # as stored: float rows, or uint8 rows of blocks
    qtype: QType
    shape: tuple[int, ...]  # element shape, numpy order (3-D on a MoE expert stack: experts first)

    def floats(self) -> np.ndarray:
        return fmt.decode(self.raw, self.qtype).reshape(self.shape).astype(np.float32)


def _factor(t) -> Factor:
    return Factor(np.asarray(t.data), t.tensor_type, fmt.numpy_shape(t))


def scaled_blocks(raw: np.ndarray, qtype: QType, c: float) -> np.ndarray:
    """A quantized tensor times c: every block's f16 scale (and minimum) multiplied, the quants untouched."""
    _, size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = np.array(raw, dtype=np.uint8).reshape(-1, size)
    for offset in _SCALE_FIELDS[qtype]:
        field = blocks[:, offset : offset + 2].copy().view(np.float16)
        blocks[:, offset : offset + 2] = (field.astype(np.float32) * c).astype(np.float16).view(np.uint8)
    return blocks.reshape(raw.shape)


def _native(qtype: QType) -> bool:
    return qtype in _SCALE_FIELDS


def _fuse_a(parts: list[Factor], token_embd: bool, float_type: QType | None = None) -> Factor:
    axis = 1 if token_embd else -2  # the rank axis (rows of A; per expert on an expert stack)
    types = {p.qtype for p in parts}
    native = _native(next(iter(types))) or types <= {QType.F32, QType.F16}
    if len(types) == 1 and not token_embd and native and float_type is None:
        raw = np.concatenate([p.raw for p in parts], axis=-2)
        shape = (*parts[0].shape[:-2], sum(p.shape[-2] for p in parts), parts[0].shape[-1])
        return Factor(raw, parts[0].qtype, shape)
    data = np.concatenate([p.floats() for p in parts], axis=axis)
    return _as(data, float_type)


def _as(data: np.ndarray, float_type: QType | None) -> Factor:
    if float_type == QType.F16:
        return Factor(data.astype(np.float16), QType.F16, data.shape)
    return Factor(data, QType.F32, data.shape)


def _fuse_b(parts: list[Factor], coefs: list[float], float_type: QType | None = None) -> Factor:
    types = {p.qtype for p in parts}
    qtype = next(iter(types))
    if len(types) == 1 and _native(qtype) and float_type is None:
        raw = np.concatenate([scaled_blocks(p.raw, qtype, c) for p, c in zip(parts, coefs)], axis=-1)
        return Factor(raw, qtype, (*parts[0].shape[:-1], sum(p.shape[-1] for p in parts)))
    data = np.concatenate([c * p.floats() for p, c in zip(parts, coefs)], axis=-1)
    if float_type is None and types == {QType.F16}:  # f16 sources: stay f16 (half the bytes of f32)
        float_type = QType.F16
    return _as(data, float_type)


def _coefficient(reader_alpha: float, rank: int, c: float) -> float:
    """llama.cpp's per-tensor factor scale·alpha/r (alpha 0: just scale), folded into B."""
    return c * (reader_alpha / rank if reader_alpha else 1.0)


class Cancelled(Exception):
    """A background build whose coefficient set is no longer wanted."""


def write_fused(
    sources: list[tuple[str, Path, float]],
    out: Path,
    arch: str,
    extra: dict | None = None,
    float_type: QType | None = None,
    stop=None,
) -> Path:
    """Write the adapter equal to Σ c·adapter for (name, path, c) sources (c != 0), atomically; `extra`:
    more metadata (key -> value); `float_type` (F32/F16): every factor in that type instead of natively."""
    readers = [(name, gguf.GGUFReader(path), c) for name, path, c in sources]
    infos = [fmt.read_adapter(path) for _, path, _ in sources]
    bases = sorted({b for info in infos for b in info.pairs})
    writer = fmt.AdapterWriter(out, arch, "fused:" + "+".join(name for name, _, _ in sources))
    try:
        for base in bases:
            if stop is not None and stop():
                raise Cancelled
            a_parts, b_parts, coefs = [], [], []
            for (_, reader, c), info in zip(readers, infos):
                if base not in info.pairs:
                    continue
                tensors = {t.name: t for t in reader.tensors if t.name.startswith(base + ".lora_")}
                a_parts.append(_factor(tensors[base + fmt.LORA_A]))
                b_parts.append(_factor(tensors[base + fmt.LORA_B]))
                coefs.append(_coefficient(info.alpha, info.pairs[base].rank, c))
            a = _fuse_a(a_parts, base == fmt.TOKEN_EMBD, float_type)
            b = _fuse_b(b_parts, coefs, float_type)
            writer.add_raw_pair(base, a.raw, a.qtype, b.raw, b.qtype)
        writer.add_metadata(KEY_FUSED_NAMES, [name for name, _, _ in sources])
        writer.add_metadata(KEY_FUSED_COEFS, [float(c) for _, _, c in sources])
        for key, value in (extra or {}).items():
            writer.add_metadata(key, value)
        writer.commit()
    except BaseException:
        writer.abort()
        raise
    return out


def fused_path(directory: Path, key: tuple[tuple[str, float], ...]) -> Path:
    label = "_".join(f"{n}{v:+.6g}" for n, v in key)
    safe = "".join(ch if ch.isalnum() or ch in "+-._" else "-" for ch in label)[:120]
    return directory / f"fused-{os.getpid()}-{safe}.gguf"


def check_sources(sources: list[tuple[str, Path, float]]) -> None:
    if len(sources) < 1:
        raise AdapterError("nothing to fuse: every coefficient is 0")
