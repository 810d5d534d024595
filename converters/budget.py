"""`--max-size`: per-tensor rank and factor types that carry the most of an AV within a byte budget.

Pure math on the factors of pass 1 (numpy). For each tensor and each candidate (rank, lora_a type,
lora_b type) the expected squared error is

    tail(r) + kept(r) * (q_a + q_b)

where tail(r) is the energy of the dropped singular values and q_a, q_b are the relative squared
quantization errors of each factor type, measured on this tensor's own factors. A Lagrange multiplier
trades error against bytes; a bisection on it picks, for every tensor at once, the choice minimising
error + mu * bytes under the budget (the classic rate-distortion allocation, optimal for this model).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from avgguf.gguf import adapter_format as fmt
from avgguf.errors import ConversionError

RANKS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
TYPES = ("f32", "f16", "q8_0", "q5_0", "q4_0")
BUDGET_CAP_RANK = 128  # largest rank --max-size considers unless --max-rank says otherwise
FILE_OVERHEAD = 16384  # GGUF header, standard keys and avgguf.* scalars, with room to spare
PAIR_OVERHEAD = 320  # per pair: two tensor infos, alignment padding, bookkeeping arrays

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """'10MB' -> 10_000_000 bytes (KB/MB/GB are decimal, KiB/MiB/GiB binary)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text or "")
    unit = m.group(2).upper() if m else None
    if m is None or unit not in _UNITS:
        raise ConversionError(
            f"--max-size {text!r}: expected a size such as 2.5MB, 800KB or 1GB (units B, KB, MB, GB, KiB, MiB, GiB)"
        )
    return int(float(m.group(1)) * _UNITS[unit])


def pair_overhead(name: str) -> int:
    return PAIR_OVERHEAD + 3 * len(name)


@dataclass(frozen=True)
class Choice:
    rank: int
    type_a: str
    type_b: str
    nbytes: int
    error: float  # expected squared Frobenius error (absolute)


def _quant_error(arr: np.ndarray, dtype: str) -> float:
    """Relative squared error of storing arr (rows of a multiple of the block size) as dtype."""
    qtype = fmt.DTYPES[dtype]
    if not fmt.fits_type(qtype, arr.shape[-1]):
        return float("nan")
    seen = fmt.decode(fmt.encode(arr, qtype), qtype).reshape(arr.shape)
    return float(np.sum((seen - arr) ** 2, dtype=np.float64) / max(np.sum(arr.astype(np.float64) ** 2), 1e-300))


def candidates(
    name: str, shape: tuple[int, int], lora_a: np.ndarray, lora_b: np.ndarray, s2: np.ndarray, total: float, types=TYPES
) -> list[Choice]:
    """Every (rank, type_a, type_b) worth considering for one tensor. lora_a/lora_b are the pair at the
    largest rank (len(s2)), s2 the squared singular values, total the delta's energy."""
    cap = len(s2)
    qa = {t: _quant_error(lora_a, t) for t in types}
    qb = {t: _quant_error(lora_b, t) for t in types}
    cum = np.concatenate([[0.0], np.cumsum(s2, dtype=np.float64)])
    out = []
    for r in sorted({r for r in RANKS if r < cap} | {cap}):
        kept = float(cum[r])
        a_shape, b_shape = fmt.expected_pair_shapes(name, shape, r)
        for ta in types:
            for tb in types:
                if not fmt.fits_type(fmt.DTYPES[tb], r) or not fmt.fits_type(fmt.DTYPES[ta], a_shape[-1]):
                    continue
                nbytes = (
                    fmt.stored_bytes(fmt.DTYPES[ta], a_shape) + fmt.stored_bytes(fmt.DTYPES[tb], b_shape) + pair_overhead(name)
                )
                err = max(total - kept, 0.0) + kept * (qa[ta] + qb[tb])
                out.append(Choice(r, ta, tb, nbytes, err))
    return _pareto(out)


def _pareto(choices: list[Choice]) -> list[Choice]:
    """Drop choices that cost more bytes and do not lower the error."""
    front, best = [], float("inf")
    for c in sorted(choices, key=lambda c: (c.nbytes, c.error)):
        if c.error < best:
            front.append(c)
            best = c.error
    return front


def allocate(options: dict[str, list[Choice]], budget: int, fixed_overhead: int = FILE_OVERHEAD) -> dict[str, Choice]:
    """The choice per tensor minimising total error with total bytes + fixed_overhead <= budget."""
    room = budget - fixed_overhead
    smallest = sum(opts[0].nbytes for opts in options.values())
    if room < smallest:
        raise ConversionError(
            f"--max-size {budget} bytes is too small: even rank 1 in the smallest types needs "
            f"{smallest + fixed_overhead} bytes for {len(options)} tensors; raise --max-size"
        )

    def pick(mu: float) -> dict[str, Choice]:
        return {n: min(opts, key=lambda c: c.error + mu * c.nbytes) for n, opts in options.items()}

    def size(sel: dict[str, Choice]) -> int:
        return sum(c.nbytes for c in sel.values())

    best = pick(0.0)
    if size(best) <= room:
        return best
    lo, hi = 0.0, 1.0
    while size(pick(hi)) > room:
        hi *= 4.0
    best = pick(hi)
    for _ in range(80):  # bisection on mu (log scale once bracketed)
        mid = (lo + hi) / 2 if lo == 0.0 else float(np.sqrt(lo * hi))
        sel = pick(mid)
        if size(sel) <= room:
            hi, best = mid, sel
        else:
            lo = mid
        if lo > 0 and hi / lo < 1 + 1e-9:
            break
    return _fill(options, best, room)


def _fill(options: dict[str, list[Choice]], sel: dict[str, Choice], room: int) -> dict[str, Choice]:
    """Spend what the bisection left over on the upgrades with the best error drop per byte."""
    sel = dict(sel)
    left = room - sum(c.nbytes for c in sel.values())
    while True:
        best, gain = None, 0.0
        for n, opts in options.items():
            cur = sel[n]
            for c in opts:
                extra = c.nbytes - cur.nbytes
                if 0 < extra <= left and cur.error - c.error > 0 and (cur.error - c.error) / extra > gain:
                    best, gain = (n, c), (cur.error - c.error) / extra
        if best is None:
            return sel
        left -= best[1].nbytes - sel[best[0]].nbytes
        sel[best[0]] = best[1]
