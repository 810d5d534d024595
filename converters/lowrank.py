"""Low-rank factorisation of a delta (pure math, torch): rank policies, full vs randomized SVD."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

OVERSAMPLE = 10
POWER_ITERS = 4


@dataclass(frozen=True)
class RankPolicy:
    rank: int | None = None        # uniform rank (capped by each tensor's smaller dimension)
    energy: float | None = None    # smallest rank keeping this fraction of each tensor's energy
    max_rank: int | None = None    # cap for the energy policy
    svd: str = "auto"              # auto | full | randomized

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
    left: np.ndarray     # (out, r) = U sqrt(S)
    right: np.ndarray    # (r, in)  = sqrt(S) Vh
    rank: int
    energy: float        # ||delta||_F^2
    kept: float          # fraction of energy in the kept singular values
    method: str          # full | randomized


def _choose_rank(s2: torch.Tensor, total: float, policy: RankPolicy, cap: int) -> int:
    if policy.energy is None or total == 0.0:
        return min(cap, s2.numel())
    frac = torch.cumsum(s2.double(), 0) / total
    reached = torch.nonzero(frac >= policy.energy - 1e-12)
    r = int(reached[0]) + 1 if reached.numel() else s2.numel()
    return max(1, min(r, cap))


def _use_randomized(policy: RankPolicy, cap: int, min_dim: int) -> bool:
    if policy.svd == "full":
        return False
    q = cap + OVERSAMPLE
    if policy.svd == "randomized":
        return q < min_dim
    return q * 4 <= min_dim  # auto: only where it is clearly cheaper than a full SVD


def factorize(delta: np.ndarray, policy: RankPolicy, device: str = "cpu") -> Factors:
    """Best rank-r factorisation of a 2-D delta under the policy."""
    m = torch.from_numpy(np.ascontiguousarray(delta, dtype=np.float32)).to(device)
    total = float(torch.sum(m.double() ** 2))
    min_dim = min(m.shape)
    cap = policy.cap(min_dim)
    if _use_randomized(policy, cap, min_dim):
        u, s, v = torch.svd_lowrank(m, q=cap + OVERSAMPLE, niter=POWER_ITERS)
        vh, method = v.T, "randomized"
    else:
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
        method = "full"
    s2 = s ** 2
    r = _choose_rank(s2, total, policy, cap)
    root = torch.sqrt(s[:r])
    left = (u[:, :r] * root).cpu().numpy()
    right = (root[:, None] * vh[:r]).cpu().numpy()
    kept = float(torch.sum(s2[:r].double())) / total if total > 0 else 1.0
    return Factors(left, right, r, total, min(kept, 1.0), method)


def factorize_product(left: np.ndarray, right: np.ndarray, policy: RankPolicy | None,
                      device: str = "cpu") -> Factors:
    """Re-factor an existing low-rank delta left @ right (e.g. a PEFT LoRA) without forming it:
    QR of both sides, SVD of the small core. policy None keeps the full existing rank."""
    b = torch.from_numpy(np.ascontiguousarray(left, dtype=np.float32)).to(device).double()
    a = torch.from_numpy(np.ascontiguousarray(right, dtype=np.float32)).to(device).double()
    qb, rb = torch.linalg.qr(b)
    qa, ra = torch.linalg.qr(a.T)
    uc, s, vch = torch.linalg.svd(rb @ ra.T)
    s2 = s ** 2
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
