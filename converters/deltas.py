"""The deltas aligned - base of a pair, tensor by tensor, with bounded memory.

A tensor up to `STREAM_ELEMENTS` is read whole; a bigger one (an 8B model's untied token_embd / output:
128256 x 4096, 2.1 GB as float32; a Qwen3-30B-A3B expert stack, 128 x 768 x 2048) is a `StreamedDelta`,
read in row chunks (experts) by converters.streaming and by the error check, so that no copy of it is ever
whole in memory. Tensors llama.cpp never applies are only
measured (row chunks) and booked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from avgguf.errors import ConversionError
from avgguf.gguf import adapter_format as fmt
from avgguf.gguf.arches import qk_heads, unapplied_reason

from .lowrank import Factors, RankPolicy, factorize
from .sources import TensorSource
from .streaming import streamed_factorize, streamed_factorize_experts

CHUNK_ELEMENTS = 1 << 24  # elements per row chunk (64 MB of float32)
STREAM_ELEMENTS = 1 << 26  # a 2-D delta above this many elements (256 MB of float32) is never read whole


def chunk_rows(shape: tuple[int, ...]) -> int:
    """Rows (experts, for a 3-D stack) per chunk of about CHUNK_ELEMENTS."""
    return max(1, CHUNK_ELEMENTS // max(1, int(np.prod(shape[1:], dtype=np.int64))))


def row_chunks(shape: tuple[int, ...]):
    step = chunk_rows(shape)
    for start in range(0, shape[0], step):
        yield start, min(shape[0], start + step)


@dataclass
class StreamedDelta:
    """aligned - base of one big tensor, read only as rows start:stop (experts, of a 3-D expert stack)."""

    base: TensorSource
    aligned: TensorSource
    name: str
    shape: tuple[int, ...]

    def rows(self, start: int, stop: int) -> np.ndarray:
        chunk = self.aligned.load_rows(self.name, start, stop)
        chunk -= self.base.load_rows(self.name, start, stop)
        check_finite(chunk, self.name, self.base, self.aligned)
        return chunk


Delta = np.ndarray | StreamedDelta


def rows_of(delta: Delta) -> Callable[[int, int], np.ndarray]:
    return delta.rows if isinstance(delta, StreamedDelta) else (lambda a, b: delta[a:b])


def factor(delta: Delta, policy: RankPolicy, device: str = "cpu") -> Factors:
    if isinstance(delta, StreamedDelta) and len(delta.shape) == 3:
        return streamed_factorize_experts(delta.rows, delta.shape, policy, chunk_rows(delta.shape))
    if isinstance(delta, StreamedDelta):
        return streamed_factorize(delta.rows, delta.shape, policy, chunk_rows(delta.shape))
    return factorize(delta, policy, device)


def check_finite(delta: np.ndarray, tname: str, base: TensorSource, aligned: TensorSource) -> None:
    if not np.all(np.isfinite(delta)):
        raise ConversionError(
            f"tensor {tname!r}: the delta has NaN/Inf values ({base.path} vs {aligned.path}); check both checkpoints"
        )


def delta_energy(base: TensorSource, aligned: TensorSource, tname: str) -> float:
    """Σ delta² of one tensor, read in row chunks."""
    d = StreamedDelta(base, aligned, tname, tuple(base.shape(tname)))
    return sum(float(np.sum(np.square(d.rows(a, b), dtype=np.float64))) for a, b in row_chunks(d.shape))


def _streamed(base: TensorSource, tname: str, shape: tuple[int, ...]) -> bool:
    """Big 2-D tensors whose rows read the same on both sides (Q/K rows of a Hugging Face checkpoint are
    permuted only by a whole load; they are never this big), and big MoE expert stacks (read by experts)."""
    if int(np.prod(shape, dtype=np.int64)) <= STREAM_ELEMENTS:
        return False
    if len(shape) == 3:
        return fmt.is_expert(tname)
    return len(shape) == 2 and qk_heads(base.arch, tname, base.n_head, base.n_head_kv) is None


def load_delta(base: TensorSource, aligned: TensorSource, tname: str) -> Delta:
    shape = tuple(base.shape(tname))
    if _streamed(base, tname, shape):
        return StreamedDelta(base, aligned, tname, shape)
    delta = aligned.load(tname)
    delta -= base.load(tname)
    check_finite(delta, tname, base, aligned)
    return delta


def applicable_deltas(base: TensorSource, aligned: TensorSource, names, book_zero, book_skip):
    """(name, delta) for every tensor llama.cpp can apply, in `names` order; zero deltas go to book_zero(),
    unapplicable ones to book_skip(name, energy, reason), measured in row chunks and never loaded whole."""
    tied = base.tied_embeddings
    for tname in names:
        shape = tuple(base.shape(tname))
        # the architecture's own reason first: it is the true one where both apply (DeepSeek's 3-D attn_k_b)
        reason = unapplied_reason(base.arch, tname) or fmt.unapplicable_reason(tname, len(shape), tied)
        if reason:
            energy = delta_energy(base, aligned, tname)
            if energy == 0.0:
                book_zero()
            else:
                book_skip(tname, energy, reason)
            continue
        delta = load_delta(base, aligned, tname)
        zero = delta_energy(base, aligned, tname) == 0.0 if isinstance(delta, StreamedDelta) else not np.any(delta)
        if zero:
            book_zero()
            continue
        yield tname, delta


def relative_error(name: str, shape: tuple[int, ...], delta_rows, lora_a: np.ndarray, lora_b: np.ndarray) -> float:
    """||delta - applied|| / ||delta||, where applied is what llama.cpp adds for the written pair; row chunk by
    row chunk (expert by expert), so neither is ever whole in memory."""
    num = den = 0.0
    for a, b in row_chunks(shape):
        d = np.asarray(delta_rows(a, b), dtype=np.float32)
        num += float(np.sum(np.square(d - fmt.delta_from_pair(name, lora_a, lora_b, a, b), dtype=np.float64)))
        den += float(np.sum(np.square(d, dtype=np.float64)))
    return float(np.sqrt(num) / max(np.sqrt(den), 1e-30))
