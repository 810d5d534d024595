"""Decoding-time personalized alignment ("PAD: Personalized Alignment of LLMs at Decoding-Time"; docs/pad.md).

An AV at scale 1 is a DPO-aligned policy π_i; log π_i − log π_base is its token-level implicit reward. At
every step, over the base's top-k candidates (`pad`; k = 10 as in PAD's release) or the whole vocabulary
(`pad-full`, logit arithmetic as in EFT/MOD):

    score(t) = log π_base(t) + Σ_i w_i · (log π_i(t) − log π_base(t))

then greedy or sampled (temperature, top-p, seed). Weights 0 give the base's own answer. One loaded model
serves all policies: a context per AV with a nonzero weight (shared weights, own adapter, own KV cache).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from avgguf.runtime.sampling import log_softmax
from avgguf.errors import AvggufError

MODES = ("weights", "pad", "pad-full")
TOP_K = 10


def check_mode(mode: str, where: str = "--decode") -> str:
    if mode not in MODES:
        raise AvggufError(f"{where} {mode!r}: choose one of {', '.join(MODES)}")
    return mode


def _logsumexp(x: np.ndarray) -> float:
    m = float(x.max())
    return m + float(np.log(np.exp(x - m, dtype=np.float32).sum(dtype=np.float64)))


def candidates(base_logp: np.ndarray, mode: str, k: int = TOP_K, extra: int | None = None) -> np.ndarray:
    """Token ids the rule scores: the base's top-k (plus `extra`, a token being judged), or all."""
    if mode == "pad-full":
        return np.arange(base_logp.shape[-1])
    top = np.argpartition(-base_logp, k)[:k] if base_logp.shape[-1] > k else np.arange(base_logp.shape[-1])
    if extra is not None and extra not in top:
        top = np.append(top, extra)
    return top


def scores(base_logp: np.ndarray, policy_logps: Sequence[np.ndarray], weights: Sequence[float], cand: np.ndarray) -> np.ndarray:
    """log π_base + Σ w_i (log π_i − log π_base) on the candidate ids."""
    out = base_logp[cand].copy()
    for lp, w in zip(policy_logps, weights):
        out += w * (lp[cand] - base_logp[cand])
    return out


def pick(cand: np.ndarray, score: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> int:
    if temperature <= 0:
        return int(cand[int(np.argmax(score))])
    p = np.exp(log_softmax(score / temperature))
    order = np.argsort(-p)
    keep = order[: int(np.searchsorted(np.cumsum(p[order]), top_p) + 1)]
    q = p[keep] / p[keep].sum()
    return int(cand[keep[rng.choice(len(keep), p=q)]])


@dataclass
class PadSettings:
    mode: str
    weights: dict[str, float]
    k: int = TOP_K


class PadDecoder:
    """One generation under PAD: a base context plus one context per AV with a nonzero weight."""

    def __init__(self, engine, settings: PadSettings):
        check_mode(settings.mode)
        self.engine, self.settings = engine, settings
        self.active = [(n, w) for n, w in settings.weights.items() if w != 0.0]
        # The contexts decode each token side by side, the engine's threads split between them: on a small
        # model two 1-thread decodes at once cost less than two 2-thread decodes one after the other.
        n = 1 + len(self.active)
        threads = max(1, engine.n_threads // n)
        self.contexts = [engine.side_context({}, threads)] + [
            engine.side_context({name: 1.0}, threads) for name, _ in self.active
        ]
        self._pool = None
        if n > 1 and engine.n_threads >= n:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(n, thread_name_prefix="avgguf-pad")

    def _eval_all(self, tokens: Sequence[int]) -> None:
        if self._pool is None:
            for ctx in self.contexts:
                ctx.eval(tokens)
            return
        for future in [self._pool.submit(ctx.eval, tokens) for ctx in self.contexts]:
            future.result()  # llama_decode releases the GIL: the contexts really run at once

    def tokens(
        self,
        prompt: Sequence[int],
        max_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop_ids: set[int] | None = None,
        sampler=None,
    ) -> Iterator[int]:
        """Generated token ids, one at a time (the stop token is not yielded). `sampler`: an
        avgguf.runtime.sampling.Sampler, which then chooses from PAD's scores with every option of the weights path
        (penalties, top-k, min-p, grammar...; `temperature`, `top_p`, `seed` are then its own); the scores
        it sees are the base's raw logits plus the weighted rewards, so weights 0 hand it the base's logits."""
        rng = np.random.default_rng(seed)
        stop_ids = stop_ids or set()
        if len(prompt) + max_tokens > self.contexts[0].n_ctx:
            max_tokens = self.contexts[0].n_ctx - len(prompt)
            if max_tokens < 1:
                raise AvggufError(f"the prompt is {len(prompt)} tokens but the context holds {self.contexts[0].n_ctx}")
        for ctx in self.contexts:
            ctx.reset()
        self._eval_all(prompt)
        weights = [w for _, w in self.active]
        for _ in range(max_tokens):
            pos, base, policies, cand = self._step_logps()
            if sampler is not None:
                tok = sampler.choose(cand, scores(base, policies, weights, pos) + self._shift)
            else:
                tok = int(cand[pick(pos, scores(base, policies, weights, pos), temperature, top_p, rng)])
            if tok in stop_ids:
                return
            yield tok
            self._eval_all([tok])

    def _step_logps(self) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
        """Candidate ids and the log-probs the rule needs, indexed by candidate position: one float32 pass over
        each context's logits for its normaliser, the rest only on the candidates (the whole vocabulary for
        pad-full)."""
        base_logits = self.contexts[0].logits()
        cand = candidates(base_logits, self.settings.mode, self.settings.k)
        self._shift = _logsumexp(base_logits)  # log-probs + this = the base's raw logits
        base = base_logits[cand] - self._shift
        policies = []
        for ctx in self.contexts[1:]:
            logits = ctx.logits()
            policies.append(logits[cand] - _logsumexp(logits))
        return np.arange(len(cand)), base.astype(np.float64), policies, cand

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
        for ctx in self.contexts:
            ctx.close()


def token_logps(
    base_logp: np.ndarray,
    policy_logps: Sequence[np.ndarray],
    weights: Sequence[float],
    tokens: Sequence[int],
    mode: str,
    k: int = TOP_K,
) -> np.ndarray:
    """log-probability of each given token under the decoding distribution (rows = positions); under `pad`
    the judged token joins the base's top-k so that every reference gets a finite score."""
    out = np.empty(len(tokens))
    for i, tok in enumerate(tokens):
        cand = candidates(base_logp[i], mode, k, extra=tok)
        s = scores(base_logp[i], [lp[i] for lp in policy_logps], weights, cand)
        out[i] = s[int(np.nonzero(cand == tok)[0][0])] - np.logaddexp.reduce(s)
    return out


def describe(mode: str, weights: Mapping[str, float]) -> str:
    return f"{mode}: " + " ".join(f"{k}={v:g}" for k, v in weights.items())
