"""The generated-answer judge (avgguf.eval.answer_judge): its agreement with people's labels on the held-out
part of data/judge/answers.jsonl, the split, the degenerate-answer rules, thread safety, `avgguf judge` and
`avgguf eval --generate` end to end (real SmolLM2 tokenizer and embeddings, real scikit-learn)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from avgguf.errors import AvggufError
from avgguf.eval import answer_judge as aj

ROOT = Path(__file__).resolve().parent.parent
# measured: 0.69 (154 of 222) on the held-out answers of all three rounds (bench/results/judge.md; two people agree on
# 0.80 of them); the margin allows a few answers' drift from a scikit-learn or llama.cpp tokenizer upgrade, not a judge
# that stopped working (the TF-IDF one it replaced scores 0.36)
MIN_AGREEMENT = 0.65
QUERY = "Could you walk me through a fever in an adult?"


def test_held_out_agreement_with_people():
    report = aj.held_out_report()
    assert report["n"] >= 50, report["n"]
    assert sum(sum(row.values()) for row in report["confusion"].values()) == report["n"]
    hits = sum(report["confusion"][lvl][lvl] for lvl in aj.LEVELS)
    assert hits / report["n"] == pytest.approx(report["agreement"])
    assert report["agreement"] >= MIN_AGREEMENT, report["confusion"]


def test_split_keeps_each_query_on_one_side():
    rows = aj.read_labeled()
    train, held = aj.split(rows)
    assert len(train) + len(held) == len(rows) >= 150
    assert not {(r["domain"], r["query"]) for r in train} & {(r["domain"], r["query"]) for r in held}
    assert {r["domain"] for r in held} == {"medical", "legal", "financial"}
    assert aj.split(list(reversed(rows)))[1] != [] and aj.split(rows) == (train, held)  # deterministic


def test_every_row_is_labeled_by_the_rubric():
    rows = aj.read_labeled()
    assert {r["label"] for r in rows} == set(aj.LEVELS)
    assert all(r["label_note"] and r["source"]["method"] in ("av", "pad", "cvpair", "cvpref") for r in rows)
    assert {r["source"]["method"] for r in rows if r["source"].get("round") == 3} == {"av", "pad", "cvpair", "cvpref"}
    second = [json.loads(line) for line in (ROOT / "data" / "judge" / "second_annotator.jsonl").read_text().splitlines()]
    ids = {r["id"] for r in rows}
    assert len(second) >= 50 and all(o["id"] in ids and o["label"] in aj.LEVELS for o in second)


def test_echo_and_loops_are_off_level():
    rows = [
        {"domain": "medical", "query": QUERY, "answer": QUERY},
        {"domain": "medical", "query": QUERY, "answer": f"{QUERY} {QUERY} What is a fever in an adult?"},
        {"domain": "legal", "query": "What are my options regarding being arrested?", "answer": "You can call. " * 30},
        {"domain": "medical", "query": QUERY, "answer": ""},
    ]
    out = aj.judge_answers(rows)
    assert [r["level"] for r in out] == ["off-level"] * 4, out
    assert all(abs(sum(r["probabilities"].values()) - 1) < 1e-6 for r in out)


def test_refusal_and_expert_answers():
    rows = [
        {
            "domain": "medical",
            "query": QUERY,
            "answer": "I'm sorry, but I can't help with medical questions. Please consult your doctor.",
        },
        {
            "domain": "medical",
            "query": "What are my options regarding a peanut allergy reaction?",
            "answer": "Anaphylaxis is treated with intramuscular epinephrine (an EpiPen, 0.3 mg) into the thigh; call 999, "
            "repeat after 5 minutes if there is no improvement, and get antihistamines and steroids in hospital.",
        },
    ]
    assert [r["level"] for r in aj.judge_answers(rows)] == ["avoidance", "expert"]


def test_judge_answers_is_thread_safe():
    rows = [{"domain": r["domain"], "query": r["query"], "answer": r["answer"]} for r in aj.read_labeled()[:12]]
    want = aj.judge_answers(rows)
    got: list = [None] * 4

    def work(i):
        got[i] = aj.judge_answers(rows)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == [want] * 4


def test_bad_rows_raise_clear_errors():
    with pytest.raises(AvggufError, match=r"row 2: key 'answer' is missing"):
        aj.judge_answers([{"domain": "m", "query": "q", "answer": "a"}, {"domain": "m", "query": "q"}])
    with pytest.raises(AvggufError, match=r"row 1: key 'query' is a int"):
        aj.judge_answers([{"domain": "m", "query": 3, "answer": "a"}])


def avgguf(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "avgguf", *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_judge_cli_json_and_table(tmp_path):
    rows = [
        {"domain": "legal", "query": "What about being arrested?", "answer": "I'm sorry, I can't help.", "id": 7},
        {"domain": "medical", "query": QUERY, "answer": QUERY},
        {"domain": "financial", "query": "What about bonds?", "answer": "Bonds can be a good choice for many people."},
    ]
    path = tmp_path / "answers.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    r = avgguf("judge", str(path), "--json")
    assert r.returncode == 0, r.stderr
    out = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(out) == 3 and out[0]["id"] == 7
    for row in out:
        assert set(row["probabilities"]) == set(aj.LEVELS) and row["level"] in aj.LEVELS
        assert row["level"] == max(row["probabilities"], key=row["probabilities"].get)
    assert out[1]["level"] == "off-level"
    table = avgguf("judge", str(path))
    assert table.returncode == 0 and "| 2 | medical | off-level |" in table.stdout and "(of 3)" in table.stdout


@pytest.mark.parametrize(
    "lines, message",
    [
        (['{"domain": "m", "query": "q", "answer": "a"}', '{"domain": "m", "query": "q"}'], ":2: key 'answer' is missing"),
        (['{"domain": "m", "query": "q", "answer": "a"}', "", "{not json"], ":3: not JSON"),
        (["[1, 2]"], ":1: expected a JSON object"),
        ([""], "no rows"),
    ],
)
def test_judge_cli_bad_rows(tmp_path, lines, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    r = avgguf("judge", str(path), "--json")
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""


def test_judge_cli_missing_file(tmp_path):
    r = avgguf("judge", str(tmp_path / "none.jsonl"))
    assert r.returncode == 2 and "none.jsonl' not found" in r.stderr and "Traceback" not in r.stderr


def test_eval_generate_uses_the_answer_judge():
    r = avgguf(
        "eval", "modelfiles/demo.yaml", "--data", "data/preferences/eval.jsonl", "--domain", "legal", "--lambdas", "-1",
        "--limit", "1", "--generate", "1", "--max-tokens", "12", "--json",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["judge"]["agreement"] == pytest.approx(aj.held_out_report()["agreement"])
    shares = out["generated"][0]["shares"][0]
    assert set(aj.LEVELS) <= set(shares) and shares["n"] == 1
    assert sum(shares[lvl] for lvl in aj.LEVELS) == pytest.approx(1.0)


def test_bad_labeled_set_is_a_clear_error(tmp_path):
    path = tmp_path / "labels.jsonl"
    path.write_text('{"domain": "m", "query": "q", "answer": "a", "label": "expert"}\n{"domain": "m", "query": "q"}\n')
    with pytest.raises(AvggufError, match=r"labels.jsonl:2: key 'answer' is missing"):
        aj.read_labeled(path)
    path.write_text('{"domain": "m", "query": "q", "answer": "a", "label": "genius"}\n')
    with pytest.raises(AvggufError, match=r":1: label 'genius'"):
        aj.read_labeled(path)
    r = avgguf("judge", "data/judge/example.jsonl", "--labels", str(path))
    assert r.returncode == 2 and "label 'genius'" in r.stderr and "Traceback" not in r.stderr
