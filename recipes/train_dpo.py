"""DPO fine-tune of SmolLM2-135M-Instruct toward the expert level of one domain, on CPU, then the AV.

    pip install -e '.[train]'
    python recipes/make_preferences.py
    python recipes/train_dpo.py --domain medical --out runs/medical          # HF checkpoints base/ + aligned/
    avgguf convert --base runs/medical/base --aligned runs/medical/aligned --out modelfiles/avs/medical.gguf \
        --name medical --domain medical --rank 16

Pairs per training query: expert > generic and expert > avoidance. Loss: DPO (Rafailov et al.) with
beta 0.1 against the initial model, whose log-probabilities are computed once per pair, when first used. Token
embeddings are frozen by default: SmolLM2 ties them to the output layer, and llama.cpp cannot apply a LoRA to a
tied embedding, so training them would put part of the AV out of the adapter's reach. `--all-tensors` trains
every tensor (embeddings and norms too), as a user's full-parameter DPO run does; `--fit distill` then
compensates what a LoRA cannot carry. The tokenizer (with its chat template) is saved beside each checkpoint.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from common import (  # recipes/common.py: a script's own folder is importable
    load_smollm2,
    prompt_tokens,
    read_jsonl,
    response_logps,
    response_tokens,
    save_hf,
    save_hf_tokenizer,
    tokenizer,
)

DATA = Path(__file__).resolve().parent.parent / "data" / "preferences"


def build_pairs(rows: list[dict], tok) -> list[tuple[list[int], list[int], list[int]]]:
    """(prompt, chosen, rejected) token lists."""
    pairs = []
    for r in rows:
        prompt = prompt_tokens(tok, r["query"])
        chosen = response_tokens(tok, r["responses"]["expert"])
        for worse in ("generic", "avoidance"):
            pairs.append((prompt, chosen, response_tokens(tok, r["responses"][worse])))
    return pairs


def batch_logps(model, seqs: list[tuple[list[int], list[int]]]) -> torch.Tensor:
    """Sum of log p(response | prompt) for each (prompt, response)."""
    return response_logps(model, seqs)[0]


def train(domain: str, out: Path, steps: int, batch: int, lr: float, beta: float, seed: int, all_tensors: bool = False) -> dict:
    torch.manual_seed(seed)
    rng = random.Random(seed)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    tok = tokenizer()
    rows = read_jsonl(DATA / "train.jsonl", domain)
    if not rows:
        raise SystemExit(f"no training rows for domain {domain!r} in {DATA}/train.jsonl (run recipes/make_preferences.py)")
    pairs = build_pairs(rows, tok)
    model = load_smollm2()
    save_hf(model, out / "base")
    if not all_tensors:
        model.get_input_embeddings().weight.requires_grad_(False)

    t0 = time.perf_counter()
    reference = copy.deepcopy(model).eval()  # the initial policy, frozen
    ref: dict[int, torch.Tensor] = {}  # pair index -> (chosen, rejected) log-probs, computed when first used
    ref_s = 0.0

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    model.train()
    log = []
    order = list(range(len(pairs)))
    rng.shuffle(order)
    for step in range(steps):
        idx = [order[(step * batch + k) % len(order)] for k in range(batch)]
        chunk = [pairs[i] for i in idx]
        missing = [i for i in dict.fromkeys(idx) if i not in ref]
        if missing:
            t_ref = time.perf_counter()
            with torch.no_grad():
                lp = batch_logps(reference, [pairs[i][:2] for i in missing] + [(pairs[i][0], pairs[i][2]) for i in missing])
            for k, i in enumerate(missing):
                ref[i] = torch.stack([lp[k], lp[len(missing) + k]])
            ref_s += time.perf_counter() - t_ref
        ref_b = torch.stack([ref[i] for i in idx])
        logps = batch_logps(model, [(p, c) for p, c, _ in chunk] + [(p, r) for p, _, r in chunk])
        chosen, rejected = logps[:batch], logps[batch:]
        margin = beta * ((chosen - ref_b[:, 0]) - (rejected - ref_b[:, 1]))
        loss = -F.logsigmoid(margin).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        acc = float((margin > 0).float().mean())
        log.append({"step": step + 1, "loss": float(loss), "reward_acc": acc, "margin": float(margin.mean())})
        print(
            f"  {domain} step {step + 1}/{steps} loss {float(loss):.4f} acc {acc:.2f} margin {float(margin.mean()):.3f}",
            file=sys.stderr,
            flush=True,
        )
    model.eval()
    save_hf(model, out / "aligned")
    for sub in ("base", "aligned"):
        save_hf_tokenizer(out / sub)
    summary = {
        "domain": domain,
        "pairs": len(pairs),
        "steps": steps,
        "batch": batch,
        "lr": lr,
        "beta": beta,
        "reference_seconds": round(ref_s, 1),
        "train_seconds": round(time.perf_counter() - t0 - ref_s, 1),
        "final": log[-1],
        "log": log,
    }
    (out / "train_log.json").write_text(json.dumps(summary, indent=1))
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--domain", required=True, choices=["medical", "legal", "financial"])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--all-tensors", action="store_true", help="train every tensor (embeddings and norms too)")
    args = ap.parse_args()
    s = train(args.domain, args.out, args.steps, args.batch, args.lr, args.beta, args.seed, args.all_tensors)
    print(
        f"{args.domain}: {s['pairs']} pairs, {s['steps']} steps in {s['train_seconds']} s "
        f"(+{s['reference_seconds']} s reference), final loss {s['final']['loss']:.4f}, "
        f"reward accuracy {s['final']['reward_acc']:.2f}"
    )


if __name__ == "__main__":
    main()
