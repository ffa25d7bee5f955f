"""Load CounterFact and zsRE edit cases from JSON files into one normalised `EditCase` type.

Two on-disk layouts are understood for CounterFact (ROME's ``requested_rewrite`` records and the
MEND/EasyEdit flat records) and one for zsRE (MEND's ``src/alt/answers/...`` records). Small samples
ship in ``eval/data`` so the project runs without ``shared/data``; larger sets are only ever read from
a path the caller passes explicitly (``resolve_data_path``), never found by searching.
"""
from __future__ import annotations

import gzip
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, NoReturn, Sequence

__all__ = [
    "DataError",
    "EditCase",
    "Record",
    "cases_by_id",
    "default_data_path",
    "load_counterfact",
    "load_records",
    "load_zsre",
    "resolve_data_path",
]

DATA_DIR = Path(__file__).resolve().parent / "data"

# Samples that ship inside the package (see eval/data/PROVENANCE.md).
_SHIPPED: dict[str, str] = {
    "counterfact": "counterfact/counterfact_sample.json",
    "counterfact_mend": "counterfact/counterfact_mend_sample.json",
    "zsre": "zsre/zsre_mend_sample.json",
    "glue": "glue",
}

# Layout of a full data folder such as shared/data (see shared/data/README.md).
_FULL_LAYOUT: dict[str, str] = {
    "counterfact": "counterfact/counterfact.json.gz",
    "counterfact_mend": "counterfact/counterfact_mend.json.gz",
    "zsre": "zsre/zsre_mend_train_1k.json",
    "glue": "glue",
}


class DataError(ValueError):
    """A data file exists but its content is not what the loader expects."""


@dataclass(frozen=True)
class EditCase:
    """One knowledge edit plus the prompts that evaluate it, independent of the source format."""

    case_id: int
    subject: str
    prompt: str                      # full text, subject filled in
    target_new: str
    target_true: str
    rephrase_prompts: list[str]
    neighborhood_prompts: list[str]
    neighborhood_targets: list[str]  # the expected answer of each neighborhood prompt
    dataset: Literal["counterfact", "zsre"]
    attribute_prompts: list[str] = field(default_factory=list)   # CounterFact ROME format only
    generation_prompts: list[str] = field(default_factory=list)  # CounterFact ROME format only
    relation_id: str = ""            # CounterFact ROME format only (needed by consistency refs)
    target_new_id: str = ""          # CounterFact ROME format only (Wikidata id of target_new)

    def to_request(self) -> dict[str, Any]:
        """Return the request dict EasyEdit's editors take (``prompt`` is the full text).

        EasyEdit scores ``rephrase_prompt`` against the single ``target_new`` string, so it must be one
        string: the first rephrase is used. Locality prompts/answers are a string when there is one
        and parallel lists otherwise, as EasyEdit's own dataset classes produce.
        """
        def one_or_list(xs: list[str]) -> str | list[str]:
            return xs[0] if len(xs) == 1 else list(xs)

        request: dict[str, Any] = {
            "case_id": self.case_id,
            "prompt": self.prompt,
            "subject": self.subject,
            "target_new": self.target_new,
            "ground_truth": self.target_true,
            "rephrase_prompt": self.rephrase_prompts[0] if self.rephrase_prompts else None,
            "locality": {},
        }
        if self.neighborhood_prompts:
            request["locality"]["neighborhood"] = {
                "prompt": one_or_list(self.neighborhood_prompts),
                "ground_truth": one_or_list(self.neighborhood_targets),
            }
        return request


# ----------------------------------------------------------------------------- file access


def load_records(path: str | Path) -> list[Any]:
    """Read a JSON list from ``path`` (``.json`` or gzip-compressed ``.json.gz``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as fh:
            data = json.load(fh)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from exc
    except (OSError, UnicodeDecodeError, EOFError) as exc:  # truncated / not-gzip / wrong encoding
        raise DataError(f"{path}: cannot read: {exc}") from exc
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    return data


def default_data_path(name: str) -> Path:
    """Path of the sample shipped in ``eval/data`` for ``name`` (counterfact, counterfact_mend, zsre, glue)."""
    try:
        return DATA_DIR / _SHIPPED[name]
    except KeyError:
        raise KeyError(f"unknown data set {name!r}; shipped: {sorted(_SHIPPED)}") from None


def resolve_data_path(root: str | Path, name: str) -> Path:
    """Path of the full-size set ``name`` inside an explicitly given data folder laid out like ``shared/data``.

    Nothing is searched for: the caller names the folder (e.g. ``--data-dir ../shared/data``).
    """
    if name not in _FULL_LAYOUT:
        raise KeyError(f"unknown data set {name!r}; known: {sorted(_FULL_LAYOUT)}")
    path = Path(root) / _FULL_LAYOUT[name]
    if not path.exists():
        raise FileNotFoundError(f"{path}: not found (data set {name!r} under data folder {root})")
    return path


# ----------------------------------------------------------------------------- validation helpers


class Record:
    """Typed field access on one raw record; every problem becomes a DataError naming path, index and field."""

    def __init__(self, path: Path, index: int, raw: Any):
        self.path, self.index = path, index
        if not isinstance(raw, dict):
            self.fail(f"expected a JSON object, got {type(raw).__name__}")
        self.raw = raw

    def fail(self, message: str) -> NoReturn:
        raise DataError(f"{self.path}: record {self.index}: {message}")

    def get(self, dotted: str, default: Any = ...) -> Any:
        node: Any = self.raw
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                if default is not ...:
                    return default
                self.fail(f"missing field {dotted!r}")
            node = node[part]
        return node

    def str_(self, dotted: str, default: Any = ...) -> str:
        value = self.get(dotted, default)
        if not isinstance(value, str):
            self.fail(f"field {dotted!r} must be a string, got {type(value).__name__}")
        return value

    def int_(self, dotted: str) -> int:
        value = self.get(dotted)
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(f"field {dotted!r} must be an integer, got {type(value).__name__}")
        return value

    def str_list(self, dotted: str, default: Any = ..., *, allow_str: bool = False) -> list[str]:
        value = self.get(dotted, default)
        if allow_str and isinstance(value, str):
            return [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            self.fail(f"field {dotted!r} must be a list of strings")
        return list(value)


def _check_limit(limit: int | None) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit must be a non-negative integer or None, got {limit!r}")


# ----------------------------------------------------------------------------- CounterFact


def _counterfact_rome(rec: Record) -> EditCase:
    template = rec.str_("requested_rewrite.prompt")
    subject = rec.str_("requested_rewrite.subject")
    if "{}" not in template:
        rec.fail("field 'requested_rewrite.prompt' has no '{}' placeholder for the subject")
    target_true = rec.str_("requested_rewrite.target_true.str")
    neighborhood = rec.str_list("neighborhood_prompts")
    return EditCase(
        case_id=rec.int_("case_id"),
        subject=subject,
        prompt=template.format(subject),
        target_new=rec.str_("requested_rewrite.target_new.str"),
        target_true=target_true,
        rephrase_prompts=rec.str_list("paraphrase_prompts"),
        neighborhood_prompts=neighborhood,
        # ROME's neighborhood prompts are other subjects sharing the edited fact's TRUE object.
        neighborhood_targets=[target_true] * len(neighborhood),
        dataset="counterfact",
        attribute_prompts=rec.str_list("attribute_prompts", []),
        generation_prompts=rec.str_list("generation_prompts", []),
        relation_id=rec.str_("requested_rewrite.relation_id", ""),
        target_new_id=rec.str_("requested_rewrite.target_new.id", ""),
    )


def _counterfact_mend(rec: Record) -> EditCase:
    loc_prompts = rec.str_list("locality_prompt", allow_str=True)
    loc_answers = rec.str_list("locality_ground_truth", allow_str=True)
    if len(loc_answers) == 1 and len(loc_prompts) > 1:
        loc_answers = loc_answers * len(loc_prompts)
    if len(loc_answers) != len(loc_prompts):
        rec.fail(f"'locality_prompt' has {len(loc_prompts)} entries but 'locality_ground_truth' has {len(loc_answers)}")
    return EditCase(
        case_id=rec.int_("case_id"),
        subject=rec.str_("subject"),
        prompt=rec.str_("prompt"),
        target_new=rec.str_("target_new"),
        target_true=rec.str_("ground_truth"),
        rephrase_prompts=rec.str_list("rephrase_prompt", allow_str=True),
        neighborhood_prompts=loc_prompts,
        neighborhood_targets=loc_answers,
        dataset="counterfact",
    )


def load_counterfact(path: str | Path | None = None, limit: int | None = None) -> list[EditCase]:
    """Load CounterFact cases; the format (ROME ``requested_rewrite`` or MEND/EasyEdit) is detected from record 0.

    ``path=None`` loads the shipped 200-case ROME-format sample. ``limit`` keeps the first N records.
    """
    _check_limit(limit)
    path = Path(path) if path is not None else default_data_path("counterfact")
    raw = load_records(path)[:limit]
    if not raw:
        return []
    first = Record(path, 0, raw[0]).raw
    # One format per file: a record that does not match record 0's format is reported as missing fields.
    if "requested_rewrite" in first:
        convert = _counterfact_rome
    elif "prompt" in first and "target_new" in first:
        convert = _counterfact_mend
    else:
        raise DataError(
            f"{path}: record 0: unrecognised CounterFact format: expected 'requested_rewrite' (ROME) "
            f"or 'prompt'/'target_new'/'ground_truth' (MEND/EasyEdit); keys are {sorted(first)}"
        )
    return [convert(Record(path, i, r)) for i, r in enumerate(raw)]


# ----------------------------------------------------------------------------- zsRE


def _zsre(rec: Record) -> EditCase:
    src, subject = rec.str_("src"), rec.str_("subject")
    # ROME builds the edit template as src.replace(subject, "{}"), so the subject must be in src.
    if subject not in src:
        rec.fail(f"subject {subject!r} does not occur in field 'src' ({src!r})")
    answers = rec.str_list("answers")
    if not answers:
        rec.fail("field 'answers' is empty")
    return EditCase(
        case_id=rec.index,  # zsRE records carry no id; the position in the file is stable
        subject=subject,
        prompt=src,
        target_new=rec.str_("alt"),
        target_true=answers[0],
        rephrase_prompts=[rec.str_("rephrase")],
        # kept verbatim, including the "nq question: " prefix the MEND split uses
        neighborhood_prompts=[rec.str_("loc")],
        neighborhood_targets=[rec.str_("loc_ans")],
        dataset="zsre",
    )


def load_zsre(path: str | Path | None = None, limit: int | None = None) -> list[EditCase]:
    """Load zsRE cases in MEND format (``src, alt, answers, rephrase, loc, loc_ans, subject``).

    ``path=None`` loads the shipped 200-record sample. ``case_id`` is the record's index in the file.
    """
    _check_limit(limit)
    path = Path(path) if path is not None else default_data_path("zsre")
    raw = load_records(path)[:limit]
    return [_zsre(Record(path, i, r)) for i, r in enumerate(raw)]


def cases_by_id(cases: Sequence[EditCase]) -> Mapping[int, EditCase]:
    """Index cases by ``case_id``; duplicate ids are an error because results are keyed on them."""
    out: dict[int, EditCase] = {}
    for case in cases:
        if case.case_id in out:
            raise DataError(f"duplicate case_id {case.case_id} ({case.dataset})")
        out[case.case_id] = case
    return out
