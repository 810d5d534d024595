"""A loaded GGUF's vocabulary and chat template: tokens, prompts, end-of-generation tokens, and chat answers in
OpenAI's shapes. The same for the base model and every merged set of it (they share the tokenizer)."""

from __future__ import annotations

import functools
import re
import secrets
from collections.abc import Iterator, Sequence

from avgguf.runtime import llama
from avgguf.runtime.sampling import Sampler, Sampling


class Vocabulary:
    """Tokens and the chat template of one loaded model (a llama-cpp-python Llama)."""

    def __init__(self, llm, where: str):
        """`where`: how errors name the model (its path)."""
        self._vocab_llm, self._where = llm, where
        self._formatter = None

    def tokenize(self, text: str, special: bool = True) -> list[int]:
        """Tokens of `text` without BOS (chat templates write their own special tokens)."""
        return self._vocab_llm.tokenize(text.encode(), add_bos=False, special=special)

    def detokenize(self, tokens: Sequence[int]) -> bytes:
        return self._vocab_llm.detokenize(list(tokens))

    def prompt_tokens(self, text: str) -> list[int]:
        """Tokens of a prompt as llama.cpp evaluates it: BOS added where the GGUF's vocabulary asks for it."""
        return self._vocab_llm.tokenize(text.encode(), add_bos=True, special=True)

    @functools.cached_property
    def max_token_bytes(self) -> int:
        """The longest token's text in bytes: a text of B bytes has at least B / this many tokens."""
        return max(len(self._vocab_llm.detokenize([t])) for t in range(self.n_vocab)) or 1

    @property
    def n_vocab(self) -> int:
        return self._vocab_llm.n_vocab()

    def sampler(self, settings: Sampling) -> Sampler:
        """A llama.cpp sampler chain for this vocabulary (avgguf.runtime.sampling)."""
        return Sampler(settings, llama.vocab_handle(self._vocab_llm), self.n_vocab, self.eos)

    @property
    def eos(self) -> int:
        return self._vocab_llm.token_eos()

    def is_end(self, token: int) -> bool:
        """End of generation (EOS, EOT and the like, as the GGUF's vocabulary marks them)."""
        return llama.is_end_token(self._vocab_llm, token)

    def format_chat(self, messages: list[dict]) -> str:
        """The prompt text the GGUF's own chat template makes (generation prompt added)."""
        if self._formatter is None:
            self._formatter = llama.chat_formatter(self._vocab_llm, self._where)
        return self._formatter(messages)

    def chat_tokens(self, messages: list[dict]) -> list[int]:
        """The chat prompt's tokens, where message content is text: the template's own markers are special
        tokens, but `<|im_start|>system` typed into a message stays those characters (no forged turns).
        Content without special-token text tokenizes exactly as the whole rendered prompt does."""
        if not self.has_special_content(messages):
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

    def has_special_content(self, messages: list[dict]) -> bool:
        """Whether some message's content holds special-token text (then chat_tokens keeps it literal)."""
        return any(self._has_special(m.get("content") or "") for m in messages)

    def _has_special(self, text: str) -> bool:
        return bool(text) and self.tokenize(text) != self.tokenize(text, special=False)

    @property
    def end_text(self) -> str:
        """The end token's text, where the chat template stops an answer."""
        return llama.token_text(self._vocab_llm, self.eos)


def chat_answer(out: dict) -> dict:
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


def chat_chunks(chunks) -> Iterator[dict]:
    """Text completion chunks as chat.completion.chunk ones (a role delta first)."""
    for i, chunk in enumerate(chunks):
        choice = chunk["choices"][0]
        head = {**chunk, "id": "chat" + chunk["id"], "object": "chat.completion.chunk"}
        if i == 0:
            yield {**head, "choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]}
        delta = {"content": choice["text"]} if choice["text"] else {}
        yield {**head, "choices": [{"index": 0, "delta": delta, "finish_reason": choice["finish_reason"]}]}
