"""GLUE probes: label conventions, seeded subsets, one batched pass, argmax choice, metrics, errors."""
import json
import re
from types import SimpleNamespace

import pytest
import torch

from revive_plugin.eval import glue
from revive_plugin.eval.glue import FEW_SHOT_POOL, TASKS, GlueProbe, relative_to
from revive_plugin.eval.scoring import score_continuations
from revive_plugin.eval.testing import tiny_llama, tiny_tokenizer

N = 16  # records per synthetic task: 10 few-shot pool + 6 test items


def _records(task):
    out = []
    for i in range(N):
        label = i % 2
        if task in ("sst2", "cola"):
            out.append({"sentence": f"film {i} good", "label": label, "idx": i})
        elif task in ("mrpc", "rte"):
            out.append({"sentence1": f"Paris {i}", "sentence2": f"France {i}", "label": label, "idx": i})
        elif task == "nli":
            out.append({"sentence1": f"Paris {i}", "sentence2": f"France {i}",
                        "label": ["entailment", "not_entailment"][label]})
        elif task == "mmlu":
            out.append({"question": f"Which {i}?", "subject": "x", "choices": ["a", "b", "c", "d"], "answer": i % 4})
    return out


@pytest.fixture(scope="module")
def glue_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("glue")
    for task in TASKS:
        (d / f"{task}.json").write_text(json.dumps(_records(task)))
    return d


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer(add_bos=True)


@pytest.fixture(scope="module")
def model():
    return tiny_llama(vocab_size=400, seed=1)


class PreferToken(torch.nn.Module):
    """Wraps a LM and adds a large logit to one token at every position: it 'answers' that word."""

    def __init__(self, inner, token_id):
        super().__init__()
        self.inner, self.token_id = inner, token_id

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        logits = self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
        logits = logits.clone()
        logits[..., self.token_id] += 100.0
        return SimpleNamespace(logits=logits)


def word_id(tok, word):
    ids = tok(" " + word, add_special_tokens=False)["input_ids"]
    assert len(ids) == 1, f"test precondition: {word!r} must be one token of the tiny tokenizer"
    return ids[0]


# ----------------------------------------------------------------------------- label conventions


def test_label_words_follow_glue_conventions():
    assert TASKS["sst2"].label_words == ("negative", "positive")  # 1 = positive
    assert TASKS["mrpc"].label_words == ("No", "Yes")             # 1 = paraphrase
    assert TASKS["cola"].label_words == ("No", "Yes")             # 1 = acceptable
    assert TASKS["rte"].label_words == ("True", "False")          # 0 = entailment (not AlphaEdit's inversion)
    assert TASKS["nli"].label_words == ("True", "False")          # entailment -> 0 -> True
    assert TASKS["mmlu"].label_words == ("A", "B", "C", "D")


def test_few_shot_examples_come_from_the_pool_with_correct_answers(glue_dir):
    probe = GlueProbe(["rte", "nli", "mmlu"], n_per_task=None, few_shot=3, data_dir=glue_dir)
    rte = probe.items["rte"][0].prompt
    # pool records 0, 1, 2 have labels 0 (entailment), 1, 0
    assert rte.startswith("Paris 0\nquestion: France 0 True or False?\nanswer: True\n"
                          "Paris 1\nquestion: France 1 True or False?\nanswer: False\n")
    assert rte.endswith("Paris 10\nquestion: France 10 True or False?\nanswer:")
    assert "Paris 0 entails the France 0 True or False? Answer: True\n" in probe.items["nli"][0].prompt
    assert probe.labels["nli"] == [0, 1, 0, 1, 0, 1]
    assert "(D) d\nAnswer: C\n" in probe.items["mmlu"][0].prompt  # record 2: answer 2 -> C
    assert len(probe.items["rte"]) == N - FEW_SHOT_POOL


def test_seeded_subset_is_fixed_and_excludes_pool(glue_dir):
    a = GlueProbe(["sst2", "cola"], n_per_task=3, seed=5, data_dir=glue_dir)
    b = GlueProbe(["cola", "sst2"], n_per_task=3, seed=5, data_dir=glue_dir)
    assert a.items["sst2"] == b.items["sst2"] and a.items["cola"] == b.items["cola"]
    picks = {tuple(it.prompt for it in GlueProbe(["sst2"], n_per_task=3, seed=s, data_dir=glue_dir).items["sst2"])
             for s in range(6)}
    assert len(picks) > 1  # the seed matters
    for prompts in picks:
        assert all(int(re.search(r"film (\d+) good", p).group(1)) >= FEW_SHOT_POOL for p in prompts)


# ----------------------------------------------------------------------------- scoring


def test_predictions_are_the_argmax_label_word(glue_dir, tok, model):
    probe = GlueProbe(["sst2", "mmlu"], n_per_task=4, seed=0, data_dir=glue_dir)
    preds = probe.predict(model, tok, batch_size=5)
    for task in ("sst2", "mmlu"):
        words = TASKS[task].label_words
        for item, pred in zip(probe.items[task], preds[task]):
            single = [score_continuations(model, tok, [item.prompt], [w])[0].mean_logprob for w in words]
            assert pred == max(range(len(words)), key=single.__getitem__)


@pytest.mark.parametrize("task,word,predicted", [
    ("rte", "True", 0), ("rte", "False", 1), ("nli", "True", 0),
    ("cola", "Yes", 1), ("mrpc", "No", 0), ("mmlu", "C", 2),
])
def test_label_word_maps_to_label_id(glue_dir, tok, model, task, word, predicted):
    probe = GlueProbe([task], n_per_task=None, data_dir=glue_dir)
    biased = PreferToken(model, word_id(tok, word))
    assert probe.predict(biased, tok)[task] == [predicted] * (N - FEW_SHOT_POOL)


def test_evaluate_metrics(glue_dir, tok, model):
    probe = GlueProbe(["cola", "rte", "mmlu"], n_per_task=None, data_dir=glue_dir)
    res = probe.evaluate(PreferToken(model, word_id(tok, "Yes")), tok)
    # cola labels 0,1,0,1,0,1 ; always "Yes" (1): acc 1/2, F1 = 2*3/(2*3+3), MCC undefined -> 0
    assert res["cola"] == pytest.approx({"accuracy": 0.5, "f1": 2 / 3, "mcc": 0.0})
    assert set(res["rte"]) == {"accuracy", "f1", "mcc"} and set(res["mmlu"]) == {"accuracy", "f1"}


def test_one_batched_scoring_pass_for_all_tasks(glue_dir, tok, model, monkeypatch):
    calls = []

    def counting(*args, **kwargs):
        calls.append(len(args[2]))
        return score_continuations(*args, **kwargs)

    monkeypatch.setattr(glue, "score_continuations", counting)
    GlueProbe(["sst2", "rte", "mmlu"], n_per_task=2, data_dir=glue_dir).predict(model, tok)
    assert calls == [2 * 2 + 2 * 2 + 2 * 4]


# ----------------------------------------------------------------------------- data and errors


def test_shipped_tasks_build_without_data_dir():
    probe = GlueProbe(n_per_task=5, few_shot=1)
    assert probe.tasks == ("sst2", "mrpc", "cola", "rte")
    assert all(len(items) == 5 for items in probe.items.values())


def test_unshipped_task_error_names_path_and_flag():
    with pytest.raises(FileNotFoundError, match=r"mmlu.json not found .*--glue-dir"):
        GlueProbe(["mmlu"])


def test_argument_and_record_errors(glue_dir, tmp_path):
    with pytest.raises(ValueError, match="unknown GLUE task"):
        GlueProbe(["squad"], data_dir=glue_dir)
    with pytest.raises(ValueError, match="few_shot must be in 0..10"):
        GlueProbe(["sst2"], few_shot=11, data_dir=glue_dir)
    bad = _records("rte")
    bad[12]["label"] = 2
    (tmp_path / "rte.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"rte.json: record 12: field 'label' must be an integer in 0..1"):
        GlueProbe(["rte"], n_per_task=None, data_dir=tmp_path)


def test_relative_to():
    base = {"cola": {"accuracy": 0.8, "mcc": 0.0}}
    cur = {"cola": {"accuracy": 0.6, "mcc": -0.1}}
    ratio = relative_to(base, cur)
    assert ratio["cola"]["accuracy"] == pytest.approx(0.75)
    assert ratio["cola"]["mcc"] != ratio["cola"]["mcc"]  # NaN for a zero baseline
    assert relative_to(base, cur, mode="diff")["cola"] == pytest.approx({"accuracy": -0.2, "mcc": -0.1})
    with pytest.raises(KeyError, match="sst2"):
        relative_to(base, {"sst2": {"accuracy": 1.0}})


# ----------------------------------------------------------------------------- the full protocol

PROTOCOL_TASKS = ["sst2", "mrpc", "cola", "rte", "mmlu", "nli"]
BINARY = ["sst2", "mrpc", "cola", "rte", "nli"]
RECORDS = 30  # 10 few-shot pool + 20 test records per task


def _protocol_records(task):
    """Records whose text names their own index ("item 17"), so a prompt tells which record it came from."""
    out = []
    for i in range(RECORDS):
        label = (i * 7 + len(task)) % 2
        if task in ("sst2", "cola"):
            out.append({"sentence": f"item {i} film", "label": label})
        elif task in ("mrpc", "rte"):
            out.append({"sentence1": f"item {i} Paris", "sentence2": "France", "label": label})
        elif task == "nli":
            out.append({"sentence1": f"item {i} Paris", "sentence2": "France",
                        "label": ["entailment", "not_entailment"][label]})
        else:
            out.append({"question": f"item {i} which?", "choices": ["a", "b", "c", "d"], "answer": (i * 3) % 4})
    return out


class PrefixBag(torch.nn.Module):
    """Stub LM: the logits at position t are Σ_{s ≤ t} E[x_s] over unmasked tokens, so the label word's
    log-probability depends on the whole prompt (and predictions differ between items) but not on padding."""

    def __init__(self, vocab, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.emb = torch.nn.Parameter(3.0 * torch.randn(vocab, vocab, generator=g), requires_grad=False)

    def forward(self, input_ids, attention_mask=None):
        e = self.emb[input_ids]
        if attention_mask is not None:
            e = e * attention_mask[..., None]
        return SimpleNamespace(logits=e.cumsum(1))


def _confusion(y, p):
    tp = sum(a == 1 and b == 1 for a, b in zip(y, p))
    tn = sum(a == 0 and b == 0 for a, b in zip(y, p))
    fp = sum(a == 0 and b == 1 for a, b in zip(y, p))
    fn = sum(a == 1 and b == 0 for a, b in zip(y, p))
    return tp, tn, fp, fn


def _by_hand(y, p, classes):
    acc = sum(a == b for a, b in zip(y, p)) / len(y)
    if classes > 2:  # macro F1 over the classes present in y or p
        f1s = []
        for c in sorted(set(y) | set(p)):
            tp = sum(a == c and b == c for a, b in zip(y, p))
            fp = sum(a != c and b == c for a, b in zip(y, p))
            fn = sum(a == c and b != c for a, b in zip(y, p))
            f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
        return {"accuracy": acc, "f1": sum(f1s) / len(f1s)}
    tp, tn, fp, fn = _confusion(y, p)
    denom = ((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)) ** 0.5
    return {"accuracy": acc, "f1": 2 * tp / (2 * tp + fp + fn) if tp else 0.0,
            "mcc": (tp * tn - fp * fn) / denom if denom else 0.0}


@pytest.fixture(scope="module")
def protocol_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("glue-protocol")
    for task in PROTOCOL_TASKS:
        (d / f"{task}.json").write_text(json.dumps(_protocol_records(task)))
    return d


def test_alphaedit_protocol_on_all_six_tasks(protocol_dir, tok):
    n = 7
    probe = GlueProbe(tasks=PROTOCOL_TASKS, n_per_task=n, few_shot=0, data_dir=protocol_dir)
    records = {t: _protocol_records(t) for t in PROTOCOL_TASKS}
    for task in PROTOCOL_TASKS:
        items = probe.items[task]
        assert len(items) == n
        # Test items only from records[10:], each once, gold labels from those records.
        idx = [int(re.search(r"item (\d+)", it.prompt).group(1)) for it in items]
        assert len(set(idx)) == n and min(idx) >= FEW_SHOT_POOL
        raw = [records[task][i] for i in idx]
        gold = ([r["answer"] for r in raw] if task == "mmlu" else
                [{"entailment": 0, "not_entailment": 1}[r["label"]] for r in raw] if task == "nli" else
                [r["label"] for r in raw])
        assert probe.labels[task] == gold
        assert "item 0 " not in items[0].prompt  # few_shot=0: no pool example in the prompt

    model = PrefixBag(len(tok), seed=2)
    preds = probe.predict(model, tok, batch_size=6)
    # Prediction = the label word with the highest mean per-token log-probability after the prompt.
    for task in PROTOCOL_TASKS:
        words = TASKS[task].label_words
        for item, pred in zip(probe.items[task], preds[task]):
            single = [score_continuations(model, tok, [item.prompt], [w])[0].mean_logprob for w in words]
            assert pred == max(range(len(words)), key=single.__getitem__)
    assert any(len(set(preds[t])) > 1 for t in BINARY), "test precondition: predictions must not be constant"

    res = probe.evaluate(model, tok, batch_size=6)
    assert set(res) == set(PROTOCOL_TASKS)
    for task in BINARY:
        assert set(res[task]) == {"accuracy", "f1", "mcc"}
        assert res[task] == pytest.approx(_by_hand(probe.labels[task], preds[task], 2), abs=1e-12)
    assert set(res["mmlu"]) == {"accuracy", "f1"}
    assert res["mmlu"] == pytest.approx(_by_hand(probe.labels["mmlu"], preds["mmlu"], 4), abs=1e-12)
    # At least one MCC is a real, non-trivial value (not the 0 of a constant prediction).
    assert any(abs(res[t]["mcc"]) > 1e-9 for t in BINARY)
