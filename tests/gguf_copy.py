"""Write a model GGUF like another one (same metadata, same tensors as stored) with some tensors replaced
by float32 data: merged-weight references for tests and benchmarks, f32 copies of quantized models."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import gguf


def copy_gguf(src: str | Path, dst: str | Path, replace: dict[str, np.ndarray]) -> Path:
    src, dst = Path(src), Path(dst)
    reader = gguf.GGUFReader(src)
    arch = reader.get_field(gguf.Keys.General.ARCHITECTURE).contents()
    unknown = sorted(set(replace) - {t.name for t in reader.tensors})
    if unknown:
        raise KeyError(f"{src} has no tensor {unknown[0]!r}")
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=".avgguf-", suffix=".gguf.partial")
    os.close(fd)
    w = gguf.GGUFWriter(tmp, arch)
    try:
        for key, f in reader.fields.items():
            if key.startswith("GGUF.") or key == gguf.Keys.General.ARCHITECTURE:
                continue
            sub = f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
            w.add_key_value(key, f.contents(), f.types[0], sub_type=sub)
        for t in reader.tensors:
            if t.name in replace:
                w.add_tensor(t.name, np.ascontiguousarray(replace[t.name], dtype=np.float32))
            else:
                w.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, dst)
    except BaseException:
        w.close()
        Path(tmp).unlink(missing_ok=True)
        raise
    return dst
