"""`avgguf tune`: the inverse of the knobs. Given target levels per domain ("expert legal answers, avoid
financial advice, generic medical"), find coefficients in [-2, 2] that maximise the level judge's share of the
target level in each domain, with far fewer evaluations than the paper's grid (21^d).

Search: coordinate search on a shrinking step (1, 0.5, 0.25, 0.1): from the best of a few seeds (all 0, and
each domain's AV at +1 for expert, -1 for avoidance), move one coefficient at a time by ± step while that
improves the objective; when no move helps, halve the step. Every evaluated point is cached. The objective
is the mean over target domains of the target level's share, plus a small term (1/100) for the judge's mean
soft probability of that level, which breaks the ties of the discrete shares.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from avgguf.config.coefficients import COEF_MAX, COEF_MIN
from avgguf.errors import AvggufError
from avgguf.eval.judge import LEVELS, Judge

STEPS = (1.0, 0.5, 0.25, 0.1)
SOFT_WEIGHT = 0.01


def parse_target(text: str, domains: list[str]) -> dict[str, str]:
    """'legal=expert,financial=avoidance' -> {'legal': 'expert', 'financial': 'avoidance'}."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        domain, sep, level = part.partition("=")
        if not sep:
            raise AvggufError(f"--target {part!r}: expected DOMAIN=LEVEL, e.g. legal=expert")
        if level not in LEVELS:
            raise AvggufError(f"--target {part!r}: unknown level {level!r}; levels: {', '.join(LEVELS)}")
        if domain not in domains:
            raise AvggufError(f"--target {part!r}: unknown domain {domain!r}; the data has {', '.join(domains)}")
        out[domain] = level
    if not out:
        raise AvggufError("--target is empty; e.g. --target legal=expert,financial=avoidance")
    return out


@dataclass
class Search:
    """Coordinate search over named coefficients of `objective` (higher is better), at most `budget` calls."""

    names: list[str]
    objective: Callable[[dict[str, float]], float]
    budget: int
    progress: Callable[[int, float], None] | None = None
    seen: dict[tuple, float] = field(default_factory=dict)

    def value(self, point: tuple) -> float | None:
        if point not in self.seen:
            if len(self.seen) >= self.budget:
                return None
            self.seen[point] = self.objective(dict(zip(self.names, point)))
            if self.progress:
                self.progress(len(self.seen), max(self.seen.values()))
        return self.seen[point]

    def run(self, seeds: list[tuple]) -> tuple[tuple, float]:
        best, best_value = None, -np.inf
        for seed in seeds:
            v = self.value(seed)
            if v is not None and v > best_value:
                best, best_value = seed, v
        for step in STEPS:
            improved = True
            while improved:
                improved = False
                for i in range(len(self.names)):
                    for direction in (1, -1):
                        moved = list(best)
                        moved[i] = round(min(COEF_MAX, max(COEF_MIN, moved[i] + direction * step)), 4)
                        v = self.value(tuple(moved))
                        if v is None:
                            return best, best_value
                        if v > best_value + 1e-12:
                            best, best_value, improved = tuple(moved), v, True
        return best, best_value


def seeds_for(names: list[str], av_for: dict[str, str], target: dict[str, str]) -> list[tuple]:
    zero = tuple(0.0 for _ in names)
    guess = {av_for[d]: {"expert": 1.0, "avoidance": -1.0, "generic": 0.0}[lvl] for d, lvl in target.items() if d in av_for}
    return [zero, tuple(guess.get(n, 0.0) for n in names)]


@dataclass
class TuneResult:
    coefficients: dict[str, float]
    evaluations: int
    seconds: float
    achieved: dict[str, dict[str, float]]
    objective: float


class LevelObjective:
    """The target shares for a coefficient set, by the level judge on each target domain's rows."""

    def __init__(self, engine, rows_by_domain: dict[str, list[dict]], target: dict[str, str]):
        self.engine, self.rows, self.target = engine, rows_by_domain, target
        self.judge = Judge(engine)
        self.last: dict[str, dict[str, float]] = {}
        self.cache: dict[tuple, dict[str, dict[str, float]]] = {}

    def shares(self, coefs: dict[str, float]) -> dict[str, dict[str, float]]:
        key = tuple(sorted(coefs.items()))
        if key not in self.cache:
            self.engine.set_coefficients(coefs)
            out = {}
            for domain in self.target:
                scores = np.array([self.judge.scores(r) for r in self.rows[domain]])
                picks = scores.argmax(axis=1)
                soft = np.exp(scores - scores.max(axis=1, keepdims=True))
                soft /= soft.sum(axis=1, keepdims=True)
                out[domain] = {
                    **{lvl: float(np.mean(picks == i)) for i, lvl in enumerate(LEVELS)},
                    "soft": {lvl: float(soft[:, i].mean()) for i, lvl in enumerate(LEVELS)},
                }
            self.cache[key] = out
        return self.cache[key]

    def __call__(self, coefs: dict[str, float]) -> float:
        shares = self.shares(coefs)
        hard = np.mean([shares[d][lvl] for d, lvl in self.target.items()])
        soft = np.mean([shares[d]["soft"][lvl] for d, lvl in self.target.items()])
        return float(hard + SOFT_WEIGHT * soft)


def tune(
    engine,
    names: list[str],
    rows_by_domain: dict[str, list[dict]],
    target: dict[str, str],
    av_for: dict[str, str],
    budget: int,
    progress=None,
) -> TuneResult:
    if budget < 3:
        raise AvggufError(f"--budget {budget}: the search needs at least 3 evaluations")
    t0 = time.perf_counter()
    objective = LevelObjective(engine, rows_by_domain, target)
    search = Search(names, objective, budget, progress)
    best, value = search.run(seeds_for(names, av_for, target))
    coefs = dict(zip(names, best))
    achieved = {d: {lvl: v for lvl, v in s.items() if lvl in LEVELS} for d, s in objective.shares(coefs).items()}
    return TuneResult(coefs, len(search.seen), time.perf_counter() - t0, achieved, value)


def grid(engine, names: list[str], rows_by_domain, target, step: float, progress=None) -> TuneResult:
    """The paper's exhaustive search on a regular grid over [-2, 2]^d (the baseline)."""
    t0 = time.perf_counter()
    axis = np.round(np.arange(COEF_MIN, COEF_MAX + 1e-9, step), 4)
    objective = LevelObjective(engine, rows_by_domain, target)
    best, best_value, n = None, -np.inf, 0
    for point in np.array(np.meshgrid(*[axis] * len(names), indexing="ij")).reshape(len(names), -1).T:
        coefs = dict(zip(names, map(float, point)))
        v = objective(coefs)
        n += 1
        if v > best_value:
            best, best_value = coefs, v
        if progress:
            progress(n, best_value)
    achieved = {d: {lvl: v for lvl, v in s.items() if lvl in LEVELS} for d, s in objective.shares(best).items()}
    return TuneResult(best, n, time.perf_counter() - t0, achieved, best_value)
