"""Metric functions against hand-computed values."""
import math

import numpy as np
import pytest
import sklearn.metrics as skm

from revive_plugin.eval import metrics as M



def NLL(p):
    """Mean-token NLL whose probability is p, so cases below read as probabilities."""
    return -math.log(p)


# ----------------------------------------------------------------------------- CounterFact


def test_counterfact_hand_computed():
    # case 0: P(new)=.5 > P(true)=.2 ; case 1: P(new)=.1 < P(true)=.4
    rw_new, rw_true = [NLL(.5), NLL(.1)], [NLL(.2), NLL(.4)]
    # paraphrases: case 0 has two prompts (one success, one failure) -> 0.5 ; case 1 one success -> 1
    pa_new, pa_true = [[NLL(.6), NLL(.1)], [NLL(.3)]], [[NLL(.2), NLL(.3)], [NLL(.1)]]
    # neighbours: success when P(true) > P(new)
    ne_new, ne_true = [[NLL(.1), NLL(.5)], [NLL(.2)]], [[NLL(.3), NLL(.4)], [NLL(.6)]]
    out = M.counterfact_metrics(rw_new, rw_true, pa_new, pa_true, ne_new, ne_true)
    assert out["efficacy_score"] == pytest.approx(0.5)
    assert out["efficacy_magnitude"] == pytest.approx(((.5 - .2) + (.1 - .4)) / 2)
    # per case first (ROME summarize), not pooled over prompts: (0.5 + 1) / 2, not 2/3
    assert out["generalization_score"] == pytest.approx(0.75)
    assert out["generalization_magnitude"] == pytest.approx((((.6 - .2) + (.1 - .3)) / 2 + (.3 - .1)) / 2)
    assert out["specificity_score"] == pytest.approx(0.75)
    assert out["specificity_magnitude"] == pytest.approx((((.3 - .1) + (.4 - .5)) / 2 + (.6 - .2)) / 2)


def test_preference_ties_fail_and_shapes_are_checked():
    assert M.preference_rate([1.0], [1.0]) == 0.0
    with pytest.raises(ValueError, match="2 cases vs 1"):
        M.preference_rate([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="case 0 has 2 vs 1"):
        M.preference_margin([[1.0, 2.0]], [[1.0]])
    with pytest.raises(ValueError, match="no cases"):
        M.preference_rate([], [])


# ----------------------------------------------------------------------------- zsRE / EasyEdit


def test_token_accuracy_is_per_case_then_mean():
    correct = [[True, False], [True, True, True, True]]
    assert M.token_accuracy(correct) == pytest.approx(0.75)  # not 5/6 pooled
    out = M.zsre_metrics(correct, [[False]], [[True, True, False, False]])
    assert out == pytest.approx({"efficacy": 0.75, "generalization": 0.0, "specificity": 0.5})
    with pytest.raises(ValueError, match="case 1 has no values"):
        M.token_accuracy([[True], []])


def test_easyedit_locality_compares_with_pre_edit_predictions():
    pre = [[5, 6, 7], [1, 2]]
    post = [[5, 0, 7], [9, 9]]
    assert M.locality(pre, post) == pytest.approx((2 / 3 + 0) / 2)
    out = M.easyedit_metrics([[True, True]], [[True, False]], pre, post)
    assert out == pytest.approx({"rewrite_acc": 1.0, "rephrase_acc": 0.5, "locality": 1 / 3})
    with pytest.raises(ValueError, match="case 1 has 2 pre-edit vs 1 post-edit"):
        M.locality(pre, [[5, 6, 7], [1]])


# ----------------------------------------------------------------------------- fluency


def test_n_gram_entropy_hand_computed():
    # words a b a b: bigrams ab, ba, ab -> H2 = H(2/3, 1/3); trigrams aba, bab -> H3 = 1 bit
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    expected = (2 / 3 * h2 + 4 / 3 * 1.0) / 2
    assert M.compute_n_gram_entropy("a b a b") == pytest.approx(expected)
    # a repeated word: every n-gram identical -> 0; a single word has no bigrams -> 0
    assert M.compute_n_gram_entropy("the the the the the") == 0.0
    assert M.compute_n_gram_entropy("word") == 0.0
    assert M.n_gram_entropy(["a b a b", "word"]) == pytest.approx(expected / 2)


def test_word_tokenize_splits_punctuation():
    assert M.word_tokenize("Paris, France's capital.") == ["Paris", ",", "France's", "capital", "."]


def test_repetitive_text_is_less_fluent():
    varied = "The city of Paris is the capital of France and has many museums."
    looped = "Paris Paris Paris Paris Paris Paris Paris Paris Paris Paris Paris Paris."
    assert M.n_gram_entropy([varied]) > M.n_gram_entropy([looped])


# ----------------------------------------------------------------------------- consistency


def test_consistency_without_references_reports_reason():
    value, reason = M.consistency(["text"], "P103", "Q150")
    assert value is None and reason == "reference data (attribute_snippets, idf, tfidf_vocab) not available"


def test_consistency_with_rome_style_idf_and_vocab():
    refs = {"P1": {"Q1": ["paris is a city in france", {"text": "the city of paris"}]}}
    vocab, idf = {"paris": 0, "city": 1, "france": 2}, [1.0, 2.0, 3.0]
    value, reason = M.consistency(["paris city"], "P1", "Q1", refs, idf=idf, vocab=vocab)
    # tf*idf: generated [1*1, 1*2, 0] ; references paris x2, city x2, france x1 -> [2, 4, 3]
    assert reason is None
    assert value == pytest.approx((1 * 2 + 2 * 4) / math.sqrt(1 + 4) / math.sqrt(4 + 16 + 9))


def test_consistency_self_fitted_and_missing_target():
    refs = {"P1": {"Q1": ["paris is a city"]}}
    assert M.consistency(["paris is a city"], "P1", "Q1", refs)[0] == pytest.approx(1.0)
    value, reason = M.consistency(["x"], "P1", "Q2", refs)
    assert value is None and "Q2" in reason


# ----------------------------------------------------------------------------- GLUE


def test_classification_metrics_hand_computed():
    y = [1, 1, 1, 0, 0, 0]
    p = [1, 1, 0, 1, 0, 0]  # TP=2 FN=1 FP=1 TN=2
    assert M.accuracy(y, p) == pytest.approx(4 / 6)
    assert M.f1(y, p) == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    assert M.mcc(y, p) == pytest.approx((2 * 2 - 1 * 1) / math.sqrt(3 * 3 * 3 * 3))
    assert M.mcc([1, 0], [1, 1]) == 0.0  # a constant prediction has an undefined MCC -> 0
    assert M.f1([0, 0], [0, 0]) == 0.0


def test_classification_metrics_match_sklearn():
    rng = np.random.default_rng(0)
    y, p = rng.integers(0, 2, 50), rng.integers(0, 2, 50)
    assert M.f1(y, p) == pytest.approx(skm.f1_score(y, p))
    assert M.mcc(y, p) == pytest.approx(skm.matthews_corrcoef(y, p))
    y4, p4 = rng.integers(0, 4, 80), rng.integers(0, 4, 80)
    assert M.macro_f1(y4, p4) == pytest.approx(skm.f1_score(y4, p4, average="macro"))
    with pytest.raises(ValueError, match="3 labels vs 2 predictions"):
        M.accuracy([1, 0, 1], [1, 0])
