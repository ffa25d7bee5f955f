"""Editing and general-ability metrics as pure functions of already computed scores (no model here).

Notation: for a prompt and a target, ``nll`` is the mean per-token negative log-likelihood of the
target (``TokenScores.mean_nll``) and ``P = exp(-nll)``. A "case" is one edit; where a case has several
prompts (e.g. CounterFact's two paraphrases), the per-prompt values are averaged within the case first
and the case means are then averaged, as ROME's ``summarize.py`` does.

CounterFact (ROME/MEMIT protocol)::

    efficacy_score            = mean_cases [ P(new) > P(true) ]         on the rewrite prompt
    efficacy_magnitude        = mean_cases [ P(new) - P(true) ]
    generalization_score/mag  = the same on the paraphrase prompts
    specificity_score         = mean_cases [ P(true) > P(new) ]         on the neighborhood prompts
    specificity_magnitude     = mean_cases [ P(true) - P(new) ]

zsRE (MEMIT protocol)::

    acc(case)      = (1/T) * sum_t [ argmax_t == target_t ]   teacher-forced top-1 over the T target tokens
    efficacy       = mean_cases acc(src -> alt)
    generalization = mean_cases acc(rephrase -> alt)
    specificity    = mean_cases acc(loc -> loc_ans)   (the loc answer tokens against the ground truth)

EasyEdit::

    rewrite_acc / rephrase_acc = mean_cases acc(...)                   as zsRE above
    locality                   = mean_cases (1/T) * sum_t [ post_argmax_t == pre_argmax_t ]
                                 (the edited model agrees with the unedited model, not with the truth)

Fluency (ROME): ``n_gram_entropy``. Consistency (ROME): ``consistency``. GLUE: ``accuracy``, ``f1``,
``macro_f1``, ``mcc``.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from numbers import Real
from typing import Any, Mapping, Sequence

import numpy as np

__all__ = [
    "CONSISTENCY_UNAVAILABLE",
    "accuracy",
    "compute_n_gram_entropy",
    "consistency",
    "counterfact_metrics",
    "easyedit_metrics",
    "f1",
    "locality",
    "macro_f1",
    "mcc",
    "n_gram_entropy",
    "preference_margin",
    "preference_rate",
    "token_accuracy",
    "word_tokenize",
    "zsre_metrics",
]

CaseValues = Sequence[Any]  # per case: a float, or a sequence of floats (one per prompt of that case)


# ----------------------------------------------------------------------------- helpers


def _case_means(values: CaseValues, name: str) -> np.ndarray:
    """Per-case means of a sequence whose elements are numbers or sequences of numbers."""
    if len(values) == 0:
        raise ValueError(f"{name}: no cases")
    out = np.empty(len(values), dtype=np.float64)
    for i, v in enumerate(values):
        if isinstance(v, (Real, np.number, bool, np.bool_)):
            out[i] = float(v)
        else:
            v = np.asarray(v, dtype=np.float64)
            if v.size == 0:
                raise ValueError(f"{name}: case {i} has no values")
            out[i] = v.mean()
    return out


def _paired(a: CaseValues, b: CaseValues, name: str) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Align two per-case value lists prompt by prompt (same number of cases and of prompts per case)."""
    if len(a) != len(b):
        raise ValueError(f"{name}: {len(a)} cases vs {len(b)} cases")
    if len(a) == 0:
        raise ValueError(f"{name}: no cases")
    xs, ys = [], []
    for i, (x, y) in enumerate(zip(a, b)):
        x, y = np.atleast_1d(np.asarray(x, dtype=np.float64)), np.atleast_1d(np.asarray(y, dtype=np.float64))
        if x.shape != y.shape or x.ndim != 1 or x.size == 0:
            raise ValueError(f"{name}: case {i} has {x.size} vs {y.size} values")
        xs.append(x)
        ys.append(y)
    return xs, ys


# ----------------------------------------------------------------------------- CounterFact


def preference_rate(nll_a: CaseValues, nll_b: CaseValues) -> float:
    """mean_cases mean_prompts [ P(a) > P(b) ], i.e. [ nll_a < nll_b ] (ties count as failures, as in ROME)."""
    xs, ys = _paired(nll_a, nll_b, "preference_rate")
    return float(np.mean([np.mean(x < y) for x, y in zip(xs, ys)]))


def preference_margin(nll_a: CaseValues, nll_b: CaseValues) -> float:
    """mean_cases mean_prompts [ exp(-nll_a) - exp(-nll_b) ]."""
    xs, ys = _paired(nll_a, nll_b, "preference_margin")
    return float(np.mean([np.mean(np.exp(-x) - np.exp(-y)) for x, y in zip(xs, ys)]))


def counterfact_metrics(
    rewrite_new: CaseValues,
    rewrite_true: CaseValues,
    paraphrase_new: CaseValues,
    paraphrase_true: CaseValues,
    neighborhood_new: CaseValues,
    neighborhood_true: CaseValues,
) -> dict[str, float]:
    """CounterFact efficacy / generalization / specificity score and magnitude from mean-token NLLs.

    Each argument holds, per case, the NLL of target_new (``*_new``) or target_true (``*_true``) on
    that prompt group. Specificity flips the comparison: neighbours should keep the true object.
    """
    return {
        "efficacy_score": preference_rate(rewrite_new, rewrite_true),
        "efficacy_magnitude": preference_margin(rewrite_new, rewrite_true),
        "generalization_score": preference_rate(paraphrase_new, paraphrase_true),
        "generalization_magnitude": preference_margin(paraphrase_new, paraphrase_true),
        "specificity_score": preference_rate(neighborhood_true, neighborhood_new),
        "specificity_magnitude": preference_margin(neighborhood_true, neighborhood_new),
    }


# ----------------------------------------------------------------------------- token accuracy (zsRE, EasyEdit)


def token_accuracy(correct: Sequence[Sequence[bool]]) -> float:
    """mean_cases [ fraction of the case's target tokens predicted top-1 ] (per case first, then over cases)."""
    return float(_case_means(correct, "token_accuracy").mean())


def zsre_metrics(
    rewrite_correct: Sequence[Sequence[bool]],
    rephrase_correct: Sequence[Sequence[bool]],
    loc_correct: Sequence[Sequence[bool]],
) -> dict[str, float]:
    """zsRE efficacy / generalization / specificity as teacher-forced token accuracies (MEMIT protocol)."""
    return {
        "efficacy": token_accuracy(rewrite_correct),
        "generalization": token_accuracy(rephrase_correct),
        "specificity": token_accuracy(loc_correct),
    }


def locality(pre_argmax: Sequence[Sequence[int]], post_argmax: Sequence[Sequence[int]]) -> float:
    """EasyEdit locality: mean_cases [ fraction of positions where post-edit argmax == pre-edit argmax ]."""
    if len(pre_argmax) != len(post_argmax):
        raise ValueError(f"locality: {len(pre_argmax)} pre-edit cases vs {len(post_argmax)} post-edit cases")
    if len(pre_argmax) == 0:
        raise ValueError("locality: no cases")
    per_case = []
    for i, (pre, post) in enumerate(zip(pre_argmax, post_argmax)):
        if len(pre) != len(post) or len(pre) == 0:
            raise ValueError(f"locality: case {i} has {len(pre)} pre-edit vs {len(post)} post-edit tokens")
        per_case.append(np.mean(np.asarray(pre) == np.asarray(post)))
    return float(np.mean(per_case))


def easyedit_metrics(
    rewrite_correct: Sequence[Sequence[bool]],
    rephrase_correct: Sequence[Sequence[bool]],
    pre_locality_argmax: Sequence[Sequence[int]],
    post_locality_argmax: Sequence[Sequence[int]],
) -> dict[str, float]:
    """EasyEdit's rewrite_acc, rephrase_acc and locality (agreement with the pre-edit model)."""
    return {
        "rewrite_acc": token_accuracy(rewrite_correct),
        "rephrase_acc": token_accuracy(rephrase_correct),
        "locality": locality(pre_locality_argmax, post_locality_argmax),
    }


# ----------------------------------------------------------------------------- fluency


_WORD_RE = re.compile(r"\w+(?:'\w+)?|[^\w\s]", re.UNICODE)


def word_tokenize(text: str) -> list[str]:
    """Words and single punctuation marks, via a regex.

    ROME uses ``nltk.word_tokenize``, whose punkt data cannot be downloaded here; this regex agrees
    with it on plain prose (words and punctuation split apart) but keeps contractions such as
    "don't" as one token where nltk gives "do" + "n't".
    """
    return _WORD_RE.findall(text)


def compute_n_gram_entropy(
    text: str, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)
) -> float:
    """ROME's weighted n-gram entropy of one text: mean_n [ w_n * H_n ], H_n = -sum_g f_g log2 f_g.

    f_g is the relative frequency of n-gram g among the text's n-grams; a text with fewer than n words
    has H_n = 0 (as in ROME, where the empty frequency table sums to 0).
    """
    if len(ns) != len(weights):
        raise ValueError(f"{len(ns)} n-gram orders but {len(weights)} weights")
    tokens = word_tokenize(text)
    weighted = []
    for n, w in zip(ns, weights):
        counts = Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))
        freqs = np.array(list(counts.values()), dtype=np.float64)
        h = float(-(freqs / freqs.sum() * np.log2(freqs / freqs.sum())).sum()) if freqs.size else 0.0
        weighted.append(w * h)
    return float(np.mean(weighted))


def n_gram_entropy(texts: Sequence[str]) -> float:
    """Fluency as in ROME: arithmetic mean over texts of ``compute_n_gram_entropy`` (ns=[2,3], w=[2/3,4/3])."""
    if len(texts) == 0:
        raise ValueError("n_gram_entropy: no texts")
    return float(np.mean([compute_n_gram_entropy(t) for t in texts]))


# ----------------------------------------------------------------------------- consistency


CONSISTENCY_UNAVAILABLE = "reference data (attribute_snippets, idf, tfidf_vocab) not available"


def consistency(
    generated: Sequence[str],
    relation_id: str,
    target_id: str,
    references: Mapping[str, Mapping[str, Sequence[Any]]] | None = None,
    *,
    idf: Sequence[float] | None = None,
    vocab: Mapping[str, int] | None = None,
) -> tuple[float | None, str | None]:
    """ROME's reference score: tf-idf cosine between all generated texts and the target's Wikipedia snippets.

        consistency = cos( tfidf(" ".join(generated)), tfidf(" ".join(snippets[relation_id][target_id])) )

    ``references`` is ROME's attribute_snippets as ``{relation_id: {target_id: [text or {"text": ...}]}}``.
    With ``idf`` and ``vocab`` (ROME's idf.npy / tfidf_vocab.json) the vectorizer is ROME's exactly;
    without them it is fitted on the two documents, which is NOT comparable with published numbers.
    Returns ``(value, None)``, or ``(None, reason)`` when the metric cannot be computed.
    """
    if references is None:
        return None, CONSISTENCY_UNAVAILABLE
    snippets = references.get(relation_id, {}).get(target_id)
    if not snippets:
        return None, f"no reference snippets for relation {relation_id!r}, target {target_id!r}"
    from sklearn.feature_extraction.text import TfidfVectorizer  # heavy import, only when used

    ref_text = " ".join(s["text"] if isinstance(s, Mapping) else str(s) for s in snippets)
    gen_text = " ".join(generated)
    if (idf is None) != (vocab is None):
        raise ValueError("consistency: pass both idf and vocab, or neither")
    if idf is not None:
        vec = TfidfVectorizer(vocabulary=dict(vocab))
        vec.idf_ = np.asarray(idf, dtype=np.float64)  # ROME: vec.idf_ = idf from Wikipedia counts
        enc = vec.transform([gen_text, ref_text]).toarray()
    else:
        enc = TfidfVectorizer().fit_transform([gen_text, ref_text]).toarray()
    norms = np.linalg.norm(enc, axis=1)
    if not norms.all():
        return 0.0, None  # a document with no known terms shares nothing with the other
    return float(enc[0] @ enc[1] / norms[0] / norms[1]), None


# ----------------------------------------------------------------------------- classification (GLUE)


def _labels(y_true: Sequence[Any], y_pred: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
    t, p = np.asarray(y_true), np.asarray(y_pred)
    if t.shape != p.shape or t.ndim != 1:
        raise ValueError(f"{t.size} labels vs {p.size} predictions")
    if t.size == 0:
        raise ValueError("no labels")
    return t, p


def accuracy(y_true: Sequence[Any], y_pred: Sequence[Any]) -> float:
    """mean [ pred == true ]."""
    t, p = _labels(y_true, y_pred)
    return float(np.mean(t == p))


def f1(y_true: Sequence[Any], y_pred: Sequence[Any], positive: Any = 1) -> float:
    """Binary F1 of the ``positive`` class: 2TP / (2TP + FP + FN); 0 when there is no TP (sklearn's zero_division=0)."""
    t, p = _labels(y_true, y_pred)
    tp = np.sum((p == positive) & (t == positive))
    fp = np.sum((p == positive) & (t != positive))
    fn = np.sum((p != positive) & (t == positive))
    return float(2 * tp / (2 * tp + fp + fn)) if tp else 0.0


def macro_f1(y_true: Sequence[Any], y_pred: Sequence[Any]) -> float:
    """Unweighted mean of the per-class binary F1 over the classes present in y_true or y_pred."""
    t, p = _labels(y_true, y_pred)
    classes = np.unique(np.concatenate([t, p]))
    return float(np.mean([f1(t, p, positive=c) for c in classes]))


def mcc(y_true: Sequence[Any], y_pred: Sequence[Any], positive: Any = 1) -> float:
    """Matthews correlation (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)); 0 if the denominator is 0."""
    t, p = _labels(y_true, y_pred)
    tp = float(np.sum((p == positive) & (t == positive)))
    tn = float(np.sum((p != positive) & (t != positive)))
    fp = float(np.sum((p == positive) & (t != positive)))
    fn = float(np.sum((p != positive) & (t == positive)))
    denom = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return (tp * tn - fp * fn) / denom if denom else 0.0
