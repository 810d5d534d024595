"""Judging *generated* answers offline: a level classifier (avoidance / generic / expert) of answer text,
trained on the training split's reference responses (TF-IDF word n-grams + logistic regression, scikit-learn),
and the level shares of answers generated under a setting.

Kept for the reference texts (bench/pad_compare.py, tests/test_pad.py): on *generated* answers it agrees with
people's labels on about half (bench/results/judge.md). `avgguf eval --generate` and `avgguf judge` use
avgguf.eval.answer_judge, trained on hand-labeled generated answers."""

from __future__ import annotations

from dataclasses import dataclass

from avgguf.errors import AvggufError

LEVELS = ("avoidance", "generic", "expert")


def _sklearn():
    try:
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
    except ImportError:
        raise AvggufError("judging generated answers needs scikit-learn: pip install 'avgguf[eval]'") from None
    return TfidfVectorizer, LogisticRegression, make_pipeline


def examples(rows: list[dict]) -> tuple[list[str], list[str]]:
    texts, labels = [], []
    for r in rows:
        for level in LEVELS:
            texts.append(r["responses"][level])
            labels.append(level)
    return texts, labels


@dataclass
class LevelClassifier:
    pipeline: object
    trained_on: int

    @classmethod
    def train(cls, rows: list[dict]) -> LevelClassifier:
        tfidf, logreg, make_pipeline = _sklearn()
        texts, labels = examples(rows)
        if len(set(labels)) < 3 or len(rows) < 5:
            raise AvggufError(f"the level classifier needs at least 5 training rows with all three levels, got {len(rows)}")
        pipe = make_pipeline(tfidf(ngram_range=(1, 2), sublinear_tf=True, min_df=1), logreg(max_iter=2000, C=4.0))
        pipe.fit(texts, labels)
        return cls(pipe, len(rows))

    def predict(self, texts: list[str]) -> list[str]:
        return list(self.pipeline.predict(texts)) if texts else []

    def accuracy(self, rows: list[dict]) -> float:
        texts, labels = examples(rows)
        predicted = self.predict(texts)
        return sum(p == t for p, t in zip(predicted, labels)) / len(labels)

    def shares(self, answers: list[str]) -> dict:
        predicted = self.predict(answers)
        return {**{lvl: predicted.count(lvl) / max(len(predicted), 1) for lvl in LEVELS}, "n": len(predicted)}
