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
    left: np.ndarray  # (out, r) = U sqrt(S)
    right: np.ndarray  # (r, in)  = sqrt(S) Vh
    rank: int
    energy: float  # ||delta||_F^2
    kept: float  # fraction of energy in the kept singular values
    method: str  # full | gram | randomized
    spectrum: np.ndarray | None = None  # squared singular values up to the policy's cap (rank budgeting)

    def truncated(self, r: int) -> "Factors":
        """The leading r components (left/right are U sqrt(S) / sqrt(S) Vh, so columns stay paired)."""
        if r >= self.rank:
            return self
        kept = float(np.sum(self.spectrum[:r], dtype=np.float64)) / self.energy if self.spectrum is not None else float("nan")
        return Factors(self.left[:, :r].copy(), self.right[:r].copy(), r, self.energy, min(kept, 1.0), self.method, self.spectrum)


def _choose_rank(s2: torch.Tensor, total: float, policy: RankPolicy, cap: int) -> int:
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


def _gram_svd(m: torch.Tensor, cap: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Leading singular triplets from the eigendecomposition of the smaller Gram matrix, in float64."""
    md = m.double()
    tall = md.shape[0] >= md.shape[1]
    w, v = torch.linalg.eigh(md.T @ md if tall else md @ md.T)
    w, v = w.flip(0)[:cap].clamp_min(0.0), v.flip(1)[:, :cap]
    s = torch.sqrt(w)
    other = (md @ v if tall else md.T @ v) / torch.where(s > 0, s, torch.ones_like(s))
    u, vh = (other, v.T) if tall else (v, other.T)
    return u.float(), s.float(), vh.float()


def factorize(delta: np.ndarray, policy: RankPolicy, device: str = "cpu") -> Factors:
    """Best rank-r factorisation of a 2-D delta under the policy."""
    m = torch.from_numpy(np.ascontiguousarray(delta, dtype=np.float32)).to(device)
    total = float(torch.sum(m.double() ** 2))
    min_dim = min(m.shape)
    cap = policy.cap(min_dim)
    method = _method(policy, cap, min_dim)
    if method == "randomized":
        u, s, v = torch.svd_lowrank(m, q=sketch_width(cap), niter=POWER_ITERS)
        vh = v.T
    elif method == "gram":
        # the energy policy needs the whole spectrum to find its rank; the rank policy only the first cap
        u, s, vh = _gram_svd(m, min_dim if policy.energy is not None else cap)
    else:
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
    s2 = s**2
    r = _choose_rank(s2, total, policy, cap)
    root = torch.sqrt(s[:r])
    left = (u[:, :r] * root).cpu().numpy()
    right = (root[:, None] * vh[:r]).cpu().numpy()
    kept = float(torch.sum(s2[:r].double())) / total if total > 0 else 1.0
    return Factors(left, right, r, total, min(kept, 1.0), method, s2[:cap].double().cpu().numpy())


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
        r = _choose_rank(s2, total, policy, policy.cap(n))
    root = torch.sqrt(s[:r])
    new_left = ((qb @ uc[:, :r]) * root).float().cpu().numpy()
    new_right = (root[:, None] * (vch[:r] @ qa.T)).float().cpu().numpy()
    kept = float(torch.sum(s2[:r])) / total if total > 0 else 1.0
    return Factors(new_left, new_right, r, total, min(kept, 1.0), "product-svd")
