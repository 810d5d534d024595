"""A modelfile brought to life: its base loaded once, its AVs attached, generation under any coefficients."""

from __future__ import annotations

import codecs
import logging
import time
import uuid
from collections.abc import Iterator

from avgguf.config.modelfile import Modelfile
from avgguf.errors import AvggufError
from avgguf.runtime.engine import Engine, Perf
from avgguf.runtime.pad import TOP_K, PadDecoder, PadSettings
from avgguf.runtime.sampling import GenerationRequest, pad_sampling, sampling_args
from avgguf.runtime.threads import ThreadPolicy

log = logging.getLogger(__name__)
__all__ = ["ADAPT_EVERY", "GenerationRequest", "Runtime", "pad_sampling"]
ADAPT_EVERY = 16  # streamed tokens between thread-policy checks


class Runtime:
    """A modelfile's engine with its AVs loaded: chat and completion under any coefficients, on the weights
    (llama-cpp-python's own loop) or by decoding-time alignment (PAD, avgguf.runtime.pad)."""

    def __init__(
        self,
        modelfile: Modelfile,
        *,
        n_gpu_layers: int | None = None,
        n_ctx: int | None = None,
        threads: int | None = None,
        verbose: bool = False,
        fuse: str = "async",
        merge: str | None = None,
    ):
        """`merge`: avgguf.runtime.merged's mode (default: the modelfile's)."""
        d = modelfile.spec.defaults
        self.modelfile = modelfile
        self.engine = Engine(
            modelfile.base_path,
            n_ctx=n_ctx or d.n_ctx,
            threads=ThreadPolicy.from_settings(threads, d.n_threads),
            n_gpu_layers=d.n_gpu_layers if n_gpu_layers is None else n_gpu_layers,
            seed=d.seed if d.seed is not None else 0,
            verbose=verbose,
            fuse=fuse,
            merge=merge or d.merge,
            fused_rank=d.fused_rank,
        )
        for name, path in modelfile.av_paths.items():
            self.engine.load_adapter(name, path)  # a LoRA AV or a control vector (told apart by the file)
        if modelfile.spec.control_vector_layers is not None:
            self.engine.control_vectors.set_layer_range(*modelfile.spec.control_vector_layers)
        self._pad_perf: tuple[int, float, int, float] | None = None  # the last PAD request's counts and times

    @property
    def n_ctx(self) -> int:
        return self.engine.n_ctx

    @property
    def knob_kinds(self) -> dict[str, str]:
        """Each knob's kind, in the modelfile's order: "control vector" (one add per layer) or "LoRA"."""
        vectors = self.engine.control_vectors.vectors
        return {name: "control vector" if name in vectors else "LoRA" for name in self.modelfile.av_paths}

    def set_coefficients(self, coefficients: dict[str, float]) -> bool:
        return self.engine.set_coefficients(coefficients)

    def sampling(self, req: GenerationRequest) -> dict:
        """llama-cpp-python's sampling arguments for this request, the modelfile's defaults filled in."""
        return sampling_args(req, self.modelfile.spec.defaults)

    def with_system(self, messages: list[dict]) -> list[dict]:
        """The modelfile's `system:` applied by its `system_policy` (avgguf.config.modelfile)."""
        return self.modelfile.system_messages(messages)

    def _prepare(self, req: GenerationRequest, coefficients: dict[str, float], reuse_prefix: bool) -> dict:
        """Apply the coefficients (a change resets the KV cache) and return the sampling arguments. Without
        prefix reuse every request is evaluated from position 0, so its output does not depend on what ran
        before (same seed, same text)."""
        self.set_coefficients(coefficients)
        if not reuse_prefix:
            self.engine.reset()
        self.engine.adapt_threads()
        self.engine.perf_reset()
        kw = self.sampling(req)
        if kw["seed"] is None:
            kw.pop("seed")
        return kw

    def chat(self, req: GenerationRequest, coefficients: dict[str, float], stream: bool = False, reuse_prefix: bool = True):
        """OpenAI-shaped chat completion (dict) or stream of chunks, under exactly these coefficients."""
        messages = self.with_system(req.messages or [])
        self.check_fits(self.count_tokens(self.engine.format_chat(messages)))
        kw = self._prepare(req, coefficients, reuse_prefix)
        return self.engine.chat_completion(messages, stream=stream, **kw)

    def complete(self, req: GenerationRequest, coefficients: dict[str, float], stream: bool = False, reuse_prefix: bool = True):
        self.check_fits(self.count_tokens(req.prompt or "") + 1)
        kw = self._prepare(req, coefficients, reuse_prefix)
        return self.engine.completion(req.prompt or "", stream=stream, **kw)

    def stream_chat_text(
        self, req: GenerationRequest, coefficients: dict[str, float], reuse_prefix: bool = True, decode: str = "weights"
    ) -> Iterator[str]:
        """The answer's text pieces as they come; the thread policy is re-checked every few tokens.
        decode: weights (AVs in the weights, the default) or pad / pad-full (coefficients = PAD weights)."""
        if decode != "weights":
            yield from (piece for piece, _ in self.pad_pieces(req, coefficients, decode) if piece)
            return
        try:
            for i, chunk in enumerate(self.chat(req, coefficients, stream=True, reuse_prefix=reuse_prefix)):
                if i and i % ADAPT_EVERY == 0:
                    self.engine.adapt_threads()
                piece = chunk["choices"][0]["delta"].get("content")
                if piece:
                    yield piece
        finally:
            self.engine.settle()

    # -- decoding-time alignment (PAD) --------------------------------------------------------------

    def pad_pieces(self, req: GenerationRequest, weights: dict[str, float], mode: str) -> Iterator[tuple[str, str | None]]:
        """(text piece, finish reason or None) under PAD: `weights` are the per-AV reward weights."""
        kw = self.sampling(req)
        kw.setdefault("stop", None)
        prompt = self.engine.chat_tokens(self.with_system(req.messages or []))
        self.check_fits(len(prompt))
        sampling = pad_sampling(kw, req)
        # sampled: PAD scores at least the tokens the weights path's top-k would draw from, so weights 0 give
        # the base's own answer (greedy needs only the top 10)
        k = TOP_K if sampling.temperature == 0 else max(TOP_K, sampling.top_k or self.engine.n_vocab)
        decoder = PadDecoder(self.engine, PadSettings(mode, weights, k=k))
        sampler = self.engine.sampler(sampling)
        t0, first, tokens, text = time.perf_counter(), None, [], ""
        finish = "length"
        utf8 = codecs.getincrementaldecoder("utf-8")(errors="ignore")  # pieces may split a character
        try:
            for tok in decoder.tokens(prompt, kw["max_tokens"], sampler=sampler):
                if req.cancel.is_set():
                    finish = "cancelled"
                    break
                if self.engine.is_end(tok):
                    finish = "stop"
                    break
                first = first or time.perf_counter()
                tokens.append(tok)
                piece = utf8.decode(self.engine.detokenize([tok]))
                full = text + piece
                cut = min((full.find(s) for s in (kw["stop"] or []) if s in full), default=-1)
                if cut >= 0:
                    yield full[len(text) : cut], None
                    finish = "stop"
                    break
                if piece:
                    yield piece, None
                    text = full
        finally:
            decoder.close()
            sampler.close()
            end = time.perf_counter()
            self._pad_perf = (len(prompt), (first or end) - t0, len(tokens), end - (first or end))
        yield "", finish

    def chat_pad(self, req: GenerationRequest, weights: dict[str, float], mode: str, stream: bool = False):
        """OpenAI-shaped chat completion (dict or chunk iterator) generated under PAD."""
        head = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": ""}

        def chunks():
            for piece, finish in self.pad_pieces(req, weights, mode):
                delta = {"content": piece} if piece else {}
                yield {
                    **head,
                    "object": "chat.completion.chunk",
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
                }

        if stream:
            return chunks()
        parts, finish = [], None
        for piece, finish_ in self.pad_pieces(req, weights, mode):
            parts.append(piece)
            finish = finish_ or finish
        n_prompt, _, n_gen, _ = self._pad_perf
        return {
            **head,
            "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(parts)}, "finish_reason": finish}],
            "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_gen, "total_tokens": n_prompt + n_gen},
        }

    def generated_tokens(self, finish_reason: str | None, decode: str = "weights") -> int:
        """Tokens the last request generated, from llama.cpp's counters: every generated token but the last
        is decoded again; when the answer ended on an end token that one was decoded too (and not counted)."""
        if decode != "weights":
            return self._pad_perf[2]
        n_eval = self.engine.perf().gen_tokens
        return n_eval + (1 if finish_reason == "length" else 0)

    def check_fits(self, prompt_tokens: int) -> None:
        """A clear error when the prompt leaves no room for even one generated token."""
        if prompt_tokens >= self.n_ctx:
            raise AvggufError(
                f"the prompt is {prompt_tokens} tokens but the context holds {self.n_ctx} "
                f"(--n-ctx / defaults.n_ctx); raise the context length or shorten the prompt"
            )

    def stats(self, gen_tokens: int | None = None, decode: str = "weights") -> str:
        """The `--stats` line for the last request (llama.cpp's own timers; PAD: wall clock)."""
        if decode != "weights" and self._pad_perf:
            n_prompt, prompt_s, n_gen, gen_s = self._pad_perf
            return Perf(n_prompt, 1000 * prompt_s, max(n_gen - 1, 0), 1000 * gen_s).line(n_gen)
        return self.engine.perf().line(gen_tokens)

    def count_tokens(self, text: str) -> int:
        return len(self.engine.tokenize(text))

    def close(self) -> None:
        self.engine.close()
