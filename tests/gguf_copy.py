"""Write a model GGUF like another one (same metadata, same tensors as stored) with some tensors replaced
by float32 data: merged-weight references for tests and benchmarks, f32 copies of quantized models."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import gguf
import numpy as np

from avgguf.gguf.adapter_format import copy_metadata


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
        copy_metadata(reader, w)
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
