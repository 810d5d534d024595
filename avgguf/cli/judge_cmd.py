"""`avgguf judge ANSWERS.jsonl`: the generated-answer judge (avgguf.eval.answer_judge) on answers a user brings."""

from __future__ import annotations

import json
from pathlib import Path

from avgguf.cli import args as cli_args
from avgguf.errors import AvggufError
from avgguf.eval import answer_judge as aj

EXCERPT = 60


def add_parser(sub, parent) -> None:
    p = sub.add_parser(
        "judge",
        parents=[parent],
        help="label answers avoidance / generic / expert / off-level",
        description='Labels each row {"domain", "query", "answer"} of a JSONL file with the generated-answer judge '
        "(trained on hand-labeled answers of the demo AVs, data/judge/answers.jsonl): its level and the "
        "probability of each level. Other keys of a row are kept.",
    )
    p.add_argument("answers", metavar="ANSWERS.jsonl", help='rows {"domain", "query", "answer"}, one JSON object a line')
    p.add_argument("--labels", help="the labeled set the judge trains on (default: data/judge/answers.jsonl)")
    cli_args.add_json_arg(p, "one JSON object per input row (JSON Lines)")


def read_answers(path: str) -> list[dict]:
    """The rows of ANSWERS.jsonl; a bad line is an error naming its line number and what is wrong."""
    file = Path(path)
    if not file.is_file():
        raise AvggufError(f"{path!r} not found (expected a JSONL file of rows {{'domain', 'query', 'answer'}})")
    rows = []
    for n, line in enumerate(file.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise AvggufError(f"{path}:{n}: not JSON ({exc.msg} at column {exc.colno})") from None
        try:
            aj.check_rows([row])
        except AvggufError as exc:
            raise AvggufError(f"{path}:{n}: {str(exc).partition(': ')[2]}") from None
        rows.append(row)
    if not rows:
        raise AvggufError(f"{path}: no rows")
    return rows


def run_judge(args) -> int:
    rows = read_answers(args.answers)
    out = aj.judge_answers(rows, data=args.labels or aj.DATA)
    if args.json:
        print("\n".join(json.dumps(r, ensure_ascii=False) for r in out))
    else:
        print(render(out))
    return 0


def render(out: list[dict]) -> str:
    lines = ["| # | domain | level | p | answer |", "|---|---|---|---|---|"]
    for i, r in enumerate(out, 1):
        text = " ".join(r["answer"].split())
        text = text if len(text) <= EXCERPT else text[: EXCERPT - 1] + "…"
        lines.append(f"| {i} | {r['domain']} | {r['level']} | {r['probabilities'][r['level']]:.2f} | {text.replace('|', '/')} |")
    counts = {lvl: sum(r["level"] == lvl for r in out) for lvl in aj.LEVELS}
    lines.append("\n" + ", ".join(f"{lvl} {n}" for lvl, n in counts.items()) + f" (of {len(out)})")
    return "\n".join(lines)
