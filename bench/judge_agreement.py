"""Agreement of the generated-answer judges with people's labels, on the held-out part of data/judge/answers.jsonl.

    python bench/judge_agreement.py [--data data/judge/answers.jsonl] [--out bench/results/judge.md]

The new judge (avgguf.eval.answer_judge: SmolLM2's token embeddings + hand features, logistic regression)
is trained on the train split of the hand-labeled generated answers; the old one (avgguf.eval.levels: TF-IDF
on the templated reference responses of data/preferences/train.jsonl) is trained as `avgguf eval --generate`
trained it before. Both label the same held-out answers (queries not in the train split). The old judge has no
off-level class, so its agreement is also given on the held-out answers people did not call off-level.
Also printed: a grouped cross-validation on the train split (folds by query), the only number used to pick
the judge's settings.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from avgguf import atomic  # noqa: E402
from avgguf.eval import answer_judge as aj  # noqa: E402
from avgguf.eval.judge import read_eval_data  # noqa: E402
from avgguf.eval.levels import LevelClassifier  # noqa: E402

COMMAND = "python bench/judge_agreement.py"


def confusion_table(rows: list[dict], predicted: list[str], levels=aj.LEVELS) -> list[str]:
    lines = ["| people \\ judge | " + " | ".join(levels) + " | n |", "|---" * (len(levels) + 2) + "|"]
    for t in aj.LEVELS:
        counts = [sum(r["label"] == t and p == lvl for r, p in zip(rows, predicted)) for lvl in levels]
        lines.append(f"| {t} | " + " | ".join(str(c) for c in counts) + f" | {sum(counts)} |")
    return lines


# the judge settings compared by cross-validation on the train split (the held-out split never chose among them)
CANDIDATES = {
    "two logistic regressions (hand 0.5, embedding 0.5)": {"hand_weight": 0.5, "embedding_weight": 0.5},
    "two logistic regressions + random forest on the hand features (0.25 / 0.5 / 0.25)": {},
    "embedding regression + random forest (0 / 0.5 / 0.5)": {"hand_weight": 0.0, "embedding_weight": 0.5},
}
REPEATS = 8  # fold assignments: the first is queries[k::folds], the others seeded shuffles of the queries


class CachedFeatures(aj.Features):
    """The judge's features, each row computed once (cross-validation refits on the same rows)."""

    def __init__(self, table):
        super().__init__(table)
        self.cache: dict[tuple[str, str, str], object] = {}

    def row(self, query: str, answer: str, domain: str = ""):
        key = (query, answer, domain)
        if key not in self.cache:
            self.cache[key] = super().row(query, answer, domain)
        return self.cache[key]


def grouped_cv(train: list[dict], folds: int = 5, seed: int = 0, features=None, **settings) -> float:
    """Agreement of judges trained on 4/5 of the train split's queries, tested on the other 1/5 (5 folds);
    seed 0: queries[k::folds] in sorted order, else a seeded shuffle of the queries first."""
    import random

    features = features or CachedFeatures(aj.gguf_tokens.default_table())
    queries = sorted({(r["domain"], r["query"]) for r in train})
    if seed:
        random.Random(seed).shuffle(queries)
    hits = 0
    for k in range(folds):
        test_q = set(queries[k::folds])
        fit = [r for r in train if (r["domain"], r["query"]) not in test_q]
        test = [r for r in train if (r["domain"], r["query"]) in test_q]
        judge = aj.AnswerJudge(features, **settings).fit(fit)
        hits += sum(p == r["label"] for p, r in zip(judge.predict(test), test))
    return hits / len(train)


def selection_lines(train: list[dict]) -> list[str]:
    features = CachedFeatures(aj.gguf_tokens.default_table())
    lines = ["| judge settings | CV, first fold assignment | CV, mean of " + f"{REPEATS} fold assignments |", "|---|---|---|"]
    for name, settings in CANDIDATES.items():
        scores = [grouped_cv(train, seed=s, features=features, **settings) for s in range(REPEATS)]
        lines.append(f"| {name}{' (the judge)' if not settings else ''} | {scores[0]:.3f} | {sum(scores) / REPEATS:.3f} |")
    return lines


def agree(rows: list[dict], predicted: list[str]) -> tuple[int, int]:
    return sum(p == r["label"] for p, r in zip(predicted, rows)), len(rows)


def report(data: Path) -> str:
    rows = aj.read_labeled(data)
    train, held = aj.split(rows)
    t0 = time.perf_counter()
    new = aj.agreement(aj.trained_judge(data), held)
    train_s = time.perf_counter() - t0
    old_clf = LevelClassifier.train(read_eval_data(ROOT / "data" / "preferences" / "train.jsonl"))
    old_pred = old_clf.predict([r["answer"] for r in held])
    on_level = [(r, p) for r, p in zip(held, old_pred) if r["label"] != "off-level"]
    new_on = [(r, p) for r, p in zip(held, new["predicted"]) if r["label"] != "off-level"]
    counts = {lvl: sum(r["label"] == lvl for r in rows) for lvl in aj.LEVELS}
    h_new, n = agree(held, new["predicted"])
    h_old, _ = agree(held, old_pred)
    h_old_on, n_on = agree([r for r, _ in on_level], [p for _, p in on_level])
    h_new_on, _ = agree([r for r, _ in new_on], [p for _, p in new_on])
    lines = [
        "# The generated-answer judge vs people's labels",
        "",
        f"`{COMMAND}`: {len(rows)} answers generated by the demo AVs (SmolLM2-135M, λ in -1..1.5, "
        "recipes/make_judge_set.py), each labeled by hand by the rubric of recipes/make_preferences.py "
        f"({', '.join(f'{k} {v}' for k, v in counts.items())}). Split by query: {len(train)} answers train, "
        f"{len(held)} held out (no held-out query is in the train split). Judge trained in {train_s:.1f} s.",
        "",
        "| judge | agreement, all held-out | agreement, held-out without off-level |",
        "|---|---|---|",
        "| new: hand features + token embeddings, two logistic regressions and a random forest averaged "
        "(avgguf.eval.answer_judge) | "
        f"{h_new}/{n} = {h_new / n:.2f} | "
        f"{h_new_on}/{n_on} = {h_new_on / n_on:.2f} |",
        f"| old: TF-IDF on reference responses (avgguf.eval.levels) | {h_old}/{n} = {h_old / n:.2f} | "
        f"{h_old_on}/{n_on} = {h_old_on / n_on:.2f} |",
        "",
        "**Model selection: grouped 5-fold cross-validation on the train split only** (folds by query; 234 answers). "
        "The judge's settings are the best of these by the mean over fold assignments; the held-out split was scored "
        "once for the chosen settings (one candidate looked at on held-out in this round; the previous settings, first "
        "row below, scored 0.77 there). Issue #23's goal, 0.85 on held-out, is not reached: cross-validation on the "
        "train split plateaus at 0.84-0.86 for every judge tried, and the held-out queries come out lower (their "
        "commonest misses, expert answers called generic and generic ones called off-level, are the rubric's "
        "borderlines). Also tried by the same cross-validation and dropped (no gain): SmolLM2's "
        "contextual hidden states from llama.cpp (mean-pooled or last token, answer alone or after the query; "
        "0.78-0.84, and about 3 s of CPU per answer), eight more hand features (new domain terms, 'such as' lists, "
        "parenthesised acronyms, self-introductions, first-person narrative, non-ASCII letters, query words in the "
        "first sentence, long words; 0.84-0.85), other regularisation, no class weights, gradient boosting and "
        "extra trees.",
        "",
        *selection_lines(train),
        "",
        "**New judge, held-out confusion (rows: people, columns: judge)**",
        "",
        *confusion_table(held, new["predicted"]),
        "",
        "**Old judge, held-out confusion (it has no off-level class)**",
        "",
        *confusion_table(held, old_pred),
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=aj.DATA)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "judge.md")
    args = ap.parse_args()
    text = report(args.data)
    atomic.write_text_atomic(args.out, text)
    print(text)


if __name__ == "__main__":
    main()
