"""Low-rank factorisation of a delta that is only ever read in row chunks (issue #22: an 8B model's untied
token_embd / output delta is 128256 x 4096, 2.1 GB as float32; whole, it and its temporaries break a 2 GB
peak-RSS budget).

`streamed_factorize` returns the same `converters.lowrank.Factors` as `lowrank.factorize` (left = U sqrt(S),
right = sqrt(S) Vh, rank, energy, kept, method, spectrum) under the same `RankPolicy`, holding only one
row chunk of the delta, the sketch and the factors:

- gram: G = sum chunk.T @ chunk (float64, in x in) in one pass, its eigendecomposition, then a second pass
  for the left factor (chunk @ V / sqrt(S)). Exact, like lowrank's gram route; used while the column count
  is at most `lowrank.GRAM_MAX_DIM` (the same threshold `lowrank.factorize` uses).
- randomized: a range finder on the row space, X <- orth(A.T (A X)), each step one pass over the row
  chunks (A.T A X is accumulated chunk by chunk: sum chunk.T @ (chunk @ X)); `POWER_ITERS` + 1 steps
  from a Gaussian start of `sketch_width(cap)` columns (the polynomial degree in A of torch.svd_lowrank
  with `POWER_ITERS` iterations, which lowrank.factorize uses), then one last pass for B = A X (out x q)
  and the SVD of that small B. `POWER_ITERS` + 2 passes in all.

`streamed_factorize_experts` is the same for a 3-D MoE expert stack (E, out, in), read a few experts at a
time, with lowrank.factorize's shared-rank rule.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from .lowrank import GRAM_MAX_DIM, POWER_ITERS, Factors, RankPolicy, choose_rank, svd, factorize, sketch_width

CHUNK_ELEMENTS = 1 << 24  # default row chunk: 16 M float32 elements (64 MB), as converters/convert.py reads


def default_chunk_rows(shape: tuple[int, ...]) -> int:
    return max(1, CHUNK_ELEMENTS // max(1, int(np.prod(shape[1:], dtype=np.int64))))


def streamed_method(shape: tuple[int, int], policy: RankPolicy) -> str:
    """gram | randomized | full (full: the tensor is not worth streaming; it is read whole and handed to
    lowrank.factorize)."""
    rows, cols = shape
    min_dim = min(rows, cols)
    cap = policy.cap(min_dim)
    if policy.svd == "full":
        return "full"
    if cols <= GRAM_MAX_DIM and policy.svd != "randomized":
        return "gram"
    if sketch_width(cap) * 3 <= min_dim or (policy.svd == "randomized" and sketch_width(cap) < min_dim):
        return "randomized"
    return "full"


def _chunks(rows: int, chunk_rows: int):
    for start in range(0, rows, chunk_rows):
        yield start, min(rows, start + chunk_rows)


def _load(load_rows: Callable[[int, int], np.ndarray], start: int, stop: int, cols: int) -> torch.Tensor:
    c = np.ascontiguousarray(load_rows(start, stop), dtype=np.float32)
    if c.shape != (stop - start, cols):
        raise ValueError(f"load_rows({start}, {stop}) gave shape {c.shape}, expected {(stop - start, cols)}")
    return torch.from_numpy(c)


def streamed_factorize(
    load_rows: Callable[[int, int], np.ndarray],
    shape: tuple[int, int],
    policy: RankPolicy,
    chunk_rows: int | None = None,
    *,
    seed: int = 0,
) -> Factors:
    """Best rank-r factorisation of a 2-D delta (out, in) under the policy, reading it only as
    load_rows(start, stop) -> rows start:stop as float32 (aligned minus base). Peak memory: one chunk
    (chunk_rows x in float32, plus a float64 copy on the gram route), the in x in Gram (gram) or an
    in x q and out x q sketch (randomized), and the factors."""
    rows, cols = (int(x) for x in shape)
    chunk_rows = int(chunk_rows or default_chunk_rows(shape))
    min_dim = min(rows, cols)
    cap = policy.cap(min_dim)
    method = streamed_method((rows, cols), policy)
    if method == "full":
        parts = [np.asarray(load_rows(a, b), dtype=np.float32) for a, b in _chunks(rows, chunk_rows)]
        return factorize(np.concatenate(parts) if len(parts) > 1 else parts[0], policy)
    if method == "gram":
        return _gram(load_rows, rows, cols, policy, cap, chunk_rows)
    return _randomized(load_rows, rows, cols, policy, cap, chunk_rows, seed)


def _gram(load_rows, rows: int, cols: int, policy: RankPolicy, cap: int, chunk_rows: int) -> Factors:
    g = torch.zeros(cols, cols, dtype=torch.float64)
    for a, b in _chunks(rows, chunk_rows):
        c = _load(load_rows, a, b, cols).double()
        g.addmm_(c.T, c)
        del c
    total = float(torch.trace(g))  # = sum delta^2, accumulated in float64
    w, v = torch.linalg.eigh(g)
    del g
    keep = min(cols, rows) if policy.energy is not None else cap  # as lowrank: the energy policy sees all
    w, v = w.flip(0)[:keep].clamp_min(0.0), v.flip(1)[:, :keep]
    s2 = w
    r = choose_rank(s2, total, policy, cap)
    s = torch.sqrt(w[:r])
    root = torch.sqrt(s)
    scale = torch.where(root > 0, 1.0 / root, torch.zeros_like(root))
    vr = v[:, :r]
    proj = (vr * scale).float()  # left rows = chunk @ V / sqrt(S) = U sqrt(S)
    left = np.empty((rows, r), dtype=np.float32)
    for a, b in _chunks(rows, chunk_rows):
        left[a:b] = (_load(load_rows, a, b, cols) @ proj).numpy()
    right = (root[:, None] * vr.T).float().numpy()
    kept = float(torch.sum(s2[:r])) / total if total > 0 else 1.0
    return Factors(left, np.ascontiguousarray(right), r, total, min(kept, 1.0), "gram", s2[:cap].double().numpy())


def _randomized(load_rows, rows: int, cols: int, policy: RankPolicy, cap: int, chunk_rows: int, seed: int) -> Factors:
    q = min(sketch_width(cap), min(rows, cols))
    gen = torch.Generator().manual_seed(seed)
    x = torch.linalg.qr(torch.randn(cols, q, generator=gen, dtype=torch.float32)).Q
    total = 0.0
    for step in range(POWER_ITERS + 1):
        acc = torch.zeros(cols, q, dtype=torch.float64)
        for a, b in _chunks(rows, chunk_rows):
            c = _load(load_rows, a, b, cols)
            if step == 0:
                total += float(torch.sum(c.double().square_()))
            acc.add_(c.T @ (c @ x))
            del c
        x = torch.linalg.qr(acc).Q.float()
    bmat = torch.empty(rows, q, dtype=torch.float32)
    for a, b in _chunks(rows, chunk_rows):
        bmat[a:b] = _load(load_rows, a, b, cols) @ x
    u, s, wh = torch.linalg.svd(bmat.double(), full_matrices=False)
    del bmat
    s2 = s**2
    r = choose_rank(s2, total, policy, cap)
    root = torch.sqrt(s[:r])
    left = (u[:, :r] * root).float().numpy()
    right = (root[:, None] * (wh[:r] @ x.double().T)).float().numpy()
    kept = float(torch.sum(s2[:r])) / total if total > 0 else 1.0
    return Factors(left, right, r, total, min(kept, 1.0), "randomized", s2[:cap].double().numpy())


def streamed_factorize_experts(
    load_experts: Callable[[int, int], np.ndarray],
    shape: tuple[int, int, int],
    policy: RankPolicy,
    experts_per_chunk: int | None = None,
) -> Factors:
    """lowrank.factorize of a 3-D expert stack (E, out, in), reading load_experts(start, stop) -> experts
    start:stop (float32, (stop - start, out, in)). Each expert is factored up to the policy's cap as
    lowrank.factorize does (its `svd`); one rank for all experts from their summed spectrum."""
    n_expert, out, inn = (int(x) for x in shape)
    per = int(experts_per_chunk or max(1, CHUNK_ELEMENTS // max(1, out * inn)))
    cap = policy.cap(min(out, inn))
    us, ss, vhs = [], [], []
    total = 0.0
    method = ""
    for a, b in _chunks(n_expert, per):
        block = np.ascontiguousarray(load_experts(a, b), dtype=np.float32)
        for e in torch.from_numpy(block):
            total += float(torch.sum(e.double().square_()))
            u, s, vh, method = svd(e, policy, cap)
            k = cap if policy.energy is None else s.numel()
            us.append(u[:, :k].clone())
            ss.append(s[:k].clone())
            vhs.append(vh[:k].clone())
        del block
    k = min(s.numel() for s in ss)
    s2 = torch.stack([s[:k] ** 2 for s in ss]).double().sum(0)
    r = choose_rank(s2, total, policy, cap)
    left = np.stack([(u[:, :r] * torch.sqrt(s[:r])).numpy() for u, s in zip(us, ss)])
    right = np.stack([(torch.sqrt(s[:r])[:, None] * vh[:r]).numpy() for s, vh in zip(ss, vhs)])
    kept = float(torch.sum(s2[:r])) / total if total > 0 else 1.0
    return Factors(left, right, r, total, min(kept, 1.0), method, s2[:cap].numpy())
