"""`avgguf eval`: the level judge checked against a direct log-probability computation, and the CLI end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest

from avgguf.cli import main
from avgguf.runtime.engine import Engine
from avgguf.eval.judge import LEVELS, Judge, parse_lambdas
from avgguf.errors import AvggufError

ROWS = [
    {
        "domain": "medical",
        "query": q,
        "responses": {
            "avoidance": "I can't help with that.",
            "generic": "It depends on many things.",
            "expert": "Take 200 mg and check ferritin.",
        },
    }
    for q in ("What about a cough?", "Is my rash bad?", "Fever again?")
]


def direct_score(eng: Engine, prompt: list[int], response: list[int]) -> float:
    """Mean log p(response | prompt) from one full evaluation of prompt + response."""
    logits = eng.all_logits(prompt + response).astype(np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True)) - logits.max(1, keepdims=True)
    n = len(prompt)
    return float(np.mean([logp[n - 1 + j, t] for j, t in enumerate(response)]))


def test_judge_matches_direct_log_probabilities(tiny_kit):
    root, p, _ = tiny_kit
    eng = Engine(p.base_gguf, n_ctx=256, logits_all=True, type_k=0, type_v=0)
    eng.load_adapter("medical", root / "medical.gguf")
    try:
        for lam in (0.0, 1.0):
            eng.set_coefficients({"medical": lam})
            judge = Judge(eng)
            for row in ROWS:
                got = judge.scores(row)
                prompt = judge.tokens(eng.format_chat([{"role": "user", "content": row["query"]}]))
                want = [direct_score(eng, prompt, judge.tokens(row["responses"][lvl]) + [eng.eos]) for lvl in LEVELS]
                np.testing.assert_allclose(got, want, atol=1e-4)
    finally:
        eng.close()


def test_eval_cli_end_to_end(tiny_kit, tmp_path, capsys):
    root, *_ = tiny_kit
    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    plot = tmp_path / "sweep.png"
    assert (
        main(
            [
                "eval",
                str(root / "tiny.yaml"),
                "--data",
                str(data),
                "--lambdas=-1:1:1",
                "--cross",
                "--prompting",
                "--plot",
                str(plot),
                "--json",
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    sweep = out["sweeps"][0]
    assert sweep["av"] == "medical" and sweep["lambdas"] == [-1.0, 0.0, 1.0]
    for shares in sweep["shares"]:
        assert sum(shares[lvl] for lvl in LEVELS) == pytest.approx(1.0) and shares["n"] == 3
    assert [c["setting"] for c in out["cross"]] == ["base", "medical=1", "legal=1", "profile expert-medical", "profile mixed"]
    assert {"base", "prompting", "av"} <= set(out["prompting"][0])
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_bad_input(tiny_kit, tmp_path, capsys):
    root, *_ = tiny_kit
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "x"}\n')
    assert main(["eval", str(root / "tiny.yaml"), "--data", str(bad)]) == 2
    assert "bad.jsonl:1: expected a JSON object" in capsys.readouterr().err
    with pytest.raises(AvggufError, match="START:STOP:STEP"):
        parse_lambdas("1:x")
    assert parse_lambdas("-1:1.5:0.25")[-1] == 1.5 and len(parse_lambdas("-1:1.5:0.25")) == 11
