"""The one module that reaches past llama-cpp-python's public `Llama` API: how a model is loaded, and every
raw handle or private field the runtime uses (model, context and vocabulary pointers, context parameters,
adapters, logits, the token counter, perf counters, threads). An upgrade of llama-cpp-python touches this file;
the sampler chain (avgguf.runtime.sampling) and the batch decode (avgguf.runtime.contexts) call llama.cpp's C
API only on the handles it gives them.

Model load: llama.cpp puts a model's quantized matmul weights in an "extra" CPU buffer type where the CPU has
one. On Intel AMX CPUs (Sapphire Rapids and later) that is the AMX buffer, whose kernels segfault on some shapes
(reproduced here: a 64-wide q8_0 model crashes in its first decode; upstream: ggml-org/llama.cpp#20824,
#11115). avgguf therefore loads without extra buffer types where the CPU has AMX; elsewhere llama.cpp's
default stands (its repacked Q4_0 kernels are the fast path on AVX2/ARM). AVGGUF_EXTRA_BUFTS=1 or 0 overrides.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np

from avgguf.errors import AvggufError

_DEFAULTS = threading.Lock()  # the default-params hook is process-global while a model loads
_ADAPTERS = threading.Lock()  # adapter init/free change the model's shared state


@lru_cache(maxsize=1)
def cpu_has_amx() -> bool:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            return any(line.startswith("flags") and " amx_tile" in line for line in f)
    except OSError:
        return False


def use_extra_bufts() -> bool:
    """Whether models load with llama.cpp's extra CPU buffer types (AMX, repacked weights)."""
    forced = os.environ.get("AVGGUF_EXTRA_BUFTS", "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    return not cpu_has_amx()


def load_llama(path: Path, **kwargs):
    """`llama_cpp.Llama(model_path=path, **kwargs)`, with the extra-buffer policy above."""
    import llama_cpp
    import llama_cpp.llama_cpp as C

    if use_extra_bufts():
        return llama_cpp.Llama(model_path=str(path), **kwargs)
    with _DEFAULTS:
        original = C.llama_model_default_params

        def defaults():
            params = original()
            params.use_extra_bufts = False
            return params

        C.llama_model_default_params = defaults  # Llama() takes its model params from here
        try:
            return llama_cpp.Llama(model_path=str(path), **kwargs)
        finally:
            C.llama_model_default_params = original


# -- a loaded Llama's raw handles and facts ------------------------------------------------------------


def model_handle(llm):
    """The llama_model pointer (what adapters and extra contexts are made on)."""
    return llm.model


def context_handle(llm):
    """The llama_context pointer of the Llama's own context."""
    return llm.ctx


def vocab_handle(llm):
    """The llama_vocab pointer (for grammars and end-of-generation checks)."""
    return llm._model.vocab


def token_text(llm, token: int) -> str:
    """A token's text as the vocabulary stores it (`<|im_end|>`, not its detokenized bytes)."""
    return llm._model.token_get_text(token)


def is_end_token(llm, token: int) -> bool:
    """End of generation (EOS, EOT and the like, as the GGUF's vocabulary marks them)."""
    import llama_cpp

    return bool(llama_cpp.llama_vocab_is_eog(vocab_handle(llm), token))


def n_params(llm) -> int:
    import llama_cpp

    return int(llama_cpp.llama_model_n_params(model_handle(llm)))


def context_params(llm, n_threads: int):
    """A copy of the Llama's own llama_context_params (KV types etc. match) at `n_threads` threads."""
    import llama_cpp

    params = llama_cpp.llama_context_params.from_buffer_copy(llm.context_params)
    params.n_threads = params.n_threads_batch = n_threads
    return params


def ftype(type_name: str) -> int | None:
    """llama.cpp's LLAMA_FTYPE_<type_name> constant (e.g. "MOSTLY_Q8_0"), None where it has none."""
    import llama_cpp

    return getattr(llama_cpp, f"LLAMA_FTYPE_{type_name}", None)


def chat_formatter(llm, where: str = "model"):
    """messages -> prompt text, with the GGUF's tokenizer.chat_template (as llama-cpp-python applies it)."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    template = llm.metadata.get("tokenizer.chat_template")
    if not template:
        raise AvggufError(f"{where} has no tokenizer.chat_template")
    formatter = Jinja2ChatFormatter(
        template=template, eos_token=token_text(llm, llm.token_eos()), bos_token=token_text(llm, llm.token_bos())
    )
    return lambda messages: formatter(messages=messages).prompt


# -- evaluation state of a Llama ------------------------------------------------------------------------


def truncate(llm, n_tokens: int) -> None:
    """Keep the first `n_tokens` of what the Llama evaluated: its next eval() drops the K/V after them."""
    llm.n_tokens = n_tokens


def scores(llm, start: int, stop: int) -> np.ndarray:
    """Logits rows start..stop-1 of what the Llama evaluated (a view; needs logits_all=True)."""
    return llm.scores[start:stop]


def perf_reset(llm) -> None:
    import llama_cpp

    llama_cpp.llama_perf_context_reset(context_handle(llm))


def perf_counts(llm) -> tuple[int, float, int, float]:
    """llama.cpp's counters since the last reset: prompt tokens, their ms, generated tokens, their ms."""
    import llama_cpp

    d = llama_cpp.llama_perf_context(context_handle(llm))
    return d.n_p_eval, d.t_p_eval_ms, d.n_eval, d.t_eval_ms


# -- any context: threads, adapters, logits ------------------------------------------------------------


def set_threads(ctx, n: int) -> None:
    """The CPU threads a context computes with from its next decode."""
    import llama_cpp

    llama_cpp.llama_set_n_threads(ctx, n, n)


def init_adapter(model, path: Path):
    """A LoRA adapter loaded into the model (freed with it, or by free_adapter); None where llama.cpp refused."""
    import llama_cpp

    with _ADAPTERS:
        return llama_cpp.llama_adapter_lora_init(model, str(path).encode()) or None


def free_adapter(handle) -> None:
    import llama_cpp

    with _ADAPTERS:
        llama_cpp.llama_adapter_lora_free(handle)


def set_adapters(ctx, pairs: Sequence[tuple[object, float]], what: str) -> tuple:
    """Replace the context's whole adapter set with these (handle, scale) pairs (none: no adapters); the
    ctypes arrays, which the caller keeps alive while the context uses them. AvggufError naming `what`."""
    import llama_cpp

    n = len(pairs)
    handles = (llama_cpp.llama_adapter_lora_p_ctypes * max(n, 1))(*[h for h, _ in pairs])
    scales = (ctypes.c_float * max(n, 1))(*[s for _, s in pairs])
    rc = llama_cpp.llama_set_adapters_lora(ctx, handles if n else None, n, scales if n else None)
    if rc != 0:
        raise AvggufError(f"llama.cpp could not set {what} (code {rc})")
    return handles, scales


def logits_row(ctx, n_vocab: int, index: int = -1) -> np.ndarray:
    """The logits of batch entry `index` of the context's last decode (a view, valid until the next one)."""
    import llama_cpp

    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, index), shape=(n_vocab,))
