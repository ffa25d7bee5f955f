"""Perplexity against a hand computation on a tiny random LLaMA: token weighting, batching, truncation, errors."""
import json
import math

import pytest
import torch

from revive_plugin.eval.perplexity import load_sentences, perplexity
from revive_plugin.eval.testing import tiny_llama, tiny_tokenizer

TEXTS = [
    "The capital of France is Paris.",
    "Review : a dull and boring mess",
    "English is spoken in England and Microsoft developed Windows for many years.",
    "Rome",
]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer(add_bos=True)


@pytest.fixture(scope="module")
def model(tok):
    return tiny_llama(vocab_size=len(tok), seed=3)


def by_hand(model, tok, texts, max_tokens=128):
    """Each sentence alone (no padding), Σ −log p(x_t | x_<t) over t = 1..n−1, pooled over all tokens."""
    nll, count = 0.0, 0
    for text in texts:
        ids = tok(text)["input_ids"][:max_tokens]
        if len(ids) < 2:
            continue
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
        nll -= sum(float(logp[t - 1, ids[t]]) for t in range(1, len(ids)))
        count += len(ids) - 1
    return math.exp(nll / count), nll / count, count


def test_matches_hand_computation_and_is_token_weighted(model, tok):
    ppl, nll, count = by_hand(model, tok, TEXTS)
    out = perplexity(model, tok, TEXTS, batch_size=1)
    assert out["ppl_tokens"] == count == sum(len(tok(t)["input_ids"]) - 1 for t in TEXTS)
    assert out["ppl_nll"] == pytest.approx(nll, rel=1e-5)
    assert out["ppl"] == pytest.approx(ppl, rel=1e-5)
    # Token-weighted, not the mean of per-sentence perplexities (they differ for sentences of unequal length).
    per_sentence = [by_hand(model, tok, [t])[0] for t in TEXTS]
    assert out["ppl"] != pytest.approx(sum(per_sentence) / len(per_sentence), rel=1e-3)


@pytest.mark.parametrize("batch_size", [2, 3, 8])
def test_batching_and_padding_do_not_change_it(model, tok, batch_size):
    ref = perplexity(model, tok, TEXTS, batch_size=1)
    out = perplexity(model, tok, TEXTS, batch_size=batch_size)
    assert out["ppl_tokens"] == ref["ppl_tokens"]
    assert out["ppl"] == pytest.approx(ref["ppl"], rel=1e-5)


def test_max_tokens_truncates_each_sentence(model, tok):
    ppl, _, count = by_hand(model, tok, TEXTS, max_tokens=5)
    out = perplexity(model, tok, TEXTS, batch_size=4, max_tokens=5)
    assert out["ppl_tokens"] == count == sum(min(len(tok(t)["input_ids"]), 5) - 1 for t in TEXTS)
    assert out["ppl"] == pytest.approx(ppl, rel=1e-5)
    assert out["ppl"] != pytest.approx(perplexity(model, tok, TEXTS, batch_size=4)["ppl"], rel=1e-3)


def test_sentences_of_one_token_are_skipped_and_no_usable_text_is_an_error(model, tok):
    assert len(tok("")["input_ids"]) == 1  # only BOS: nothing to predict
    with_empty = perplexity(model, tok, ["", *TEXTS], batch_size=3)
    assert with_empty == pytest.approx(perplexity(model, tok, TEXTS, batch_size=3), rel=1e-6)
    with pytest.raises(ValueError, match="two or more tokens"):
        perplexity(model, tok, ["", ""])
    with pytest.raises(ValueError, match="two or more tokens"):
        perplexity(model, tok, [])


def test_restores_training_mode(model, tok):
    model.train()
    try:
        perplexity(model, tok, TEXTS[:1])
        assert model.training
    finally:
        model.eval()


def test_load_sentences_formats_and_errors(tmp_path):
    good = tmp_path / "ok.json"
    good.write_text(json.dumps([{"Text": "a b"}, "c d", {"Text": "e f"}]))
    assert load_sentences(good) == ["a b", "c d", "e f"]
    assert load_sentences(good, limit=2) == ["a b", "c d"]
    assert len(load_sentences()) == 200  # the shipped ME-PPL sample
    with pytest.raises(FileNotFoundError, match="not found"):
        load_sentences(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_sentences(bad)
    bad.write_text(json.dumps([{"Text": ""}]))
    with pytest.raises(ValueError, match="non-empty list"):
        load_sentences(bad)
