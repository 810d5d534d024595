"""Extra llama.cpp contexts on an already loaded model: the weights are shared, each context has its own
adapter set and its own KV cache (what decoding-time alignment needs: one context per policy)."""

from __future__ import annotations

import ctypes
from collections.abc import Sequence

import numpy as np

from .errors import AvggufError


class SideContext:
    """A llama_context on `model` with fixed adapters; tokens are appended (KV kept), last logits read."""

    def __init__(self, model, params, n_vocab: int, n_ctx: int, adapters: Sequence[tuple[object, float]] = ()):
        """`params`: a llama_context_params (a copy of the main context's, so KV types etc. match)."""
        import llama_cpp

        self._ctx = llama_cpp.llama_init_from_model(model, params)
        if not self._ctx:
            raise AvggufError(f"llama.cpp could not create a context of {n_ctx} tokens (out of memory?)")
        self.n_vocab, self.n_ctx, self.n_past = n_vocab, n_ctx, 0
        self._batch_size = max(1, min(params.n_batch, n_ctx))
        n = len(adapters)
        # the arrays must stay alive while the context uses them
        self._handles = (llama_cpp.llama_adapter_lora_p_ctypes * max(n, 1))(*[h for h, _ in adapters])
        self._scales = (ctypes.c_float * max(n, 1))(*[s for _, s in adapters])
        if n and llama_cpp.llama_set_adapters_lora(self._ctx, self._handles, n, self._scales) != 0:
            raise AvggufError("llama.cpp could not set the adapters of a side context")

    def eval(self, tokens: Sequence[int]) -> None:
        import llama_cpp

        if self.n_past + len(tokens) > self.n_ctx:
            raise AvggufError(f"context full: {self.n_past} + {len(tokens)} tokens > {self.n_ctx}")
        for start in range(0, len(tokens), self._batch_size):
            chunk = list(tokens[start:start + self._batch_size])
            arr = (llama_cpp.llama_token * len(chunk))(*chunk)
            rc = llama_cpp.llama_decode(self._ctx, llama_cpp.llama_batch_get_one(arr, len(chunk)))
            if rc != 0:
                raise AvggufError(f"llama_decode failed in a side context (code {rc})")
            self.n_past += len(chunk)

    def logits(self) -> np.ndarray:
        import llama_cpp

        ptr = llama_cpp.llama_get_logits_ith(self._ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()  # float32, owned

    def reset(self) -> None:
        import llama_cpp

        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self._ctx), True)
        self.n_past = 0

    def close(self) -> None:
        import llama_cpp

        if self._ctx:
            llama_cpp.llama_free(self._ctx)
            self._ctx = None
