"""A model GGUF written like another one (same metadata, same tensors as stored) with some tensors replaced by
float32 data: merged-weight references for the tests and benchmarks, f32 copies of quantized models."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

from avgguf import atomic
from avgguf.gguf.adapter_format import copy_metadata


def copy_gguf(src: str | Path, dst: str | Path, replace: dict[str, np.ndarray]) -> Path:
    """`src` as `dst` (replaced atomically if it exists), the tensors named in `replace` stored as those
    float32 arrays (numpy shape, as the reader gives it); KeyError naming a tensor `src` does not have."""
    src, dst = Path(src), Path(dst)
    reader = gguf.GGUFReader(src)
    arch = reader.get_field(gguf.Keys.General.ARCHITECTURE).contents()
    unknown = sorted(set(replace) - {t.name for t in reader.tensors})
    if unknown:
        raise KeyError(f"{src} has no tensor {unknown[0]!r}")
    with atomic.output_file(dst, force=True, inputs=[src]) as tmp:
        w = gguf.GGUFWriter(str(tmp), arch)
        try:
            copy_metadata(reader, w)
            for t in reader.tensors:
                if t.name in replace:
                    w.add_tensor(t.name, np.ascontiguousarray(replace[t.name], dtype=np.float32))
                else:
                    w.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
        finally:
            w.close()
    return dst
