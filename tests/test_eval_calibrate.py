"""`revive calibrate` on a tiny LLaMA: held-out records, one z optimisation per batch, weights restored per point."""
import json

import pytest
import yaml

from revive_plugin.adapters import batched_z, easyedit
from revive_plugin.eval.calibrate import calibrate, heldout_cases, parse_grid, report
from revive_plugin.eval.datasets import load_counterfact
from revive_plugin.eval.harness import RunConfig, ordered_cases

from test_eval_harness import TINY_MEMIT


def calibration_config(tmp_path, hparams: dict, **extra) -> RunConfig:
    """A run config for ``hparams`` on a data file whose records are not the shipped sample's (new case ids),
    plus 2 shipped ones."""
    hp = tmp_path / "tiny.yaml"
    hp.write_text(yaml.safe_dump(hparams))
    shipped = json.loads((load_counterfact.__globals__["DATA_DIR"] / "counterfact/counterfact_sample.json").read_text())
    records = [dict(r, case_id=100000 + i) for i, r in enumerate(shipped[:8])] + shipped[8:10]
    data = tmp_path / "cf.json"
    data.write_text(json.dumps(records))
    return RunConfig.from_dict({"name": "cal", "hparams": str(hp), "data": str(data), "order": "seeded",
                                "device": "cpu", **extra})


def assert_same_point(a: dict, b: dict) -> None:
    """Two calibration rows of the same settings measured the same (each point started from the unedited model)."""
    for key in ("efficacy_magnitude", "generalization_magnitude", "specificity_magnitude", "ppl"):
        assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), key


@pytest.fixture
def config(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("REVIVE_CACHE", str(tmp_path / "cache"))
    # z at layer 0, its loss at layer 1: with z at the last layer δ reaches only its own position, the targets'
    # loss cannot move and the edit's direction would be optimiser noise
    yield calibration_config(tmp_path, {**TINY_MEMIT, "layers": [0], "model_name": str(tiny_model_dir)},
                             batched_z=True, revive={"tau": 0.3})
    easyedit.disable_easyedit()


def test_parse_grid():
    assert parse_grid(["mom2_update_weight=[100, 10]", "run.transforms=[[], [revive]]", "v_lr=0.5"]) == {
        "mom2_update_weight": [100, 10], "run.transforms": [[], ["revive"]], "v_lr": [0.5]}
    # exponent notation is a number, as in EasyEdit's hparams (PyYAML alone reads 5e-4 as a string)
    assert parse_grid(["lr=[5e-4, 5.0e-3, 1E3]", "name=['5e-4']"]) == {"lr": [5e-4, 5e-3, 1000.0], "name": ["5e-4"]}
    with pytest.raises(ValueError, match="key=\\[v1, v2\\]"):
        parse_grid(["mom2_update_weight"])


def test_heldout_records_exclude_the_shipped_sample_and_come_last(config):
    held = heldout_cases(config, 3)
    order = ordered_cases(config)
    assert all(c.case_id >= 100000 for c in held)
    assert [c.case_id for c in held] == [c.case_id for c in order if c.case_id >= 100000][-3:]
    assert [c.case_id for c in order] != sorted(c.case_id for c in order)  # seeded order, not file order
    with pytest.raises(ValueError, match="held-out records asked"):
        heldout_cases(config, 9)


def test_grid_points_share_one_z_optimisation_and_start_from_the_unedited_model(config, tmp_path, monkeypatch):
    calls = []
    real = batched_z.compute_zs
    monkeypatch.setattr(batched_z, "compute_zs", lambda *a, **k: calls.append(1) or real(*a, **k))
    out = tmp_path / "out"
    grid = parse_grid(["mom2_update_weight=[100, 1]", "run.transforms=[[], [revive]]"])
    rows = calibrate(config, grid, 3, out, command="revive calibrate test")
    assert len(calls) == 1                      # four points, one optimisation of the batch's target vectors
    assert [r["point"] for r in rows][0] == "unedited" and len(rows) == 5
    # Each point starts from the unedited model: repeating the first point gives the same numbers.
    assert rows[1]["point"] == {"mom2_update_weight": 100, "run.transforms": []}
    again = calibrate(config, parse_grid(["mom2_update_weight=[100]"]), 3, tmp_path / "again")
    assert again[1]["efficacy_magnitude"] == pytest.approx(rows[1]["efficacy_magnitude"], abs=1e-6)
    assert again[1]["ppl"] == pytest.approx(rows[1]["ppl"], rel=1e-6)
    assert len(calls) == 1                      # the second calibration read the vectors from the cache
    # A weaker solve (λ = 100 vs 1) moves the edited facts less.
    assert rows[3]["efficacy_magnitude"] > rows[1]["efficacy_magnitude"]
    assert rows[1]["ppl"] != rows[0]["ppl"]
    lines = [json.loads(x) for x in (out / "calibration.jsonl").read_text().splitlines()]
    assert lines[-1]["point"] == {"mom2_update_weight": 1, "run.transforms": ["revive"]}
    png = (out / "calibration.png").read_bytes()
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and width <= 1600 and height < 1200  # a grid, readable at 100%
    (out / "calibration.png").unlink()
    assert report(out) == out / "calibration.png" and (out / "calibration.png").exists()
    with pytest.raises(ValueError, match="fewer than two grid points"):
        report(tmp_path / "again")
    table = (out / "calibration.md").read_text()
    assert "mom2_update_weight=1, run.transforms=['revive']" in table and "revive calibrate test" in table


def test_lemoe_points_each_start_without_the_experts_of_the_point_before(tmp_path, tiny_model_dir, monkeypatch):
    """LEMoE adds modules to the model: restoring the weights alone would leave the first point's expert
    routing the second point's prompts (or refuse to load the weights back)."""
    from test_lemoe import LEMOE

    monkeypatch.setenv("REVIVE_CACHE", str(tmp_path / "cache"))
    config = calibration_config(tmp_path, {**LEMOE, "num_steps": 5, "model_name": str(tiny_model_dir)})
    try:
        rows = calibrate(config, parse_grid(["lr=[0.05, 0.05]"]), 3, tmp_path / "out")
    finally:
        easyedit.disable_easyedit()
    assert [r["point"] for r in rows[1:]] == [{"lr": 0.05}, {"lr": 0.05}]
    assert rows[1]["ppl"] != rows[0]["ppl"]  # the expert changed the model
    assert_same_point(rows[1], rows[2])
