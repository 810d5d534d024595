"""`avgguf bake --format gguf` at the base's own quantized type by delta-preserving requantization
(avgguf/gguf/requant.py): every merged tensor keeps the base's blocks and type, only the integer values the
AV's effect needs change, chosen against the layer inputs' H = XᵀX of the base on calibration text
(avgguf.converters.hessians, which runs the base in transformers: torch is needed for this route only).
Tensors the profile does not touch are copied as stored; float tensors it touches stay in their float type."""

from __future__ import annotations

import time
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QType
from gguf import quants

from avgguf import atomic
from avgguf.errors import AvggufError
from avgguf.export.merge import Bake, write_merged
from avgguf.gguf import requant

FLOAT_TYPES = (QType.F32, QType.F16, QType.BF16)


def _hessians(base: Path, calibration, progress: bool) -> dict:
    try:
        from avgguf.converters.hessians import collect
    except ImportError as exc:
        raise AvggufError(
            f"baking at the base's own type keeps the AVs' effect by calibrating on the base, which needs "
            f"torch and transformers ({exc.name} is missing): pip install 'avgguf[convert]', or bake with --type q8_0"
        ) from None
    hessians, _ = collect(base, calibration, progress=progress)
    return hessians


def keep_type(hessians: dict):
    """The per-tensor function of bake.write_merged: merged float32 -> the tensor's own type."""

    def convert(tensor, merged: np.ndarray) -> np.ndarray:
        if tensor.tensor_type in FLOAT_TYPES:
            return quants.quantize(merged, tensor.tensor_type).reshape(np.asarray(tensor.data).shape)
        flat = merged.reshape(-1, merged.shape[-1])
        h = hessians.get(tensor.name) if merged.ndim == 2 else None  # expert stacks: nearest rounding
        return requant.requantize(np.asarray(tensor.data), tensor.tensor_type, flat, h)

    return convert


def check_types(reader: gguf.GGUFReader, touched: set[str]) -> None:
    """AvggufError naming the first merged tensor whose type cannot be changed in place (IQ* codebooks)."""
    for t in reader.tensors:
        if t.name in touched and t.tensor_type not in FLOAT_TYPES:
            try:
                requant.layout(t.tensor_type)
            except AvggufError as exc:
                raise AvggufError(f"tensor {t.name!r}: {exc}") from None


def baked_kept_type(bake: Bake, out: Path, touched: set[str], progress: bool = False, stop=None, calibration=None) -> dict:
    """The profile merged into the base at the base's own types (see the module's doc)."""
    base = Path(bake.modelfile.base_path)
    reader = gguf.GGUFReader(base)
    check_types(reader, touched)
    t0 = time.perf_counter()
    hessians = _hessians(base, calibration, progress)
    calibrate_s = time.perf_counter() - t0
    with atomic.output_file(out, needed_bytes=base.stat().st_size, **bake.file_policy("model")) as partial:
        write_merged(bake, partial, progress, stop, keep_type=keep_type(hessians))
    return {
        "format": "gguf",
        "requantization": "delta-preserving (the base's blocks kept)",
        "bytes": out.stat().st_size,
        "calibration_s": round(calibrate_s, 1),
    }
