"""Delta-preserving requantization: a merged tensor written in the base's own quantized type *without*
re-deciding its roundings. Every block keeps the base's bytes that are not quantized values (scales, mins,
K-quant super-block scales); only the integer values change, chosen on the layer's inputs: starting from
the base's own values, exact coordinate descent on ‖X(W' − W − ΔW)‖² = Σ_rows eᵀHe (H = XᵀX from
calibration text) moves each value by its rounded optimal step given all the others, so many small moves
add up to ΔW's effect on real activations even where ΔW is far below one quantization step, and the error
never exceeds keeping the base as it is. (GPTQ's greedy column-by-column rounding kept less of a sub-step
delta in tests/test_requant.py's layer: 0.73 vs 0.82 at a fifth of a step.) A fresh quantization of W + ΔW
instead picks new scales and roundings whose noise is larger than the AV itself (bench/bake_speed.py:
0.05-0.10 of the effect kept at Q4_1).

The layout of each type (which bits of a block are which element's value, with which weight) is not written
down here: it is probed once per type from gguf-py's own dequantizer, so every type gguf-py can dequantize
whose values are plain integers in fixed bit positions works (Q4_0/1, Q5_0/1, Q8_0, Q2_K-Q6_K); codebook
types (IQ*) are refused with a clear error."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import gguf
import numpy as np
from gguf import quants

from avgguf.errors import AvggufError

DAMP = 0.01  # fraction of H's mean diagonal added to it (GPTQ's damping)
BLOCK_COLS = 128  # columns per lazy-batch update


@dataclass(frozen=True)
class Layout:
    """Where each element of one block keeps its integer value: value = Σ_k weight[e, k]·bit(byte[e, k], bit[e, k])
    (weight 0 marks an unused slot). `q_bytes`: bytes holding value bits only (scales live elsewhere)."""

    byte: np.ndarray  # [elements, slots] int
    bit: np.ndarray  # [elements, slots] int
    weight: np.ndarray  # [elements, slots] int, powers of two (the top one negative for signed types)
    block_bytes: int

    @property
    def q_min(self) -> int:
        return int(np.minimum(self.weight, 0).sum(axis=1).max())

    @property
    def q_max(self) -> int:
        return int(np.maximum(self.weight, 0).sum(axis=1).min())


def _dequant_block(block: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    return quants.dequantize(block.reshape(1, -1), qtype).reshape(-1).astype(np.float64)


def _value_bits(block: np.ndarray, qtype) -> list[tuple[int, int, int, float]]:
    """(byte, bit, element, change) for every bit whose flip moves exactly one element of `block`."""
    ref = _dequant_block(block, qtype)
    found = []
    for byte in range(block.size):
        for bit in range(8):
            flipped = block.copy()
            flipped[byte] ^= np.uint8(1 << bit)
            with np.errstate(all="ignore"):
                diff = _dequant_block(flipped, qtype) - ref
            moved = np.flatnonzero(np.abs(diff) > 0)
            if moved.size == 1 and np.isfinite(diff[moved[0]]):
                # the change if the bit goes 0 -> 1
                sign = 1.0 if not (block[byte] >> bit) & 1 else -1.0
                found.append((byte, bit, int(moved[0]), sign * float(diff[moved[0]])))
    return found


@lru_cache(maxsize=None)
def layout(qtype: gguf.GGMLQuantizationType) -> Layout:
    """The value-bit layout of `qtype`, probed from gguf-py's dequantizer on a block with moderate random
    scales (AvggufError for a type whose values are not plain integers)."""
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(0)
    for _ in range(16):
        block = _probe_block(rng, type_size)
        bits = _value_bits(block, qtype)
        per_element: dict[int, list] = {}
        for byte, bit, element, change in bits:
            per_element.setdefault(element, []).append((byte, bit, change))
        found = _layout_from(per_element, block_size, type_size) if len(per_element) == block_size else None
        if found is not None:
            return found
    raise AvggufError(
        f"{qtype.name} is not a type whose values can be changed in place (not plain integers per element); "
        f"bake with --type q8_0 or give a base of another type"
    )


def _probe_block(rng, type_size: int) -> np.ndarray:
    """Random bytes: scale fields are then ordinary nonzero numbers almost always (a block where they are not
    leaves some element without single-element bits, and the caller draws another)."""
    return rng.integers(0, 256, type_size, dtype=np.uint8)


def _layout_from(per_element: dict, block_size: int, type_size: int) -> Layout | None:
    """The layout, or None where this probe's float rounding hides a bit's power of two (draw another)."""
    slots = max(len(v) for v in per_element.values())
    byte = np.zeros((block_size, slots), np.int64)
    bit = np.zeros((block_size, slots), np.int64)
    weight = np.zeros((block_size, slots), np.int64)
    for e, entries in per_element.items():
        unit = min((c for _, _, c in entries), key=abs)  # the lowest bit: weight +1 by definition
        for k, (b, bt, change) in enumerate(entries):
            ratio = change / unit
            w = int(round(ratio))
            if abs(ratio - w) > 1e-3 or w == 0 or (abs(w) & (abs(w) - 1)):
                return None
            byte[e, k], bit[e, k], weight[e, k] = b, bt, w
    return Layout(byte, bit, weight, type_size)


# --- one tensor ---------------------------------------------------------------------------------------------


def _blocks(raw: np.ndarray, qtype) -> np.ndarray:
    type_size = gguf.GGML_QUANT_SIZES[qtype][1]
    return np.ascontiguousarray(raw).reshape(-1, type_size)


def _cleared(blocks: np.ndarray, lay: Layout) -> np.ndarray:
    """`blocks` with every value bit 0 (scales untouched)."""
    out = blocks.copy()
    mask = np.full(lay.block_bytes, 0xFF, np.uint8)
    for e in range(lay.byte.shape[0]):
        for k in np.flatnonzero(lay.weight[e]):
            mask[lay.byte[e, k]] &= np.uint8(~(1 << lay.bit[e, k]) & 0xFF)
    return out & mask


def pack(blocks: np.ndarray, values: np.ndarray, lay: Layout) -> np.ndarray:
    """`blocks` with each element's value replaced by `values` ([n_blocks, block_size] ints in range)."""
    out = _cleared(blocks, lay)
    n_bits = {e: int(np.count_nonzero(lay.weight[e])) for e in range(lay.byte.shape[0])}
    u = np.asarray(values, np.int64) % (1 << max(n_bits.values()))  # two's complement for the signed types
    for k in range(lay.byte.shape[1]):
        used = np.flatnonzero(lay.weight[:, k])
        power = np.log2(np.abs(lay.weight[used, k])).astype(np.int64)
        bits = ((u[:, used] >> power) & 1).astype(np.uint8) << lay.bit[used, k].astype(np.uint8)
        for byte in np.unique(lay.byte[used, k]):
            sel = lay.byte[used, k] == byte
            out[:, byte] |= np.bitwise_or.reduce(bits[:, sel], axis=1)
    return out


def unpack(blocks: np.ndarray, lay: Layout) -> np.ndarray:
    """Each element's integer value ([n_blocks, block_size]), read from its bits."""
    values = np.zeros((blocks.shape[0], lay.byte.shape[0]), np.int64)
    for k in range(lay.byte.shape[1]):
        bits = (blocks[:, lay.byte[:, k]] >> lay.bit[:, k].astype(np.uint8)) & 1
        values += bits.astype(np.int64) * lay.weight[:, k]
    return values


@dataclass
class Grid:
    """Per element of a quantized tensor: dequantized = scale·value + offset, value an integer in [lo, hi]."""

    scale: np.ndarray
    offset: np.ndarray
    values: np.ndarray
    lo: int
    hi: int


def grid(raw: np.ndarray, qtype, shape: tuple[int, int]) -> Grid:
    """The base's own grid for tensor `raw` (numpy shape `shape`): its scales, offsets and integer values."""
    lay = layout(qtype)
    blocks = _blocks(raw, qtype)
    zero = _cleared(blocks, lay)
    ones = pack(blocks, np.ones((blocks.shape[0], lay.byte.shape[0]), np.int64), lay)
    offset = quants.dequantize(zero, qtype).reshape(shape).astype(np.float32)
    scale = quants.dequantize(ones, qtype).reshape(shape).astype(np.float32) - offset
    return Grid(scale, offset, unpack(blocks, lay).reshape(shape), lay.q_min, lay.q_max)


def feedback_values(target: np.ndarray, g: Grid, h: np.ndarray | None) -> np.ndarray:
    """Integer values on the base's grid for `target` ([rows, cols] float32; cols are the layer's inputs):
    nearest rounding, then with H coordinate descent on ‖X(W' − target)‖² (see descend)."""
    values = _nearest(target, g)
    return values if h is None else descend(values, target, g, h)


def descend(values: np.ndarray, target: np.ndarray, g: Grid, h: np.ndarray, sweeps: int = 2) -> np.ndarray:
    """Exact coordinate descent on ‖X(W' − target)‖² = Σ_rows eᵀHe (e = W' − target) from `values`: each
    integer value moves by the rounded optimal step given all others, so the error never grows (unlike
    greedy rounding); block-lazy updates of the gradient G = E·H, all rows at once."""
    h = np.asarray(h, np.float32) + DAMP * float(np.mean(np.diag(h))) * np.eye(h.shape[0], dtype=np.float32)
    values = values.copy()
    err = g.scale * values + g.offset - np.asarray(target, np.float32)
    grad = err @ h
    diag = np.diag(h)
    cols = values.shape[1]
    for _ in range(sweeps):
        for i1 in range(0, cols, BLOCK_COLS):
            i2 = min(i1 + BLOCK_COLS, cols)
            moved = np.zeros((values.shape[0], i2 - i1), np.float32)
            for j in range(i1, i2):
                s = g.scale[:, j]
                with np.errstate(divide="ignore", invalid="ignore"):
                    step = np.where(s != 0, np.rint(-grad[:, j] / (s * diag[j])), 0)
                new = np.clip(values[:, j] + step, g.lo, g.hi)
                change = (new - values[:, j]) * s
                values[:, j] = new
                grad[:, i1:i2] += np.outer(change, h[j, i1:i2])
                moved[:, j - i1] = change
            grad[:, :i1] += moved @ h[i1:i2, :i1]
            grad[:, i2:] += moved @ h[i1:i2, i2:]
    return values


def _nearest(target: np.ndarray, g: Grid) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.rint((target - g.offset) / g.scale)
    q = np.where(g.scale != 0, q, g.values)
    return np.clip(q, g.lo, g.hi).astype(np.int64)


def requantize(raw: np.ndarray, qtype, target: np.ndarray, h: np.ndarray | None = None) -> np.ndarray:
    """`raw` (the base tensor's blocks, as gguf-py reads them) moved toward `target` (float32, numpy shape
    [rows, cols]) on the base's own grid; the result has `raw`'s dtype and shape."""
    g = grid(raw, qtype, target.shape)
    values = feedback_values(target, g, h)
    lay = layout(qtype)
    blocks = pack(_blocks(raw, qtype), values.reshape(-1, lay.byte.shape[0]), lay)
    return blocks.reshape(raw.shape)
