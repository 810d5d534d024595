"""`avgguf convert --kind control-vector`: a llama.cpp control vector (avgguf.gguf.control_vector) from a
base/aligned pair or from preference data, measured on the base model's residual stream in transformers.

Where the vector acts: direction N is added to the output of decoder block N (0-based; llama.cpp has none for
block 0), so the hooks here sit on the same block outputs (`model.model.layers[N]`), never on HF's
`hidden_states[-1]` (which has the final norm applied).

Per-layer scaling (what scale 1.0 means). Adding a vector at every layer compounds: what is added at block N
flows on through the residual stream into every later block. So each direction is fitted in order, with the
earlier ones already applied: v_N = target_N - mean(steered block-N output), where "steered" is the base model
running with v_1..v_{N-1} added. At scale 1.0 the steered base's mean residual stream then equals the target's
at every block from 1 on, on the calibration tokens (exactly for the mean; the per-token spread is what a
constant vector cannot carry, and the report measures it):
- pair (a): target = the aligned model's mean block outputs on calibration text (prompts included) and its
  own sampled answers (the tokens averaged: every position but the first); steered = the base on the same tokens;
- preferences (b), `--method mean`: target = the base's mean block outputs over the chosen answers' tokens,
  steered = the base on the rejected answers (prompts excluded): at 1.0 the rejected answers' mean residual
  stream moves onto the chosen ones'; `--method pca` (cvector-generator's idea): per block, the first
  principal direction of the per-pair differences (chosen - rejected answer means, uncentered), its sign made
  to agree with the mean difference (cvector-generator's sign is random), and its length fitted as above along
  that direction only.
All sequences run as one padded batch (the fit needs every token's mean at block N before block N+1 runs), so
`max_tokens` (--calibration-tokens) bounds the calibration set.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from avgguf.errors import ConversionError
from avgguf.gguf import control_vector as cvf

from .calibration import read_calibration
from .distill import DistillSettings, _encode_row, build_sequences, load_tokenizer
from .sources import GGUFModel, TensorSource

log = logging.getLogger(__name__)
KL_POSITIONS = 512  # positions whose next-token KL the pair report measures (aligned log-probs kept for these)


@dataclass
class Batch:
    """Right-padded token ids, their attention mask and the positions the means run over."""

    ids: torch.Tensor
    mask: torch.Tensor
    select: torch.Tensor  # bool [B, T]


@dataclass
class CvecReport:
    kind: str  # "pair" | "preferences"
    method: str
    layers: list[int]
    n_embd: int
    sequences: int
    tokens: int
    seconds: float
    fit: dict = field(default_factory=dict)  # fidelity figures (see the convert functions)

    def to_dict(self) -> dict:
        return asdict(self)


def load_model(src: TensorSource, device: str, flag: str):
    """The checkpoint in transformers (a GGUF through its GGUF loader), float32, eval, no grads."""
    from transformers import AutoModelForCausalLM

    path, kw = (src.path.parent, {"gguf_file": src.path.name}) if isinstance(src, GGUFModel) else (src.path, {})
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, **kw)
    except Exception as exc:  # transformers raises many types for unloadable checkpoints
        raise ConversionError(
            f"{flag} {str(src.path)!r}: transformers cannot load it ({exc}); a control vector is measured on the "
            f"model's residual stream in transformers: give the Hugging Face checkpoint"
        ) from None
    model.eval().to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def decoder_layers(model):
    """The decoder blocks (block N's output is where llama.cpp adds direction N)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise ConversionError(f"{type(model).__name__}: no decoder layers found (model.model.layers)")
    return layers


def pad_batch(seqs: list[list[int]], starts: list[int], device: str, pad: int = 0) -> Batch:
    """One batch; the means run over positions >= starts[i] of sequence i."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    select = torch.zeros((len(seqs), width), dtype=torch.bool)
    for i, (s, start) in enumerate(zip(seqs, starts)):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
        select[i, start : len(s)] = True
    return Batch(ids.to(device), mask.to(device), select.to(device))


def _hidden(out):
    return out[0] if isinstance(out, tuple) else out


def _replace(out, h):
    return (h, *out[1:]) if isinstance(out, tuple) else h


@torch.no_grad()
def block_means(model, batch: Batch, per_row: bool = False) -> torch.Tensor:
    """Mean output of every decoder block over the selected tokens: [n_layer, n_embd], or per sequence
    [B, n_layer, n_embd] with `per_row`."""
    layers, found = decoder_layers(model), {}
    w = batch.select.to(torch.float32)

    def hook(i):
        def run(mod, inp, out):
            h = _hidden(out)
            if per_row:
                found[i] = (h * w[..., None]).sum(1) / w.sum(1).clamp(min=1)[:, None]
            else:
                found[i] = (h * w[..., None]).sum((0, 1)) / w.sum()

        return run

    handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        model(input_ids=batch.ids, attention_mask=batch.mask)
    finally:
        for h in handles:
            h.remove()
    return torch.stack([found[i] for i in range(len(layers))], dim=-2)


@torch.no_grad()
def fit_sequential(model, batch: Batch, targets: torch.Tensor, layers: list[int], directions: torch.Tensor | None = None):
    """Directions {N: vector} for the blocks in `layers`, fitted in order so that the steered model's mean
    block-N output over the selected tokens equals targets[N] (along directions[N] only, when given);
    returns them and the logits of the steered pass."""
    blocks, fitted = decoder_layers(model), {}
    w = batch.select.to(torch.float32)

    def hook(i):
        def run(mod, inp, out):
            h = _hidden(out)
            gap = targets[i] - (h * w[..., None]).sum((0, 1)) / w.sum()
            if directions is not None:
                gap = directions[i] * (gap @ directions[i])
            fitted[i] = gap
            return _replace(out, h + gap)

        return run

    handles = [blocks[i].register_forward_hook(hook(i)) for i in sorted(layers)]
    try:
        logits = model(input_ids=batch.ids, attention_mask=batch.mask).logits
    finally:
        for h in handles:
            h.remove()
    return {i: fitted[i].float().cpu().numpy() for i in sorted(layers)}, logits


@torch.no_grad()
def answer_logprob(model, batch: Batch, vectors: dict) -> float:
    """Mean log-probability per selected token (each predicted from the one before) with `vectors` ({block:
    numpy vector}) added to the block outputs at scale 1."""
    blocks = decoder_layers(model)
    adds = {i: torch.as_tensor(v, device=batch.ids.device) for i, v in vectors.items()}
    handles = [blocks[i].register_forward_hook(lambda m, inp, out, a=a: _replace(out, _hidden(out) + a)) for i, a in adds.items()]
    try:
        logits = model(input_ids=batch.ids, attention_mask=batch.mask).logits
    finally:
        for h in handles:
            h.remove()
    sel = batch.select[:, 1:]
    lp = F.log_softmax(logits[:, :-1].float(), -1).gather(-1, batch.ids[:, 1:, None])[..., 0]
    return float(lp[sel].mean())


def check_layers(n_layer: int, layer_range: tuple[int, int] | None) -> list[int]:
    """The blocks a vector is made for: 1..n_layer-1, or the given inclusive range within it."""
    lo, hi = layer_range or (1, n_layer - 1)
    if not 1 <= lo <= hi <= n_layer - 1:
        raise ConversionError(
            f"--layer-range {lo} {hi}: the model has {n_layer} blocks; control vectors apply to blocks 1..{n_layer - 1}"
        )
    return list(range(lo, hi + 1))


def _cap(seqs: list[list[int]], starts: list[int], max_tokens: int, what: str):
    kept, total = 0, 0
    for s in seqs:
        if total + len(s) > max_tokens and kept:
            break
        kept, total = kept + 1, total + len(s)
    if kept < len(seqs):
        log.warning("%s: %d of %d sequences kept (--calibration-tokens %d)", what, kept, len(seqs), max_tokens)
    return seqs[:kept], starts[:kept]


def _kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    """Mean KL(p || q) over rows of next-token logits."""
    p = F.log_softmax(p_logits.float(), -1)
    return float((p.exp() * (p - F.log_softmax(q_logits.float(), -1))).sum(-1).mean())


def _positions(batch: Batch) -> torch.Tensor:
    """Up to KL_POSITIONS selected (row, position) pairs, spread over the batch."""
    where = batch.select.nonzero()
    step = max(1, len(where) // KL_POSITIONS)
    return where[::step][:KL_POSITIONS]


def _pair_sequences(aligned, tok, calibration: str | None, samples: int, max_len: int, progress: bool) -> list[list[int]]:
    """The calibration text: each prompt row's chat-templated prompt itself, then what build_sequences makes
    (text and token rows, prompts with their given answers, `samples` answers of the aligned model each)."""
    rows, label = read_calibration(calibration)
    prompts = [_encode_row(tok, row, f"calibration row {i + 1}")[0][:max_len] for i, row in enumerate(rows) if row.is_prompt]
    seqs = build_sequences(rows, tok, aligned, DistillSettings(samples=samples, max_len=max_len), progress)
    out = [q for q in prompts if len(q) >= 2] + seqs
    if not out:
        raise ConversionError(f"calibration {label}: no sequence of 2 tokens or more to measure the residual stream on")
    return out


def convert_pair(
    base: TensorSource,
    aligned: TensorSource,
    out: str | Path,
    *,
    calibration: str | None = None,
    tokenizer: str | None = None,
    samples: int = 1,
    layer_range: tuple[int, int] | None = None,
    max_tokens: int = 16384,
    max_len: int = 160,
    device: str = "cpu",
    force: bool = False,
    name: str | None = None,
    progress: bool = False,
) -> CvecReport:
    """Source (a): the aligned model's average shift of the residual stream, as a control vector for the base
    (module docstring). Report: KL(aligned || base) and KL(aligned || base + vector) on up to KL_POSITIONS
    calibration positions, and the share of the last fitted block's per-token shift the vector leaves."""
    t0 = time.monotonic()
    torch.manual_seed(0)
    model = load_model(aligned, device, "--aligned")
    tok = load_tokenizer(tokenizer, (aligned, base))
    seqs = _pair_sequences(model, tok, calibration, samples, max_len, progress)
    # every position but the first (attention sinks carry outsized activations there)
    seqs, starts = _cap(seqs, [1] * len(seqs), max_tokens, "calibration")
    batch = pad_batch(seqs, starts, device)
    layers = check_layers(model.config.num_hidden_layers, layer_range)
    targets = block_means(model, batch)
    where = _positions(batch)
    teacher = model(input_ids=batch.ids, attention_mask=batch.mask).logits[where[:, 0], where[:, 1]]
    del model
    model = load_model(base, device, "--base")
    plain = model(input_ids=batch.ids, attention_mask=batch.mask).logits[where[:, 0], where[:, 1]]
    vectors, logits = fit_sequential(model, batch, targets, layers)
    steered = logits[where[:, 0], where[:, 1]]
    fit = {"kl_base": _kl(teacher, plain), "kl_steered": _kl(teacher, steered), "kl_positions": len(where)}
    report = CvecReport("pair", "mean", layers, int(targets.shape[-1]), len(seqs), int(batch.select.sum()), 0.0, fit)
    return _write(out, vectors, model, report, t0, force, name, {"avgguf.cv.source": "pair"})


def _write(out, vectors, model, report: CvecReport, t0: float, force: bool, name: str | None, meta: dict) -> CvecReport:
    hint = getattr(model.config, "model_type", "") or ""
    meta = {**meta, "avgguf.cv.method": report.method, "avgguf.cv.fit": json.dumps(report.fit)}
    if name:
        meta["general.name"] = name
    cvf.write_control_vector(out, vectors, hint, metadata=meta, force=force)
    report.seconds = time.monotonic() - t0
    return report


# -- source (b): preference rows -----------------------------------------------------------------------------


def read_preferences(path: str | Path, positive: str, negatives: tuple[str, ...], domain: str | None = None):
    """(prompt, chosen, rejected) texts: rows {prompt|query, chosen, rejected}, or avgguf's rows {query,
    responses: {level: text}} paired as `positive` over each of `negatives` (recipes/train_dpo.py's pairs);
    `domain`: only rows of that domain (avgguf's rows carry one)."""
    p = Path(path)
    if not p.is_file():
        raise ConversionError(f"--preferences {str(p)!r} not found; give a JSONL file (one JSON object per line)")
    pairs = []
    for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{p}:{i}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConversionError(f"{where}: not JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise ConversionError(f"{where}: expected a JSON object")
        if domain is not None and row.get("domain", domain) != domain:
            continue
        pairs += _row_pairs(row, where, positive, negatives)
    if not pairs:
        raise ConversionError(f"--preferences {str(p)!r}: no pairs" + (f" of domain {domain!r}" if domain else ""))
    return pairs


def _row_pairs(row: dict, where: str, positive: str, negatives: tuple[str, ...]) -> list[tuple[str, str, str]]:
    prompt = row.get("prompt", row.get("query"))
    if not isinstance(prompt, str) or not prompt:
        raise ConversionError(f"{where}: expected a non-empty 'prompt' (or 'query') string")
    if "chosen" in row or "rejected" in row:
        chosen, rejected = row.get("chosen"), row.get("rejected")
        if not (isinstance(chosen, str) and isinstance(rejected, str) and chosen and rejected):
            raise ConversionError(f"{where}: 'chosen' and 'rejected' must both be non-empty strings")
        return [(prompt, chosen, rejected)]
    levels = row.get("responses")
    if not isinstance(levels, dict):
        raise ConversionError(f"{where}: expected 'chosen'/'rejected' or avgguf's 'responses': {{level: text}}")
    missing = [k for k in (positive, *negatives) if not isinstance(levels.get(k), str)]
    if missing:
        raise ConversionError(f"{where}: responses has no {missing} (it has {sorted(levels)}); see --positive/--negative")
    return [(prompt, levels[positive], levels[n]) for n in negatives]


def _encode_pairs(tok, pairs, max_len: int) -> tuple[list[list[int]], list[list[int]], list[int]]:
    """Chosen and rejected sequences (chat prompt + answer + EOS) and where each answer starts."""
    if tok is None:
        raise ConversionError("--preferences holds text: give --tokenizer DIR_OR_GGUF (none was found beside --base)")
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    pos, neg, starts = [], [], []
    for prompt, chosen, rejected in pairs:
        msgs = [{"role": "user", "content": prompt}]
        if getattr(tok, "chat_template", None):
            head = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        else:
            head = f"user: {prompt}\nassistant: "
        ids = tok(head, add_special_tokens=False)["input_ids"]
        pos.append((ids + tok(chosen, add_special_tokens=False)["input_ids"] + eos)[:max_len])
        neg.append((ids + tok(rejected, add_special_tokens=False)["input_ids"] + eos)[:max_len])
        starts.append(min(len(ids), max_len - 1))
    return pos, neg, starts


def _pca_directions(model, pos: Batch, neg: Batch, layers: list[int]) -> torch.Tensor:
    """Per block, the unit first principal direction of the per-pair differences (uncentered, as
    cvector-generator), signed to agree with their mean."""
    diffs = block_means(model, pos, per_row=True) - block_means(model, neg, per_row=True)  # [pairs, L, E]
    out = torch.zeros(diffs.shape[1:], dtype=torch.float32, device=diffs.device)
    for i in layers:
        _, _, vh = torch.linalg.svd(diffs[:, i].float(), full_matrices=False)
        u = vh[0]
        out[i] = u if (diffs[:, i].mean(0) @ u) >= 0 else -u
    return out


def convert_preferences(
    base: TensorSource,
    preferences: str | Path,
    out: str | Path,
    *,
    method: str = "mean",
    positive: str = "expert",
    negatives: tuple[str, ...] = ("generic", "avoidance"),
    domain: str | None = None,
    tokenizer: str | None = None,
    layer_range: tuple[int, int] | None = None,
    max_tokens: int = 32768,
    max_len: int = 160,
    device: str = "cpu",
    force: bool = False,
    name: str | None = None,
) -> CvecReport:
    """Source (b): the base model's residual stream on chosen vs rejected answers (module docstring). Report:
    the mean per-token log-likelihood margin of chosen over rejected answers under the base alone and with the
    vector at 1.0 (a vector that carries the preference raises it), and the per-block mean gap it closes."""
    if method not in ("mean", "pca"):
        raise ConversionError(f"--method {method!r}: expected mean or pca")
    t0 = time.monotonic()
    pairs = read_preferences(preferences, positive, negatives, domain)
    model = load_model(base, device, "--base")
    pos, neg, starts = _encode_pairs(load_tokenizer(tokenizer, (base,)), pairs, max_len)
    pos, starts_p = _cap(pos, starts, max_tokens // 2, "preferences")
    neg, starts = neg[: len(pos)], starts_p
    pb, nb = pad_batch(pos, starts, device), pad_batch(neg, starts, device)
    layers = check_layers(model.config.num_hidden_layers, layer_range)
    targets = block_means(model, pb)
    dirs = _pca_directions(model, pb, nb, layers) if method == "pca" else None
    vectors, _ = fit_sequential(model, nb, targets, layers, dirs)
    gap = (targets - block_means(model, nb)).norm(dim=-1)
    margins = [answer_logprob(model, pb, v) - answer_logprob(model, nb, v) for v in ({}, vectors)]
    fit = {
        "pairs": len(pos),
        "margin_base": round(margins[0], 4),
        "margin_steered": round(margins[1], 4),
        "mean_gap_norm": {str(i): round(float(gap[i]), 4) for i in layers},
    }
    report = CvecReport("preferences", method, layers, int(targets.shape[-1]), len(pos), int(nb.select.sum()), 0.0, fit)
    return _write(out, vectors, model, report, t0, force, name, {"avgguf.cv.source": "preferences"})
