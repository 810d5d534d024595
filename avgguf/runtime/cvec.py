"""Control vectors as knobs next to the LoRA AVs: loaded by name, each at its own scale in the coefficient set,
summed into one buffer and applied per context with llama.cpp's `llama_set_adapter_cvec`.

A coefficient set (avgguf.runtime.background.Key: the non-zero knobs, sorted by name) holds LoRA and
control-vector knobs alike; `split` separates them. The LoRA part goes where it always went (separate, fused
or merged weights: avgguf.runtime.adapter_sets), the control-vector part to whichever context computes. Like a
LoRA change, a control-vector change leaves the KV cache alone in llama.cpp: `ContextVectors.set` says when it
changed, and the caller resets that context's KV cache in the same step. The add is one per layer per token
whatever the number of vectors (they are summed here first). The file format: avgguf.gguf.control_vector.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from avgguf.errors import AvggufError
from avgguf.gguf import control_vector as cvf
from avgguf.runtime.background import Key

__all__ = ["ContextVectors", "ControlVectors", "LoadedControlVector"]


@dataclass
class LoadedControlVector:
    name: str
    path: Path
    vector: cvf.ControlVector


class ControlVectors:
    """An engine's control vectors by name, the model's shape and the layer range they apply to."""

    def __init__(self, n_embd: int, n_layer: int, base_arch: str, base_path: str):
        self.n_embd, self.n_layer = n_embd, n_layer
        self._arch, self._base = base_arch, base_path
        self.vectors: dict[str, LoadedControlVector] = {}
        self.start, self.end = cvf.layer_range(n_layer)
        self._buffers: dict[Key, object] = {}  # ctypes float arrays per control-vector set (small: layers x n_embd)

    @classmethod
    def for_model(cls, model, base_arch: str, base_path: str) -> ControlVectors:
        """For a loaded llama_model (its n_embd and n_layer as llama.cpp sees them)."""
        import llama_cpp

        return cls(int(llama_cpp.llama_model_n_embd(model)), int(llama_cpp.llama_model_n_layer(model)), base_arch, base_path)

    def load(self, name: str, path: str | os.PathLike) -> LoadedControlVector:
        path = Path(path)
        vector = cvf.read_control_vector(path)
        cvf.check_against_base(vector, self.n_embd, self.n_layer, self._arch, self._base)
        self.vectors[name] = loaded = LoadedControlVector(name, path, vector)
        return loaded

    def set_layer_range(self, start: int | None, end: int | None) -> None:
        """llama.cpp's --control-vector-layer-range (inclusive; <= 0 or None: its defaults)."""
        self.start, self.end = cvf.layer_range(self.n_layer, start, end)

    @property
    def layers(self) -> tuple[int, int]:
        return self.start, self.end

    def split(self, key: Key) -> tuple[Key, Key]:
        """(LoRA part, control-vector part) of a coefficient set."""
        return tuple(kv for kv in key if kv[0] not in self.vectors), tuple(kv for kv in key if kv[0] in self.vectors)

    def buffer(self, key: Key):
        """The summed directions of a control-vector set (llama.cpp's layout), cached per set."""
        buf = self._buffers.get(key)
        if buf is None:
            flat = cvf.flat_buffer([(self.vectors[n].vector, v) for n, v in key], self.n_embd, self.n_layer)
            buf = (ctypes.c_float * len(flat)).from_buffer_copy(np.ascontiguousarray(flat).tobytes())
            if len(self._buffers) >= 16:
                self._buffers.pop(next(iter(self._buffers)))
            self._buffers[key] = buf
        return buf

    def summed(self, key: Key) -> np.ndarray:
        """The buffer of a set as numpy ((n_layer - 1) x n_embd floats, layer 1 first)."""
        return np.frombuffer(self.buffer(key), dtype=np.float32).copy()


class ContextVectors:
    """What one llama_context's control vector is; `set` replaces it (an empty set clears it)."""

    def __init__(self, vectors: ControlVectors):
        self._vectors = vectors
        self.key: Key = ()
        self._range = vectors.layers
        self._keep = None  # the buffer llama.cpp copied from (kept for reuse; llama.cpp copies it)

    def set(self, ctx, key: Key) -> bool:
        """Apply this control-vector set to `ctx`; True if what it computes with changed (then the caller
        resets the context's KV cache)."""
        if key == self.key and self._range == self._vectors.layers:
            return False
        import llama_cpp

        v = self._vectors
        if key:
            buf = v.buffer(key)
            rc = llama_cpp.llama_set_adapter_cvec(ctx, buf, len(buf), v.n_embd, v.start, v.end)
        else:
            buf, rc = None, llama_cpp.llama_set_adapter_cvec(ctx, None, 0, v.n_embd, 0, 0)
        if rc != 0:
            raise AvggufError(f"llama.cpp could not set control vectors {dict(key)} (code {rc}; see --verbose)")
        self.key, self._range, self._keep = key, v.layers, buf
        return True
