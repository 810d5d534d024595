"""Extra llama.cpp contexts on an already loaded model: the weights are shared, each context has its own
adapter set and its own KV cache (what decoding-time alignment needs: one context per policy)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from avgguf.errors import AvggufError
from avgguf.runtime import llama

# Unified K/V (BatchContext): query rows per step at most, below llama.cpp's CPU flash-attention tile (64 rows,
# GGML_FA_TILE_Q), so a row takes the same row-at-a-time kernel in a big step as in a small one.
EXACT_ROWS = 63


# `serve --parallel` by default: 8 sequences where their K/V (f16, n_ctx cells each) fits AUTO_KV_BYTES, else 4
# (llama-server's default count). 8 pays on the CPU (bench/results/server_load.md: at 8 clients 1.28x
# llama-server's requests/s, 4: 1.10x); above 1 GiB of K/V the memory matters more.
AUTO_PARALLEL, FALLBACK_PARALLEL, AUTO_KV_BYTES = 8, 4, 1 << 30


def kv_bytes_per_token(shapes: dict[str, tuple[int, ...]]) -> int:
    """f16 K and V bytes one token takes in every layer (the rows of each attn_k/attn_v weight; 0 for a model
    without attention, e.g. recurrent)."""
    rows = sum(shape[0] for name, shape in shapes.items() if name.endswith((".attn_k.weight", ".attn_v.weight")))
    return 2 * rows


def auto_parallel(shapes: dict[str, tuple[int, ...]], n_ctx: int) -> int:
    """The sequences a batching context gets when none is asked for (AUTO_PARALLEL where it fits)."""
    return AUTO_PARALLEL if AUTO_PARALLEL * n_ctx * kv_bytes_per_token(shapes) <= AUTO_KV_BYTES else FALLBACK_PARALLEL


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
        self._keep = llama.set_adapters(self._ctx, adapters, "the adapters of a side context") if adapters else ()

    @property
    def ctx(self):
        """The llama_context pointer (control vectors: avgguf.runtime.cvec)."""
        return self._ctx

    def eval(self, tokens: Sequence[int]) -> None:
        import llama_cpp

        if self.n_past + len(tokens) > self.n_ctx:
            raise AvggufError(f"context full: {self.n_past} + {len(tokens)} tokens > {self.n_ctx}")
        for start in range(0, len(tokens), self._batch_size):
            chunk = list(tokens[start : start + self._batch_size])
            arr = (llama_cpp.llama_token * len(chunk))(*chunk)
            rc = llama_cpp.llama_decode(self._ctx, llama_cpp.llama_batch_get_one(arr, len(chunk)))
            if rc != 0:
                raise AvggufError(f"llama_decode failed in a side context (code {rc})")
            self.n_past += len(chunk)

    def logits(self) -> np.ndarray:
        return llama.logits_row(self._ctx, self.n_vocab).copy()  # float32, owned

    def reset(self) -> None:
        import llama_cpp

        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self._ctx), True)
        self.n_past = 0

    def close(self) -> None:
        import llama_cpp

        if self._ctx:
            llama_cpp.llama_free(self._ctx)
            self._ctx = None


class BatchContext:
    """A llama_context decoding several sequences per step (continuous batching), each token tagged with its
    sequence so attention never crosses sequences. K/V: a stream of `n_ctx_seq` cells per sequence (default),
    so a sequence's attention sums run over its own cells only and its answer does not depend on the others'
    attention; or (`unified`, llama-server's --kv-unified) one buffer of n_seq x n_ctx_seq cells shared by all,
    with flash attention: about twice the requests/s at 8 clients here, but not exact under load.

    Unified and float rounding (llama.cpp's CPU flash attention): a step of 64+ query rows takes a tiled
    kernel, fewer rows one row at a time over the buffer's cells (masked ones skipped exactly), one row next
    to 512+ cells splits them between threads. Steps here stay under EXACT_ROWS, so a prompt chunk next to
    other sequences' tokens never goes tiled (on the tests' tiny model, without the cap concurrent greedy
    answers differed from solo ones; with it they mostly agree). What is left (read from llama.cpp, not
    isolated): a sequence's cells are visited in buffer order, and where its new cells land depends on which
    cells the others freed (llama.cpp reuses the lowest free cells), so its attention sums run in another
    order under load; on SmolLM2 most 32-token greedy answers then part from the solo ones somewhere
    (bench/results/server_load.md), as llama-server's do on one set.
    The adapter set is the context's and may change between steps: K/V already stored for a sequence stays
    the one computed under that sequence's own set."""

    def __init__(self, model, params, n_vocab: int, n_seq: int, n_ctx_seq: int, unified: bool = False):
        import llama_cpp

        self.unified = unified
        params.n_seq_max = n_seq
        params.n_ctx = n_seq * n_ctx_seq  # unified: every sequence can reach n_ctx_seq while the others do
        params.n_outputs_max, params.n_outputs_max_per_seq = n_seq, 1  # one logits row per sequence and step
        params.kv_unified = unified
        if unified:  # llama-server's flash attention too (other rounding than `avgguf run`'s context)
            params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO
        self._ctx = llama_cpp.llama_init_from_model(model, params)
        if not self._ctx:
            raise AvggufError(
                f"llama.cpp could not create a context of {n_seq} x {n_ctx_seq} tokens "
                f"(out of memory? lower --parallel or --n-ctx)"
            )
        self.n_vocab, self.n_seq = n_vocab, n_seq
        self.capacity = max(1, min(params.n_batch, EXACT_ROWS) if unified else params.n_batch)
        self._batch = llama_cpp.llama_batch_init(self.capacity, 0, 1)
        self._keep: tuple = ()

    def set_adapters(self, pairs: Sequence[tuple[object, float]]) -> None:
        """The adapter set for the next decode steps ((handle, scale) pairs)."""
        self._keep = llama.set_adapters(self._ctx, pairs, "the adapters of the batch context")  # alive while used

    def decode(self, tokens: Sequence[tuple[int, int, int, bool]]) -> None:
        """One step: (token, position, sequence, wants logits) for at most `capacity` tokens."""
        import llama_cpp

        b = self._batch
        for i, (tok, pos, seq, logits) in enumerate(tokens):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, 1, logits
            b.seq_id[i][0] = seq
        b.n_tokens = len(tokens)
        rc = llama_cpp.llama_decode(self._ctx, b)
        if rc != 0:
            raise AvggufError(f"llama_decode failed for a batch of {len(tokens)} tokens (code {rc})")

    @property
    def ctx(self):
        """The llama_context pointer, for llama.cpp's samplers."""
        return self._ctx

    def logits(self, index: int) -> np.ndarray:
        """Logits of the batch entry `index` of the last step (a view, valid until the next step)."""
        return llama.logits_row(self._ctx, self.n_vocab, index)

    def forget(self, seq: int, keep: int = 0) -> bool:
        """Drop a sequence's K/V from position `keep` on; False where the memory cannot cut a sequence
        (recurrent state), then only keep=0 works."""
        import llama_cpp

        return bool(llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(self._ctx), seq, keep, -1))

    def set_threads(self, n: int) -> None:
        llama.set_threads(self._ctx, n)

    def close(self) -> None:
        import llama_cpp

        if self._ctx:
            llama_cpp.llama_batch_free(self._batch)
            llama_cpp.llama_free(self._ctx)
            self._ctx = None
