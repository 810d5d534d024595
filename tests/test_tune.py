"""Issue #14: `avgguf tune` reaches the grid's best target shares with fewer evaluations (real llama.cpp on a
tiny synthetic model, the grid computed here as the known optimum), saves a profile that reloads, and fails
clearly on bad targets."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import yaml

from avgguf.eval.tune import Search


def test_search_finds_a_known_optimum_with_few_evaluations():
    """A smooth objective with its maximum at (0.5, -1.25, 1.7): coordinate search vs the 0.05 grid's 81^3."""
    opt = np.array([0.5, -1.25, 1.7])
    search = Search(["a", "b", "c"], lambda c: -float(np.sum((np.array(list(c.values())) - opt) ** 2)), budget=200)
    best, value = search.run([(0.0, 0.0, 0.0)])
    assert np.abs(np.array(best) - opt).max() <= 0.1 and len(search.seen) < 200
    assert value > -0.02


def eval_rows(tiny_kit, tmp_path):
    """Held-out rows for the tiny model: each level's response is a fixed token pattern."""
    rows = []
    for domain in ("medical", "legal"):
        for i in range(4):
            rows.append(
                {
                    "domain": domain,
                    "query": f"q{i} {domain}",
                    "responses": {"avoidance": f"no {'a' * (i + 1)}", "generic": f"maybe b{i}", "expert": f"yes c{i} d{i}"},
                }
            )
    path = tmp_path / "eval.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tune(*args):
    return subprocess.run(
        [sys.executable, "-m", "avgguf.cli", "tune", *args, "--json"], capture_output=True, text=True, check=False, timeout=600
    )


def test_tune_matches_the_grid_with_fewer_evaluations(tiny_kit, tmp_path):
    root, *_ = tiny_kit
    data = eval_rows(tiny_kit, tmp_path)
    mf = tmp_path / "tune.yaml"
    spec = yaml.safe_load((root / "tiny.yaml").read_text())
    spec["base"] = str(root / "med" / "base.gguf")
    spec["avs"] = {"medical": str(root / "medical.gguf"), "legal": str(root / "legal.gguf")}
    mf.write_text("# keep me\n" + yaml.safe_dump(spec, sort_keys=False))
    target = "medical=expert,legal=avoidance"
    full = tune(str(mf), "--data", str(data), "--target", target, "--grid", "0.5")
    assert full.returncode == 0, full.stderr
    grid = json.loads(full.stdout)
    assert grid["evaluations"] == 9 * 9
    got = tune(str(mf), "--data", str(data), "--target", target, "--budget", "60", "--save-profile", "tuned")
    assert got.returncode == 0, got.stderr
    result = json.loads(got.stdout)
    assert result["evaluations"] < grid["evaluations"]
    for domain, level in (("medical", "expert"), ("legal", "avoidance")):
        assert result["achieved"][domain][level] >= grid["achieved"][domain][level] - 0.05 - 1e-9, (result, grid)
    listed = subprocess.run(
        [sys.executable, "-m", "avgguf.cli", "profiles", str(mf)], capture_output=True, text=True, check=False
    )
    want = " ".join(f"{k}={v:g}" for k, v in result["coefficients"].items())
    assert "tuned" in listed.stdout and want in listed.stdout, listed.stdout
    assert mf.read_text().startswith("# keep me")


@pytest.mark.parametrize(
    "target,words",
    [
        ("cardio=expert", "unknown domain 'cardio'"),
        ("medical=guru", "unknown level 'guru'"),
        ("medical", "expected DOMAIN=LEVEL"),
        ("financial=expert", "has no AV for domain 'financial'"),
    ],
)
def test_bad_targets_are_clear_errors(tiny_kit, tmp_path, target, words):
    root, *_ = tiny_kit
    data = eval_rows(tiny_kit, tmp_path)
    if target.startswith("financial"):
        with data.open("a") as f:
            f.write(
                json.dumps({"domain": "financial", "query": "q", "responses": {"avoidance": "a", "generic": "b", "expert": "c"}})
                + "\n"
            )
    r = tune(str(root / "tiny.yaml"), "--data", str(data), "--target", target)
    assert r.returncode == 2 and words in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_impossible_budget(tiny_kit, tmp_path):
    root, *_ = tiny_kit
    r = tune(str(root / "tiny.yaml"), "--data", str(eval_rows(tiny_kit, tmp_path)), "--target", "medical=expert", "--budget", "2")
    assert r.returncode == 2 and "at least 3 evaluations" in r.stderr


def test_transfer_to_another_fine_tune(tiny_kit, tmp_path):
    from avgguf.testing.synthetic import Spec, make_pair, to_gguf_tensors, write_gguf

    root, p, q = tiny_kit
    other = tmp_path / "other-fine-tune.gguf"
    write_gguf(other, q.spec, to_gguf_tensors(q.spec, q.delta.applied_to(q.weights, 0.5)))
    data = eval_rows(tiny_kit, tmp_path)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "avgguf.cli",
            "eval",
            str(root / "tiny.yaml"),
            "--data",
            str(data),
            "--lambdas",
            "0,1",
            "--transfer",
            str(other),
            "--json",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["transfer"]["model"] == str(other)
    assert [s["lambdas"] for s in out["transfer"]["sweeps"]] == [[0.0, 1.0], [0.0, 1.0]]
    text = subprocess.run(
        [
            sys.executable,
            "-m",
            "avgguf.cli",
            "eval",
            str(root / "tiny.yaml"),
            "--data",
            str(data),
            "--lambdas",
            "0,1",
            "--transfer",
            str(other),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert "expert (other)" in text.stdout
    wider = make_pair(tmp_path / "wide", Spec("llama", n_embd=96, n_head=4, n_head_kv=2))
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "avgguf.cli",
            "eval",
            str(root / "tiny.yaml"),
            "--data",
            str(data),
            "--transfer",
            str(wider.base_gguf),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 2 and "does not fit" in r.stderr and "Traceback" not in r.stderr, r.stderr
