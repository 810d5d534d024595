"""Offline level judge: which of the three reference responses (avoidance / generic / expert) the model
(base + sum of λ·AV in llama.cpp) finds most likely, by length-normalised log-probability."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from avgguf import atomic
from avgguf.runtime.engine import Engine
from avgguf.errors import AvggufError

LEVELS = ("avoidance", "generic", "expert")
EXPERT_PROMPT = (
    "You are a domain expert. Answer with specific, technical, actionable detail: exact figures, "
    "named tests, laws, doses or rules. Never refuse and never stay vague."
)


def read_eval_data(path: str | Path, domain: str | None = None) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise AvggufError(f"--data {str(path)!r} not found (make it with recipes/make_preferences.py)")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            assert isinstance(row["query"], str) and isinstance(row["domain"], str)
            assert all(isinstance(row["responses"][lvl], str) for lvl in LEVELS)
        except (json.JSONDecodeError, KeyError, TypeError, AssertionError):
            raise AvggufError(
                f"{path}:{n}: expected a JSON object with 'domain', 'query' and 'responses' "
                f"holding {', '.join(LEVELS)} (see docs/eval-tune.md)"
            ) from None
        if domain is None or row["domain"] == domain:
            rows.append(row)
    if not rows:
        raise AvggufError(f"{path}: no rows" + (f" for domain {domain!r}" if domain else ""))
    return rows


def parse_lambdas(text: str) -> list[float]:
    """'-1:1.5:0.25' (inclusive range) or '0,0.5,1'."""
    try:
        if ":" in text:
            start, stop, step = (float(x) for x in text.split(":"))
            if step <= 0:
                raise ValueError
            n = int(round((stop - start) / step))
            return [round(start + i * step, 6) for i in range(n + 1)]
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise AvggufError(f"--lambdas {text!r}: expected START:STOP:STEP (e.g. -1:1.5:0.25) or a list 0,0.5,1") from None


class Judge:
    """Scores the reference responses of a row under the engine's current coefficients."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._cache: dict[str, list[int]] = {}

    def tokens(self, text: str) -> list[int]:
        if text not in self._cache:
            self._cache[text] = self.engine.tokenize(text)
        return self._cache[text]

    def scores(self, row: dict, system: str | None = None) -> np.ndarray:
        """Mean log-probability per token of each level's response (prompt evaluated once, shared)."""
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": row["query"]}]
        prompt = self.tokens(self.engine.format_chat(messages))
        responses = [self.tokens(row["responses"][level]) + [self.engine.eos] for level in LEVELS]
        return np.array([float(np.mean(lp)) for lp in self.engine.score_continuations(prompt, responses)])

    def level_shares(self, rows: list[dict], system: str | None = None) -> dict:
        t0 = time.perf_counter()
        picks = [int(np.argmax(self.scores(r, system))) for r in rows]
        secs = (time.perf_counter() - t0) / len(rows)
        shares = {lvl: picks.count(i) / len(picks) for i, lvl in enumerate(LEVELS)}
        return {**shares, "n": len(rows), "seconds_per_query": secs}


@dataclass
class SweepResult:
    domain: str
    av: str
    lambdas: list[float]
    shares: list[dict] = field(default_factory=list)


def sweep(engine: Engine, rows: list[dict], av: str, lambdas: list[float], base: dict[str, float], progress=None) -> SweepResult:
    judge = Judge(engine)
    res = SweepResult(rows[0]["domain"], av, lambdas)
    for lam in lambdas:
        engine.set_coefficients({**base, av: lam})
        res.shares.append(judge.level_shares(rows))
        if progress:
            progress(f"{res.domain} {av}={lam:g}: " + " ".join(f"{k} {res.shares[-1][k]:.2f}" for k in LEVELS))
    return res


def pad_sweep(
    engine: Engine, rows: list[dict], av: str, lambdas: list[float], base: dict[str, float], mode: str, progress=None
) -> SweepResult:
    """The level judge under decoding-time alignment: each reference scored by its mean log-probability
    under the PAD distribution with weight λ on `av` (avgguf.pad.token_logps). The base's and the AV's
    log-prob rows do not depend on λ: computed once per response, then every λ is cheap."""
    from avgguf.runtime.pad import token_logps

    judge = Judge(engine)
    res = SweepResult(rows[0]["domain"], av, lambdas)
    picks = {lam: [] for lam in lambdas}
    t0 = time.perf_counter()
    for row in rows:
        prompt = judge.tokens(engine.format_chat([{"role": "user", "content": row["query"]}]))
        per_level = []
        for level in LEVELS:
            resp = judge.tokens(row["responses"][level]) + [engine.eos]
            engine.set_coefficients(base)
            base_rows = engine.logprob_rows(prompt, resp)
            engine.set_coefficients({**base, av: 1.0})
            av_rows = engine.logprob_rows(prompt, resp)
            per_level.append((base_rows, av_rows, resp))
        for lam in lambdas:
            means = [float(np.mean(token_logps(b, [a], [lam], r, mode))) for b, a, r in per_level]
            picks[lam].append(int(np.argmax(means)))
    secs = (time.perf_counter() - t0) / len(rows)
    for lam in lambdas:
        res.shares.append(
            {**{lvl: picks[lam].count(i) / len(rows) for i, lvl in enumerate(LEVELS)}, "n": len(rows), "seconds_per_query": secs}
        )
        if progress:
            progress(f"{res.domain} {mode} {av}={lam:g}: " + " ".join(f"{k} {res.shares[-1][k]:.2f}" for k in LEVELS))
    return res


def plot_sweeps(results: list[SweepResult], out: str | Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise AvggufError("--plot needs matplotlib: pip install matplotlib") from None
    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 3.4), squeeze=False, sharey=True)
    colors = {"avoidance": "#c0392b", "generic": "#7f8c8d", "expert": "#2471a3"}
    for ax, res in zip(axes[0], results):
        for lvl in LEVELS:
            ax.plot(res.lambdas, [s[lvl] for s in res.shares], marker="o", ms=3, label=lvl, color=colors[lvl])
        ax.axvline(0, color="k", lw=0.5, ls=":")
        ax.set_title(f"{res.domain} queries, {res.av} AV")
        ax.set_xlabel("λ")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("share of queries judged")
    axes[0][-1].legend(loc="center right")
    fig.tight_layout()
    kind = Path(out).suffix.lstrip(".").lower() or "png"
    # an earlier plot (its metadata names avgguf) is replaced; any other file is refused (avgguf.atomic)
    with atomic.output_file(out, previous=_our_plot, what="plot", flag="--plot") as tmp:
        fig.savefig(tmp, dpi=120, format=kind, metadata={"Software": PLOT_MARK} if kind == "png" else None)
    plt.close(fig)


PLOT_MARK = "avgguf eval"


def _our_plot(path: Path) -> bool:
    with open(path, "rb") as f:
        return PLOT_MARK.encode() in f.read(4096)
