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
import json
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


def confusion_table(rows: list[dict], predicted: list[str], levels=aj.LEVELS, corner="people \\ judge") -> list[str]:
    lines = [f"| {corner} | " + " | ".join(levels) + " | n |", "|---" * (len(levels) + 2) + "|"]
    for t in aj.LEVELS:
        counts = [sum(r["label"] == t and p == lvl for r, p in zip(rows, predicted)) for lvl in levels]
        lines.append(f"| {t} | " + " | ".join(str(c) for c in counts) + f" | {sum(counts)} |")
    return lines


# the judge settings compared by cross-validation on the train split (the held-out split never chose among them)
CANDIDATES = {
    "two logistic regressions (hand 0.5, embedding 0.5), C 0.1": {"hand_weight": 0.5, "embedding_weight": 0.5, "c": 0.1},
    "two logistic regressions + random forest on the hand features (0.25 / 0.5 / 0.25), C 0.1": {"c": 0.1},
    "embedding regression + random forest (0 / 0.5 / 0.5), C 0.1": {"hand_weight": 0.0, "embedding_weight": 0.5, "c": 0.1},
    "two logistic regressions + random forest (0.25 / 0.5 / 0.25), C 0.03": {"c": 0.03},
    "two logistic regressions + random forest (0.25 / 0.5 / 0.25), C 0.01": {},
}
SECOND = ROOT / "data" / "judge" / "second_annotator.jsonl"
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


SOURCES = {
    "rounds 1-2: the previous demo AVs (DPO-distilled), λ -1..1.5": lambda src: src.get("round") != 3,
    "round 3: the current demo AVs, live": lambda src: src.get("round") == 3 and src["method"] == "av",
    "round 3: PAD with the current AVs": lambda src: src.get("round") == 3 and src["method"] == "pad",
    "round 3: control vectors from the AV's pair": lambda src: src.get("round") == 3 and src["method"] == "cvpair",
    "round 3: control vectors from preference data": lambda src: src.get("round") == 3 and src["method"] == "cvpref",
}


def by_source_lines(held: list[dict], predicted: list[str]) -> list[str]:
    lines = ["| held-out answers made by | judge agrees | n |", "|---|---|---|"]
    for name, made_by in SOURCES.items():
        pairs = [(r, p) for r, p in zip(held, predicted) if made_by(r["source"])]
        hits = sum(p == r["label"] for r, p in pairs)
        lines.append(f"| {name} | {hits / max(len(pairs), 1):.2f} | {len(pairs)} |")
    return lines


def annotator_lines(rows: list[dict], second: Path) -> list[str]:
    """A second person's blind labels of a sample of the set against the first's: the ceiling for any judge."""
    from sklearn.metrics import cohen_kappa_score

    if not second.is_file():
        return []
    first = {r["id"]: r for r in rows}
    pairs = [(first[o["id"]], o["label"]) for o in map(json.loads, second.read_text().splitlines()) if o["id"] in first]
    hits = sum(r["label"] == lab for r, lab in pairs)
    kappa = cohen_kappa_score([r["label"] for r, _ in pairs], [lab for _, lab in pairs])
    return [
        f"**People vs people.** A second annotator labeled {len(pairs)} answers of rounds 1-2 (a seeded sample, "
        f"{second.relative_to(ROOT)}) blind, by the same rubric and the same 16 calibration examples: they agree "
        f"with the first on {hits}/{len(pairs)} = {hits / len(pairs):.2f} (Cohen's kappa {kappa:.2f}). That is the "
        "ceiling a judge trained on these labels can be expected to reach; rows: the first annotator, columns: the second.",
        "",
        *confusion_table([r for r, _ in pairs], [lab for _, lab in pairs], corner="first \\ second"),
    ]


def report(data: Path) -> str:
    from sklearn.metrics import cohen_kappa_score

    rows = aj.read_labeled(data)
    train, held = aj.split(rows)
    t0 = time.perf_counter()
    new = aj.agreement(aj.trained_judge(data), held)
    train_s = time.perf_counter() - t0
    old_clf = LevelClassifier.train(read_eval_data(ROOT / "data" / "preferences" / "train.jsonl"))
    old_pred = old_clf.predict([r["answer"] for r in held])
    on_level = [i for i, r in enumerate(held) if r["label"] != "off-level"]
    counts = {lvl: sum(r["label"] == lvl for r in rows) for lvl in aj.LEVELS}
    h_new, n = agree(held, new["predicted"])
    h_old, _ = agree(held, old_pred)
    h_old_on, n_on = agree([held[i] for i in on_level], [old_pred[i] for i in on_level])
    h_new_on, _ = agree([held[i] for i in on_level], [new["predicted"][i] for i in on_level])
    kappa = cohen_kappa_score([r["label"] for r in held], new["predicted"])
    lines = [
        "# The generated-answer judge vs people's labels",
        "",
        f"`{COMMAND}`: {len(rows)} answers generated by SmolLM2-135M with the demo knobs at λ in -1..1.5 "
        "(recipes/make_judge_set.py: rounds 1-2 the previous demo AVs; round 3 the current AVs, PAD and both kinds "
        "of control vector), each labeled by hand by the rubric of recipes/make_preferences.py, blind to λ and "
        f"method, before any judge was trained on it ({', '.join(f'{k} {v}' for k, v in counts.items())}). Split "
        f"by query: {len(train)} answers train, {len(held)} held out (no held-out query is in the train split). "
        f"Judge trained in {train_s:.1f} s.",
        "",
        "| judge | agreement, all held-out | agreement, held-out without off-level |",
        "|---|---|---|",
        "| new: hand features + token embeddings, two logistic regressions and a random forest averaged "
        f"(avgguf.eval.answer_judge) | {h_new}/{n} = {h_new / n:.2f} (kappa {kappa:.2f}) | "
        f"{h_new_on}/{n_on} = {h_new_on / n_on:.2f} |",
        f"| old: TF-IDF on reference responses (avgguf.eval.levels) | {h_old}/{n} = {h_old / n:.2f} | "
        f"{h_old_on}/{n_on} = {h_old_on / n_on:.2f} |",
        "",
        *by_source_lines(held, new["predicted"]),
        "",
        *annotator_lines(rows, SECOND),
        "",
        *selection_lines(train),
        "",
        SELECTION_NOTE,
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


SELECTION_NOTE = (
    "**Model selection: grouped 5-fold cross-validation on the train split only** (folds by query). The judge's "
    "settings are the best of the rows above by the mean over fold assignments; the held-out split was scored once "
    "for them (the previous settings, C 0.1, were looked at there once before this selection ran: 0.72). "
    "Issue #23's goal, 0.85 on held-out, is not reached, and the people-vs-people agreement above says why: "
    "two annotators following the same rubric agree on about 0.80 of these answers (their commonest difference, "
    "generic against expert for an answer with one dubious specific, is also the judge's commonest miss). With "
    "rounds 1-2 alone (360 answers) the held-out agreement was 0.78 and cross-validation 0.86; round 3's answers "
    "(control vectors and PAD at high λ write much degenerate-but-specific text) are harder for people and judge "
    "alike. Also tried and dropped: the base model's log-probabilities of the answer as features (mean, spread, "
    "quantiles from llama.cpp; +0.01 held-out, 1.5 s of CPU per answer), SmolLM2's contextual hidden states "
    "(0.78-0.84 by cross-validation on rounds 1-2, 3 s per answer), eight more hand features, other "
    "regularisation, no class weights, gradient boosting and extra trees."
)


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
