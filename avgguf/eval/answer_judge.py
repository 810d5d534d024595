"""The judge of *generated* answers: avoidance / generic / expert / off-level, trained on answers the demo AVs
generated and a person labeled (data/judge/answers.jsonl, recipes/make_judge_set.py).

Features (robust to the templated reference texts: nothing keys on their exact wording):
  * the base model's own token embeddings (SmolLM2's `token_embd.weight`, read from the embedded GGUF),
    mean-pooled over the answer, and the cosine between the answer's and the query's pooled embedding;
  * hand features: length, refusal and redirect phrases, AI self-reference, digits / units / acronym density,
    echo of the query (shared word n-grams, coverage), repetition (repeated n-grams and lines), list markers.
scikit-learn models on them: logistic regressions on the standardised hand features and on the embedding, and a
random forest on the hand features, their probabilities averaged. The labeled set splits deterministically by
query (`split`): the judge is trained on the train part; `held_out_report` measures its agreement with the
people's labels on the rest. Training takes a few seconds and is cached per process; `judge_answers` is the
thread-safe entry point (the server calls it).
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from avgguf.eval import gguf_tokens
from avgguf.errors import AvggufError

LEVELS = ("avoidance", "generic", "expert", "off-level")
DATA = Path(__file__).resolve().parents[2] / "data" / "judge" / "answers.jsonl"
HELD_OUT_EVERY = 3  # every third query of a domain (by position) is held out

_WORD = re.compile(r"[A-Za-z][A-Za-z'\-]*|\d+(?:[.,]\d+)?")
_REFUSAL = re.compile(
    r"\b(i'?m sorry|i am sorry|i apologi[sz]e|i'?m afraid i (?:can'?t|cannot|am unable)|"
    r"i (?:can(?:'|no)?t|cannot|couldn'?t|won'?t|will not) (?:help|assist|provide|give|discuss|answer|offer|do that|walk)|"
    r"i(?:'m| am) (?:not able|unable|not equipped|not here to|not familiar)|"
    r"i (?:don'?t|do not) have (?:the (?:ability|capacity|capability|expertise)|any (?:\w+ )?advice)|"
    r"(?:cannot|can't|unable to) (?:provide|give|offer) (?:\w+ )?(?:advice|guidance|help))",
    re.I,
)
_REDIRECT = re.compile(
    r"\b(consult|speak (?:to|with)|talk (?:to|with)|contact|reach out|seek|see a|visit a)\b.{0,60}?"
    r"\b(doctor|physician|gp|healthcare|professional|lawyer|solicitor|attorney|advis[eo]r|planner|expert|specialist|"
    r"provider|helpline|clinician)",
    re.I,
)
_AI_SELF = re.compile(r"\b(as an ai|ai (?:language )?(?:model|assistant)|chatbot|smollm|language model)\b", re.I)
_UNITS = re.compile(
    r"(\d\s?(?:%|mg|g\b|kg|ml|mmol|micrograms?|mmhg|years?|months?|weeks?|days?|hours?|minutes?)|[£$€]\s?\d|"
    r"\b(?:act|section|regulation|article|tax|rate|apr|isa|etf|dose|ecg|ct|mri)\b)",
    re.I,
)
_ACRONYM = re.compile(r"\b[A-Z]{2,}[0-9]?s?\b")
_NAME = re.compile(r"(?<=[a-z,;:(] )[A-Z][a-z]{3,}\b")  # a capitalised word mid-sentence: a drug, product, law
_LIST = re.compile(r"(?m)^\s*(?:\d+[.)]|[-*•])\s+")
_OFF_TOPIC = re.compile(
    r"\b(story|character|protagonist|narrative|article|website|shop|project|game|magic|vacation|customer support)\b", re.I
)
_SELF = re.compile(r"\b(i'm|i am|i've|i can|i'd|my|me)\b", re.I)
# words a reader meets in a specific answer of each domain (technical vocabulary, not the references' wording)
DOMAIN_WORDS = {
    "medical": "diagnosis diagnose test tests scan ct mri x-ray ultrasound ecg blood urine urinalysis dose doses mg "
    "medication medicine drug drugs antibiotic antibiotics inhaler injection epinephrine adrenaline symptoms "
    "treatment therapy surgery prescription prescribe clinician gp physician infection inflammation chronic acute "
    "syndrome disorder hormone insulin iron ferritin vitamin steroid nsaid nsaids ibuprofen paracetamol naproxen "
    "aspirin opioids opioid codeine statin statins metformin levothyroxine antihistamine antihistamines salbutamol "
    "bronchodilator bronchodilators corticosteroid corticosteroids triptan sumatriptan ssri sertraline epipen "
    "anaphylaxis spirometry biopsy endoscopy colonoscopy physiotherapy analgesia epidural emollient emollients "
    "hba1c tsh ldl hdl glucose cholesterol haemoglobin hemoglobin platelets referral",
    "legal": "law laws legal act section court courts claim claims sue lawsuit tribunal judge statute contract "
    "contracts liability negligence damages compensation rights tenant landlord employer employee dismissal "
    "notice evidence solicitor lawyer attorney police arrest bail custody consumer refund warranty breach "
    "deposit copyright infringement injunction regulation regulations gdpr limitation statutory probate executor "
    "intestacy testator codicil defamation libel slander acas tribunal ombudsman clause clauses indemnity "
    "enforceable unenforceable restraint jurisdiction precedent plaintiff claimant defendant solicitors",
    "financial": "interest rate rates apr fee fees tax taxes pension annuity annuities bond bonds stock stocks "
    "equity equities fund funds index etf portfolio allocation dividend dividends inflation mortgage loan "
    "deposit credit score utilisation utilization debt income withdrawal premium premiums insurance policy "
    "yield yields return returns isa savings account 401k ira roth sipp lisa apr aer ltv amortisation "
    "amortization compound compounding expense ratio ter rebalance rebalancing bitcoin ethereum exchange "
    "brokerage equity ratio consolidation refinance refinancing",
}
DOMAIN_SETS = {d: set(ws.split()) for d, ws in DOMAIN_WORDS.items()}
_HEDGE = re.compile(r"\b(general(?:ly)?|may|might|could|depends|various|several|important to|consider|overall)\b", re.I)


def words(text: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(text)]


def _ngrams(ws: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(ws[i : i + n]) for i in range(len(ws) - n + 1)]


def _repetition(ws: list[str], n: int) -> float:
    grams = _ngrams(ws, n)
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


_MIRROR = {"you": "me", "your": "my", "yours": "mine", "yourself": "myself"}


def _echo(q: list[str], a: list[str]) -> tuple[float, float, float]:
    """Share of the answer's word trigrams found in the query; share of the query's words in the answer's
    first 30 words; share of the answer's bigrams that are the query's (all the query, said again). The
    answer's "you/your" read as the query's "me/my" ("I can walk you through X" echoes "walk me through X")."""
    a = [_MIRROR.get(w, w) for w in a]
    qg3, ag3 = set(_ngrams(q, 3)), _ngrams(a, 3)
    in_query = sum(g in qg3 for g in ag3) / len(ag3) if ag3 else float(bool(a) and a == q[: len(a)])
    head = set(a[:30])
    coverage = sum(w in head for w in q) / len(q) if q else 0.0
    qg2, ag2 = set(_ngrams(q, 2)), _ngrams(a, 2)
    bigram = sum(g in qg2 for g in ag2) / len(ag2) if ag2 else 0.0
    return in_query, coverage, bigram


def hand_features(query: str, answer: str, domain: str = "") -> np.ndarray:
    a, q = words(answer), words(query)
    n = max(len(a), 1)
    lines = [ln.strip().lower() for ln in answer.splitlines() if ln.strip()]
    repeated_lines = 1.0 - len(set(lines)) / len(lines) if lines else 0.0
    head = answer[:300]
    letters = sum(c.isalpha() for c in answer)
    return np.array(
        [
            np.log1p(len(a)),
            float(bool(_REFUSAL.search(head))),
            len(_REFUSAL.findall(answer)) / n * 10,
            float(bool(_REDIRECT.search(answer))),
            float(bool(_AI_SELF.search(answer))),
            sum(w[0].isdigit() for w in a) / n * 10,
            len(_UNITS.findall(answer)) / n * 10,
            len(_ACRONYM.findall(answer)) / n * 10,
            *_echo(q, a),
            _repetition(a, 3),
            _repetition(a, 6),
            repeated_lines,
            len(_LIST.findall(answer)) / n * 10,
            len(_HEDGE.findall(answer)) / n * 10,
            answer.count("?") / n * 10,
            1.0 - letters / max(len(answer), 1),
            float(len(a) < 8),
            *_topic(q, a, domain, answer),
        ]
    )


def _topic(q: list[str], a: list[str], domain: str, answer: str) -> tuple[float, ...]:
    """On the question's topic and domain, and how specific? The share of the query's content words (5+
    letters) anywhere in the answer, the answer's rate of the domain's technical words and the best other
    domain's rate, how many distinct technical words and mid-sentence names (drugs, products, laws) and figures
    it has, story/role-play markers and self-talk."""
    n = max(len(a), 1)
    content = [w for w in q if len(w) >= 5]
    aset = set(a)
    coverage = sum(w in aset for w in content) / len(content) if content else 0.0
    rates = {d: sum(w in ws for w in a) / n * 10 for d, ws in DOMAIN_SETS.items()}
    own = rates.get(domain, max(rates.values()))
    other = max((r for d, r in rates.items() if d != domain), default=0.0)
    terms = len(aset & DOMAIN_SETS.get(domain, set().union(*DOMAIN_SETS.values())))
    figures = sum(w[0].isdigit() for w in a)
    text = " ".join(a)
    return (
        coverage,
        own,
        other,
        np.log1p(terms),
        np.log1p(len(set(_NAME.findall(answer)))),
        np.log1p(figures),
        len(_OFF_TOPIC.findall(text)) / n * 10,
        len(_SELF.findall(text)) / n * 10,
    )


DEGENERATE = 0.95  # off-level's probability when a rule below fires


def degenerate_reason(query: str, answer: str) -> str | None:
    """Off-level whatever the model says: an empty answer, an echo of the question (most of the answer's
    word trigrams are the query's, and it is no refusal) or a repetition loop (half its word 6-grams repeat)."""
    a = words(answer)
    if len(a) < 2:
        return "empty"
    q = words(query)
    in_query, coverage, bigram = _echo(q, a)
    restated = coverage >= 0.7 and len(a) <= 2 * len(q) + 6  # the question said again, little else
    if (max(in_query, bigram) >= 0.5 or restated) and not _REFUSAL.search(answer):
        return "echo"
    if _repetition(a, 6) >= 0.5:
        return "repetition"
    return None


def _degenerate(query: str, answer: str, probs: dict[str, float]) -> dict[str, float]:
    if degenerate_reason(query, answer) is None or probs["off-level"] >= DEGENERATE:
        return probs
    rest = sum(v for k, v in probs.items() if k != "off-level") or 1.0
    return {k: DEGENERATE if k == "off-level" else (1 - DEGENERATE) * v / rest for k, v in probs.items()}


N_HAND = len(hand_features("", "")) + 3  # hand features, subwords and the query-answer cosine, before the embedding


@dataclass
class Features:
    """The base model's token embeddings, mean-pooled, next to the hand features."""

    table: gguf_tokens.TokenEmbeddings

    def pooled(self, text: str) -> np.ndarray:
        vec = self.table.mean(text)
        norm = np.linalg.norm(vec)
        return vec / norm if norm > 0 else vec

    def subwords(self, answer: str) -> tuple[float, float]:
        """Technical vocabulary by the base model's tokenizer: mean tokens per word of 4+ letters, and the
        share of such words split into 3+ tokens (urinalysis, epinephrine, amortisation)."""
        long = [w for w in set(words(answer)) if len(w) >= 4 and w.isalpha()]
        if not long:
            return 0.0, 0.0
        counts = [len(self.table.tokens(" " + w)) for w in long]
        return float(np.mean(counts)), sum(c >= 3 for c in counts) / len(counts)

    def row(self, query: str, answer: str, domain: str = "") -> np.ndarray:
        a, q = self.pooled(answer), self.pooled(query)
        return np.concatenate([hand_features(query, answer, domain), self.subwords(answer), [float(a @ q)], a])

    def matrix(self, rows: list[dict]) -> np.ndarray:
        return np.stack([self.row(r["query"], r["answer"], r.get("domain", "")) for r in rows])


def read_labeled(path: str | Path = DATA) -> list[dict]:
    """The labeled answers: rows {"domain", "query", "answer", "label", ...}, label one of LEVELS."""
    path = Path(path)
    if not path.is_file():
        raise AvggufError(
            f"the answer judge's labeled set {str(path)!r} is missing: it ships in the source tree (data/judge/), "
            "made by recipes/make_judge_set.py and labeled by hand"
        )
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            check_rows([row])
        except json.JSONDecodeError as exc:
            raise AvggufError(f"{path}:{n}: not JSON ({exc.msg} at column {exc.colno})") from None
        except AvggufError as exc:
            raise AvggufError(f"{path}:{n}: {str(exc).partition(': ')[2]}") from None
        if row.get("label") not in LEVELS:
            raise AvggufError(f"{path}:{n}: label {row.get('label')!r}; expected one of {', '.join(LEVELS)}")
        rows.append(row)
    return rows


def split(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """(train, held-out): per domain, every HELD_OUT_EVERY-th distinct query (in file order, from the second)
    is held out with all its answers, so no query is on both sides."""
    order: dict[str, list[str]] = {}
    for r in rows:
        qs = order.setdefault(r["domain"], [])
        if r["query"] not in qs:
            qs.append(r["query"])
    held = {(d, q) for d, qs in order.items() for i, q in enumerate(qs) if i % HELD_OUT_EVERY == 1}
    train = [r for r in rows if (r["domain"], r["query"]) not in held]
    return train, [r for r in rows if (r["domain"], r["query"]) in held]


class AnswerJudge:
    """Three models, their level probabilities averaged: a logistic regression on the standardised hand
    features (weight `hand_weight`), one on the pooled embedding (`embedding_weight`) and a random forest on the
    hand features (the rest). Class weights balanced: expert answers are few. The settings were chosen by a
    repeated grouped cross-validation on the train split only (bench/judge_agreement.py prints it)."""

    def __init__(self, features: Features, c: float = 0.01, hand_weight: float = 0.25, embedding_weight: float = 0.5):
        self.features, self.c = features, c
        self.weights = (hand_weight, embedding_weight, 1.0 - hand_weight - embedding_weight)
        self.parts: list[tuple[slice, object, object, float]] = []
        self.trained_on = 0

    def fit(self, rows: list[dict]) -> AnswerJudge:
        try:
            from sklearn.ensemble import RandomForestClassifier
            from sklearn.linear_model import LogisticRegression
            from sklearn.preprocessing import StandardScaler
        except ImportError:
            raise AvggufError("the answer judge needs scikit-learn: pip install 'avgguf[eval]'") from None
        x, y = self.features.matrix(rows), [r["label"] for r in rows]
        self.parts = []
        for cols, weight in zip((slice(0, N_HAND), slice(N_HAND, None)), self.weights):
            scaler = StandardScaler().fit(x[:, cols])
            model = LogisticRegression(C=self.c, max_iter=5000, class_weight="balanced").fit(scaler.transform(x[:, cols]), y)
            self.parts.append((cols, scaler, model, weight))
        if self.weights[2] > 0:  # n_jobs=1: deterministic and no worker pool in the server's threads
            forest = RandomForestClassifier(500, min_samples_leaf=2, class_weight="balanced", random_state=0, n_jobs=1)
            self.parts.append((slice(0, N_HAND), None, forest.fit(x[:, :N_HAND], y), self.weights[2]))
        self.trained_on = len(rows)
        return self

    def _proba(self, x: np.ndarray) -> np.ndarray:
        """(rows, LEVELS) probabilities: each part's, weighted."""
        out = np.zeros((len(x), len(LEVELS)))
        for cols, scaler, model, weight in self.parts:
            p = model.predict_proba(x[:, cols] if scaler is None else scaler.transform(x[:, cols]))
            for j, lvl in enumerate(model.classes_):
                out[:, LEVELS.index(lvl)] += weight * p[:, j]
        return out

    def probabilities(self, rows: list[dict]) -> list[dict[str, float]]:
        if not rows:
            return []
        proba = self._proba(self.features.matrix(rows))
        out = [{lvl: float(p[j]) for j, lvl in enumerate(LEVELS)} for p in proba]
        return [_degenerate(r["query"], r["answer"], p) for r, p in zip(rows, out)]

    def predict(self, rows: list[dict]) -> list[str]:
        return [max(p, key=p.get) for p in self.probabilities(rows)]


def agreement(judge: AnswerJudge, rows: list[dict]) -> dict:
    """Agreement with the rows' labels and the confusion matrix {label: {predicted: count}}."""
    predicted = judge.predict(rows)
    confusion = {t: {p: 0 for p in LEVELS} for t in LEVELS}
    for r, p in zip(rows, predicted):
        confusion[r["label"]][p] += 1
    hits = sum(p == r["label"] for p, r in zip(predicted, rows))
    return {"agreement": hits / max(len(rows), 1), "n": len(rows), "confusion": confusion, "predicted": predicted}


_LOCK = threading.RLock()
_CACHE: dict[str, object] = {}


def _data_key(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.is_file() else str(path)


def trained_judge(path: str | Path = DATA) -> AnswerJudge:
    """The judge trained on the train split of the labeled set (built once per process and data file)."""
    path = Path(path)
    with _LOCK:
        key = f"judge:{path.resolve()}:{_data_key(path)}"
        if key not in _CACHE:
            train, _ = split(read_labeled(path))
            _CACHE[key] = AnswerJudge(Features(gguf_tokens.default_table())).fit(train)
        return _CACHE[key]


def held_out_report(path: str | Path = DATA) -> dict:
    """The trained judge's agreement with the people's labels on the held-out queries (cached like it)."""
    path = Path(path)
    with _LOCK:
        key = f"report:{path.resolve()}:{_data_key(path)}"
        if key not in _CACHE:
            _, held = split(read_labeled(path))
            report = agreement(trained_judge(path), held)
            _CACHE[key] = {**report, "trained_on": trained_judge(path).trained_on, "data": str(path)}
        return _CACHE[key]


def check_rows(rows: list[dict], where: str = "row") -> None:
    for i, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise AvggufError(f"{where} {i}: expected a JSON object with 'domain', 'query' and 'answer'")
        for key in ("domain", "query", "answer"):
            if not isinstance(row.get(key), str):
                found = "missing" if key not in row else f"a {type(row[key]).__name__}"
                raise AvggufError(f"{where} {i}: key {key!r} is {found}; expected a string")


def judge_answers(rows: list[dict], data: str | Path = DATA) -> list[dict]:
    """Each row {"domain", "query", "answer"} labeled: {"level": one of LEVELS, "probabilities": {level: p}}
    (other keys of the row are kept). Thread-safe; the judge is trained lazily on first use (from `data`, the
    labeled set) and kept for the process."""
    check_rows(rows)
    judge = trained_judge(data)
    with _LOCK:
        probs = judge.probabilities(rows)
    return [{**row, "level": max(p, key=p.get), "probabilities": p} for row, p in zip(rows, probs)]
