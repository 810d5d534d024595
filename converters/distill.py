"""`--fit distill`: train an AV's low-rank factors toward the aligned model's behaviour.

The SVD keeps the AV's largest weight directions; what a user trained is a *behaviour*. Starting from
the SVD factors, every factor pair (only the tensors llama.cpp applies) is trained together, base
frozen, to minimise KL(aligned || base + B·A) on calibration text (converters.calibration) plus the
aligned model's own sampled answers. Deltas a LoRA cannot carry (norms, tied embeddings) are thereby
compensated where the factors can.

Memory stays bounded: the teacher (aligned model) runs first and keeps only its top-k log-probs per
position (the KL is taken over those k tokens plus one bucket for the rest of the vocabulary); then it is
freed and only the base model plus the factors are in memory while training.
"""

from __future__ import annotations

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
from avgguf.gguf.arches import permute_rows, qk_heads, unpermute_rows
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


@torch.no_grad()
def teacher_targets(teacher, seqs: list[list[int]], s: DistillSettings, progress: bool) -> list[tuple]:
    """Per sequence: top-k log-probs (float32) and their token ids, for positions 0..len-2."""
    out = []
    for _, ids, mask in tqdm(
        list(_batches(seqs, s.batch, s.device)), desc="teacher log-probs", disable=not progress, leave=False
    ):
        logp = F.log_softmax(teacher(input_ids=ids, attention_mask=mask).logits[:, :-1].float(), -1)
        vals, idx = torch.topk(logp, s.top_k, dim=-1)
        for i, n in enumerate(mask.sum(1).tolist()):
            out.append((vals[i, : n - 1].cpu(), idx[i, : n - 1].cpu().int()))
    return out


# ---------------------------------------------------------------------------------------------
# The student: base model + trainable factors


class Student:
    """The base model with factor pairs added through forward hooks (HF layout, f32)."""

    def __init__(self, model, src: TensorSource, factors: dict[str, Factors], device: str):
        self.model, self.src, self.enabled = model, src, True
        self.params: dict[str, tuple[torch.nn.Parameter, torch.nn.Parameter]] = {}
        modules = self._modules_by_gguf_name()
        for name, f in factors.items():
            module = modules.get(name)
            if module is None:
                raise ConversionError(f"--fit distill: no module of the transformers model carries {name!r}")
            left = torch.nn.Parameter(torch.from_numpy(self._to_hf(name, f.left)).to(device))
            right = torch.nn.Parameter(torch.from_numpy(np.ascontiguousarray(f.right)).to(device))
            self.params[name] = (left, right)
            module.register_forward_hook(self._hook(name, module, left, right))

    def _modules_by_gguf_name(self) -> dict[str, torch.nn.Module]:
        tmap = gguf.get_tensor_name_map(self.src.arch.model_arch, self.src.n_layer)
        out = {}
        for hf_name, module in self.model.named_modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                g = tmap.get_name(hf_name + ".weight", try_suffixes=(".weight",))
                if g is not None:
                    out[g] = module
        return out

    def _hook(self, name: str, module, left, right):
        embedding = isinstance(module, torch.nn.Embedding)

        def hook(mod, inputs, output):
            if not self.enabled:
                return output
            if embedding:  # token_embd: delta (n_vocab, n_embd) = left @ right, rows picked by token id
                return output + F.embedding(inputs[0], left) @ right
            return output + (inputs[0] @ right.T) @ left.T

        return hook

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


def kl_loss(logits: torch.Tensor, vals: torch.Tensor, idx: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over masked positions of KL(teacher || student) on the teacher's top-k plus a tail bucket."""
    logq = F.log_softmax(logits.float(), -1)
    lq = torch.gather(logq, -1, idx.long())
    p = vals.exp()
    tail_p = (1 - p.sum(-1)).clamp_min(1e-12)
    tail_q = (1 - lq.exp().sum(-1)).clamp_min(1e-12)
    kl = (p * (vals - lq)).sum(-1) + tail_p * (tail_p.log() - tail_q.log())
    return (kl * mask).sum() / mask.sum().clamp_min(1)


def _collate(items: list[tuple], seqs: list[list[int]], k: int, device: str):
    ids, mask = _pad(seqs, device)
    width = ids.shape[1] - 1
    vals = torch.zeros((len(seqs), width, k))
    idx = torch.zeros((len(seqs), width, k), dtype=torch.int32)
    pmask = torch.zeros((len(seqs), width))
    for i, (v, j) in enumerate(items):
        vals[i, : len(v)], idx[i, : len(v)], pmask[i, : len(v)] = v, j, 1
    return ids, mask, vals.to(device), idx.to(device), pmask.to(device)


def _mean_kl(student: Student, seqs, targets, s: DistillSettings) -> float:
    total, n = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(seqs), s.batch):
            chunk = seqs[start : start + s.batch]
            ids, mask, vals, idx, pmask = _collate(targets[start : start + s.batch], chunk, s.top_k, s.device)
            logits = student.model(input_ids=ids, attention_mask=mask).logits[:, :-1]
            total += float(kl_loss(logits, vals, idx, pmask)) * float(pmask.sum())
            n += float(pmask.sum())
    return total / max(n, 1.0)


# ---------------------------------------------------------------------------------------------


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
    gc.collect()
    log.info(
        "distill: %d sequences (%.0f s to load and sample), teacher log-probs %.0f s",
        len(seqs),
        t_sampled - t0,
        time.perf_counter() - t_sampled,
    )
    return rows, label, seqs, targets


def _train(student: Student, seqs: list, targets: list, train_idx: list[int], s: DistillSettings, rng, progress: bool):
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
        ids, mask, vals, idx, pmask = _collate([targets[i] for i in pick], [seqs[i] for i in pick], s.top_k, s.device)
        loss = kl_loss(student.model(input_ids=ids, attention_mask=mask).logits[:, :-1], vals, idx, pmask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(kl=f"{loss.item():.4f}")
    log.info("distill: %d steps in %.0f s", s.steps, time.perf_counter() - t_train)


def _fit_meta(s: DistillSettings, label: str, rows: list, seqs: list, kls: tuple[float, float, float], t0: float) -> dict:
    kl_base, kl_before, kl_after = kls
    settings = {k: v for k, v in asdict(s).items() if k not in ("calibration", "tokenizer", "device")}
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

    student = Student(load_torch_model(base, s.device), base, factors, s.device)
    student.enabled = False
    kl_base = _mean_kl(student, hold_seqs, hold_targets, s)
    student.enabled = True
    kl_before = _mean_kl(student, hold_seqs, hold_targets, s)
    start = student.factors(factors)
    _train(student, seqs, targets, train_idx, s, rng, progress)
    kl_after = _mean_kl(student, hold_seqs, hold_targets, s)
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
