"""llama.cpp sampler chains: the one owner of how a next token is chosen, for continuous batching (from a
context's logits) and for PAD (from PAD's own scores over candidate tokens), so every option means the same
on both paths and PAD with every weight at 0 gives the base's answer.

The chain is llama-cpp-python's order: grammar (response_format / grammar / json_schema), logit bias,
penalties, then greedy, or top-k, top-p, min-p, temperature and a seeded draw.
"""

from __future__ import annotations

import ctypes
import json
from dataclasses import dataclass, field

import numpy as np

from .errors import AvggufError

PENALTY_LAST_N = 64  # llama-cpp-python's default window for repeat/presence/frequency penalties
TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])


@dataclass
class Sampling:
    """llama-cpp-python's sampler settings and defaults (so a served answer equals `avgguf run`'s)."""

    max_tokens: int
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int = 0
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None  # None: none; k >= 0: the sampled token's log-probability and the top k
    grammar: str | None = None  # GBNF, root rule `root`
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit (-100: banned)


def grammar_for(response_format: dict | None, grammar: str | None, json_schema: dict | None) -> str | None:
    """GBNF from OpenAI's response_format (json_object / json_schema) or llama-server's grammar / json_schema;
    AvggufError naming the field when the schema cannot be turned into a grammar."""
    from llama_cpp.llama_grammar import JSON_GBNF, json_schema_to_gbnf

    given = [n for n, v in (("response_format", response_format), ("grammar", grammar),
                            ("json_schema", json_schema)) if v is not None]
    if len(given) > 1:
        raise AvggufError(f"{' and '.join(given)}: send one way of constraining the output")
    if grammar is not None:
        return grammar
    schema, where = json_schema, "json_schema"
    if response_format is not None:
        kind = response_format.get("type")
        if kind == "text":
            return None
        if kind == "json_object":
            return JSON_GBNF
        if kind != "json_schema":
            raise AvggufError(f"response_format.type {kind!r}: one of text, json_object, json_schema")
        schema, where = (response_format.get("json_schema") or {}).get("schema"), "response_format.json_schema.schema"
        if not isinstance(schema, dict):
            raise AvggufError(f"{where}: a JSON Schema object is required")
    if schema is None:
        return None
    try:
        return json_schema_to_gbnf(json.dumps(schema))
    except Exception as exc:  # noqa: BLE001 (the converter raises anything from KeyError to RuntimeError)
        raise AvggufError(f"{where}: cannot turn this JSON Schema into a grammar ({type(exc).__name__}: {exc})") from None


class Sampler:
    """One request's llama.cpp sampler chain (it keeps the penalty window and the grammar's state)."""

    def __init__(self, s: Sampling, vocab, n_vocab: int):
        """`vocab`: the model's llama_vocab pointer (for the grammar)."""
        import llama_cpp as L

        self._chain = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
        parts = []
        if s.grammar is not None:
            grammar = L.llama_sampler_init_grammar(vocab, s.grammar.encode(), b"root")
            if not grammar:
                self.close()
                raise AvggufError("grammar: llama.cpp could not parse it (GBNF with a `root` rule expected)")
            parts.append(grammar)
        if s.logit_bias:
            bias = (L.llama_logit_bias * len(s.logit_bias))(*[L.llama_logit_bias(t, b) for t, b in s.logit_bias.items()])
            parts.append(L.llama_sampler_init_logit_bias(n_vocab, len(s.logit_bias), bias))
        parts.append(L.llama_sampler_init_penalties(n_vocab, PENALTY_LAST_N, s.repeat_penalty, s.frequency_penalty,
                                                    s.presence_penalty))
        if s.temperature < 0:
            parts.append(L.llama_sampler_init_dist(s.seed))
        elif s.temperature == 0:
            parts.append(L.llama_sampler_init_greedy())
        else:
            parts += [L.llama_sampler_init_top_k(s.top_k), L.llama_sampler_init_top_p(s.top_p, 1),
                      L.llama_sampler_init_min_p(s.min_p, 1), L.llama_sampler_init_temp(s.temperature),
                      L.llama_sampler_init_dist(s.seed)]
        for part in parts:
            L.llama_sampler_chain_add(self._chain, part)  # the chain owns its parts

    def sample(self, ctx, index: int) -> int:
        """The next token from a context's logits at batch row `index` (accepted into the chain's state)."""
        import llama_cpp as L

        return L.llama_sampler_sample(self._chain, ctx, index)

    def choose(self, ids: np.ndarray, logits: np.ndarray) -> int:
        """The next token among `ids` with these logits (PAD's scores), through the same chain; accepted."""
        import llama_cpp as L

        data = np.empty(len(ids), TOKEN_DATA)
        data["id"], data["logit"], data["p"] = ids, logits, 0.0
        ptr = data.ctypes.data_as(ctypes.POINTER(L.llama_token_data))
        arr = L.llama_token_data_array(data=ptr, size=len(ids), selected=-1, sorted=False)
        L.llama_sampler_apply(self._chain, ctypes.byref(arr))
        if arr.selected < 0 or arr.data[arr.selected].logit == -np.inf:  # accepting it would abort in llama.cpp
            raise AvggufError("no candidate token is allowed (the grammar or logit_bias excludes every one)")
        token = int(arr.data[arr.selected].id)
        L.llama_sampler_accept(self._chain, token)
        return token

    def close(self) -> None:
        import llama_cpp as L

        if self._chain:
            L.llama_sampler_free(self._chain)
            self._chain = None

    def __del__(self):  # a request dropped before it ran (cancelled while queued) never got to close()
        if getattr(self, "_chain", None):
            self.close()
