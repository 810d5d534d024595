"""The avoidance -> expert axis of one domain as a rank-16 LoRA of SmolLM2-135M-Instruct, trained for both signs.

    pip install -e '.[train]'
    python recipes/make_preferences.py
    python recipes/train_axis.py --domain medical --out runs/axis-medical      # HF checkpoints base/ + aligned/
    avgguf convert --base runs/axis-medical/base --aligned runs/axis-medical/aligned \
        --out modelfiles/avs/medical.gguf --name medical --domain medical --rank 16 --dtype q8_0

Why not recipes/train_dpo.py for the demo: its pairs (expert > generic, expert > avoidance) only say where
+AV goes. Generic and avoidance are pushed down alike, and nothing says what base - AV should generate, so
at negative λ the model lands wherever the reversed update happens to lead (for the medical demo question:
an echo of the question, or a refusal that does not redirect).

Here the AV is trained as what ships, a LoRA delta D = B·A on every attention and MLP projection (the
token embeddings and norms stay frozen, so llama.cpp applies all of it), and the same D is used with both
signs in one batch: the policy at +1 (W + D) is trained on the ranking expert > generic > avoidance, the
policy at -1 (W - D) on the reverse ranking avoidance > generic > expert. Each side is DPO (β against the
initial model, all three pairs of a query's ranking) plus a length-normalised NLL anchor on the side's own
top answer (expert at +1, avoidance at -1), so that each sign does not just shift margins but *generates*
its level. `--dpo-only` drops the -1 side and the anchors (the old objective on a LoRA, for comparison).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from common import load_smollm2, prompt_tokens, read_jsonl, response_logps, response_tokens, save_hf, save_hf_tokenizer, tokenizer

DATA = Path(__file__).resolve().parent.parent / "data" / "preferences"
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LEVELS = ("expert", "generic", "avoidance")  # the +1 side's ranking, best first; the -1 side's is reversed


class SignedLoRA(torch.nn.Module):
    """W x + s · B A x, with a sign s per batch row (set in `sign` before the forward pass)."""

    def __init__(self, base: torch.nn.Linear, rank: int, rng: torch.Generator):
        super().__init__()
        self.base = base
        self.A = torch.nn.Parameter(torch.randn(rank, base.in_features, generator=rng) / math.sqrt(base.in_features))
        self.B = torch.nn.Parameter(torch.zeros(base.out_features, rank))
        self.sign: torch.Tensor | None = None

    def forward(self, x):
        out = self.base(x)
        if self.sign is None:
            return out
        return out + self.sign[:, None, None] * ((x @ self.A.T) @ self.B.T)

    def merged(self) -> torch.Tensor:
        return self.base.weight + self.B @ self.A


def add_lora(model, rank: int, seed: int) -> list[SignedLoRA]:
    rng = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.requires_grad_(False)
    loras = []
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name in TARGETS:
                if hasattr(parent, name):
                    lora = SignedLoRA(getattr(parent, name), rank, rng)
                    setattr(parent, name, lora)
                    loras.append(lora)
    return loras


def seq_logps(model, loras, seqs: list[tuple[list[int], list[int]]], signs: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of log p(response | prompt) and response length for each (prompt, response), row i at sign signs[i]."""
    sign = torch.tensor(signs, dtype=torch.float32)
    for lora in loras:
        lora.sign = sign
    return response_logps(model, seqs)


def ranking_loss(reward: torch.Tensor) -> torch.Tensor:
    """DPO over every pair of a ranking: reward[k] is the implicit reward of the k-th best answer."""
    pairs = [(i, j) for i in range(len(reward)) for j in range(i + 1, len(reward))]
    return torch.stack([-F.logsigmoid(reward[i] - reward[j]) for i, j in pairs]).mean()


def train(args) -> dict:
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    tok = tokenizer()
    rows = [r for r in read_jsonl(DATA / "train.jsonl", args.domain) if r["split"] == "train"]
    if not rows:
        raise SystemExit(f"no training rows for domain {args.domain!r} in {DATA}/train.jsonl (run recipes/make_preferences.py)")
    items = [(prompt_tokens(tok, r["query"]), [response_tokens(tok, r["responses"][lvl]) for lvl in LEVELS]) for r in rows]
    model = load_smollm2()
    save_hf(model, args.out / "base")
    loras = add_lora(model, args.rank, args.seed)
    params = [p for lora in loras for p in (lora.A, lora.B)]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    sides = (1.0,) if args.dpo_only else (1.0, -1.0)
    ref: dict[int, torch.Tensor] = {}
    order = list(range(len(items)))
    rng.shuffle(order)
    log = []
    t0 = time.perf_counter()
    model.train()
    for step in range(args.steps):
        idx = [order[(step * args.batch + k) % len(order)] for k in range(args.batch)]
        missing = [i for i in idx if i not in ref]
        if missing:
            with torch.no_grad():
                lp, _ = seq_logps(
                    model, loras, [(items[i][0], y) for i in missing for y in items[i][1]], [0.0] * 3 * len(missing)
                )
            for k, i in enumerate(missing):
                ref[i] = lp[3 * k : 3 * k + 3]
        seqs, signs = [], []
        for i in idx:
            for s in sides:
                seqs += [(items[i][0], y) for y in items[i][1]]
                signs += [s] * 3
        lp, n = seq_logps(model, loras, seqs, signs)
        losses, accs = [], []
        at = 0
        for i in idx:
            for s in sides:
                reward = args.beta * (lp[at : at + 3] - ref[i])  # expert, generic, avoidance
                ranked = reward if s > 0 else reward.flip(0)
                loss = ranking_loss(ranked)
                if not args.dpo_only:
                    top = at if s > 0 else at + 2
                    loss = loss + args.nll * (-lp[top] / n[top])
                losses.append(loss)
                accs.append(float((ranked[0] > ranked[1]) & (ranked[1] > ranked[2])))
                at += 3
        loss = torch.stack(losses).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad()
        acc = sum(accs) / len(accs)
        log.append({"step": step + 1, "loss": loss.item(), "ranking_acc": acc})
        print(
            f"  {args.domain} step {step + 1}/{args.steps} loss {loss.item():.4f} ranking acc {acc:.2f}",
            file=sys.stderr,
            flush=True,
        )
    model.eval()
    with torch.no_grad():
        for lora in loras:
            lora.base.weight.copy_(lora.merged())
            lora.sign = None
    for layer in model.model.layers:  # back to plain Linear modules (merged weights) for saving
        for parent in (layer.self_attn, layer.mlp):
            for name in TARGETS:
                if isinstance(getattr(parent, name, None), SignedLoRA):
                    setattr(parent, name, getattr(parent, name).base)
    save_hf(model, args.out / "aligned")
    for sub in ("base", "aligned"):
        save_hf_tokenizer(args.out / sub)
    summary = {
        "domain": args.domain,
        "objective": "dpo-only" if args.dpo_only else "axis",
        "queries": len(items),
        **{k: getattr(args, k) for k in ("steps", "batch", "lr", "beta", "nll", "rank", "seed")},
        "train_seconds": round(time.perf_counter() - t0, 1),
        "final": log[-1],
        "log": log,
    }
    (args.out / "train_log.json").write_text(json.dumps(summary, indent=1))
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--domain", required=True, choices=["medical", "legal", "financial"])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--batch", type=int, default=2, help="queries per step (each: 3 answers at +1 and 3 at -1)")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--nll", type=float, default=0.25, help="weight of each side's NLL anchor")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dpo-only", action="store_true", help="only the +1 side, no anchors (the old objective, on a LoRA)")
    args = ap.parse_args()
    s = train(args)
    done = f"{s['steps']} steps in {s['train_seconds']} s"
    print(f"{args.domain}: {s['queries']} queries, {done}, final loss {s['final']['loss']:.4f}")


if __name__ == "__main__":
    main()
