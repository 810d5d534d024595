"""One base GGUF loaded once in llama.cpp, any number of AV adapters, coefficients changed live.

No torch here: desktop users install only llama-cpp-python, gguf, numpy, pyyaml.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from avgguf.gguf import adapter_format as fmt
from avgguf.runtime import merged as hot
from avgguf.config.coefficients import Resolver, check_value
from avgguf.runtime.llama import load_llama
from avgguf.runtime.contexts import BatchContext, SideContext
from avgguf.errors import AdapterError, AvggufError
from avgguf.runtime.fused import FusedAdapters
from avgguf.runtime.sampling import Sampler, Sampling
from avgguf.runtime.threads import ThreadPolicy

log = logging.getLogger(__name__)
FUSE_MODES = ("async", "sync", "off")


def log_softmax(x: np.ndarray) -> np.ndarray:
    """Log-probabilities from logits along the last axis, in float64."""
    x = np.asarray(x, dtype=np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def chat_formatter(llm, where: str = "model"):
    """messages -> prompt text, with the GGUF's tokenizer.chat_template (as llama-cpp-python applies it)."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    template = llm.metadata.get("tokenizer.chat_template")
    if not template:
        raise AvggufError(f"{where} has no tokenizer.chat_template")
    vocab = llm._model
    fmt_ = Jinja2ChatFormatter(
        template=template, eos_token=vocab.token_get_text(llm.token_eos()), bos_token=vocab.token_get_text(llm.token_bos())
    )
    return lambda messages: fmt_(messages=messages).prompt


def _chat_answer(out: dict) -> dict:
    """A text completion in chat.completion's shape."""
    choice = out["choices"][0]
    return {
        **out,
        "id": "chat" + out["id"],
        "object": "chat.completion",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": choice["text"]},
                "logprobs": None,
                "finish_reason": choice["finish_reason"],
            }
        ],
    }


def _chat_chunks(chunks):
    """Text completion chunks as chat.completion.chunk ones (a role delta first)."""
    for i, chunk in enumerate(chunks):
        choice = chunk["choices"][0]
        head = {**chunk, "id": "chat" + chunk["id"], "object": "chat.completion.chunk"}
        if i == 0:
            yield {**head, "choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]}
        delta = {"content": choice["text"]} if choice["text"] else {}
        yield {**head, "choices": [{"index": 0, "delta": delta, "finish_reason": choice["finish_reason"]}]}


@dataclass
class LoadedAdapter:
    name: str
    path: Path
    info: fmt.AdapterInfo
    handle: object  # llama_adapter_lora_p, owned by the model


@dataclass
class Perf:
    """llama.cpp's own counters since the last reset: prompt tokens evaluated, generated tokens evaluated."""

    prompt_tokens: int
    prompt_ms: float
    gen_tokens: int
    gen_ms: float

    def line(self, gen_tokens: int | None = None) -> str:
        """stats: prompt_tokens=N prompt_tps=X gen_tokens=N gen_tps=Y (gen_tokens: the answer's length)."""
        prompt_tps = 1000 * self.prompt_tokens / self.prompt_ms if self.prompt_ms > 0 else 0.0
        gen_tps = 1000 * self.gen_tokens / self.gen_ms if self.gen_ms > 0 else 0.0
        shown = self.gen_tokens if gen_tokens is None else gen_tokens
        return f"stats: prompt_tokens={self.prompt_tokens} prompt_tps={prompt_tps:.1f} gen_tokens={shown} gen_tps={gen_tps:.1f}"


class Engine:
    """A llama.cpp model plus named adapters whose scales can change between requests.

    Any change of the coefficient set resets the KV cache, so no output mixes K/V computed under
    different coefficients; setting the same coefficients again is free. Callers use only this surface
    (tokens, logits, scoring, generation, perf); llama-cpp-python stays inside.
    """

    def __init__(
        self,
        model_path: str | os.PathLike,
        *,
        n_ctx: int = 2048,
        threads: ThreadPolicy | int | None = None,
        n_gpu_layers: int = 0,
        seed: int = 0,
        logits_all: bool = False,
        verbose: bool = False,
        fuse: str = "async",
        merge: str = "off",
        **llama_kwargs,
    ):
        """`merge`: run a set that stays in use on merged weights (avgguf.runtime.merged): auto | on | off."""
        self.model_path = Path(model_path)
        self.base = fmt.read_base_model(self.model_path)
        self.threads = threads if isinstance(threads, ThreadPolicy) else ThreadPolicy.from_settings(threads)
        n = self.threads.threads()
        self._llama_kwargs = dict(
            n_ctx=n_ctx, n_gpu_layers=n_gpu_layers, seed=seed, logits_all=logits_all, verbose=verbose, **llama_kwargs
        )
        self._model_llm = self._load(self.model_path, n, "base model")
        self._llm = self._model_llm  # what evaluates now: the base (with adapters) or a merged set's model
        self._n_threads = n
        self._n_ctx = n_ctx
        self._logits_all = logits_all
        self.adapters: dict[str, LoadedAdapter] = {}
        self._applied: tuple[tuple[str, float], ...] = ()
        self._applied_fused = None  # the fused adapter in use, if any
        self.coefficients: dict[str, float] = {}
        self._formatter = None
        if fuse not in FUSE_MODES:
            raise AvggufError(f"fuse must be one of {FUSE_MODES}, got {fuse!r}")
        self.fuse = fuse
        self._fusion: FusedAdapters | None = None
        self._merge = hot.enabled(merge, self)
        self._merged: hot.MergedSets | None = None
        self._key: tuple[tuple[str, float], ...] = ()  # the set in effect, on whichever path

    def _load(self, path: Path, n_threads: int, what: str):
        try:
            return load_llama(path, n_threads=n_threads, n_threads_batch=n_threads, **self._llama_kwargs)
        except (ValueError, RuntimeError) as exc:
            raise AvggufError(f"llama.cpp could not load {what} {str(path)!r} ({exc})") from None

    # -- model facts and text ---------------------------------------------------------------

    @property
    def n_ctx(self) -> int:
        # llama.cpp pads a small context (to 256), llama-cpp-python's token buffer keeps the size asked for
        return min(self._llm.n_ctx(), self._n_ctx)

    @property
    def n_vocab(self) -> int:
        return self._llm.n_vocab()

    @property
    def n_gpu_layers(self) -> int:
        return self._llama_kwargs["n_gpu_layers"]

    def sibling(self, path: str | os.PathLike) -> Engine:
        """An engine on another GGUF of this model's shape (a merged set) with this one's settings, no adapters."""
        return Engine(path, threads=self.threads, fuse="off", **self._llama_kwargs)

    @property
    def n_params(self) -> int:
        import llama_cpp

        return int(llama_cpp.llama_model_n_params(self._model_llm.model))

    @property
    def eos(self) -> int:
        return self._llm.token_eos()

    def tokenize(self, text: str, special: bool = True) -> list[int]:
        """Tokens of `text` without BOS (chat templates write their own special tokens)."""
        return self._llm.tokenize(text.encode(), add_bos=False, special=special)

    def detokenize(self, tokens: Sequence[int]) -> bytes:
        return self._llm.detokenize(list(tokens))

    def sampler(self, settings: Sampling) -> Sampler:
        """A llama.cpp sampler chain for this model's vocabulary (avgguf.runtime.sampling)."""
        return Sampler(settings, self._model_llm._model.vocab, self.n_vocab, self.eos)

    def is_end(self, token: int) -> bool:
        """End of generation (EOS, EOT and the like, as the GGUF's vocabulary marks them)."""
        import llama_cpp

        return bool(llama_cpp.llama_vocab_is_eog(self._model_llm._model.vocab, token))

    def side_context(self, scales: Mapping[str, float], threads: int | None = None) -> SideContext:
        """Another context on this model (weights shared) with these adapters at these scales, own KV cache;
        `threads`: its CPU threads (default: the engine's current count)."""
        import llama_cpp

        adapters = [(self.adapters[n].handle, float(v)) for n, v in scales.items() if v != 0.0]
        params = llama_cpp.llama_context_params.from_buffer_copy(self._model_llm.context_params)
        params.n_threads = params.n_threads_batch = threads or self._n_threads
        return SideContext(self._model_llm.model, params, self.n_vocab, self.n_ctx, adapters)

    def batch_context(self, n_seq: int, n_ctx_seq: int | None = None, unified: bool = False) -> BatchContext:
        """A context on this model decoding `n_seq` sequences together, each up to `n_ctx_seq` tokens (default:
        this engine's context length), at the engine's current thread count; `unified`: one K/V buffer shared
        by the sequences (avgguf.runtime.contexts.BatchContext)."""
        import llama_cpp

        params = llama_cpp.llama_context_params.from_buffer_copy(self._model_llm.context_params)
        params.n_threads = params.n_threads_batch = self._n_threads
        return BatchContext(self._model_llm.model, params, self.n_vocab, n_seq, n_ctx_seq or self.n_ctx, unified)

    def fusion_cache(self, capacity: int = 4) -> FusedAdapters:
        """A cache of fused adapters of this model's AVs of its own (for a context other than the engine's)."""
        return FusedAdapters(
            self._model_llm.model, self.base.arch, {n: a.path for n, a in self.adapters.items()}, capacity=capacity
        )

    def prompt_tokens(self, text: str) -> list[int]:
        """Tokens of a prompt as llama.cpp evaluates it: BOS added where the GGUF's vocabulary asks for it."""
        return self._llm.tokenize(text.encode(), add_bos=True, special=True)

    def format_chat(self, messages: list[dict]) -> str:
        """The prompt text the GGUF's own chat template makes (generation prompt added)."""
        if self._formatter is None:
            self._formatter = chat_formatter(self._model_llm, str(self.model_path))
        return self._formatter(messages)

    def chat_tokens(self, messages: list[dict]) -> list[int]:
        """The chat prompt's tokens, where message content is text: the template's own markers are special
        tokens, but `<|im_start|>system` typed into a message stays those characters (no forged turns).
        Content without special-token text tokenizes exactly as the whole rendered prompt does."""
        if not any(self._has_special(m.get("content") or "") for m in messages):
            return self.tokenize(self.format_chat(messages))
        marks = [f"AVGGUFCONTENT{secrets.token_hex(8)}X" for _ in messages]
        text = self.format_chat([{**m, "content": mark} for m, mark in zip(messages, marks)])
        by_mark = {mark: m.get("content") or "" for m, mark in zip(messages, marks)}
        tokens: list[int] = []
        for i, piece in enumerate(re.split("(" + "|".join(marks) + ")", text)):
            if i % 2:
                tokens += self.tokenize(by_mark[piece], special=False)
            elif piece:
                tokens += self.tokenize(piece)
        return tokens

    def _has_special(self, text: str) -> bool:
        return bool(text) and self.tokenize(text) != self.tokenize(text, special=False)

    @functools.cached_property
    def max_token_bytes(self) -> int:
        """The longest token's text in bytes: a text of B bytes has at least B / this many tokens."""
        return max(len(self._llm.detokenize([t])) for t in range(self.n_vocab)) or 1

    # -- threads ----------------------------------------------------------------------------

    @property
    def n_threads(self) -> int:
        return self._n_threads

    def adapt_threads(self) -> int:
        """Re-apply the thread policy (cheap: a /proc/stat read); takes effect at the next decode."""
        import llama_cpp

        n = self.threads.threads()
        if n != self._n_threads:
            llama_cpp.llama_set_n_threads(self._llm.ctx, n, n)
            log.debug("threads %d -> %d", self._n_threads, n)
            self._n_threads = n
        return n

    # -- adapters ---------------------------------------------------------------------------

    def load_adapter(self, name: str, path: str | os.PathLike) -> LoadedAdapter:
        import llama_cpp

        if name in self.adapters:
            raise AvggufError(f"an adapter named {name!r} is already loaded")
        path = Path(path)
        info = fmt.read_adapter(path)
        fmt.check_against_base(info, self.base)
        handle = llama_cpp.llama_adapter_lora_init(self._model_llm.model, str(path).encode())
        if not handle:
            raise AdapterError(f"llama.cpp refused adapter {str(path)!r} (see --verbose for its log)")
        loaded = LoadedAdapter(name, path, info, handle)
        self.adapters[name] = loaded
        self.coefficients[name] = 0.0
        return loaded

    def set_coefficients(self, coefficients: Mapping[str, float]) -> bool:
        """Replace the whole coefficient set (unnamed adapters go to 0). Returns True if what llama.cpp
        computes with changed (then the KV cache was reset).

        Two or more active AVs run as one fused adapter (avgguf.gguf.fuse) once it is built: with fuse="async"
        the separate adapters serve at once, `settle()` (called when an answer is done) builds the fused one
        in the background, and it replaces them at a later call with the same set (a request boundary);
        "sync" builds it before returning; "off" never fuses. With merging on (avgguf.runtime.merged), `settle()` also
        bakes the set into merged weights, which serve it from a later call with the same set."""
        key = self.coefficient_key(coefficients)
        self.coefficients = {name: 0.0 for name in self.adapters} | dict(key)
        self._key = key
        merged = self._merged.take(key, lambda llm: llm is self._llm) if self._merged is not None and key else None
        if merged is not None:
            return self._switch(merged)
        changed = self._switch(self._model_llm)
        if key == self._applied and (self._applied_fused is not None or not self._fusable(key)):
            return changed
        fused = self._fused_for(key)
        if key == self._applied and fused is None:
            return changed
        self._apply(key, fused)
        return True

    def _switch(self, llm) -> bool:
        """Evaluate with `llm` from now on (each model keeps its own K/V, computed under its own weights)."""
        import llama_cpp

        if llm is self._llm:
            return False
        llama_cpp.llama_set_n_threads(llm.ctx, self._n_threads, self._n_threads)
        self._llm = llm
        return True

    def coefficient_key(self, coefficients: Mapping[str, float]) -> tuple[tuple[str, float], ...]:
        """The active set as llama.cpp computes it: (name, value) of the non-zero AVs, sorted; names and
        range checked."""
        Resolver(tuple(self.adapters), where="the engine").check_names(coefficients, "coefficients")
        wanted = {name: check_value(name, coefficients.get(name, 0.0)) for name in self.adapters}
        return tuple((n, v) for n, v in sorted(wanted.items()) if v != 0.0)

    @property
    def fused(self) -> bool:
        """Whether the active set runs as one fused adapter right now."""
        return self._llm is self._model_llm and self._applied_fused is not None

    @property
    def merged(self) -> bool:
        """Whether the active set runs on merged weights right now (avgguf.runtime.merged)."""
        return self._llm is not self._model_llm

    def wait_merged(self, timeout: float | None = None) -> None:
        """Block until a background merge finishes (benchmarks, tests)."""
        if self._merged is not None:
            self._merged.wait(timeout)

    def wait_fused(self, timeout: float | None = None) -> None:
        """Block until a background fusion finishes (benchmarks, tests)."""
        if self._fusion is not None:
            self._fusion.wait(timeout)

    def _fusable(self, key) -> bool:
        return self.fuse != "off" and len(key) >= 2

    def _fused_for(self, key):
        if not self._fusable(key):
            return None
        if self._fusion is None:
            self._fusion = self.fusion_cache()
        handle = self._fusion.ready(key, self._applied_fused)
        if handle is None and self.fuse == "sync":
            return self._fusion.build_now(key, self._applied_fused)
        if handle is None and key != self._applied:
            self._fusion.cancel()  # the knobs moved on: drop a build for the previous set
        return handle

    def settle(self) -> None:
        """The knobs have settled (an answer under them is done): build their fused adapter in the background,
        so a knob change never waits for it (measured: building at the change itself pushed the next first
        token from ~55 to ~145 ms)."""
        if self.fuse == "async" and self._fusable(self._applied) and self._applied_fused is None:
            self._fused_for(self._applied)  # creates the cache on first use
            self._fusion.request(self._applied)
        if self._merge and self._key and not self.merged:
            if self._merged is None:
                paths = {n: a.path for n, a in self.adapters.items()}
                self._merged = hot.MergedSets(self.model_path, paths, lambda p: self._load(p, 1, "merged set"))
            self._merged.request(self._key)

    def _apply(self, key: tuple[tuple[str, float], ...], fused=None) -> None:
        import llama_cpp

        pairs = [(fused, 1.0)] if fused is not None else [(self.adapters[k].handle, v) for k, v in key]
        n = len(pairs)
        handles = (llama_cpp.llama_adapter_lora_p_ctypes * max(n, 1))(*[h for h, _ in pairs])
        scales = (ctypes.c_float * max(n, 1))(*[v for _, v in pairs])
        rc = llama_cpp.llama_set_adapters_lora(self._model_llm.ctx, handles if n else None, n, scales if n else None)
        if rc != 0:
            raise AvggufError(f"llama.cpp could not apply adapters {dict(key)} (code {rc})")
        self._applied, self._applied_fused = key, fused
        self._model_llm.reset()  # K/V computed under the old coefficients must never be reused

    # -- evaluation -------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget the KV cache: the next evaluation starts at position 0."""
        self._llm.reset()

    def next_logits(self, tokens: Sequence[int]) -> np.ndarray:
        """Logits for the token after `tokens` (fresh evaluation from position 0)."""
        import llama_cpp

        self._llm.reset()
        self._llm.eval(list(tokens))
        ptr = llama_cpp.llama_get_logits_ith(self._llm.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    def all_logits(self, tokens: Sequence[int]) -> np.ndarray:
        """Logits at every position (needs logits_all=True)."""
        self._need_all_logits("all_logits")
        self._llm.reset()
        self._llm.eval(list(tokens))
        return np.array(self._llm.scores[: len(tokens)], dtype=np.float32)

    def score_continuations(self, prompt: Sequence[int], continuations: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """Log-probability of every token of each continuation after `prompt`. The prompt is evaluated once
        and its K/V shared (same coefficients); each continuation replaces the previous one."""
        self._need_all_logits("score_continuations")
        llm = self._llm
        llm.reset()
        llm.eval(list(prompt))
        n = len(prompt)
        out = []
        for cont in continuations:
            llm.n_tokens = n  # keep the prompt's K/V, drop the previous continuation
            llm.eval(list(cont))
            out.append(self._rows(n, len(cont))[np.arange(len(cont)), list(cont)])
        return out

    def logprob_rows(self, prompt: Sequence[int], continuation: Sequence[int]) -> np.ndarray:
        """Log-softmax rows predicting each token of `continuation` after `prompt` (len(continuation) x vocab),
        under the current coefficients."""
        self._need_all_logits("logprob_rows")
        tokens = list(prompt) + list(continuation)
        self._llm.reset()
        self._llm.eval(tokens)
        return self._rows(len(prompt), len(continuation))

    def _rows(self, start: int, count: int) -> np.ndarray:
        """Log-softmax rows predicting tokens start..start+count-1 of what was just evaluated."""
        return log_softmax(self._llm.scores[start - 1 : start - 1 + count])

    def _need_all_logits(self, what: str) -> None:
        if not self._logits_all:
            raise AvggufError(f"{what} needs an Engine created with logits_all=True")

    # -- generation -------------------------------------------------------------------------

    def chat_completion(self, messages: list[dict], stream: bool = False, **sampling):
        """OpenAI-shaped chat completion (dict, or iterator of chunks), llama-cpp-python's sampler. Content that
        holds special-token text (`<|im_start|>system` typed in) is prompted as text (chat_tokens), not as
        the template's markers; other content takes llama-cpp-python's own chat path, unchanged."""
        if not any(self._has_special(m.get("content") or "") for m in messages):
            return self._llm.create_chat_completion(messages=messages, stream=stream, **sampling)
        end = self._model_llm._model.token_get_text(self.eos)
        sampling["stop"] = [*(sampling.get("stop") or []), end]  # as the template formatter stops
        out = self._llm.create_completion(prompt=self.chat_tokens(messages), stream=stream, **sampling)
        return _chat_chunks(out) if stream else _chat_answer(out)

    def completion(self, prompt: str, stream: bool = False, **sampling):
        return self._llm.create_completion(prompt=prompt, stream=stream, **sampling)

    def perf_reset(self) -> None:
        import llama_cpp

        llama_cpp.llama_perf_context_reset(self._llm.ctx)

    def perf(self) -> Perf:
        import llama_cpp

        d = llama_cpp.llama_perf_context(self._llm.ctx)
        return Perf(d.n_p_eval, d.t_p_eval_ms, d.n_eval, d.t_eval_ms)

    def close(self) -> None:
        if self._fusion is not None:
            self._fusion.close()
        if self._merged is not None:
            self._merged.close()
        self.adapters.clear()  # adapters are freed with the model
        self._model_llm.close()
