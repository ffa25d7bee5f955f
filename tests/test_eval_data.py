"""Loaders: shipped samples, both CounterFact formats, zsRE, EasyEdit requests, and the error messages."""
import copy
import gzip
import json

import pytest

from revive_plugin.eval.datasets import (
    DataError,
    EditCase,
    cases_by_id,
    default_data_path,
    load_counterfact,
    load_records,
    load_zsre,
    resolve_data_path,
)

ROME = {
    "case_id": 7,
    "pararel_idx": 1,
    "requested_rewrite": {
        "prompt": "The mother tongue of {} is",
        "relation_id": "P103",
        "target_new": {"str": "English", "id": "Q1860"},
        "target_true": {"str": "French", "id": "Q150"},
        "subject": "Danielle Darrieux",
    },
    "paraphrase_prompts": ["Danielle Darrieux, a native", "Danielle Darrieux spoke the language"],
    "neighborhood_prompts": ["The mother tongue of Léon Blum is", "Montesquieu, a native"],
    "attribute_prompts": ["Douglas Adams, speaker of"],
    "generation_prompts": ["Danielle Darrieux was born in"],
}
MEND = {
    "case_id": 7,
    "prompt": "The mother tongue of Danielle Darrieux is",
    "target_new": "English",
    "subject": "Danielle Darrieux",
    "ground_truth": "French",
    "rephrase_prompt": "Where Danielle Darrieux is from, people speak the language of",
    "locality_prompt": "Michel Rocard is a native speaker of",
    "locality_ground_truth": "French",
}
ZSRE = {
    "subject": "UniFirst",
    "src": "What is the product made by UniFirst?",
    "pred": "uniform",
    "rephrase": "What will be the product of UniFirst?",
    "alt": "unmanned aircraft",
    "answers": ["uniform", "uniforms"],
    "loc": "nq question: john goodman's character in the big lebowski",
    "loc_ans": "Walter Sobchak",
    "cond": "uniform >> unmanned aircraft || What is the product made by UniFirst?",
}


def write(tmp_path, name, records):
    path = tmp_path / name
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- shipped samples


def test_shipped_samples_load_and_agree_across_formats():
    rome, mend, zsre = load_counterfact(), load_counterfact(default_data_path("counterfact_mend")), load_zsre()
    assert len(rome) == len(mend) == len(zsre) == 200
    assert [c.case_id for c in rome] == [c.case_id for c in mend]
    for a, b in zip(rome, mend):
        assert (a.prompt, a.subject, a.target_new, a.target_true) == (b.prompt, b.subject, b.target_new, b.target_true)
        assert b.neighborhood_prompts[0] in a.neighborhood_prompts  # PROVENANCE cross-check
    first = rome[0]
    assert first.prompt == "The mother tongue of Danielle Darrieux is"
    assert (first.target_new, first.target_true) == ("English", "French")
    assert len(first.rephrase_prompts) == 2 and len(first.neighborhood_prompts) == 10
    assert first.neighborhood_targets == ["French"] * 10
    assert len(first.attribute_prompts) == len(first.generation_prompts) == 10
    assert all(c.dataset == "zsre" and c.subject in c.prompt for c in zsre)
    assert len(cases_by_id(rome)) == 200


def test_shipped_glue_files_have_200_balanced_records():
    for task in ("sst2", "mrpc", "cola", "rte"):
        records = load_records(default_data_path("glue") / f"{task}.json")
        assert len(records) == 200
        assert sorted({r["label"] for r in records}) == [0, 1]


def test_limit():
    assert [c.case_id for c in load_counterfact(limit=3)] == [0, 13, 14]
    assert len(load_zsre(limit=0)) == 0
    with pytest.raises(ValueError, match="limit"):
        load_zsre(limit=-1)


# ----------------------------------------------------------------------------- normalisation


def test_rome_record_normalised(tmp_path):
    (case,) = load_counterfact(write(tmp_path, "cf.json", [ROME]))
    assert case == EditCase(
        case_id=7,
        subject="Danielle Darrieux",
        prompt="The mother tongue of Danielle Darrieux is",
        target_new="English",
        target_true="French",
        rephrase_prompts=ROME["paraphrase_prompts"],
        neighborhood_prompts=ROME["neighborhood_prompts"],
        neighborhood_targets=["French", "French"],
        dataset="counterfact",
        attribute_prompts=ROME["attribute_prompts"],
        generation_prompts=ROME["generation_prompts"],
        relation_id="P103",
        target_new_id="Q1860",
    )
    req = case.to_request()
    assert req == {
        "case_id": 7,
        "prompt": "The mother tongue of Danielle Darrieux is",
        "subject": "Danielle Darrieux",
        "target_new": "English",
        "ground_truth": "French",
        "rephrase_prompt": "Danielle Darrieux, a native",
        "locality": {"neighborhood": {"prompt": ROME["neighborhood_prompts"], "ground_truth": ["French", "French"]}},
    }


def test_mend_record_normalised(tmp_path):
    (case,) = load_counterfact(write(tmp_path, "cf.json", [MEND]))
    assert case.prompt == MEND["prompt"] and case.target_true == "French"
    assert case.rephrase_prompts == [MEND["rephrase_prompt"]]
    assert case.neighborhood_prompts == [MEND["locality_prompt"]]
    assert case.neighborhood_targets == ["French"]
    assert case.attribute_prompts == [] and case.generation_prompts == []
    assert case.to_request()["locality"] == {
        "neighborhood": {"prompt": MEND["locality_prompt"], "ground_truth": "French"}
    }


def test_zsre_record_normalised(tmp_path):
    (case,) = load_zsre(write(tmp_path, "z.json", [ZSRE]))
    assert (case.case_id, case.prompt, case.target_new, case.target_true) == (
        0, ZSRE["src"], "unmanned aircraft", "uniform")
    assert case.rephrase_prompts == [ZSRE["rephrase"]]
    assert case.neighborhood_prompts == [ZSRE["loc"]]  # "nq question: " prefix kept
    assert case.neighborhood_targets == ["Walter Sobchak"]
    assert case.dataset == "zsre"


def test_gzip_records(tmp_path):
    path = tmp_path / "cf.json.gz"
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        json.dump([MEND, dict(MEND, case_id=8)], fh)
    assert [c.case_id for c in load_counterfact(path)] == [7, 8]


# ----------------------------------------------------------------------------- errors


def test_missing_file_names_path(tmp_path):
    path = tmp_path / "nope.json"
    with pytest.raises(FileNotFoundError, match="nope.json: file not found"):
        load_counterfact(path)


def test_bad_json_names_path_and_position(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n{"case_id": 1,}\n]')
    with pytest.raises(DataError, match=r"bad.json: invalid JSON at line 2"):
        load_records(path)


def test_not_a_list(tmp_path):
    with pytest.raises(DataError, match="expected a JSON list of records, got dict"):
        load_records(write(tmp_path, "d.json", {"a": 1}))


def test_missing_nested_field_names_record_index(tmp_path):
    broken = copy.deepcopy(ROME)
    del broken["requested_rewrite"]["subject"]
    path = write(tmp_path, "counterfact.json", [ROME, ROME, broken])
    with pytest.raises(DataError, match=r"counterfact.json: record 2: missing field 'requested_rewrite.subject'"):
        load_counterfact(path)


def test_wrong_type_and_missing_mend_field(tmp_path):
    with pytest.raises(DataError, match=r"record 1: field 'target_new' must be a string, got int"):
        load_counterfact(write(tmp_path, "a.json", [MEND, dict(MEND, target_new=3)]))
    no_gt = {k: v for k, v in MEND.items() if k != "ground_truth"}
    with pytest.raises(DataError, match=r"record 0: missing field 'ground_truth'"):
        load_counterfact(write(tmp_path, "b.json", [no_gt]))


def test_format_detected_from_first_record(tmp_path):
    with pytest.raises(DataError, match="record 1: missing field 'requested_rewrite"):
        load_counterfact(write(tmp_path, "mixed.json", [ROME, MEND]))
    with pytest.raises(DataError, match="unrecognised CounterFact format"):
        load_counterfact(write(tmp_path, "z.json", [ZSRE]))


def test_rome_prompt_needs_placeholder(tmp_path):
    broken = copy.deepcopy(ROME)
    broken["requested_rewrite"]["prompt"] = "The mother tongue is"
    with pytest.raises(DataError, match=r"record 0: .*no '\{\}' placeholder"):
        load_counterfact(write(tmp_path, "cf.json", [broken]))


def test_zsre_subject_must_be_in_src(tmp_path):
    path = write(tmp_path, "z.json", [ZSRE, dict(ZSRE, subject="Acme")])
    with pytest.raises(DataError, match=r"z.json: record 1: subject 'Acme' does not occur in field 'src'"):
        load_zsre(path)
    with pytest.raises(DataError, match=r"record 0: field 'answers' is empty"):
        load_zsre(write(tmp_path, "e.json", [dict(ZSRE, answers=[])]))


def test_duplicate_case_ids(tmp_path):
    cases = load_counterfact(write(tmp_path, "cf.json", [MEND, MEND]))
    with pytest.raises(DataError, match="duplicate case_id 7"):
        cases_by_id(cases)


# ----------------------------------------------------------------------------- paths


def test_paths(tmp_path):
    assert default_data_path("zsre").is_file()
    with pytest.raises(KeyError, match="unknown data set 'wiki'"):
        default_data_path("wiki")
    (tmp_path / "zsre").mkdir()
    (tmp_path / "zsre" / "zsre_mend_train_1k.json").write_text("[]")
    assert resolve_data_path(tmp_path, "zsre") == tmp_path / "zsre" / "zsre_mend_train_1k.json"
    with pytest.raises(FileNotFoundError, match="counterfact.json.gz: not found"):
        resolve_data_path(tmp_path, "counterfact")
