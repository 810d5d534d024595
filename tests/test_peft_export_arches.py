"""The PEFT export's GGUF -> Hugging Face module table per architecture and its vLLM rank rounding (no model
needed; tests/test_architectures.py loads the exported directories in transformers + PEFT)."""

from __future__ import annotations

import pytest

from avgguf.errors import AvggufError
from avgguf.export.peft import VLLM_RANKS, hf_module, vllm_rank


@pytest.mark.parametrize(
    "arch, gguf_name, expert, module",
    [
        ("llama", "blk.3.attn_q.weight", None, "model.layers.3.self_attn.q_proj"),
        ("qwen3", "blk.0.ffn_gate.weight", None, "model.layers.0.mlp.gate_proj"),
        ("gemma3", "blk.1.attn_output.weight", None, "model.layers.1.self_attn.o_proj"),
        ("olmo2", "blk.1.ffn_down.weight", None, "model.layers.1.mlp.down_proj"),
        ("phi3", "blk.0.attn_qkv.weight", None, "model.layers.0.self_attn.qkv_proj"),
        ("phi3", "blk.0.ffn_up.weight", None, "model.layers.0.mlp.gate_up_proj"),  # fused, 2*ff rows
        ("qwen3moe", "blk.1.ffn_gate_inp.weight", None, "model.layers.1.mlp.gate"),
        ("qwen3moe", "blk.1.ffn_up_exps.weight", 3, "model.layers.1.mlp.experts.3.up_proj"),
        ("qwen3moe", "blk.0.ffn_down_exps.weight", 0, "model.layers.0.mlp.experts.0.down_proj"),
        ("llama", "blk.0.ffn_gate_inp.weight", None, "model.layers.0.block_sparse_moe.gate"),  # Mixtral
        ("llama", "blk.0.ffn_gate_exps.weight", 2, "model.layers.0.block_sparse_moe.experts.2.w1"),
        ("llama", "blk.0.ffn_up_exps.weight", 2, "model.layers.0.block_sparse_moe.experts.2.w3"),
        ("llama", "blk.0.ffn_down_exps.weight", 2, "model.layers.0.block_sparse_moe.experts.2.w2"),
        ("qwen2", "output.weight", None, "lm_head"),
        ("granite", "token_embd.weight", None, "model.embed_tokens"),
    ],
)
def test_each_architecture_names_its_modules(arch, gguf_name, expert, module):
    assert hf_module(gguf_name, arch, expert) == module


@pytest.mark.parametrize(
    "arch, gguf_name, expert, words",
    [
        ("phi3", "blk.0.ffn_gate.weight", None, "no Hugging Face module"),
        ("qwen3moe", "blk.0.ffn_gate_exps.weight", None, "no Hugging Face module"),  # a stack needs its expert
        ("qwen3", "blk.0.attn_q.weight", 1, "no Hugging Face module"),
        ("stablelm", "blk.0.attn_q.weight", None, "--format adapter"),  # GGUF-only architecture
    ],
)
def test_a_tensor_without_a_module_is_a_clear_error(arch, gguf_name, expert, words):
    with pytest.raises(AvggufError, match=words.replace("-", r"\-")):
        hf_module(gguf_name, arch, expert)


def test_ranks_round_up_to_what_vllm_accepts():
    assert [vllm_rank(r) for r in (1, 8, 9, 33, 200, 257, 321, 512)] == [8, 8, 16, 64, 256, 320, 512, 512]
    assert vllm_rank(600) == 600  # above vLLM's largest: kept (the export reports it)
    assert set(VLLM_RANKS) == {8, 16, 32, 64, 128, 256, 320, 512}
