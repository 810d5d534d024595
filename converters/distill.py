"""`--fit distill`: train an AV's low-rank factors toward the aligned model's behaviour.

The SVD keeps the AV's largest weight directions; what a user trained is a *behaviour*. Starting from
the SVD factors, every factor pair (only the tensors llama.cpp applies) is trained together, base
frozen, to minimise KL(aligned || base + B·A) on calibration text (converters.calibration) plus the
aligned model's own sampled answers. Deltas a LoRA cannot carry (norms, tied embeddings) are thereby
compensated where the factors can.

Memory stays bounded: the teacher (aligned model) runs first and keeps only its top-k log-probs per
position (the KL is taken over those k tokens plus one bucket for the rest of the vocabulary); then it is
freed (and its heap pages handed back) and only the base model plus the factors are in memory while
training. No [batch, seq, vocab] tensor exists: the decoder's final hidden states are projected onto the
vocabulary a chunk of positions at a time (CHUNK_BYTES of logits), and in training each chunk's logits are
recomputed in the backward instead of kept; when a batch's activations would be large (CHECKPOINT_BYTES)
the decoder layers are checkpointed too. Peak memory is then about one model in float32 plus a few
hundred MB (bench/results/distill_scale.md).

MoE experts: transformers 5 keeps them as fused 3-D parameters (gate_up_proj [E, 2 ff, embd], gate rows
then up rows; down_proj [E, embd, ff]); the student sets them to W + left @ right (batched over experts)
for each call of the experts module. A factor pair that no module or parameter carries, or whose layout
does not match, is refused, as is one the forward never reaches.
"""

from __future__ import annotations

import ctypes
import gc
import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import gguf

from avgguf.gguf import adapter_format as fmt
from avgguf.errors import ConversionError
from avgguf.gguf.arches import HF_EXPERT, hf_language_name, permute_rows, qk_heads, unpermute_rows
from .calibration import Row, read_calibration
from .lowrank import Factors
from .sources import GGUFModel, TensorSource

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistillSettings:
    steps: int = 200  # optimiser steps
    lr: float = 0.02  # Adam step size relative to each factor's RMS
    batch: int = 8  # sequences per step
    max_len: int = 160  # tokens per sequence (prompt + answer), longer ones are cut
    samples: int = 1  # answers sampled from the aligned model per prompt
    new_tokens: int = 64  # length of each sampled answer
    temperature: float = 1.0  # sampling temperature of those answers
    top_k: int = 32  # teacher log-probs kept per position
    holdout: float = 0.1  # share of sequences kept aside to measure the KL
    seed: int = 0
    device: str = "cpu"
    calibration: str | None = None  # JSONL file; None = the built-in set
    tokenizer: str | None = None  # HF tokenizer dir or .gguf; None = found beside --aligned/--base
    checkpoint: bool | None = None  # recompute decoder layers in the backward; None = when activations are large


# ---------------------------------------------------------------------------------------------
# Models and tokenizer


def load_torch_model(src: TensorSource, device: str):
    from transformers import AutoModelForCausalLM

    if isinstance(src, GGUFModel):
        path, kw = src.path.parent, {"gguf_file": src.path.name}
    else:
        path, kw = src.path, {}
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, **kw)
    except Exception as exc:  # transformers raises many types for unloadable checkpoints
        raise ConversionError(
            f"--fit distill: transformers cannot load {str(src.path)!r} ({exc}); "
            f"distillation needs a checkpoint transformers can run"
        ) from None
    model.eval().to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _has_tokenizer(path: Path) -> bool:
    return path.is_dir() and any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"))


def load_tokenizer(explicit: str | None, sources: tuple[TensorSource, ...]):
    """The HF tokenizer named by --tokenizer, else one found beside the checkpoints, else None."""
    from transformers import AutoTokenizer

    paths = [Path(explicit)] if explicit else [s.path for s in sources]
    for p in paths:
        try:
            if p.is_file() and p.suffix == ".gguf":
                return AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
            if _has_tokenizer(p):
                return AutoTokenizer.from_pretrained(str(p))
        except Exception as exc:
            raise ConversionError(f"--tokenizer {str(p)!r}: transformers cannot load a tokenizer from it ({exc})") from None
    if explicit:
        raise ConversionError(
            f"--tokenizer {explicit!r}: no tokenizer files (tokenizer.json / tokenizer_config.json) and not a .gguf file"
        )
    return None


def _encode_row(tok, row: Row, where: str) -> tuple[list[int], bool]:
    """(token ids, is_prompt) for one calibration row."""
    if row.tokens is not None:
        return row.tokens, False
    if row.prompt_tokens is not None:
        return row.prompt_tokens, True
    if tok is None:
        raise ConversionError(
            f"{where} holds text but no tokenizer was found beside --aligned/--base: give "
            f'--tokenizer DIR_OR_GGUF, or token ids as {{"tokens": [...]}} rows'
        )
    if row.text is not None:
        return tok(row.text, add_special_tokens=False)["input_ids"], False
    if getattr(tok, "chat_template", None):
        text = tok.apply_chat_template(row.messages, tokenize=False, add_generation_prompt=True)
    else:
        text = "".join(f"{m['role']}: {m['content']}\n" for m in row.messages) + "assistant: "
    return tok(text, add_special_tokens=False)["input_ids"], True


def _eos_id(tok, model) -> int | None:
    eos = getattr(tok, "eos_token_id", None) if tok is not None else None
    if eos is None:
        eos = model.generation_config.eos_token_id or model.config.eos_token_id
    return eos[0] if isinstance(eos, list) else eos


# ---------------------------------------------------------------------------------------------
# Calibration sequences and teacher targets


def build_sequences(rows: list[Row], tok, teacher, s: DistillSettings, progress: bool) -> list[list[int]]:
    eos = _eos_id(tok, teacher)
    seqs, prompts = [], []
    for i, row in enumerate(rows):
        ids, is_prompt = _encode_row(tok, row, f"calibration row {i + 1}")
        if not is_prompt:
            seqs.append(ids[: s.max_len])
            continue
        prompts.append(ids)
        for ans in row.answers:
            seqs.append((ids + tok(ans, add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else []))[: s.max_len])
    vocab = teacher.config.vocab_size
    bad = next((t for q in seqs + prompts for t in q if t >= vocab), None)
    if bad is not None:
        raise ConversionError(f"calibration token id {bad} is outside the model's vocabulary ({vocab} tokens)")
    seqs += sample_answers(teacher, prompts, eos, s, progress)
    return [q for q in seqs if len(q) >= 2]


@torch.no_grad()
def sample_answers(teacher, prompts: list[list[int]], eos: int | None, s: DistillSettings, progress: bool) -> list[list[int]]:
    """The aligned model's own answers (sampled, left-padded batches with KV cache)."""
    out = []
    gen = torch.Generator(device="cpu").manual_seed(s.seed)
    pad = eos if eos is not None else 0
    todo = [p for p in prompts for _ in range(s.samples)]
    for start in tqdm(range(0, len(todo), 16), desc="sampling aligned answers", disable=not progress, leave=False):
        chunk = todo[start : start + 16]
        width = max(map(len, chunk))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk], device=s.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=s.device)
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
        res = teacher.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=True,
            temperature=s.temperature,
            top_k=0,
            top_p=1.0,
            max_new_tokens=s.new_tokens,
            pad_token_id=pad,
            eos_token_id=eos,
        )
        for p, row in zip(chunk, res[:, width:].tolist()):
            if eos is not None and eos in row:
                row = row[: row.index(eos) + 1]
            out.append((p + row)[: s.max_len])
    return out


def _batches(seqs: list[list[int]], size: int, device: str):
    for start in range(0, len(seqs), size):
        chunk = seqs[start : start + size]
        yield start, *_pad(chunk, device)


def _pad(chunk: list[list[int]], device: str) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, chunk))
    ids = torch.zeros((len(chunk), width), dtype=torch.long)
    mask = torch.zeros((len(chunk), width), dtype=torch.long)
    for i, q in enumerate(chunk):
        ids[i, : len(q)] = torch.tensor(q)
        mask[i, : len(q)] = 1
    return ids.to(device), mask.to(device)


# ---------------------------------------------------------------------------------------------
# Bounded memory: the vocabulary projection in chunks of positions, decoder layers checkpointed

CHUNK_BYTES = 1 << 26  # one chunk of [positions, vocab] float32 logits (64 MiB): the largest vocab-wide tensor
CHECKPOINT_BYTES = 1 << 30  # estimated activations above this: decoder layers are recomputed in the backward


def _text_config(model):
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


class LM:
    """A causal LM seen as decoder -> final hidden states -> vocabulary projection, so that logits exist
    only for `chunk` positions at a time (never [batch, seq, vocab]). The split is checked once against
    the model's own forward on a short sequence; a model whose logits it does not reproduce (an unknown
    output transform) runs whole, and only the loss is chunked."""

    def __init__(self, model, device: str):
        self.model = model
        cfg = _text_config(model)
        self.vocab = int(cfg.vocab_size)
        self.chunk = max(16, CHUNK_BYTES // (4 * self.vocab))
        self.softcap = getattr(cfg, "final_logit_softcapping", None)  # gemma 2/3: cap * tanh(x / cap)
        self.mult = getattr(cfg, "logit_scale", None)  # cohere: x * scale
        self.div = getattr(cfg, "logits_scaling", None)  # granite: x / scaling
        try:
            self.decoder, self.head = model.get_decoder(), model.get_output_embeddings()
        except Exception:  # transformers raises for models without a standard decoder lookup
            self.decoder = self.head = None
        self.split = self.head is not None  # logits() projects while the split is checked
        self.split = self.split and self._split_matches(device)

    def _split_matches(self, device: str) -> bool:
        ids = torch.arange(1, 9, device=device).unsqueeze(0) % self.vocab
        mask = torch.ones_like(ids)
        try:
            with torch.no_grad():
                want = self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
                got = self.logits(self.decoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state)
        except Exception as exc:  # any failure of the split: run the model whole
            log.info("distill: decoder/head split unavailable (%s); full logits per batch", exc)
            return False
        ok = got.shape == want.shape and float((got - want).abs().max()) <= 1e-4 * (1 + float(want.abs().max()))
        if not ok:
            log.info("distill: decoder + head does not reproduce the model's logits; full logits per batch")
        return ok

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """float32 logits of hidden states h (or h itself where the model runs whole)."""
        if not self.split:
            return h.float()
        x = self.head(h).float()
        if self.mult is not None:
            x = x * self.mult
        if self.div is not None:
            x = x / self.div
        if self.softcap is not None:
            x = torch.tanh(x / self.softcap) * self.softcap
        return x

    def rows(self, ids: torch.Tensor, mask: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
        """[n, hidden] final hidden states at the positions `where` ([batch, seq] bool), in row-major
        order ([n, vocab] logits where the model runs whole)."""
        if self.split:
            h = self.decoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        else:
            h = self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        return h[where]


def _activation_bytes(model, tokens: int) -> int:
    """Rough float32 activations one forward keeps for the backward (~20 hidden-wide and ~4 ff-wide
    tensors per token and layer)."""
    cfg = _text_config(model)
    hidden = int(getattr(cfg, "hidden_size", 0) or 0)
    ff = int(getattr(cfg, "intermediate_size", 0) or 0) or 4 * hidden
    return 4 * tokens * int(getattr(cfg, "num_hidden_layers", 0) or 0) * (20 * hidden + 4 * ff)


def checkpoint_layers(model) -> int:
    """Recompute each decoder layer in the backward (torch.utils.checkpoint): only layer inputs are kept.
    Returns the number of layers wrapped (0: no `layers` list found, the model runs as is)."""
    try:
        layers = getattr(model.get_decoder(), "layers", None)
    except Exception:
        return 0
    if not isinstance(layers, torch.nn.ModuleList):
        return 0
    for layer in layers:
        forward = layer.forward

        def run(*args, _forward=forward, **kwargs):
            if torch.is_grad_enabled():
                return torch.utils.checkpoint.checkpoint(_forward, *args, use_reentrant=False, **kwargs)
            return _forward(*args, **kwargs)

        layer.forward = run
    return len(layers)


def _where(mask: torch.Tensor) -> torch.Tensor:
    """[batch, seq] bool: the positions that predict a next token (0..len-2 of each sequence)."""
    lengths = mask.sum(1, keepdim=True)
    return torch.arange(mask.shape[1], device=mask.device).unsqueeze(0) < (lengths - 1)


@torch.no_grad()
def teacher_targets(teacher, seqs: list[list[int]], s: DistillSettings, progress: bool) -> list[tuple]:
    """Per sequence: top-k log-probs (float32) and their token ids, for positions 0..len-2."""
    lm = LM(teacher, s.device)
    out = []
    for _, ids, mask in tqdm(
        list(_batches(seqs, s.batch, s.device)), desc="teacher log-probs", disable=not progress, leave=False
    ):
        rows = lm.rows(ids, mask, _where(mask))
        vals, idx = [], []
        for c in range(0, rows.shape[0], lm.chunk):
            v, i = torch.topk(F.log_softmax(lm.logits(rows[c : c + lm.chunk]), -1), s.top_k, dim=-1)
            vals.append(v.cpu())
            idx.append(i.cpu().int())
        vals, idx = torch.cat(vals), torch.cat(idx)
        at = 0
        for n in mask.sum(1).tolist():
            out.append((vals[at : at + n - 1].clone(), idx[at : at + n - 1].clone()))
            at += n - 1
    return out


# ---------------------------------------------------------------------------------------------
# The student: base model + trainable factors

# transformers keeps MoE experts as fused 3-D parameters: gate_up_proj [E, 2 ff, embd] (gate rows, then
# up rows) and down_proj [E, embd, ff]; GGUF has ffn_{gate,up,down}_exps [E, out, in]
FUSED_EXPERTS = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}


class Student:
    """The base model with factor pairs added (HF layout, f32): forward hooks on nn.Linear / nn.Embedding
    modules (a per-expert nn.Linear takes its expert's slice of a 3-D factor pair), and W + left @ right
    per expert, recomputed at each call of the module, for fused 3-D expert parameters."""

    def __init__(self, model, src: TensorSource, factors: dict[str, Factors], device: str):
        self.model, self.src, self.enabled = model, src, True
        self.params: dict[str, tuple[torch.nn.Parameter, torch.nn.Parameter]] = {}
        for name, f in factors.items():
            left = torch.nn.Parameter(torch.from_numpy(self._to_hf(name, f.left)).to(device))
            right = torch.nn.Parameter(torch.from_numpy(np.ascontiguousarray(f.right, dtype=np.float32)).to(device))
            self.params[name] = (left, right)
        linear, fused = self._targets()
        missing = [n for n in factors if n not in linear and n not in fused]
        if missing:
            raise ConversionError(
                f"--fit distill: no module or parameter of the transformers model ({type(model).__name__}) carries "
                f"{', '.join(map(repr, missing[:6]))}{' ...' if len(missing) > 6 else ''}; distillation cannot "
                f"train them (convert without --fit distill)"
            )
        for name, mods in linear.items():
            for module, expert in mods:
                module.register_forward_hook(self._hook(name, module, expert))
        by_param: dict[tuple[int, str], list] = {}
        for name, (module, pname, rows) in fused.items():
            by_param.setdefault((id(module), pname), [module, pname, []])[2].append((name, rows))
        for module, pname, parts in by_param.values():
            self._fuse(module, pname, parts)

    # -- finding what carries each GGUF tensor

    def _gguf_name(self, tmap, hf_name: str) -> str | None:
        for n in dict.fromkeys((hf_name, hf_language_name(self.src.arch, hf_name))):
            if n is not None and (g := tmap.get_name(n, try_suffixes=(".weight",))) is not None:
                return g
        return None

    def _targets(self):
        """(GGUF name -> [(nn.Linear/nn.Embedding, expert index or None)],
        GGUF name -> (module, 3-D parameter name, rows of it)) for the factor names present."""
        tmap = gguf.get_tensor_name_map(self.src.arch.model_arch, self.src.n_layer)
        linear: dict[str, list] = {}
        fused: dict[str, tuple] = {}
        for hf_name, module in self.model.named_modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                expert = HF_EXPERT.search(hf_name + ".")
                if expert:  # per-expert module: one slice of the stacked GGUF tensor
                    stacked = hf_name[: expert.start()] + ".experts." + hf_name[expert.end() :]
                    g = self._gguf_name(tmap, stacked + ".weight")
                    e = int(expert.group(0).split(".")[2])
                else:
                    g, e = self._gguf_name(tmap, hf_name + ".weight"), None
                if g in self.params:
                    linear.setdefault(g, []).append((module, e))
                continue
            for pname, parts in FUSED_EXPERTS.items():
                p = module._parameters.get(pname)
                if p is None or p.dim() != 3:
                    continue
                names = [self._gguf_name(tmap, f"{hf_name}.{part}.weight") for part in parts]
                wanted = [(g, i) for i, g in enumerate(names) if g in self.params]
                if not wanted:
                    continue
                width = p.shape[1] // len(parts)
                for g, i in wanted:
                    self._check_fused(g, hf_name, pname, p, width, module)
                    fused[g] = (module, pname, (i * width, (i + 1) * width))
        for g, mods in linear.items():
            if self.params[g][0].dim() == 3:
                n_expert = self.params[g][0].shape[0]
                seen = sorted(e for _, e in mods if e is not None)
                if seen != list(range(n_expert)):
                    raise ConversionError(
                        f"--fit distill: {g!r} has {n_expert} experts but the transformers model has per-expert "
                        f"modules for {len(seen)} of them; distillation cannot train it (convert without --fit distill)"
                    )
        return linear, fused

    def _check_fused(self, g: str, hf_name: str, pname: str, p, width: int, module) -> None:
        left, right = self.params[g]
        want = (left.shape[0], left.shape[1], right.shape[2]) if left.dim() == 3 else None
        odd = getattr(module, "is_transposed", False) or hasattr(module, pname + "_bias")
        if want != (p.shape[0], width, p.shape[2]) or odd:
            raise ConversionError(
                f"--fit distill: {g!r} (factors {tuple(left.shape)} x {tuple(right.shape)}) does not match the "
                f"layout of {hf_name}.{pname} {tuple(p.shape)} in the transformers model ({type(module).__name__}); "
                f"distillation cannot train it (convert without --fit distill)"
            )

    # -- applying the factors

    def _hook(self, name: str, module, expert: int | None):
        embedding = isinstance(module, torch.nn.Embedding)
        pair = self.params[name]

        def hook(mod, inputs, output):
            if not self.enabled:
                return output
            left, right = pair if expert is None else (pair[0][expert], pair[1][expert])
            if embedding:  # token_embd: delta (n_vocab, n_embd) = left @ right, rows picked by token id
                return output + F.embedding(inputs[0], left) @ right
            return output + ((inputs[0] @ right.T) @ left.T).to(output.dtype)

        return hook

    def _fuse(self, module, pname: str, parts: list[tuple[str, tuple[int, int]]]) -> None:
        """The frozen 3-D parameter becomes a plain attribute; before each call of the module it is set
        to W + left @ right (batched over experts, on its rows), after the call back to W."""
        base = module._parameters.pop(pname)
        module.__dict__[pname] = base
        rows = sorted(parts, key=lambda x: x[1])

        def pre(mod, args):
            if not self.enabled:
                return
            deltas, at = [], 0
            for name, (start, stop) in rows:
                if start > at:
                    deltas.append(base.new_zeros(base.shape[0], start - at, base.shape[2]))
                left, right = self.params[name]
                deltas.append(torch.matmul(left, right))
                at = stop
            if at < base.shape[1]:
                deltas.append(base.new_zeros(base.shape[0], base.shape[1] - at, base.shape[2]))
            mod.__dict__[pname] = base + torch.cat(deltas, 1).to(base.dtype)

        def post(mod, args, output):
            mod.__dict__[pname] = base

        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post)

    # -- layout

    def _heads(self, name: str) -> tuple[int, int] | None:
        return qk_heads(self.src.arch, name, self.src.n_head, self.src.n_head_kv)

    def _to_hf(self, name: str, left: np.ndarray) -> np.ndarray:
        heads = self._heads(name)
        return np.ascontiguousarray(unpermute_rows(left, *heads) if heads else left, dtype=np.float32)

    def factors(self, like: dict[str, Factors]) -> dict[str, Factors]:
        out = {}
        for name, (left, right) in self.params.items():
            l_np = left.detach().cpu().numpy()
            heads = self._heads(name)
            l_np = np.ascontiguousarray(permute_rows(l_np, *heads) if heads else l_np)
            f = like[name]
            out[name] = Factors(
                l_np, right.detach().cpu().numpy().copy(), f.rank, f.energy, f.kept, f.method + "+distill", f.spectrum
            )
        return out


def kl_terms(logits: torch.Tensor, vals: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Per position: KL(teacher || student) on the teacher's top-k plus a tail bucket."""
    logq = F.log_softmax(logits.float(), -1)
    lq = torch.gather(logq, -1, idx.long())
    p = vals.exp()
    tail_p = (1 - p.sum(-1)).clamp_min(1e-12)
    tail_q = (1 - lq.exp().sum(-1)).clamp_min(1e-12)
    return (p * (vals - lq)).sum(-1) + tail_p * (tail_p.log() - tail_q.log())


def kl_loss(logits: torch.Tensor, vals: torch.Tensor, idx: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over masked positions of KL(teacher || student) on the teacher's top-k plus a tail bucket."""
    return (kl_terms(logits, vals, idx) * mask).sum() / mask.sum().clamp_min(1)


def _collate(items: list[tuple], seqs: list[list[int]], device: str):
    """Padded ids and mask, and the targets of the predicting positions concatenated in row-major order."""
    ids, mask = _pad(seqs, device)
    vals = torch.cat([v for v, _ in items]).to(device)
    idx = torch.cat([j for _, j in items]).to(device)
    return ids, mask, vals, idx


def _kl_sum(lm: LM, rows: torch.Tensor, vals: torch.Tensor, idx: torch.Tensor, grad: bool) -> torch.Tensor:
    """Sum of the per-position KL over `rows`, the vocabulary projection and log-softmax one chunk at a
    time; with grad, each chunk is recomputed in the backward (its logits are not kept)."""

    def chunk_kl(h, v, j):
        return kl_terms(lm.logits(h), v, j).sum()

    total = rows.new_zeros((), dtype=torch.float32)
    for c in range(0, rows.shape[0], lm.chunk):
        part = (rows[c : c + lm.chunk], vals[c : c + lm.chunk], idx[c : c + lm.chunk])
        if grad:
            total = total + torch.utils.checkpoint.checkpoint(chunk_kl, *part, use_reentrant=False)
        else:
            total = total + chunk_kl(*part)
    return total


def _mean_kl(student: Student, lm: LM, seqs, targets, s: DistillSettings) -> float:
    total, n = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(seqs), s.batch):
            ids, mask, vals, idx = _collate(targets[start : start + s.batch], seqs[start : start + s.batch], s.device)
            total += float(_kl_sum(lm, lm.rows(ids, mask, _where(mask)), vals, idx, grad=False))
            n += vals.shape[0]
    return total / max(n, 1)


# ---------------------------------------------------------------------------------------------


def _release() -> None:
    """Free what Python holds and hand freed heap pages back to the OS (glibc keeps them otherwise, and
    the base model would load on top of the teacher's pages)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _teacher_data(base: TensorSource, aligned: TensorSource, s: DistillSettings, rng: random.Random, progress: bool):
    """(calibration rows, label, sequences, teacher targets): the aligned model's top-k log-probs on the
    calibration sequences; the teacher is freed before the student loads."""
    t0 = time.perf_counter()
    rows, label = read_calibration(s.calibration)
    tok = load_tokenizer(s.tokenizer, (aligned, base))
    teacher = load_torch_model(aligned, s.device)
    seqs = build_sequences(rows, tok, teacher, s, progress)
    if not seqs:
        raise ConversionError(f"calibration {label!r} gave no sequence of 2 or more tokens")
    rng.shuffle(seqs)
    t_sampled = time.perf_counter()
    targets = teacher_targets(teacher, seqs, s, progress)
    del teacher
    _release()
    log.info(
        "distill: %d sequences (%.0f s to load and sample), teacher log-probs %.0f s",
        len(seqs),
        t_sampled - t0,
        time.perf_counter() - t_sampled,
    )
    return rows, label, seqs, targets


def _train(student: Student, lm: LM, seqs: list, targets: list, train_idx: list[int], s: DistillSettings, rng, progress: bool):
    """Adam on the factors (per-tensor learning rates), warm-up then cosine decay."""
    groups = [
        {"params": [p], "lr": s.lr * max(float(p.detach().pow(2).mean().sqrt()), 1e-8)}
        for pair in student.params.values()
        for p in pair
    ]
    opt = torch.optim.Adam(groups)
    base_lrs = [g["lr"] for g in groups]
    warm = max(1, s.steps // 20)
    t_train = time.perf_counter()
    bar = tqdm(range(s.steps), desc="distilling", unit="step", disable=not progress, leave=False)
    for step in bar:
        scale = min(1.0, (step + 1) / warm) * 0.5 * (1 + math.cos(math.pi * step / max(1, s.steps)))
        for g, lr in zip(opt.param_groups, base_lrs):
            g["lr"] = lr * scale
        pick = [train_idx[(step * s.batch + j) % len(train_idx)] for j in range(s.batch)]
        if (step * s.batch) % len(train_idx) < s.batch:
            rng.shuffle(train_idx)
        ids, mask, vals, idx = _collate([targets[i] for i in pick], [seqs[i] for i in pick], s.device)
        loss = _kl_sum(lm, lm.rows(ids, mask, _where(mask)), vals, idx, grad=True) / max(1, vals.shape[0])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if step == 0:
            _check_reached(student)
        opt.step()
        bar.set_postfix(kl=f"{loss.item():.4f}")
        if step == 0:
            log.info("distill: first step %.1f s", time.perf_counter() - t_train)
    log.info("distill: %d steps in %.0f s", s.steps, time.perf_counter() - t_train)


def _check_reached(student: Student) -> None:
    """Every factor pair must be on the loss's path; one the forward never used would stay untrained."""
    unused = [n for n, (left, right) in student.params.items() if left.grad is None and right.grad is None]
    if unused:
        raise ConversionError(
            f"--fit distill: the transformers model never used {', '.join(map(repr, unused[:6]))}"
            f"{' ...' if len(unused) > 6 else ''} in its forward; distillation cannot train them "
            f"(convert without --fit distill)"
        )


def _fit_meta(s: DistillSettings, label: str, rows: list, seqs: list, kls: tuple[float, float, float], t0: float) -> dict:
    kl_base, kl_before, kl_after = kls
    settings = {k: v for k, v in asdict(s).items() if k not in ("calibration", "tokenizer", "device", "checkpoint")}
    return {
        fmt.KEY_FIT: "distill",
        fmt.KEY_FIT_SETTINGS: json.dumps(settings, sort_keys=True),
        fmt.KEY_FIT_CALIBRATION: f"{label} ({len(rows)} rows, {len(seqs)} sequences)",
        fmt.KEY_FIT_TOKENS: int(sum(len(q) - 1 for q in seqs)),
        fmt.KEY_FIT_KL_BASE: float(kl_base),
        fmt.KEY_FIT_KL_BEFORE: float(kl_before),
        fmt.KEY_FIT_KL_AFTER: float(kl_after),
        fmt.KEY_FIT_SECONDS: float(round(time.perf_counter() - t0, 1)),
    }


def distill(
    base: TensorSource, aligned: TensorSource, factors: dict[str, Factors], s: DistillSettings, progress: bool = False
) -> tuple[dict[str, Factors], dict]:
    """Train the factors toward the aligned model; returns them (GGUF layout) and avgguf.fit.* metadata."""
    t0 = time.perf_counter()
    rng = random.Random(s.seed)
    torch.manual_seed(s.seed)
    rows, label, seqs, targets = _teacher_data(base, aligned, s, rng, progress)
    n_hold = max(1, int(round(len(seqs) * s.holdout))) if len(seqs) > 1 else 0
    train_idx = list(range(n_hold, len(seqs))) or list(range(len(seqs)))
    hold_seqs, hold_targets = seqs[:n_hold] or seqs, targets[:n_hold] or targets

    model = load_torch_model(base, s.device)
    student = Student(model, base, factors, s.device)
    lm = LM(model, s.device)
    wanted = s.checkpoint if s.checkpoint is not None else _activation_bytes(model, s.batch * s.max_len) > CHECKPOINT_BYTES
    n_ckpt = checkpoint_layers(model) if wanted else 0
    log.info(
        "distill: logits in chunks of %d positions (%s), %d decoder layers checkpointed",
        lm.chunk,
        "decoder + head" if lm.split else "whole model",
        n_ckpt,
    )
    student.enabled = False
    kl_base = _mean_kl(student, lm, hold_seqs, hold_targets, s)
    student.enabled = True
    kl_before = _mean_kl(student, lm, hold_seqs, hold_targets, s)
    start = student.factors(factors)
    _train(student, lm, seqs, targets, train_idx, s, rng, progress)
    kl_after = _mean_kl(student, lm, hold_seqs, hold_targets, s)
    fitted = student.factors(factors)
    if not kl_after < kl_before:  # never hand back something worse than the SVD start
        log.warning("distillation did not lower the held-out KL (%.4g -> %.4g); keeping the SVD factors", kl_before, kl_after)
        fitted, kl_after = start, kl_before
    log.info(
        "distill: KL(aligned || base) %.4g, SVD start %.4g, fitted %.4g on %d held-out sequences",
        kl_base,
        kl_before,
        kl_after,
        len(hold_seqs),
    )
    return fitted, _fit_meta(s, label, rows, seqs, (kl_base, kl_before, kl_after), t0)
