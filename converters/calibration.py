"""Calibration text for `avgguf convert --fit distill`: reading and validating a JSONL file.

One JSON object per line, any of these shapes (other keys are ignored):

    {"prompt": "How is asthma treated?"}                      a user turn; the aligned model answers it
    {"prompt": "...", "chosen": "...", "rejected": "..."}    DPO data: both answers are used as well
    {"query": "...", "responses": {"expert": "...", ...}}    avgguf's data/preferences rows
    {"messages": [{"role": "user", "content": "..."}, ...]}  a chat; a final assistant turn is used as given
    {"text": "..."}                                           plain text, no chat template
    {"tokens": [1, 2, 3]}  /  {"prompt_tokens": [1, 2]}      token ids (complete text / a prompt to answer)

Prompts are formatted with the model's chat template; for each prompt the aligned model's own sampled
answers are added, so the fit sees text where the two models differ. The default set (no
--calibration) ships in the package: general chat plus medical, legal and financial questions.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from avgguf.errors import ConversionError

BUILTIN = Path(__file__).with_name("calibration.jsonl")


@dataclass
class Row:
    messages: list[dict] | None = None  # chat prompt (ends with a user turn)
    answers: list[str] = field(default_factory=list)  # given assistant answers to the prompt
    text: str | None = None
    tokens: list[int] | None = None  # complete sequence
    prompt_tokens: list[int] | None = None  # a prompt to answer

    @property
    def needs_tokenizer(self) -> bool:
        return self.tokens is None and self.prompt_tokens is None

    @property
    def is_prompt(self) -> bool:
        return self.messages is not None or self.prompt_tokens is not None


def _strings(value, where: str, key: str) -> list[str]:
    values = list(value.values()) if isinstance(value, dict) else [value]
    if not all(isinstance(v, str) and v for v in values):
        raise ConversionError(f"{where}: {key!r} must be a non-empty string (or an object of strings)")
    return values


def _token_list(value, where: str, key: str) -> list[int]:
    if not isinstance(value, list) or not value or not all(isinstance(t, int) and t >= 0 for t in value):
        raise ConversionError(f"{where}: {key!r} must be a non-empty list of token ids (non-negative integers)")
    return value


def _row(obj, where: str) -> Row:
    if not isinstance(obj, dict):
        raise ConversionError(f"{where}: expected a JSON object, found {type(obj).__name__}")
    if "tokens" in obj:
        return Row(tokens=_token_list(obj["tokens"], where, "tokens"))
    if "prompt_tokens" in obj:
        return Row(prompt_tokens=_token_list(obj["prompt_tokens"], where, "prompt_tokens"))
    if "text" in obj:
        return Row(text=_strings(obj["text"], where, "text")[0])
    if "messages" in obj:
        msgs = obj["messages"]
        if (
            not isinstance(msgs, list)
            or not msgs
            or not all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in msgs)
        ):
            raise ConversionError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
        if msgs[-1]["role"] == "assistant":
            if len(msgs) == 1:
                raise ConversionError(f"{where}: 'messages' has only an assistant turn; add the user turn before it")
            return Row(messages=msgs[:-1], answers=[msgs[-1]["content"]])
        return Row(messages=msgs)
    prompt_key = "prompt" if "prompt" in obj else "query" if "query" in obj else None
    if prompt_key is None:
        raise ConversionError(
            f"{where}: no known key; expected one of 'prompt', 'query', 'messages', 'text', "
            f"'tokens', 'prompt_tokens' (see `avgguf convert --help`)"
        )
    prompt = _strings(obj[prompt_key], where, prompt_key)[0]
    answers = []
    for key in ("chosen", "rejected", "response", "responses"):
        if key in obj:
            answers += _strings(obj[key], where, key)
    return Row(messages=[{"role": "user", "content": prompt}], answers=answers)


def read_calibration(path: str | Path | None) -> tuple[list[Row], str]:
    """Rows of a calibration file (or the built-in set) and a label for the metadata."""
    p = Path(path) if path is not None else BUILTIN
    label = "builtin" if path is None else str(p)
    if not p.is_file():
        raise ConversionError(f"--calibration {str(p)!r} not found; give a JSONL file (one JSON object per line)")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise ConversionError(f"--calibration {str(p)!r} is not UTF-8 text; expected JSONL") from None
    rows = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConversionError(
                f"--calibration {str(p)!r} line {i}: not valid JSON ({exc.msg} at column "
                f"{exc.colno}); each line must be one JSON object"
            ) from None
        rows.append(_row(obj, f"--calibration {str(p)!r} line {i}"))
    if not rows:
        raise ConversionError(
            f'--calibration {str(p)!r} is empty; give at least one row such as {{"prompt": "How is asthma treated?"}}'
        )
    return rows, label
