"""Low-rank factorisation of a delta (pure math, torch): rank policies, full vs randomized SVD."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

# Randomized SVD settings. A DPO delta has a flat spectrum, where 10 extra columns and 4 power iterations
# lose ~2% of the kept energy against a full SVD; 2r (at least r + 32) columns and 10 iterations match
# the full SVD to < 0.1% of the kept energy (tests/test_lowrank_budget.py) at a fraction of its cost.
MIN_OVERSAMPLE = 32
POWER_ITERS = 10


GRAM_MAX_DIM = 2048  # auto uses the exact Gram eigensolver up to this smaller dimension


def sketch_width(cap: int) -> int:
    return cap + max(cap, MIN_OVERSAMPLE)


@dataclass(frozen=True)
class RankPolicy:
    rank: int | None = None  # uniform rank (capped by each tensor's smaller dimension)
    energy: float | None = None  # smallest rank keeping this fraction of each tensor's energy
    max_rank: int | None = None  # cap for the energy policy
    svd: str = "auto"  # auto | full | randomized

    def describe(self) -> str:
        if self.energy is not None:
            cap = f",max_rank={self.max_rank}" if self.max_rank else ""
            return f"energy={self.energy:g}{cap}"
        return f"rank={self.rank}"

    def cap(self, min_dim: int) -> int:
        limit = self.rank if self.energy is None else (self.max_rank or min_dim)
        return max(1, min(limit, min_dim))


@dataclass
class Factors:
    left: np.ndarray  # (out, r) = U sqrt(S); a MoE expert stack: (E, out, r)
    right: np.ndarray  # (r, in)  = sqrt(S) Vh; a MoE expert stack: (E, r, in)
    rank: int
    energy: float  # ||delta||_F^2
    kept: float  # fraction of energy in the kept singular values
    method: str  # full | gram | randomized
    spectrum: np.ndarray | None = None  # squared singular values up to the policy's cap (rank budgeting;
    # an expert stack: summed over its experts, the energy each rank step adds to the whole tensor)

    def truncated(self, r: int) -> "Factors":
        """The leading r components (left/right are U sqrt(S) / sqrt(S) Vh, so columns stay paired)."""
        if r >= self.rank:
            return self
        kept = float(np.sum(self.spectrum[:r], dtype=np.float64)) / self.energy if self.spectrum is not None else float("nan")
        return Factors(
            self.left[..., :r].copy(), self.right[..., :r, :].copy(), r, self.energy, min(kept, 1.0), self.method, self.spectrum
        )


def choose_rank(s2: torch.Tensor, total: float, policy: RankPolicy, cap: int) -> int:
    if policy.energy is None or total == 0.0:
        return min(cap, s2.numel())
    frac = torch.cumsum(s2.double(), 0) / total
    reached = torch.nonzero(frac >= policy.energy - 1e-12)
    r = int(reached[0]) + 1 if reached.numel() else s2.numel()
    return max(1, min(r, cap))


def _method(policy: RankPolicy, cap: int, min_dim: int) -> str:
    """full | gram | randomized. auto: the exact Gram eigensolver up to GRAM_MAX_DIM (faster than a full
    SVD and as exact for the leading components), randomized above it where the sketch is small."""
    if policy.svd == "full":
        return "full"
    q = sketch_width(cap)
    if policy.svd == "randomized":
        return "randomized" if q < min_dim else "full"
    if min_dim <= GRAM_MAX_DIM:
        return "gram"
    return "randomized" if q * 3 <= min_dim else "full"


GRAM_CHUNK = 1 << 22  # elements per row chunk of the float64 Gram products (32 MB)


def _row_blocks(t: torch.Tensor):
    """Row blocks of t in float64, one at a time (no float64 copy of a whole delta)."""
    for block in t.split(max(1, GRAM_CHUNK // max(1, t.shape[1]))):
        yield block.double()


def _gram_svd(m: torch.Tensor, cap: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Leading singular triplets from the eigendecomposition of the smaller Gram matrix, in float64."""
    tall = m.shape[0] >= m.shape[1]
    t = m if tall else m.T  # rows >= cols: its Gram t.T @ t is the small one
    g = torch.zeros(t.shape[1], t.shape[1], dtype=torch.float64, device=m.device)
    for block in _row_blocks(t):
        g.addmm_(block.T, block)
    w, v = torch.linalg.eigh(g)
    del g
    w, v = w.flip(0)[:cap].clamp_min(0.0), v.flip(1)[:, :cap]
    s = torch.sqrt(w)
    other = torch.cat([block @ v for block in _row_blocks(t)]) / torch.where(s > 0, s, torch.ones_like(s))
    u, vh = (other, v.T) if tall else (v, other.T)
    return u.float(), s.float(), vh.float()


def energy(m: torch.Tensor) -> float:
    """Σ m² in float64, block by block."""
    flat = m.reshape(-1, m.shape[-1])
    return sum(float(torch.sum(block.square())) for block in _row_blocks(flat))


def svd(m: torch.Tensor, policy: RankPolicy, cap: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, str]:
    """Leading singular triplets of a 2-D matrix under the policy (all of them for the energy policy's gram)."""
    min_dim = min(m.shape)
    method = _method(policy, cap, min_dim)
    if method == "randomized":
        u, s, v = torch.svd_lowrank(m, q=sketch_width(cap), niter=POWER_ITERS)
        return u, s, v.T, method
    if method == "gram":
        # the energy policy needs the whole spectrum to find its rank; the rank policy only the first cap
        return (*_gram_svd(m, min_dim if policy.energy is not None else cap), method)
    return (*torch.linalg.svd(m, full_matrices=False), method)


def factorize(delta: np.ndarray, policy: RankPolicy, device: str = "cpu") -> Factors:
    """Best rank-r factorisation of a 2-D delta under the policy; a 3-D MoE expert stack (E, out, in) gets one
    factorisation per expert at one shared rank (left (E, out, r), right (E, r, in)), chosen on the
    experts' summed spectrum so the energy policy counts the whole tensor's energy."""
    m = torch.from_numpy(np.ascontiguousarray(delta, dtype=np.float32)).to(device)
    stack = m[None] if m.ndim == 2 else m
    total = energy(stack)
    cap = policy.cap(min(stack.shape[1:]))
    parts = [svd(e, policy, cap) for e in stack]
    k = min(p[1].numel() for p in parts)
    s2 = torch.stack([p[1][:k] ** 2 for p in parts]).double().sum(0)  # energy of each rank step, all experts
    r = choose_rank(s2, total, policy, cap)
    left = np.stack([(u[:, :r] * torch.sqrt(s[:r])).cpu().numpy() for u, s, _, _ in parts])
    right = np.stack([(torch.sqrt(s[:r])[:, None] * vh[:r]).cpu().numpy() for _, s, vh, _ in parts])
    kept = float(torch.sum(s2[:r])) / total if total > 0 else 1.0
    if m.ndim == 2:
        left, right = left[0], right[0]
    return Factors(left, right, r, total, min(kept, 1.0), parts[0][3], s2[:cap].cpu().numpy())


def factorize_product(left: np.ndarray, right: np.ndarray, policy: RankPolicy | None, device: str = "cpu") -> Factors:
    """Re-factor an existing low-rank delta left @ right (e.g. a PEFT LoRA) without forming it:
    QR of both sides, SVD of the small core. policy None keeps the full existing rank."""
    b = torch.from_numpy(np.ascontiguousarray(left, dtype=np.float32)).to(device).double()
    a = torch.from_numpy(np.ascontiguousarray(right, dtype=np.float32)).to(device).double()
    qb, rb = torch.linalg.qr(b)
    qa, ra = torch.linalg.qr(a.T)
    uc, s, vch = torch.linalg.svd(rb @ ra.T)
    s2 = s**2
    total = float(torch.sum(s2))
    n = s.numel()
    if policy is None:
        r = n
    else:
        r = choose_rank(s2, total, policy, policy.cap(n))
    root = torch.sqrt(s[:r])
    new_left = ((qb @ uc[:, :r]) * root).float().cpu().numpy()
    new_right = (root[:, None] * (vch[:r] @ qa.T)).float().cpu().numpy()
    kept = float(torch.sum(s2[:r])) / total if total > 0 else 1.0
    return Factors(new_left, new_right, r, total, min(kept, 1.0), "product-svd")
