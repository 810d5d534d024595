"""Another fine-tune of the same base, for AV transfer (issue #14): a short supervised fine-tune of
SmolLM2-135M-Instruct on *generic* answers of every domain (a different objective than the expert AVs),
written as a Q4_1 GGUF like the embedded base, so `avgguf eval --transfer` can apply the demo AVs to it.

    python recipes/train_sft.py --out runs/sft [--steps 40] [--batch 4] [--lr 3e-5]

Writes runs/sft/hf (HF checkpoint) and runs/sft/sft-q4_1.gguf. Needs the train extra (torch, transformers).
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

from common import load_smollm2, prompt_tokens, read_jsonl, response_tokens, save_hf, tokenizer  # recipes/common.py

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=3e-5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    tok = tokenizer()
    rows = read_jsonl(ROOT / "data" / "preferences" / "train.jsonl")
    examples = [(prompt_tokens(tok, r["query"]), response_tokens(tok, r["responses"]["generic"])) for r in rows]
    rng.shuffle(examples)
    model = load_smollm2()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    for step in range(args.steps):
        chunk = [examples[(step * args.batch + k) % len(examples)] for k in range(args.batch)]
        loss = 0.0
        for prompt, answer in chunk:
            ids = torch.tensor([prompt + answer])
            labels = ids.clone()
            labels[0, : len(prompt)] = -100
            loss = loss + model(input_ids=ids, labels=labels).loss / len(chunk)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        print(f"  sft step {step + 1}/{args.steps} loss {float(loss):.4f}", file=sys.stderr, flush=True)
    model.eval()
    save_hf(model, args.out / "hf")
    write_gguf(args.out)


def write_gguf(out: Path) -> Path:
    """HF checkpoint -> f32 GGUF laid out like the embedded base -> Q4_1 by llama.cpp's quantizer."""
    import llama_cpp

    from avgguf.testing.reference import f32_gguf

    f32 = f32_gguf(out / "hf", out / "sft-f32.gguf")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_1
    params.allow_requantize = True
    target = out / "sft-q4_1.gguf"
    if llama_cpp.llama_model_quantize(str(f32).encode(), str(target).encode(), params) != 0:
        raise SystemExit("quantizing the SFT model failed")
    f32.unlink()
    print(f"wrote {target}")
    return target


if __name__ == "__main__":
    main()
