"""--fit distill with bounded memory and on MoE experts: the chunked vocabulary loss and checkpointed
layers give the same loss and gradients as the whole-logits computation; the student applies 3-D expert
factors to transformers 5's fused expert parameters (GGUF ffn_{gate,up,down}_exps onto gate_up_proj /
down_proj) and refuses what it cannot map."""

from __future__ import annotations

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from avgguf.converters import distill as D  # noqa: E402
from avgguf.converters.lowrank import Factors  # noqa: E402
from avgguf.converters.sources import open_source  # noqa: E402
from avgguf.errors import ConversionError  # noqa: E402
from avgguf.testing.synthetic import TINY_HF_CONFIG  # noqa: E402

COMMON = dict(TINY_HF_CONFIG, tie_word_embeddings=False)
MOE = {
    "mixtral": lambda: transformers.MixtralConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2),
    "qwen3moe": lambda: transformers.Qwen3MoeConfig(
        **COMMON, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48, head_dim=16
    ),
}
EXPS = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")


def tiny(config, seed: int):
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def load(path):
    return transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


@pytest.fixture(scope="module", params=sorted(MOE))
def moe_pair(request, tmp_path_factory):
    """(base dir, aligned dir): a tiny random MoE whose expert weights alone moved."""
    root = tmp_path_factory.mktemp(request.param)
    model = tiny(MOE[request.param](), 0)
    model.save_pretrained(root / "base")
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".experts." in name:
                p.add_(0.5 * p.std() * torch.randn(p.shape, generator=gen))
    model.save_pretrained(root / "aligned")
    return root / "base", root / "aligned"


def exact_factors(base, aligned) -> dict[str, Factors]:
    """Full-rank 3-D factors of every expert delta read through the TensorSources (GGUF names, numpy
    (E, out, in)): left = delta, right = identity, per expert."""
    out = {}
    for name in base.names():
        if not any(k in name for k in EXPS):
            continue
        delta = aligned.load(name) - base.load(name)
        assert delta.ndim == 3
        e, _, n_in = delta.shape
        right = np.broadcast_to(np.eye(n_in, dtype=np.float32), (e, n_in, n_in)).copy()
        out[name] = Factors(delta.astype(np.float32), right, n_in, float((delta**2).sum()), 1.0, "full", None)
    return out


def test_student_applies_3d_expert_factors_to_fused_parameters(moe_pair):
    """base + exact expert factors through the student = the aligned model (every expert, gate/up/down)."""
    base_dir, aligned_dir = moe_pair
    base, aligned = open_source(base_dir, "--base"), open_source(aligned_dir, "--aligned")
    factors = exact_factors(base, aligned)
    assert len(factors) == 3 * COMMON["num_hidden_layers"]
    model = load(base_dir)
    ids = torch.randint(3, COMMON["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = load(aligned_dir)(input_ids=ids).logits
        plain = model(input_ids=ids).logits
    student = D.Student(model, base, factors, "cpu")
    with torch.no_grad():
        got = model(input_ids=ids).logits
        student.enabled = False
        off = model(input_ids=ids).logits
        student.enabled = True
    assert (want - plain).abs().max() > 1e-2  # the experts' delta shows in the logits
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(off, plain)
    # every factor is trained: gradients reach all of them, through checkpointed layers as well
    D.checkpoint_layers(model)
    model(input_ids=ids).logits.float().pow(2).mean().backward()
    D._check_reached(student)
    for name, (left, right) in student.params.items():
        assert float(left.grad.abs().sum()) > 0 and float(right.grad.abs().sum()) > 0, name
    # handed back in GGUF layout, unchanged
    back = student.factors(factors)
    for name, f in factors.items():
        np.testing.assert_array_equal(back[name].left, f.left)
        assert back[name].right.shape == f.right.shape and back[name].method == "full+distill"


def test_student_refuses_what_it_cannot_map(moe_pair):
    base_dir, aligned_dir = moe_pair
    base, aligned = open_source(base_dir, "--base"), open_source(aligned_dir, "--aligned")
    factors = exact_factors(base, aligned)
    name = next(n for n in factors if "ffn_up_exps" in n)
    f = factors[name]
    # a tensor no module or parameter of the model carries
    bogus = {"blk.9.ffn_gate_exps.weight": f}
    with pytest.raises(ConversionError, match="no module or parameter .* carries 'blk.9.ffn_gate_exps.weight'"):
        D.Student(load(base_dir), base, bogus, "cpu")
    # 3-D factors in the wrong orientation: (E, in, r) x (E, r, out) instead of (E, out, r) x (E, r, in)
    e, out, n_in = f.left.shape[0], f.left.shape[1], f.right.shape[2]
    assert out != n_in
    swapped = {name: Factors(np.zeros((e, n_in, 2), np.float32), np.zeros((e, 2, out), np.float32), 2, 1.0, 1.0, "x")}
    with pytest.raises(ConversionError, match="does not match the layout"):
        D.Student(load(base_dir), base, swapped, "cpu")


def test_student_refuses_factors_the_forward_never_uses(moe_pair):
    base_dir, _ = moe_pair
    base = open_source(base_dir, "--base")
    model = load(base_dir)
    e, h = 4, COMMON["hidden_size"]
    ff = getattr(model.config, "moe_intermediate_size", None) or model.config.intermediate_size
    f = Factors(np.zeros((e, ff, 2), np.float32), np.zeros((e, 2, h), np.float32), 2, 1.0, 1.0, "full")
    student = D.Student(model, base, {"blk.0.ffn_gate_exps.weight": f}, "cpu")
    # a forward that never reaches the experts (here: nothing but the embeddings) leaves them untrained
    model.get_input_embeddings()(torch.tensor([[3, 4]])).sum().backward()
    with pytest.raises(ConversionError, match="never used 'blk.0.ffn_gate_exps.weight'"):
        D._check_reached(student)


def test_chunked_loss_and_checkpointing_match_whole_logits(monkeypatch):
    """Teacher top-k, the held-out KL and the training loss and gradients are the same with logits in
    small chunks and checkpointed layers as with [batch, seq, vocab] logits at once."""
    cfg = transformers.LlamaConfig(**COMMON)
    teacher = tiny(cfg, 1)
    rng = np.random.default_rng(0)
    seqs = [[1] + rng.integers(3, 320, n).tolist() for n in (20, 9, 14)]
    s = D.DistillSettings(batch=3, top_k=8)
    targets = D.teacher_targets(teacher, seqs, s, False)
    # the old computation: whole logits, top-k per position
    ids, mask = D._pad(seqs, "cpu")
    with torch.no_grad():
        logp = torch.log_softmax(teacher(input_ids=ids, attention_mask=mask).logits[:, :-1].float(), -1)
    vals, idx = torch.topk(logp, 8, dim=-1)
    for i, (v, j) in enumerate(targets):
        n = len(seqs[i]) - 1
        torch.testing.assert_close(v, vals[i, :n], atol=1e-5, rtol=1e-5)
        assert torch.equal(j, idx[i, :n].int())

    def loss_and_grads(chunk_bytes: int, ckpt: bool):
        monkeypatch.setattr(D, "CHUNK_BYTES", chunk_bytes)
        model = tiny(cfg, 2)
        lm = D.LM(model, "cpu")
        assert lm.split
        if ckpt:
            assert D.checkpoint_layers(model) == COMMON["num_hidden_layers"]
        params = [p for n, p in model.named_parameters() if n.endswith(("q_proj.weight", "down_proj.weight"))]
        for p in model.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        ids, mask, v, j = D._collate(targets, seqs, "cpu")
        loss = D._kl_sum(lm, lm.rows(ids, mask, D._where(mask)), v, j, grad=True) / v.shape[0]
        loss.backward()
        return float(loss.detach()), [p.grad.clone() for p in params], lm.chunk

    whole, g_whole, big = loss_and_grads(1 << 30, False)
    small, g_small, tiny_chunk = loss_and_grads(1, True)  # 16-position chunks: several per batch
    assert tiny_chunk == 16 < big
    # the reference: the old loss on whole logits
    model = tiny(cfg, 2)
    ids, mask, _, _ = D._collate(targets, seqs, "cpu")
    width = ids.shape[1] - 1
    tv, ti, pm = torch.zeros(3, width, 8), torch.zeros(3, width, 8, dtype=torch.int32), torch.zeros(3, width)
    for i, (v, j) in enumerate(targets):
        tv[i, : len(v)], ti[i, : len(v)], pm[i, : len(v)] = v, j, 1
    with torch.no_grad():
        ref = float(D.kl_loss(model(input_ids=ids, attention_mask=mask).logits[:, :-1], tv, ti, pm))
    assert whole == pytest.approx(ref, rel=1e-5) and small == pytest.approx(ref, rel=1e-5)
    for a, b in zip(g_whole, g_small):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
