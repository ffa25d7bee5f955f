"""General-ability probes (GLUE-style tasks and MMLU) scored by comparing label-word log-probabilities.

Follows AlphaEdit's ``glue_eval``: the first 10 records of each task file are the few-shot pool, the
rest are test items; each item's prompt ends with an answer cue and the prediction is the label word
with the highest mean per-token log-probability after it. Unlike AlphaEdit, all (prompt, label word)
pairs of all tasks go through ONE batched scoring pass, the test subset is a seeded sample fixed at
construction (identical at every checkpoint), and RTE keeps GLUE's labels (0 = entailment is answered
"True"; AlphaEdit's prompt writes it as "False").
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from .datasets import DataError, Record, default_data_path, load_records
from .metrics import accuracy, f1, macro_f1, mcc
from .scoring import score_continuations

__all__ = ["FEW_SHOT_POOL", "GlueProbe", "GlueTask", "SHIPPED_TASKS", "TASKS", "relative_to"]

FEW_SHOT_POOL = 10  # AlphaEdit: records[:10] are few-shot examples, records[10:] are test items
SHIPPED_TASKS = ("sst2", "mrpc", "cola", "rte")


@dataclass(frozen=True)
class GlueTask:
    """How to turn one task's records into prompts, label ids and label words."""

    name: str
    filename: str
    label_words: tuple[str, ...]              # label_words[label_id] is the answer scored after the cue
    fields: tuple[str, ...]                   # required string fields
    question: Callable[[Record], str]        # prompt text ending with the answer cue
    label_id: Callable[[Record], int]
    # AlphaEdit's protocol reports F1 and MCC; MCC (positive = label 1) is defined for the binary tasks only.
    metrics: tuple[str, ...] = ("accuracy", "f1", "mcc")

    def example(self, rec: Record) -> str:
        """A solved example for the few-shot context."""
        return f"{self.question(rec)} {self.label_words[self.label_id(rec)]}\n"


def _int_label(n: int) -> Callable[[Record], int]:
    def get(rec: Record) -> int:
        value = rec.get("label")
        if isinstance(value, bool) or value not in range(n):
            rec.fail(f"field 'label' must be an integer in 0..{n - 1}, got {value!r}")
        return value
    return get


def _mmlu_label(rec: Record) -> int:
    value = rec.get("answer")
    if isinstance(value, bool) or value not in range(4):
        rec.fail(f"field 'answer' must be an integer in 0..3, got {value!r}")
    return value


def _nli_label(rec: Record) -> int:
    # GLUE RTE ids: 0 = entailment, 1 = not_entailment (the same convention as the rte task here).
    value = rec.get("label")
    ids = {"entailment": 0, "not_entailment": 1}
    if value not in ids:
        rec.fail(f"field 'label' must be 'entailment' or 'not_entailment', got {value!r}")
    return ids[value]


def _mmlu_question(rec: Record) -> str:
    choices = rec.str_list("choices")
    if len(choices) != 4:
        rec.fail(f"field 'choices' must have 4 entries, got {len(choices)}")
    options = "".join(f"({letter}) {text}\n" for letter, text in zip("ABCD", choices))
    return f"Question: {rec.str_('question')}\n{options}Answer:"


TASKS: dict[str, GlueTask] = {
    t.name: t
    for t in (
        GlueTask(  # label 1 = positive
            "sst2", "sst2.json", ("negative", "positive"), ("sentence",),
            lambda r: f"Review : {r.str_('sentence')}\nSentiment :", _int_label(2),
        ),
        GlueTask(  # label 1 = paraphrase (equivalent)
            "mrpc", "mrpc.json", ("No", "Yes"), ("sentence1", "sentence2"),
            lambda r: "Are the sentences paraphrases of each other.\n"
                      f"Sentence 1: {r.str_('sentence1')}\nSentence 2: {r.str_('sentence2')}\nAnswer:",
            _int_label(2),
        ),
        GlueTask(  # label 1 = acceptable
            "cola", "cola.json", ("No", "Yes"), ("sentence",),
            lambda r: f"Is this sentence linguistically acceptable?\nSentence: {r.str_('sentence')}\nAnswer:",
            _int_label(2),
        ),
        GlueTask(  # GLUE: 0 = entailment -> "True", 1 = not_entailment -> "False"
            "rte", "rte.json", ("True", "False"), ("sentence1", "sentence2"),
            lambda r: f"{r.str_('sentence1')}\nquestion: {r.str_('sentence2')} True or False?\nanswer:",
            _int_label(2),
        ),
        GlueTask(  # answer index 0..3 -> A..D; F1 is macro over the four letters; no MCC (not binary)
            "mmlu", "mmlu.json", ("A", "B", "C", "D"), ("question",), _mmlu_question, _mmlu_label,
            ("accuracy", "f1"),
        ),
        GlueTask(  # string labels, mapped to GLUE ids: entailment 0 -> "True", not_entailment 1 -> "False"
            "nli", "nli.json", ("True", "False"), ("sentence1", "sentence2"),
            lambda r: f"{r.str_('sentence1')} entails the {r.str_('sentence2')} True or False? Answer:",
            _nli_label,
        ),
    )
}


@dataclass(frozen=True)
class _Item:
    prompt: str
    label: int


class GlueProbe:
    """A fixed, seeded set of probe items per task, evaluated on any model/tokenizer in one scoring pass.

    ``few_shot`` solved examples (taken in order from each task's first 10 records) precede every
    test prompt. ``n_per_task`` test items are drawn without replacement from records[10:] with a
    seed derived from (seed, task), so adding a task does not change another task's subset; ``None``
    or a number larger than the test set takes all of them. ``data_dir=None`` reads the shipped
    sst2/mrpc/cola/rte files; mmlu and nli need a ``data_dir`` that has them.
    """

    def __init__(
        self,
        tasks: Sequence[str] = SHIPPED_TASKS,
        n_per_task: int | None = 100,
        seed: int = 0,
        few_shot: int = 0,
        data_dir: str | Path | None = None,
    ):
        unknown = [t for t in tasks if t not in TASKS]
        if unknown:
            raise ValueError(f"unknown GLUE task(s) {unknown}; known: {sorted(TASKS)}")
        if not tasks:
            raise ValueError("no GLUE tasks given")
        if not 0 <= few_shot <= FEW_SHOT_POOL:
            raise ValueError(f"few_shot must be in 0..{FEW_SHOT_POOL} (the few-shot pool size), got {few_shot}")
        if n_per_task is not None and n_per_task < 1:
            raise ValueError(f"n_per_task must be >= 1 or None, got {n_per_task}")
        self.tasks = tuple(dict.fromkeys(tasks))
        self.n_per_task, self.seed, self.few_shot = n_per_task, seed, few_shot
        self.data_dir = Path(data_dir) if data_dir is not None else default_data_path("glue")
        self.items: dict[str, list[_Item]] = {t: self._build(TASKS[t]) for t in self.tasks}

    def _path(self, task: GlueTask) -> Path:
        path = self.data_dir / task.filename
        if not path.is_file():
            shipped = "" if task.name in SHIPPED_TASKS else f" (only {', '.join(SHIPPED_TASKS)} ship with the package)"
            raise FileNotFoundError(
                f"GLUE task {task.name!r}: {path} not found{shipped}; pass --glue-dir pointing at a folder "
                f"that contains {task.filename} (e.g. shared/data/glue)"
            )
        return path

    def _build(self, task: GlueTask) -> list[_Item]:
        path = self._path(task)
        raw = load_records(path)
        if len(raw) <= FEW_SHOT_POOL:
            raise DataError(f"{path}: {len(raw)} records; need more than the {FEW_SHOT_POOL}-record few-shot pool")

        def rec(i: int) -> Record:
            r = Record(path, i, raw[i])
            for name in task.fields:
                r.str_(name)
            return r

        context = "".join(task.example(rec(i)) for i in range(self.few_shot))
        test = range(FEW_SHOT_POOL, len(raw))
        if self.n_per_task is not None and self.n_per_task < len(test):
            # String seeding is stable across processes and Python versions (random's version-2 seeding).
            test = sorted(random.Random(f"{self.seed}:{task.name}").sample(test, self.n_per_task))
        items = []
        for i in test:
            r = rec(i)
            items.append(_Item(context + task.question(r), task.label_id(r)))
        return items

    @property
    def labels(self) -> dict[str, list[int]]:
        """Gold label ids of the selected items, per task."""
        return {t: [it.label for it in items] for t, items in self.items.items()}

    def predict(self, model: torch.nn.Module, tok: Any, batch_size: int = 16) -> dict[str, list[int]]:
        """Predicted label ids per task: argmax over label words of the mean per-token log-probability."""
        prompts, words, owners = [], [], []
        for t in self.tasks:
            for k, item in enumerate(self.items[t]):
                for word in TASKS[t].label_words:
                    prompts.append(item.prompt)
                    words.append(word)
                owners.append((t, k))
        scores = score_continuations(model, tok, prompts, words, batch_size=batch_size, progress="GLUE probes")
        preds: dict[str, list[int]] = {t: [] for t in self.tasks}
        pos = 0
        for t, _ in owners:
            n = len(TASKS[t].label_words)
            chunk = [s.mean_logprob for s in scores[pos:pos + n]]
            preds[t].append(max(range(n), key=chunk.__getitem__))  # ties: first label word, deterministic
            pos += n
        return preds

    def evaluate(self, model: torch.nn.Module, tok: Any, batch_size: int = 16) -> dict[str, dict[str, float]]:
        """Per task ``{"accuracy", "f1", "mcc"}``: binary tasks (sst2, mrpc, cola, rte, nli) have F1 and MCC
        with positive class = label id 1 (AlphaEdit's protocol reports both); mmlu (4 classes) has accuracy
        and macro F1 over the four letters, no MCC."""
        preds = self.predict(model, tok, batch_size=batch_size)
        out: dict[str, dict[str, float]] = {}
        for t in self.tasks:
            y, p = self.labels[t], preds[t]
            res = {"accuracy": accuracy(y, p)}
            res["f1"] = macro_f1(y, p) if len(TASKS[t].label_words) > 2 else f1(y, p, positive=1)
            if "mcc" in TASKS[t].metrics:
                res["mcc"] = mcc(y, p, positive=1)
            out[t] = res
        return out


def relative_to(
    base: Mapping[str, Mapping[str, float]], cur: Mapping[str, Mapping[str, float]], mode: str = "ratio"
) -> dict[str, dict[str, float]]:
    """Each metric of ``cur`` relative to ``base``: ``cur / base`` (``mode="ratio"``; NaN if base is 0)
    or ``cur - base`` (``mode="diff"``, better for MCC, which can be 0 or negative)."""
    if mode not in ("ratio", "diff"):
        raise ValueError(f"mode must be 'ratio' or 'diff', got {mode!r}")
    out: dict[str, dict[str, float]] = {}
    for task, metrics in cur.items():
        if task not in base:
            raise KeyError(f"task {task!r} has no baseline")
        out[task] = {}
        for name, value in metrics.items():
            if name not in base[task]:
                raise KeyError(f"metric {task}/{name} has no baseline")
            b = base[task][name]
            if mode == "diff":
                out[task][name] = value - b
            else:
                out[task][name] = value / b if b else float("nan")
    return out
