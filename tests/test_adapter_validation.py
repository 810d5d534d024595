"""Issue 20 / audit findings 4, 18, 25: every adapter GGUF is fully validated before llama.cpp sees it.

A case table of bad adapters, each built with gguf-py's GGUFWriter on a tiny synthetic base: each gives one
AdapterError naming the file and the tensor or key (and `avgguf inspect` one error line, exit 2), and none
reaches llama.cpp, which is shown in a real llama.cpp process that tries every case and then still decodes
with every factor type the whitelist accepts."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import GGUFValueType as V

from avgguf.gguf import adapter_format as fmt
from avgguf.cli import main
from avgguf.testing.synthetic import Spec, make_pair, to_gguf_tensors, write_gguf
from avgguf.errors import AdapterError

RNG = np.random.default_rng(0)
# byte offsets of the f16 scale fields in one block, from ggml's block_* structs (ggml-common.h)
SCALE_OFFSETS = {
    Q.Q4_0: (0,),
    Q.Q4_1: (0, 2),
    Q.Q5_0: (0,),
    Q.Q5_1: (0, 2),
    Q.Q8_0: (0,),
    Q.Q2_K: (80, 82),
    Q.Q3_K: (108,),
    Q.Q4_K: (0, 2),
    Q.Q5_K: (0, 2),
    Q.Q6_K: (208,),
}
ATTN_Q = "blk.0.attn_q.weight"  # (64, 64) in the tiny llama base: lora_a (r, 64), lora_b (64, r)
EXPS = "blk.0.ffn_gate_exps.weight"  # (2, 96, 64) in base3d: lora_a (2, r, 64), lora_b (2, 96, r)


@dataclass
class Raw:
    """A tensor stored as `qtype` from raw bytes; `shape` is the element shape (numpy order)."""

    qtype: Q
    shape: tuple[int, ...]
    data: np.ndarray  # uint8


def quant(x: np.ndarray, qtype: Q) -> Raw:
    return Raw(qtype, x.shape, gguf.quants.quantize(x.astype(np.float32), qtype))


def k_quant(shape: tuple[int, int], qtype: Q) -> Raw:
    """Random K-quant blocks (gguf-py cannot quantize to K-quants) with small finite scales."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = RNG.integers(0, 256, (shape[0] * shape[1] // block, size), dtype=np.uint8)
    for offset in SCALE_OFFSETS[qtype]:
        blocks[:, offset : offset + 2] = np.full((len(blocks), 1), 1e-3, np.float16).view(np.uint8)
    return Raw(qtype, shape, blocks.reshape(shape[0], -1))


def pair(r: int = 4, a_dtype=np.float32, b_dtype=np.float32, name: str = ATTN_Q, cols: int = 64, rows: int = 64):
    return {
        name + ".lora_a": (0.01 * RNG.standard_normal((r, cols))).astype(a_dtype),
        name + ".lora_b": (0.01 * RNG.standard_normal((rows, r))).astype(b_dtype),
    }


def write_adapter(path: Path, tensors: dict, *, arch: str = "llama", kv: dict | None = None) -> Path:
    """An adapter as a GGUF: the standard keys (overridden or dropped, value None, by `kv`: key -> (value,
    GGUFValueType)), then `tensors` (numpy arrays in their own type, or Raw)."""
    w = gguf.GGUFWriter(None, arch)
    keys = {
        "general.type": ("adapter", V.STRING),
        "adapter.type": ("lora", V.STRING),
        "adapter.lora.alpha": (0.0, V.FLOAT32),
        **(kv or {}),
    }
    if "general.architecture" in keys:
        w.kv_data[0].pop("general.architecture")
    for key, spec in keys.items():
        if spec is not None:
            w.add_key_value(key, spec[0], spec[1])
    for name, t in tensors.items():
        if isinstance(t, Raw):
            w.add_tensor_info(name, t.shape, np.dtype(np.float32), t.data.nbytes, raw_dtype=t.qtype)
        else:
            w.add_tensor_info(name, t.shape, t.dtype, t.nbytes)
    w.write_header_to_file(path)
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for t in tensors.values():
        w.write_tensor_data(t.data if isinstance(t, Raw) else t)
    w.close()
    return path


def with_value(tensors: dict, name: str, index, value) -> dict:
    t = tensors[name].copy()
    t[index] = value
    return {**tensors, name: t}


def with_scale(raw: Raw, offset: int, value: float) -> Raw:
    """A quantized tensor with the f16 field at `offset` of its first block set to `value`."""
    size = gguf.GGML_QUANT_SIZES[raw.qtype][1]
    blocks = raw.data.reshape(-1, size).copy()
    blocks[0, offset : offset + 2] = np.array([value], np.float16).view(np.uint8)
    return Raw(raw.qtype, raw.shape, blocks.reshape(raw.data.shape))


def quant_pair(qtype: Q, r: int = 32) -> dict:
    p = pair(r)
    return {k: quant(v, qtype) for k, v in p.items()}


def truncated(path: Path) -> Path:
    write_adapter(path, pair())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


A, B = ATTN_Q + ".lora_a", ATTN_Q + ".lora_b"
EA, EB = "token_embd.weight.lora_a", "token_embd.weight.lora_b"  # token_embd: lora_a (300, r), lora_b (64, r)


def zeros(*shape: int) -> np.ndarray:
    return np.zeros(shape, np.float32)


def adapter(tensors, **kw):
    """A case maker: the adapter of `tensors()` (built when the case runs) with write_adapter's options."""
    return lambda p: write_adapter(p, tensors(), **kw)


def with_keys(**kv):
    return adapter(pair, kv={key.replace("__", "."): value for key, value in kv.items()})


# (case id, how the file is made (tmp path -> path), words the one error must contain,
#  whether the adapter alone is bad (inspect refuses it) or only against this base)
CASES = [
    # integer and f64 factors: no CPU kernel multiplies them (llama.cpp segfaults at the first decode)
    ("i8-factor", adapter(lambda: pair(a_dtype=np.int8)), [A, "I8"], True),
    ("i16-factor", adapter(lambda: pair(b_dtype=np.int16)), [B, "I16"], True),
    ("i32-factor", adapter(lambda: pair(a_dtype=np.int32)), [A, "I32"], True),
    ("i64-factor", adapter(lambda: pair(b_dtype=np.int64)), [B, "I64"], True),
    ("f64-factor", adapter(lambda: pair(a_dtype=np.float64, b_dtype=np.float64)), [A, "F64"], True),
    # Q8_1 is an activation format: there is no matmul with it as the weight
    ("q8_1-factor", adapter(lambda: {A: Raw(Q.Q8_1, (32, 64), np.zeros((32, 80), np.uint8)), B: pair(32)[B]}), [A, "Q8_1"], True),
    # a K-quant whose rows (64) are no multiple of its 256-value block (gguf-py refuses it already)
    (
        "q4_k-row-64",
        adapter(lambda: {A: Raw(Q.Q4_K, (1, 64), np.zeros((1, 36), np.uint8)), B: pair(1)[B]}),
        ["Q4_K", "256"],
        True,
    ),
    # non-finite factor values, float types (the row is named)
    ("nan-f32", adapter(lambda: with_value(pair(), A, (2, 7), np.nan)), [A, "NaN", "row 2"], True),
    ("+inf-f32", adapter(lambda: with_value(pair(), B, (9, 1), np.inf)), [B, "+Inf", "row 9"], True),
    ("-inf-f32", adapter(lambda: with_value(pair(), A, (0, 0), -np.inf)), [A, "-Inf", "row 0"], True),
    (
        "nan-f16",
        adapter(lambda: with_value(pair(a_dtype=np.float16, b_dtype=np.float16), B, (63, 3), np.nan)),
        [B, "NaN", "row 63"],
        True,
    ),
    ("-inf-f16", adapter(lambda: with_value(pair(b_dtype=np.float16), B, (5, 0), -np.inf)), [B, "-Inf"], True),
    # bf16: a NaN in the top half of an f32
    (
        "nan-bf16",
        adapter(lambda: {**pair(), A: quant(with_value(pair(), A, (1, 1), np.nan)[A], Q.BF16)}),
        [A, "NaN", "row 1"],
        True,
    ),
    # quantized factors: a NaN block scale (d), an Inf minimum (m) of a *_1 type, a NaN K-quant scale
    (
        "nan-q8_0-scale",
        adapter(lambda: {**quant_pair(Q.Q8_0), A: with_scale(quant_pair(Q.Q8_0)[A], 0, np.nan)}),
        [A, "NaN"],
        True,
    ),
    ("inf-q4_1-min", adapter(lambda: {**quant_pair(Q.Q4_1), B: with_scale(quant_pair(Q.Q4_1)[B], 2, np.inf)}), [B, "+Inf"], True),
    (
        "nan-q6_k-scale",
        adapter(lambda: {EA: with_scale(k_quant((300, 256), Q.Q6_K), 208, np.nan), EB: k_quant((64, 256), Q.Q6_K)}),
        [EA, "NaN"],
        True,
    ),
    # a NaN in a token_embd pair (get_rows, not a matmul: garbage logits all the same)
    (
        "nan-token-embd",
        adapter(lambda: with_value({EA: zeros(300, 4), EB: zeros(64, 4)}, EB, (3, 3), np.nan)),
        [EB, "NaN", "row 3"],
        True,
    ),
    # alpha: wrong GGUF type (llama.cpp asserts), NaN, missing
    ("alpha-uint32", with_keys(adapter__lora__alpha=(8, V.UINT32)), ["adapter.lora.alpha", "UINT32", "FLOAT32"], True),
    ("alpha-nan", with_keys(adapter__lora__alpha=(float("nan"), V.FLOAT32)), ["adapter.lora.alpha", "finite"], True),
    ("alpha-missing", with_keys(adapter__lora__alpha=None), ["adapter.lora.alpha"], True),
    # general.type: a model, not an adapter; or not a string
    ("general-type-model", with_keys(general__type=("model", V.STRING)), ["general.type", "'model'"], True),
    ("general-type-int", with_keys(general__type=(1, V.INT32)), ["general.type", "INT32"], True),
    # adapter.type: another kind of adapter, or missing
    ("adapter-type-ia3", with_keys(adapter__type=("ia3", V.STRING)), ["adapter.type", "ia3"], True),
    ("adapter-type-missing", with_keys(adapter__type=None), ["adapter.type"], True),
    # general.architecture not a string (llama.cpp asserts)
    ("arch-uint32", with_keys(general__architecture=(7, V.UINT32)), ["general.architecture", "UINT32"], True),
    # half a pair, either half
    ("only-lora-a", adapter(lambda: {A: pair()[A]}), [B, "missing"], True),
    ("only-lora-b", adapter(lambda: {B: pair()[B]}), [A, "missing"], True),
    # lora_a says rank 4, lora_b rank 3
    ("rank-mismatch", adapter(lambda: {A: zeros(4, 64), B: zeros(64, 3)}), [ATTN_Q, "rank"], True),
    # token_embd's flipped layout with different ranks (llama.cpp: GGML_ASSERT at the first decode)
    ("token-embd-rank-mismatch", adapter(lambda: {EA: zeros(300, 4), EB: zeros(64, 3)}), ["token_embd.weight", "rank"], True),
    # 3-D and 1-D factors
    ("3d-factor", adapter(lambda: {A: zeros(2, 4, 64), B: zeros(64, 4)}), [ATTN_Q, "2-D"], True),
    ("1d-factor", adapter(lambda: {A: zeros(64), B: zeros(64, 1)}), [ATTN_Q, "2-D"], True),
    # a tensor that is neither half of a pair
    ("unknown-suffix", adapter(lambda: {**pair(), ATTN_Q + ".lora_c": zeros(4, 64)}), [ATTN_Q + ".lora_c"], True),
    # truncated file, not a GGUF at all, an empty file
    ("truncated", truncated, ["not a readable GGUF"], True),
    ("not-gguf", lambda p: (p.write_text("base: x.gguf\n"), p)[1], ["not a readable GGUF"], True),
    ("empty-file", lambda p: (p.write_bytes(b""), p)[1], ["not a readable GGUF"], True),
    # --- fine as a file, wrong for this base ---
    # a 2-D pair on a MoE expert stack (its pairs are 3-D, one per expert), and 3-D halves of two expert counts
    ("2d-pair-on-experts", adapter(lambda: pair(name=EXPS, cols=64, rows=96)), [EXPS, "3-D per-expert"], True),
    (
        "expert-count-mismatch",
        adapter(lambda: {EXPS + ".lora_a": zeros(2, 4, 64), EXPS + ".lora_b": zeros(3, 96, 4)}),
        [EXPS, "expert count"],
        True,
    ),
    # a pair on a 1-D base tensor (a norm): llama.cpp applies pairs to matmul weights and expert stacks only
    (
        "pair-on-1d-base",
        adapter(lambda: pair(name="output_norm.weight", cols=1, rows=64)),
        ["output_norm.weight", "1-D", "2-D matmul weights and 3-D MoE expert stacks only"],
        False,
    ),
    # per-expert pairs for 3 experts on a base stack of 2 (base3d has one)
    (
        "pair-on-3d-base",
        adapter(lambda: {EXPS + ".lora_a": zeros(3, 4, 64), EXPS + ".lora_b": zeros(3, 96, 4)}),
        [EXPS, "expected (2, 4, 64) / (2, 96, 4)"],
        False,
    ),
    # an adapter for another architecture
    ("wrong-arch", adapter(pair, arch="qwen2"), ["'qwen2'", "'llama'"], False),
    # a pair on a tensor the base does not have
    ("tensor-not-in-base", adapter(lambda: pair(name="blk.9.attn_q.weight")), ["blk.9.attn_q.weight", "does not exist"], False),
    # shapes of another model (n_embd 32)
    ("shape-mismatch", adapter(lambda: pair(cols=32, rows=32)), [ATTN_Q, "expected (4, 64) / (64, 4)"], False),
]

assert len(CASES) >= 30 and len({c[0] for c in CASES}) == len(CASES)  # the issue asks for 30 cases per surface

# Every factor type the whitelist accepts, on a tensor whose rows fit the type: these load and decode in llama.cpp.
GOOD = {
    "f32": adapter(pair),
    "f16": adapter(lambda: pair(a_dtype=np.float16, b_dtype=np.float16)),
    "bf16": adapter(lambda: {k: quant(v, Q.BF16) for k, v in pair().items()}),
    **{q.name.lower(): adapter(lambda q=q: quant_pair(q)) for q in (Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0)},
    # K-quants on token_embd, the only tensor with rows of 256 here (rank 256: lora_a (300, 256), lora_b (64, 256))
    **{
        q.name.lower(): adapter(lambda q=q: {EA: k_quant((300, 256), q), EB: k_quant((64, 256), q)})
        for q in (Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K)
    },
}


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """The tiny llama base, and the same with one 3-D (expert) tensor added (gguf-py reads it; llama.cpp would not)."""
    root = tmp_path_factory.mktemp("validation")
    p = make_pair(root / "llama", Spec("llama"))
    tensors = to_gguf_tensors(p.spec, p.weights)
    base3d = write_gguf(root / "base3d.gguf", p.spec, {**tensors, "blk.0.ffn_gate_exps.weight": zeros(2, 96, 64)})
    return p.base_gguf, base3d


FIXES = ("re-create", "Re-create", "Re-convert", "avgguf convert", "convert it against")  # each error says the fix


def _check(path: Path, base: Path) -> None:
    fmt.check_against_base(fmt.read_adapter(path), fmt.read_base_model(base))


@pytest.mark.parametrize("case,make,words,alone", CASES, ids=[c[0] for c in CASES])
def test_bad_adapter_is_one_clear_error(bases, tmp_path, capsys, case, make, words, alone):
    base, base3d = bases
    path = make(tmp_path / f"{case}.gguf")
    with pytest.raises(AdapterError) as err:
        _check(path, base3d if case == "pair-on-3d-base" else base)
    message = str(err.value)
    assert str(path) in message, message
    for word in words:
        assert word in message, message
    assert any(fix in message for fix in FIXES), message
    assert "\n" not in message
    code = main(["inspect", str(path)])
    out, errtext = capsys.readouterr()
    if alone:  # the file itself is bad: inspect says so in one line
        assert code == 2 and "Traceback" not in errtext, errtext
        assert len([ln for ln in errtext.splitlines() if ln.startswith("avgguf inspect: error:")]) == 1, errtext
    else:
        assert code == 0, errtext


@pytest.mark.parametrize("qtype", sorted(SCALE_OFFSETS, key=int), ids=lambda q: q.name)
def test_scale_offsets_match_gguf_py_dequantize(qtype):
    """The value check reads each block's f16 scales; a NaN there must be a NaN in gguf-py's own dequantization,
    and finite scales give finite values."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = k_quant((2, 256), qtype).data if block == 256 else quant(RNG.standard_normal((2, 256)), qtype).data
    assert np.isfinite(gguf.quants.dequantize(raw, qtype)).all()
    assert fmt._first_non_finite(raw, qtype) is None
    for offset in SCALE_OFFSETS[qtype]:
        bad = raw.reshape(-1, size).copy()
        bad[1, offset : offset + 2] = np.array([np.nan], np.float16).view(np.uint8)
        bad = bad.reshape(raw.shape)
        assert not np.isfinite(gguf.quants.dequantize(bad, qtype)).all()
        assert fmt._first_non_finite(bad, qtype) == (0 if raw.shape[1] // size > 1 else 1, "NaN")


def test_values_are_checked_in_chunks(bases, tmp_path, monkeypatch):
    """A NaN in the last chunk of a factor is found while the check never holds more than a chunk."""
    base, _ = bases
    monkeypatch.setattr(fmt, "CHECK_CHUNK_BYTES", 256)  # one row of 64 f32 values per chunk
    path = write_adapter(tmp_path / "late-nan.gguf", with_value(pair(), ATTN_Q + ".lora_b", (63, 0), np.nan))
    with pytest.raises(AdapterError, match="row 63"):
        _check(path, base)


SURVIVE = r"""
import json, sys
import numpy as np
from avgguf.runtime.engine import Engine
from avgguf.errors import AdapterError
base, bad, good = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
eng = Engine(base, n_ctx=64, logits_all=True, fuse="off")
out = {"refused": {}, "finite": {}}
for name, path in bad.items():
    try:
        eng.load_adapter(name, path)
        out["refused"][name] = False
    except AdapterError:
        out["refused"][name] = True
for name, path in good.items():
    eng.load_adapter(name, path)
    eng.set_coefficients({name: 1.0})
    out["finite"][name] = bool(np.isfinite(eng.all_logits([1, 270, 280, 290])).all())
eng.set_coefficients({})
eng.close()
print(json.dumps(out))
"""


def test_real_llama_cpp_survives_every_case_and_multiplies_every_whitelisted_type(bases, tmp_path):
    """One real llama.cpp process: every bad case is refused before llama.cpp sees it (the process lives on),
    then every whitelisted factor type loads and decodes to finite logits on the CPU backend."""
    base, _ = bases
    bad = {case: str(make(tmp_path / f"{case}.gguf")) for case, make, _, _ in CASES if case != "pair-on-3d-base"}
    good = {name: str(make(tmp_path / f"good-{name}.gguf")) for name, make in GOOD.items()}
    r = subprocess.run(
        [sys.executable, "-c", SURVIVE, str(base), json.dumps(bad), json.dumps(good)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert r.returncode == 0, (r.returncode, r.stderr[-3000:])
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["refused"] == {case: True for case in bad}
    assert out["finite"] == {name: True for name in good}


def test_inspect_escapes_terminal_control_characters(bases, tmp_path, capsys):
    """finding 25: metadata and tensor names are printed with control characters escaped (no OSC 52 / title)."""
    evil = "\x1b]52;c;ZWNobyBwd25lZA==\x07\x1b]0;owned\x07\u202e"
    path = write_adapter(
        tmp_path / "evil.gguf", pair(), kv={"avgguf.av.domain": (evil, V.STRING), "general.name": ("x\x1b[2J", V.STRING)}
    )
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert not any(ch in out for ch in "\x1b\x07\u202e"), repr(out)
    assert "\\x1b]52;c;" in out and "\\u202e" in out and "x\\x1b[2J" in out
    assert main(["inspect", str(path), "--json"]) == 0
    text = capsys.readouterr().out
    assert "\x1b" not in text and json.loads(text)["metadata"]["avgguf.av.domain"] == evil
