"""converters.streaming (row-chunked factorisation) against converters.lowrank.factorize."""

from __future__ import annotations

import numpy as np
import pytest

from converters.lowrank import RankPolicy, factorize
from converters.streaming import streamed_factorize, streamed_factorize_experts, streamed_method


def _delta(rows: int, cols: int, rank: int, noise: float, seed: int) -> np.ndarray:
    """Low rank (decaying spectrum) plus dense noise: a DPO-like delta, flat tail included."""
    g = np.random.default_rng(seed)
    u = g.standard_normal((rows, rank))
    v = g.standard_normal((rank, cols))
    scale = np.linspace(3.0, 1.0, rank)[:, None]
    return ((u @ (scale * v)) / np.sqrt(cols) + noise * g.standard_normal((rows, cols))).astype(np.float32)


def _reader(m: np.ndarray, calls: list | None = None):
    def load_rows(start: int, stop: int) -> np.ndarray:
        if calls is not None:
            calls.append(stop - start)
        return m[start:stop].copy()

    return load_rows


CASES = [
    # (rows, cols, policy, expected method): tall with a small side (gram), tall and wide (randomized)
    (3000, 256, RankPolicy(rank=16), "gram"),
    (3000, 256, RankPolicy(energy=0.6, max_rank=64), "gram"),
    (4000, 2304, RankPolicy(rank=16), "randomized"),
    (1200, 2600, RankPolicy(rank=16), "randomized"),
    (4000, 2304, RankPolicy(energy=0.3, max_rank=32), "randomized"),
]


@pytest.mark.parametrize("rows,cols,policy,method", CASES)
@pytest.mark.parametrize("noise", [0.02, 0.2])
def test_matches_lowrank(rows, cols, policy, method, noise):
    m = _delta(rows, cols, 24, noise, seed=rows + cols)
    calls: list[int] = []
    got = streamed_factorize(_reader(m, calls), (rows, cols), policy, chunk_rows=700)
    ref = factorize(m, policy)
    assert got.method == method == streamed_method((rows, cols), policy)
    assert max(calls) <= 700  # never more than one chunk at a time
    assert got.left.shape == (rows, got.rank) and got.right.shape == (got.rank, cols)
    assert got.left.dtype == np.float32 and got.right.dtype == np.float32
    assert got.energy == pytest.approx(ref.energy, rel=1e-6)
    assert got.rank == ref.rank
    assert abs(got.kept - ref.kept) <= 1e-3 * ref.kept  # kept energy within 0.1 %
    # reconstruction: the error of the factors is the energy they leave out
    err = float(np.sum((m.astype(np.float64) - got.left @ got.right) ** 2)) / got.energy
    ref_err = float(np.sum((m.astype(np.float64) - ref.left @ ref.right) ** 2)) / ref.energy
    assert err == pytest.approx(1.0 - got.kept, abs=2e-4)
    assert err <= ref_err + 1e-3
    assert got.spectrum is not None and got.spectrum.shape == ref.spectrum.shape
    np.testing.assert_allclose(got.spectrum[: got.rank], ref.spectrum[: got.rank], rtol=2e-3)


def test_chunk_size_does_not_matter():
    m = _delta(2000, 300, 12, 0.05, seed=1)
    a = streamed_factorize(_reader(m), m.shape, RankPolicy(rank=8), chunk_rows=2000)
    b = streamed_factorize(_reader(m), m.shape, RankPolicy(rank=8), chunk_rows=37)
    np.testing.assert_allclose(a.left @ a.right, b.left @ b.right, atol=1e-5)


def test_small_tensor_falls_back_to_full():
    m = _delta(100, 60, 8, 0.05, seed=2)
    policy = RankPolicy(rank=16)  # sketch 48 columns: not worth a randomized pass on 60
    got = streamed_factorize(_reader(m), m.shape, RankPolicy(rank=16, svd="full"), chunk_rows=30)
    ref = factorize(m, RankPolicy(rank=16, svd="full"))
    assert got.method == "full"
    np.testing.assert_allclose(got.left @ got.right, ref.left @ ref.right, atol=1e-5)
    assert streamed_method(m.shape, policy) == "gram"


def test_zero_delta():
    m = np.zeros((500, 100), dtype=np.float32)
    got = streamed_factorize(_reader(m), m.shape, RankPolicy(rank=4), chunk_rows=64)
    assert got.energy == 0.0 and got.kept == 1.0
    assert np.all(got.left @ got.right == 0)


@pytest.mark.parametrize("policy", [RankPolicy(rank=8), RankPolicy(energy=0.5, max_rank=32)])
def test_experts_match_lowrank(policy):
    stack = np.stack([_delta(96, 160, 10, 0.05, seed=e) for e in range(6)])
    got = streamed_factorize_experts(lambda a, b: stack[a:b].copy(), stack.shape, policy, experts_per_chunk=4)
    ref = factorize(stack, policy)
    assert got.rank == ref.rank and got.method == ref.method
    assert got.left.shape == ref.left.shape and got.right.shape == ref.right.shape
    assert got.kept == pytest.approx(ref.kept, rel=1e-5)
    np.testing.assert_allclose(got.left @ got.right, ref.left @ ref.right, atol=1e-4)


# --- converters.convert streams the big tensors of a real pair (issue #22: an 8B model's embedding) ---


def _adapter_deltas(path) -> dict[str, np.ndarray]:
    import gguf

    from avgguf.gguf import adapter_format as fmt

    tensors = {t.name: fmt.tensor_floats(t) for t in gguf.GGUFReader(path).tensors}
    return {n: fmt.delta_from_pair(n, tensors[n + fmt.LORA_A], tensors[n + fmt.LORA_B]) for n in fmt.read_adapter(path).pairs}


def _no_whole_load(source, streamed: set):
    """source.load refuses the tensors that must only be read in row chunks."""
    whole = source.load

    def load(name):
        assert name not in streamed, f"{name} was loaded whole"
        return whole(name)

    source.load = load
    return source


@pytest.mark.parametrize("route", ["hf", "mixed"])
@pytest.mark.parametrize("budget", [None, 60_000])
def test_convert_streams_big_tensors_and_writes_the_same_adapter(llama_pair, tmp_path, monkeypatch, route, budget):
    from converters import deltas
    from converters.convert import convert_pair
    from converters.sources import open_source

    def run(out, stream):
        base = open_source(llama_pair.base_hf if route == "hf" else llama_pair.base_gguf, "--base")
        aligned = open_source(llama_pair.aligned_hf, "--aligned")
        shapes = {n: base.shape(n) for n in base.names()}
        streamed = {n for n, s in shapes.items() if len(s) == 2 and np.prod(s) > 4000 and ".attn_q." not in n}
        if stream:
            monkeypatch.setattr(deltas, "STREAM_ELEMENTS", 4000)  # the q/k projections (64 x 64) stay whole
            monkeypatch.setattr(deltas, "CHUNK_ELEMENTS", 1000)  # several chunks per tensor
            base, aligned = _no_whole_load(base, streamed), _no_whole_load(aligned, streamed)
        report = convert_pair(base, aligned, out, name="s", policy=RankPolicy(rank=64), max_size=budget)
        monkeypatch.undo()
        return report, streamed

    whole, _ = run(tmp_path / "whole.gguf", False)
    chunked, streamed = run(tmp_path / "streamed.gguf", True)
    assert {"token_embd.weight", "output.weight"} <= streamed and any("ffn_up" in n for n in streamed)
    a, b = _adapter_deltas(tmp_path / "whole.gguf"), _adapter_deltas(tmp_path / "streamed.gguf")
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_allclose(b[name], a[name], atol=2e-3 * np.abs(a[name]).max(), err_msg=name)
    errors = {r.name: r.rel_error for r in whole.records}
    for r in chunked.records:
        assert r.rel_error == pytest.approx(errors[r.name], rel=0.05, abs=1e-4), r.name
    assert chunked.zero_tensors == whole.zero_tensors and [s.name for s in chunked.skipped] == [s.name for s in whole.skipped]
