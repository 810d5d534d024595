"""The layer inputs' second moments H = XᵀX of a base model on calibration text, per GGUF weight tensor: what
delta-preserving requantization (avgguf/gguf/requant.py) needs to keep Σλ·ΔW's effect on real activations.

The base GGUF is run by transformers (its GGUF loader dequantizes every tensor with gguf-py), so torch is
needed here and nowhere in the runtime; tensors fed by the same input (q/k/v, gate/up) share one H."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch

from avgguf.converters.calibration import read_calibration
from avgguf.errors import ConversionError

MAX_SEQ = 512


def _load(base: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(str(base.parent), gguf_file=base.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(str(base.parent), gguf_file=base.name)
    except (ValueError, KeyError, OSError) as exc:
        raise ConversionError(
            f"calibrating requantization: transformers cannot run {base.name} ({exc}); bake with --type q8_0"
        ) from None
    return model.eval(), tok


def _texts(tok, calibration: str | Path | None) -> list[list[int]]:
    rows, _ = read_calibration(calibration)
    seqs = []
    for row in rows:
        if row.tokens or row.prompt_tokens:
            seqs.append(list(row.tokens or row.prompt_tokens))
        elif row.text is not None:
            seqs.append(tok(row.text)["input_ids"])
        else:
            for answer in row.answers or [None]:  # each given answer after its prompt, or the prompt alone
                turns = [*row.messages, *([{"role": "assistant", "content": answer}] if answer else [])]
                seqs.append(list(tok.apply_chat_template(turns, tokenize=True, return_dict=False)))
    return [s[:MAX_SEQ] for s in seqs if len(s) > 1]


def _gguf_names(model) -> dict[str, str]:
    """HF linear module name -> GGUF tensor name (without .weight)."""
    arch = gguf.MODEL_ARCH[model.config.model_type.upper()]
    tmap = gguf.get_tensor_name_map(arch, model.config.num_hidden_layers)
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            mapped = tmap.get_name(name)
            if mapped is not None and mapped.startswith("blk."):
                out[name] = mapped
    return out


def collect(base: str | Path, calibration: str | Path | None = None, max_tokens: int = 8192, progress: bool = False):
    """{GGUF tensor name ("blk.0.attn_q.weight"): H (float64 [n_in, n_in])} and the number of tokens seen."""
    from tqdm import tqdm

    model, tok = _load(Path(base))
    names = _gguf_names(model)
    sums: dict[str, torch.Tensor] = {}
    handles = []
    for hf_name, module in model.named_modules():
        if hf_name in names:

            def hook(mod, args, _key=hf_name):
                x = args[0].reshape(-1, args[0].shape[-1]).double()
                sums[_key] = sums[_key] + x.T @ x if _key in sums else x.T @ x

            handles.append(module.register_forward_pre_hook(hook))
    seen = 0
    with torch.inference_mode():
        for seq in tqdm(_texts(tok, calibration), desc="calibrate", unit="text", disable=not progress):
            model.model(torch.tensor([seq]))  # the layers only: lm_head's input is not needed
            seen += len(seq)
            if seen >= max_tokens:
                break
    for h in handles:
        h.remove()
    shared: dict[int, np.ndarray] = {}
    out = {}
    for hf_name, key in names.items():
        if hf_name in sums:
            t = sums[hf_name]
            out[key + ".weight"] = shared.setdefault(id(t), t.numpy())
    return out, seen
