"""One base GGUF loaded once in llama.cpp, any number of AV adapters, coefficients changed live.

No torch here: desktop users install only llama-cpp-python, gguf, numpy, pyyaml.
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from . import adapter_format as fmt
from .errors import AdapterError, AvggufError

log = logging.getLogger(__name__)


def chat_formatter(llm, where: str = "model"):
    """messages -> prompt text, with the GGUF's tokenizer.chat_template (as llama-cpp-python applies it)."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    template = llm.metadata.get("tokenizer.chat_template")
    if not template:
        raise AvggufError(f"{where} has no tokenizer.chat_template")
    vocab = llm._model
    fmt_ = Jinja2ChatFormatter(template=template, eos_token=vocab.token_get_text(llm.token_eos()),
                               bos_token=vocab.token_get_text(llm.token_bos()))
    return lambda messages: fmt_(messages=messages).prompt


@dataclass
class LoadedAdapter:
    name: str
    path: Path
    info: fmt.AdapterInfo
    handle: object  # llama_adapter_lora_p, owned by the model


class Engine:
    """A llama.cpp model plus named adapters whose scales can change between requests.

    Any change of the coefficient set resets the KV cache, so no output mixes K/V computed under
    different coefficients; setting the same coefficients again is free.
    """

    def __init__(self, model_path: str | os.PathLike, *, n_ctx: int = 2048, n_threads: int | None = None,
                 n_gpu_layers: int = 0, seed: int = 0, logits_all: bool = False, verbose: bool = False,
                 **llama_kwargs):
        from llama_cpp import Llama

        self.model_path = Path(model_path)
        self.base = fmt.read_base_model(self.model_path)
        try:
            self.llm = Llama(model_path=str(self.model_path), n_ctx=n_ctx, n_threads=n_threads,
                             n_gpu_layers=n_gpu_layers, seed=seed, logits_all=logits_all, verbose=verbose,
                             **llama_kwargs)
        except (ValueError, RuntimeError) as exc:
            raise AvggufError(f"llama.cpp could not load base model {str(self.model_path)!r} ({exc})") from None
        self.adapters: dict[str, LoadedAdapter] = {}
        self._applied: tuple[tuple[str, float], ...] = ()
        self.coefficients: dict[str, float] = {}
        self._formatter = None

    # -- adapters ---------------------------------------------------------------------------

    def load_adapter(self, name: str, path: str | os.PathLike) -> LoadedAdapter:
        import llama_cpp

        if name in self.adapters:
            raise AvggufError(f"an adapter named {name!r} is already loaded")
        path = Path(path)
        info = fmt.read_adapter(path)
        fmt.check_against_base(info, self.base)
        handle = llama_cpp.llama_adapter_lora_init(self.llm.model, str(path).encode())
        if not handle:
            raise AdapterError(f"llama.cpp refused adapter {str(path)!r} (see --verbose for its log)")
        loaded = LoadedAdapter(name, path, info, handle)
        self.adapters[name] = loaded
        self.coefficients[name] = 0.0
        return loaded

    def set_coefficients(self, coefficients: Mapping[str, float]) -> bool:
        """Replace the whole coefficient set (unnamed adapters go to 0). Returns True if it changed."""
        for name, value in coefficients.items():
            if name not in self.adapters:
                raise AvggufError(f"unknown alignment vector {name!r}; loaded: {sorted(self.adapters) or 'none'}")
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise AvggufError(f"coefficient for {name!r} must be a finite number, got {value!r}")
        wanted = {name: float(coefficients.get(name, 0.0)) for name in self.adapters}
        key = tuple((n, v) for n, v in sorted(wanted.items()) if v != 0.0)
        self.coefficients = wanted
        if key == self._applied:
            return False
        self._apply(key)
        return True

    def _apply(self, key: tuple[tuple[str, float], ...]) -> None:
        import llama_cpp

        n = len(key)
        handles = (llama_cpp.llama_adapter_lora_p_ctypes * max(n, 1))(*[self.adapters[k].handle for k, _ in key])
        scales = (ctypes.c_float * max(n, 1))(*[v for _, v in key])
        rc = llama_cpp.llama_set_adapters_lora(self.llm.ctx, handles if n else None, n, scales if n else None)
        if rc != 0:
            raise AvggufError(f"llama.cpp could not apply adapters {dict(key)} (code {rc})")
        self._applied = key
        self.llm.reset()  # K/V computed under the old coefficients must never be reused

    # -- evaluation -------------------------------------------------------------------------

    def next_logits(self, tokens: Sequence[int]) -> np.ndarray:
        """Logits for the token after `tokens` (fresh evaluation from position 0)."""
        import llama_cpp

        self.llm.reset()
        self.llm.eval(list(tokens))
        ptr = llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.llm.n_vocab(),)).copy()

    def all_logits(self, tokens: Sequence[int]) -> np.ndarray:
        """Logits at every position (needs logits_all=True)."""
        if not self.llm._logits_all:
            raise AvggufError("all_logits needs an Engine created with logits_all=True")
        self.llm.reset()
        self.llm.eval(list(tokens))
        return np.array(self.llm.scores[: len(tokens)], dtype=np.float32)

    def format_chat(self, messages: list[dict]) -> str:
        """The prompt text the GGUF's own chat template makes (generation prompt added)."""
        if self._formatter is None:
            self._formatter = chat_formatter(self.llm, str(self.model_path))
        return self._formatter(messages)

    def close(self) -> None:
        self.adapters.clear()  # adapters are freed with the model
        self.llm.close()
