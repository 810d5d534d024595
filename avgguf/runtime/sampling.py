"""llama.cpp sampler chains: the one owner of how a next token is chosen, for continuous batching (from a
context's logits) and for PAD (from PAD's own scores over candidate tokens), so every option means the same
on both paths and PAD with every weight at 0 gives the base's answer.

The chain is llama-cpp-python's order: grammar (response_format / grammar / json_schema), logit bias,
penalties, then greedy, or top-k, top-p, min-p, temperature and a seeded draw.
"""

from __future__ import annotations

import ctypes
import json
import random
import re
import threading
from dataclasses import dataclass, field

import numpy as np

from avgguf.errors import AvggufError
from avgguf.runtime import llama

PENALTY_LAST_N = 64  # llama-cpp-python's default window for repeat/presence/frequency penalties
# llama.cpp's grammar parser recurses once per nesting level and expands x{m,n} into n rules, with no limit:
# a crafted grammar (or a JSON Schema with maxLength 20000) overflows its stack (measured: 20 000 levels
# crash a thread, 6 000 parse). The bounds here refuse those; llama-cpp-python's schema converter nests
# one group per allowed repetition, so MAX_REPEAT stays below MAX_GRAMMAR_DEPTH.
MAX_GRAMMAR_CHARS = 1 << 18
MAX_GRAMMAR_DEPTH = 1024
MAX_REPEAT = 1000  # x{m,n} in a grammar; minLength/maxItems/... in a schema
MAX_SCHEMA_DEPTH = 64
SCHEMA_COUNTS = {"minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties", "minContains", "maxContains"}
TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])


def log_softmax(x: np.ndarray) -> np.ndarray:
    """Log-probabilities from logits along the last axis, in float64."""
    x = np.asarray(x, dtype=np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


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
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit


@dataclass
class GenerationRequest:
    messages: list[dict] | None = None  # chat
    prompt: str | None = None  # plain completion
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repeat_penalty: float | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    stop: list[str] | None = None
    grammar: str | None = None  # GBNF (avgguf.runtime.sampling.grammar_for)
    logit_bias: dict[int, float] | None = None
    cancel: threading.Event = field(default_factory=threading.Event)  # set: stop at the next token (PAD)


def sampling_args(req: GenerationRequest, defaults) -> dict:
    """llama-cpp-python's sampling arguments for a request: its own values, else `defaults` (a modelfile's
    avgguf.config.modelfile defaults); min_p and the penalties fall back to llama-cpp-python's own."""
    d = defaults
    out = {
        "max_tokens": req.max_tokens or d.max_tokens,
        "temperature": d.temperature if req.temperature is None else req.temperature,
        "top_p": d.top_p if req.top_p is None else req.top_p,
        "top_k": d.top_k if req.top_k is None else req.top_k,
        "repeat_penalty": d.repeat_penalty if req.repeat_penalty is None else req.repeat_penalty,
        "seed": req.seed if req.seed is not None else d.seed,
        "stop": req.stop,
    }
    for name in ("min_p", "presence_penalty", "frequency_penalty"):
        if getattr(req, name) is not None:
            out[name] = getattr(req, name)
    return out


def pad_sampling(kw: dict, req: GenerationRequest) -> Sampling:
    """The sampler settings of the weights path (sampling_args' values, llama-cpp-python's defaults for
    the rest) for PAD's own scores."""
    given = {
        k: kw[k]
        for k in ("temperature", "top_p", "top_k", "repeat_penalty", "min_p", "presence_penalty", "frequency_penalty")
        if kw.get(k) is not None
    }
    seed = kw.get("seed")
    return Sampling(
        max_tokens=kw["max_tokens"],
        **given,
        seed=seed if seed is not None else random.getrandbits(32),
        grammar=req.grammar,
        logit_bias=req.logit_bias or {},
    )


def grammar_for(response_format: dict | None, grammar: str | None, json_schema: dict | None) -> str | None:
    """GBNF from OpenAI's response_format (json_object / json_schema) or llama-server's grammar / json_schema;
    AvggufError naming the field when the schema cannot be turned into a grammar."""
    from llama_cpp.llama_grammar import JSON_GBNF, json_schema_to_gbnf

    given = [
        n for n, v in (("response_format", response_format), ("grammar", grammar), ("json_schema", json_schema)) if v is not None
    ]
    if len(given) > 1:
        raise AvggufError(f"{' and '.join(given)}: send one way of constraining the output")
    if grammar is not None:
        return check_grammar(grammar, "grammar")
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
    _check_schema(schema, where)
    try:
        gbnf = json_schema_to_gbnf(json.dumps(schema))
    except Exception as exc:  # noqa: BLE001 (the converter raises anything from KeyError to RuntimeError)
        raise AvggufError(f"{where}: cannot turn this JSON Schema into a grammar ({type(exc).__name__}: {exc})") from None
    return check_grammar(gbnf, where)


def _check_schema(node, where: str, depth: int = 0) -> None:
    if depth > MAX_SCHEMA_DEPTH:
        raise AvggufError(f"{where}: nested deeper than {MAX_SCHEMA_DEPTH} levels")
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        if key in SCHEMA_COUNTS and isinstance(value, (int, float)) and value > MAX_REPEAT:
            raise AvggufError(
                f"{where}: {key} {value} is over {MAX_REPEAT} (llama.cpp expands each repetition "
                f"into a grammar rule): constrain the length in your own code instead"
            )
        _check_schema(value, where, depth + 1)


def check_grammar(gbnf: str, where: str) -> str:
    """`gbnf` if llama.cpp can parse it without running out of stack: at most MAX_GRAMMAR_CHARS characters,
    MAX_GRAMMAR_DEPTH nested groups and MAX_REPEAT repetitions; else AvggufError naming `where`."""
    if len(gbnf) > MAX_GRAMMAR_CHARS:
        raise AvggufError(f"{where}: the grammar is {len(gbnf)} characters, over {MAX_GRAMMAR_CHARS}")
    depth = deepest = 0
    quote = None  # the closing character of a "string" or [class] being read
    i = 0
    while i < len(gbnf):
        ch = gbnf[i]
        if quote is not None:
            i += 2 if ch == "\\" else 1
            quote = None if ch == quote else quote
            continue
        if ch in '"[':
            quote = '"' if ch == '"' else "]"
        elif ch == "#":  # a comment, to the end of its line
            newline = gbnf.find("\n", i)
            i = len(gbnf) if newline < 0 else newline
            continue
        elif ch == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif ch == ")":
            depth -= 1
        elif ch == "{":
            counts = [int(x) for x in re.findall(r"\d+", gbnf[i : gbnf.find("}", i) + 1 or len(gbnf)])]
            if counts and max(counts) > MAX_REPEAT:
                raise AvggufError(f"{where}: a repetition of {max(counts)} is over {MAX_REPEAT}")
        i += 1
    if deepest > MAX_GRAMMAR_DEPTH:
        raise AvggufError(f"{where}: groups nested {deepest} deep, over {MAX_GRAMMAR_DEPTH}")
    return gbnf


class Sampler:
    """One request's llama.cpp sampler chain (it keeps the penalty window and the grammar's state)."""

    def __init__(self, s: Sampling, vocab, n_vocab: int, end_token: int):
        """`vocab`: the model's llama_vocab pointer (for the grammar); `end_token`: what to answer when the
        grammar leaves no token at all (the answer ends; accepting a forbidden token would abort llama.cpp)."""
        import llama_cpp as L

        self.n_vocab, self.end_token, self.guarded = n_vocab, end_token, s.grammar is not None
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
        parts.append(
            L.llama_sampler_init_penalties(n_vocab, PENALTY_LAST_N, s.repeat_penalty, s.frequency_penalty, s.presence_penalty)
        )
        if s.temperature < 0:
            parts.append(L.llama_sampler_init_dist(s.seed))
        elif s.temperature == 0:
            parts.append(L.llama_sampler_init_greedy())
        else:
            parts += [
                L.llama_sampler_init_top_k(s.top_k),
                L.llama_sampler_init_top_p(s.top_p, 1),
                L.llama_sampler_init_min_p(s.min_p, 1),
                L.llama_sampler_init_temp(s.temperature),
                L.llama_sampler_init_dist(s.seed),
            ]
        for part in parts:
            L.llama_sampler_chain_add(self._chain, part)  # the chain owns its parts

    def sample(self, ctx, index: int) -> int:
        """The next token from a context's logits at batch row `index` (accepted into the chain's state)."""
        import llama_cpp as L

        if not self.guarded:
            return L.llama_sampler_sample(self._chain, ctx, index)
        # with a grammar, as llama_sampler_sample does it, but checked before the token is accepted
        logits = llama.logits_row(ctx, self.n_vocab, index)
        return self.choose(np.arange(self.n_vocab, dtype=np.int32), logits)

    def choose(self, ids: np.ndarray, logits: np.ndarray) -> int:
        """The next token among `ids` with these logits (PAD's scores), through the same chain; accepted."""
        import llama_cpp as L

        data = np.empty(len(ids), TOKEN_DATA)
        data["id"], data["logit"], data["p"] = ids, logits, 0.0
        ptr = data.ctypes.data_as(ctypes.POINTER(L.llama_token_data))
        arr = L.llama_token_data_array(data=ptr, size=len(ids), selected=-1, sorted=False)
        L.llama_sampler_apply(self._chain, ctypes.byref(arr))
        if arr.selected < 0 or arr.data[arr.selected].logit == -np.inf:  # accepting it would abort in llama.cpp
            return self.end_token  # the grammar allows no token (its end, or an impossible grammar): stop here
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
