"""One base GGUF loaded once in llama.cpp, any number of AV adapters, coefficients changed live.

The engine holds the model, its adapters and the verbs callers need (tokens, chat prompts, logits, scoring,
generation, perf); which weights serve a coefficient set, and the KV rule that comes with it, belong to
avgguf.runtime.adapter_sets; llama-cpp-python's internals to avgguf.runtime.llama. No torch here: the runtime
needs llama-cpp-python, gguf and numpy only.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from avgguf.config.coefficients import Resolver, check_value
from avgguf.errors import AdapterError, AvggufError
from avgguf.gguf import adapter_format as fmt
from avgguf.gguf.control_vector import is_control_vector
from avgguf.runtime import llama
from avgguf.runtime.adapter_sets import FUSE_MODES, AdapterSets, LoadedAdapter
from avgguf.runtime.background import Key
from avgguf.runtime.contexts import BatchContext, SideContext
from avgguf.runtime.cvec import ContextVectors, ControlVectors, LoadedControlVector
from avgguf.runtime.fused import FusedAdapters
from avgguf.runtime.llama import chat_formatter
from avgguf.runtime.sampling import log_softmax
from avgguf.runtime.threads import ThreadPolicy
from avgguf.runtime.vocabulary import Vocabulary, chat_answer, chat_chunks

log = logging.getLogger(__name__)
__all__ = ["FUSE_MODES", "Engine", "LoadedAdapter", "Perf", "chat_formatter", "log_softmax"]


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


class Scoring:
    """Logits and log-probabilities of token sequences under the coefficient set in effect: every call
    evaluates from position 0 (a shared prompt at most) on the model that serves the set (AdapterSets.llm),
    so it never reads K/V computed under another set."""

    def __init__(self, sets: AdapterSets, logits_all: bool):
        self._serving, self._logits_all = sets, logits_all

    @property
    def _llm(self):
        """What evaluates now: the base model (with adapters) or a merged set's model."""
        return self._serving.llm

    def reset(self) -> None:
        """Forget the KV cache: the next evaluation starts at position 0."""
        self._llm.reset()

    def _eval(self, tokens: Sequence[int]) -> None:
        self._llm.reset()
        self._llm.eval(list(tokens))

    def next_logits(self, tokens: Sequence[int]) -> np.ndarray:
        """Logits for the token after `tokens` (fresh evaluation from position 0)."""
        self._eval(tokens)
        return llama.logits_row(llama.context_handle(self._llm), self._llm.n_vocab()).copy()

    def all_logits(self, tokens: Sequence[int]) -> np.ndarray:
        """Logits at every position (needs logits_all=True)."""
        self._need_all_logits("all_logits")
        self._eval(tokens)
        return np.array(llama.scores(self._llm, 0, len(tokens)), dtype=np.float32)

    def score_continuations(self, prompt: Sequence[int], continuations: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """Log-probability of every token of each continuation after `prompt`. The prompt is evaluated once
        and its K/V shared (same coefficients); each continuation replaces the previous one."""
        self._need_all_logits("score_continuations")
        self._eval(prompt)
        n, out = len(prompt), []
        for cont in continuations:
            llama.truncate(self._llm, n)  # keep the prompt's K/V, drop the previous continuation
            self._llm.eval(list(cont))
            out.append(self._rows(n, len(cont))[np.arange(len(cont)), list(cont)])
        return out

    def logprob_rows(self, prompt: Sequence[int], continuation: Sequence[int]) -> np.ndarray:
        """Log-softmax rows predicting each token of `continuation` after `prompt` (len(continuation) x vocab),
        under the current coefficients."""
        self._need_all_logits("logprob_rows")
        self._eval(list(prompt) + list(continuation))
        return self._rows(len(prompt), len(continuation))

    def _rows(self, start: int, count: int) -> np.ndarray:
        """Log-softmax rows predicting tokens start..start+count-1 of what was just evaluated."""
        return log_softmax(llama.scores(self._llm, start - 1, start - 1 + count))

    def _need_all_logits(self, what: str) -> None:
        if not self._logits_all:
            raise AvggufError(f"{what} needs an Engine created with logits_all=True")


class Engine(Vocabulary, Scoring):
    """A llama.cpp model plus named adapters whose scales can change between requests.

    Any change of the coefficient set resets the KV cache, so no output mixes K/V computed under
    different coefficients; setting the same coefficients again is free (`sets`: avgguf.runtime.adapter_sets).
    Tokens and chat prompts come from Vocabulary (avgguf.runtime.vocabulary), logits and scoring from Scoring."""

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
        fused_rank: int | None = None,
        **llama_kwargs,
    ):
        """`fuse`: async | sync | off; `merge`: run a set that stays in use on merged weights
        (avgguf.runtime.merged): auto | on | off; `fused_rank`: a set's fused adapter re-compressed to this
        rank per tensor (cheaper, not exact; None: the exact fused adapter)."""
        self.fused_rank = fused_rank
        self.model_path = Path(model_path)
        self.base = fmt.read_base_model(self.model_path)
        self.threads = threads if isinstance(threads, ThreadPolicy) else ThreadPolicy.from_settings(threads)
        self._n_threads = self.threads.threads()
        self._llama_kwargs = dict(
            n_ctx=n_ctx, n_gpu_layers=n_gpu_layers, seed=seed, logits_all=logits_all, verbose=verbose, **llama_kwargs
        )
        self._n_ctx = n_ctx
        self._model_llm = self._load(self.model_path, self._n_threads, "base model")
        Vocabulary.__init__(self, self._model_llm, str(self.model_path))
        self.adapters: dict[str, LoadedAdapter] = {}
        self.control_vectors = ControlVectors.for_model(
            llama.model_handle(self._model_llm), self.base.arch, str(self.model_path)
        )  # knobs next to the AVs (avgguf.runtime.cvec)
        self.coefficients: dict[str, float] = {}
        self.sets = AdapterSets(self, self._model_llm, fuse, merge)
        Scoring.__init__(self, self.sets, logits_all)

    def _load(self, path: Path, n_threads: int, what: str):
        try:
            return llama.load_llama(path, n_threads=n_threads, n_threads_batch=n_threads, **self._llama_kwargs)
        except (ValueError, RuntimeError) as exc:
            raise AvggufError(f"llama.cpp could not load {what} {str(path)!r} ({exc})") from None

    # -- model facts, tokens, other contexts ----------------------------------------------------

    @property
    def n_ctx(self) -> int:
        # llama.cpp pads a small context (to 256), llama-cpp-python's token buffer keeps the size asked for
        return min(self._llm.n_ctx(), self._n_ctx)

    @property
    def n_gpu_layers(self) -> int:
        return self._llama_kwargs["n_gpu_layers"]

    @property
    def n_params(self) -> int:
        return llama.n_params(self._model_llm)

    fuse = property(lambda self: self.sets.fuse, doc="async | sync | off (avgguf.runtime.adapter_sets)")

    def sibling(self, path: str | os.PathLike) -> Engine:
        """An engine on another GGUF of this model's shape (a merged set) with this one's settings, no adapters."""
        return Engine(path, threads=self.threads, fuse="off", **self._llama_kwargs)

    def load_merged(self, path: Path):
        """A llama-cpp-python model of a merged set of this model (avgguf.runtime.adapter_sets serves it)."""
        return self._load(path, 1, "merged set")

    def side_context(self, scales: Mapping[str, float], threads: int | None = None) -> SideContext:
        """Another context on this model (weights shared) with these adapters at these scales, own KV cache;
        `threads`: its CPU threads (default: the engine's current count)."""
        lora, vectors = self.control_vectors.split(tuple(sorted((n, float(v)) for n, v in scales.items() if v != 0.0)))
        adapters = [(self.adapters[n].handle, v) for n, v in lora]
        params = llama.context_params(self._model_llm, threads or self._n_threads)
        side = SideContext(llama.model_handle(self._model_llm), params, self.n_vocab, self.n_ctx, adapters)
        side.vectors = ContextVectors(self.control_vectors)
        side.vectors.set(side.ctx, vectors)  # a fresh context: nothing in its KV cache yet
        return side

    def batch_context(self, n_seq: int, n_ctx_seq: int | None = None, unified: bool = False) -> BatchContext:
        """A context on this model decoding `n_seq` sequences together, each up to `n_ctx_seq` tokens (default:
        this engine's context length), at the engine's current thread count; `unified`: one K/V buffer shared
        by the sequences (avgguf.runtime.contexts.BatchContext)."""
        params = llama.context_params(self._model_llm, self._n_threads)
        model = llama.model_handle(self._model_llm)
        return BatchContext(model, params, self.n_vocab, n_seq, n_ctx_seq or self.n_ctx, unified)

    def fusion_cache(self, capacity: int = 4) -> FusedAdapters:
        """A cache of fused adapters of this model's AVs of its own (for a context other than the engine's)."""
        paths = {n: a.path for n, a in self.adapters.items()}
        model = llama.model_handle(self._model_llm)
        return FusedAdapters(model, self.base.arch, paths, capacity=capacity, rank=self.fused_rank)

    # -- threads ----------------------------------------------------------------------------------

    @property
    def n_threads(self) -> int:
        return self._n_threads

    def adapt_threads(self) -> int:
        """Re-apply the thread policy (cheap: a /proc/stat read); takes effect at the next decode."""
        n = self.threads.threads()
        if n != self._n_threads:
            llama.set_threads(llama.context_handle(self._llm), n)
            log.debug("threads %d -> %d", self._n_threads, n)
            self._n_threads = n
        return n

    # -- adapters and coefficient sets -------------------------------------------------------------

    @property
    def knob_names(self) -> tuple[str, ...]:
        """Every coefficient name: the LoRA AVs, then the control vectors (load order)."""
        return (*self.adapters, *self.control_vectors.vectors)

    def load_adapter(self, name: str, path: str | os.PathLike) -> LoadedAdapter | LoadedControlVector:
        """A LoRA AV, or a control vector (detected from the file: avgguf.gguf.control_vector), as knob `name`."""
        if name in self.knob_names:
            raise AvggufError(f"an adapter named {name!r} is already loaded")
        path = Path(path)
        if is_control_vector(path):
            self.coefficients[name] = 0.0
            return self.control_vectors.load(name, path)
        info = fmt.read_adapter(path)
        fmt.check_against_base(info, self.base)
        handle = llama.init_adapter(llama.model_handle(self._model_llm), path)
        if handle is None:
            raise AdapterError(f"llama.cpp refused adapter {str(path)!r} (see --verbose for its log)")
        self.adapters[name] = loaded = LoadedAdapter(name, path, info, handle)
        self.coefficients[name] = 0.0
        return loaded

    def coefficient_key(self, coefficients: Mapping[str, float]) -> Key:
        """The active set as llama.cpp computes it: (name, value) of the non-zero AVs, sorted; names and
        range checked."""
        Resolver(self.knob_names, where="the engine").check_names(coefficients, "coefficients")
        wanted = {name: check_value(name, coefficients.get(name, 0.0)) for name in self.knob_names}
        return tuple((n, v) for n, v in sorted(wanted.items()) if v != 0.0)

    def set_coefficients(self, coefficients: Mapping[str, float]) -> bool:
        """Replace the whole coefficient set (unnamed adapters go to 0). Returns True if what llama.cpp
        computes with changed (then the KV cache was reset). Fused and merged variants: AdapterSets."""
        key = self.coefficient_key(coefficients)
        self.coefficients = {name: 0.0 for name in self.knob_names} | dict(key)
        return self.sets.select(key)

    fused = property(lambda self: self.sets.fused, doc="Whether the active set runs as one fused adapter now.")
    merged = property(lambda self: self.sets.merged, doc="Whether the active set runs on merged weights now.")

    def settle(self) -> None:
        """An answer under the current set is done: build its fused adapter / merged model in the background."""
        self.sets.settle()

    def wait_fused(self, timeout: float | None = None) -> None:
        """Block until a background fusion finishes (benchmarks, tests)."""
        self.sets.wait_fused(timeout)

    def wait_merged(self, timeout: float | None = None) -> None:
        """Block until a background merge finishes (benchmarks, tests)."""
        self.sets.wait_merged(timeout)

    # -- generation (llama-cpp-python's own loop) and its counters -----------------------------------

    def chat_completion(self, messages: list[dict], stream: bool = False, **sampling):
        """OpenAI-shaped chat completion (dict, or iterator of chunks), llama-cpp-python's sampler. Content that
        holds special-token text (`<|im_start|>system` typed in) is prompted as text (chat_tokens), not as
        the template's markers; other content takes llama-cpp-python's own chat path, unchanged."""
        if not self.has_special_content(messages):
            return self._llm.create_chat_completion(messages=messages, stream=stream, **sampling)
        sampling["stop"] = [*(sampling.get("stop") or []), self.end_text]  # as the template formatter stops
        out = self._llm.create_completion(prompt=self.chat_tokens(messages), stream=stream, **sampling)
        return chat_chunks(out) if stream else chat_answer(out)

    def completion(self, prompt: str, stream: bool = False, **sampling):
        return self._llm.create_completion(prompt=prompt, stream=stream, **sampling)

    def perf_reset(self) -> None:
        llama.perf_reset(self._llm)

    def perf(self) -> Perf:
        return Perf(*llama.perf_counts(self._llm))

    def close(self) -> None:
        self.sets.close()
        self.adapters.clear()  # adapters are freed with the model
        self._model_llm.close()
