"""The one module that reaches past llama-cpp-python's public `Llama` API: how a model is loaded.

llama.cpp puts a model's quantized matmul weights in an "extra" CPU buffer type where the CPU has one. On
Intel AMX CPUs (Sapphire Rapids and later) that is the AMX buffer, whose kernels segfault on some shapes
(reproduced here: a 64-wide q8_0 model crashes in its first decode; upstream: ggml-org/llama.cpp#20824,
#11115). avgguf therefore loads without extra buffer types where the CPU has AMX; elsewhere llama.cpp's
default stands (its repacked Q4_0 kernels are the fast path on AVX2/ARM). AVGGUF_EXTRA_BUFTS=1 or 0 overrides.
"""

from __future__ import annotations

import os
import threading
from functools import lru_cache
from pathlib import Path

_DEFAULTS = threading.Lock()  # the default-params hook is process-global while a model loads


@lru_cache(maxsize=1)
def cpu_has_amx() -> bool:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            return any(line.startswith("flags") and " amx_tile" in line for line in f)
    except OSError:
        return False


def use_extra_bufts() -> bool:
    """Whether models load with llama.cpp's extra CPU buffer types (AMX, repacked weights)."""
    forced = os.environ.get("AVGGUF_EXTRA_BUFTS", "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    return not cpu_has_amx()


def load_llama(path: Path, **kwargs):
    """`llama_cpp.Llama(model_path=path, **kwargs)`, with the extra-buffer policy above."""
    import llama_cpp
    import llama_cpp.llama_cpp as C

    if use_extra_bufts():
        return llama_cpp.Llama(model_path=str(path), **kwargs)
    with _DEFAULTS:
        original = C.llama_model_default_params

        def defaults():
            params = original()
            params.use_extra_bufts = False
            return params

        C.llama_model_default_params = defaults  # Llama() takes its model params from here
        try:
            return llama_cpp.Llama(model_path=str(path), **kwargs)
        finally:
            C.llama_model_default_params = original
