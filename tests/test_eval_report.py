"""Collapse point, spectral early warning and lead time on hand-made rows; summary.md, compare.md and grid figures."""
import json
import shutil
import struct
from pathlib import Path

import pytest
import yaml

from revive_plugin.eval import report
from revive_plugin.eval.collapse import (EarlyWarning, collapse_point, early_warning, lead_time,
                                         sigma_max_growth)
from revive_plugin.eval.report import compare, read_rows, spectral_means, write_report

ROOT = Path(__file__).resolve().parents[1]
L4, L5 = "model.layers.4.mlp.down_proj.weight", "model.layers.5.mlp.down_proj.weight"


def row(edits, *, collapsed=None, sigma=None, delta=None, ss=None, **extra):
    """A metrics row; sigma/delta/ss: {layer: value} written as spectral/{layer}/{metric}."""
    r = {"edits": edits, **extra}
    if collapsed is not None:
        r["collapsed"] = collapsed
    for metric, values in (("sigma_max", sigma), ("delta_rel", delta), ("ss", ss)):
        for layer, v in (values or {}).items():
            r[f"spectral/{layer}/{metric}"] = v
    return r


# ----------------------------------------------------------------------------- collapse point


def test_collapse_point_is_the_first_collapsed_row():
    rows = [row(0, collapsed=False), row(10, collapsed=False), row(20, collapsed=True), row(30, collapsed=True)]
    assert collapse_point(rows) == 20
    assert collapse_point([row(0, collapsed=False), row(10, collapsed=False)]) is None  # never collapses
    assert collapse_point([row(0), row(10)]) is None  # rows without the flag (older runs)
    assert collapse_point([]) is None


# ----------------------------------------------------------------------------- early warning


def test_sigma_max_rule_fires_at_the_first_checkpoint_at_or_above_the_ratio():
    rows = [row(0, sigma={L4: 10.0, L5: 20.0}), row(10, sigma={L4: 14.9, L5: 21.0}),
            row(20, sigma={L4: 15.0, L5: 31.0}), row(30, sigma={L4: 40.0, L5: 40.0})]
    w = early_warning(rows)
    # At 20 edits both layers fire (1.5× and 1.55×); the larger ratio is reported.
    assert w == EarlyWarning(edits=20, rule="sigma_max_ratio", layer=L5, value=pytest.approx(1.55), threshold=1.5)
    assert "1.55× its pre-edit value" in w.describe() and L5 in w.describe()
    assert early_warning(rows, sigma_max_ratio=2.0).edits == 30
    assert sigma_max_growth(rows) == pytest.approx([1.0, 1.49, 1.55, 4.0])


def test_delta_rel_rule_and_rule_order():
    rows = [row(0, sigma={L4: 10.0}, delta={L4: 0.0}), row(10, sigma={L4: 10.0}, delta={L4: 0.2, L5: 0.6}),
            row(20, sigma={L4: 16.0}, delta={L4: 0.7})]
    w = early_warning(rows)
    assert (w.edits, w.rule, w.layer, w.value) == (10, "delta_rel", L5, 0.6)
    # At 20 edits both rules fire: σ_max is tried first.
    assert early_warning(rows[:1] + rows[2:]).rule == "sigma_max_ratio"
    assert early_warning(rows, delta_rel=0.8).edits == 20


def test_ss_rule_is_off_unless_asked():
    rows = [row(0, ss={L4: 1.0}), row(10, ss={L4: 0.4})]
    assert early_warning(rows) is None
    w = early_warning(rows, ss_min=0.5)
    assert (w.edits, w.rule, w.layer, w.value) == (10, "ss_min", L4, 0.4)


def test_early_warning_on_rows_missing_keys():
    assert early_warning([row(0), row(10, efficacy=0.5)]) is None  # no spectral keys at all
    # No pre-edit row: σ_max has no baseline, so only delta_rel can fire.
    assert early_warning([row(10, sigma={L4: 100.0})]) is None
    assert early_warning([row(10, sigma={L4: 100.0}, delta={L4: 0.9})]).rule == "delta_rel"
    # A layer missing at edits 0 is not compared; NaN is not a measurement.
    assert early_warning([row(0, sigma={L4: 1.0}), row(10, sigma={L5: 9.0, L4: float("nan")})]) is None


@pytest.mark.parametrize("kwargs", [{"sigma_max_ratio": 1.0}, {"delta_rel": 0.0}, {"ss_min": 1.0}])
def test_early_warning_rejects_thresholds_the_pre_edit_row_meets(kwargs):
    with pytest.raises(ValueError):
        early_warning([row(0)], **kwargs)


# ----------------------------------------------------------------------------- lead time


def test_lead_time():
    base = {L4: 10.0}
    rows = [row(0, collapsed=False, sigma=base), row(20, collapsed=False, sigma={L4: 16.0}),
            row(40, collapsed=False, sigma={L4: 20.0}), row(60, collapsed=True, sigma={L4: 30.0})]
    lt = lead_time(rows)
    assert lt.edits == 40
    assert "early warning at 20 edits" in lt.description and "collapse at 60 edits" in lt.description
    assert "lead time 40 edits" in lt.description
    assert lead_time(rows, sigma_max_ratio=2.5).edits == 0  # fires at the collapse checkpoint itself
    late = lead_time(rows[:3] + [row(60, collapsed=True, sigma={L4: 30.0}), row(80, collapsed=True, sigma={L4: 40.0})],
                     sigma_max_ratio=3.5)
    assert late.edits == -20 and "after the collapse" in late.description


def test_lead_time_when_one_side_is_missing():
    never = [row(0, collapsed=False, sigma={L4: 10.0}), row(50, collapsed=False, sigma={L4: 20.0}),
             row(100, collapsed=False, sigma={L4: 20.0})]
    lt = lead_time(never)
    assert lt.edits is None and "early warning at 50 edits" in lt.description
    assert "no collapse in 100 edits" in lt.description
    silent = [row(0, collapsed=False, sigma={L4: 10.0}), row(50, collapsed=True, sigma={L4: 10.5})]
    assert lead_time(silent) == (None, "collapse at 50 edits with no early warning: no lead time")
    old = lead_time([row(0, sigma={L4: 10.0}), row(50, sigma={L4: 10.0})])
    assert old.edits is None and "collapse not measured" in old.description


# ----------------------------------------------------------------------------- reports


def png_size(path):
    head = Path(path).read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def synthetic_run(root, name, collapse_at):
    """A 100-edit run, checkpoints every 10, with every key the harness writes now."""
    d = root / name
    d.mkdir()
    rows = []
    for e in range(0, 101, 10):
        ppl_rel = 1 + (e / collapse_at) ** 3 if collapse_at else 1 + e / 1000
        grow = 1.0 if collapse_at else 0.0
        r = {"edits": e, "ppl": 20 * ppl_rel, "ppl_rel": ppl_rel, "collapsed": ppl_rel >= 2.0,
             "glue_sst2_accuracy": 0.8, "glue_sst2_f1": 0.7, "glue_sst2_mcc": 0.3,
             "glue_mmlu_accuracy": 0.3, "glue_mmlu_f1": 0.25}
        if e:
            r.update({"efficacy_score": 0.9 - e / 300, "generalization_score": 0.7, "specificity_score": 0.8,
                      "last_batch_efficacy_score": 0.95, "last_batch_generalization_score": 0.6,
                      "last_batch_specificity_score": 0.8, "fluency": 5.0})
        for layer in (L4, L5):
            p = f"spectral/{layer}/"
            r.update({p + "ls": 1 - e / 1000, p + "ss": 1 - e / 500, p + "fro_norm": 170 + e * grow,
                      p + "sigma_max": 20 * (1 + grow * e / 80), p + "k": 28, p + "delta_fro": e * grow,
                      p + "delta_rel": e * grow / 1000, p + "protected_left": 0.0, p + "protected_right": 0.0,
                      p + "complement_sigma_max": 5 + e * grow, p + "complement_over_sigma_k": (5 + e * grow) / 6})
        rows.append(r)
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = {"name": name, "hparams": "hparams/MEMIT/smollm2-135m.yaml", "transforms": [], "revive": {},
              "dataset": "counterfact", "data": None, "edits": 100, "batch_size": 10, "eval_every": 10,
              "eval_facts": "all", "collapse_ppl_ratio": 2.0, "fluency_prompts": 10}
    (d / "config.yaml").write_text(yaml.safe_dump(config))
    return d


@pytest.fixture
def captured(monkeypatch):
    """The figures as they are saved: {file name: [(title, [(x, linestyle, colour) of vertical lines])]}."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    out = {}
    save = Figure.savefig

    def spy(fig, path, *args, **kwargs):
        panels = []
        for ax in fig.axes:
            if not ax.get_visible():
                continue
            vlines = [(ln.get_xdata()[0], ln.get_linestyle(), ln.get_color()) for ln in ax.get_lines()
                      if len(set(ln.get_xdata())) == 1 and ln.get_linestyle() in ("--", ":")]
            panels.append((ax.get_title(), vlines))
        out[Path(path).name] = panels
        return save(fig, path, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", spy)
    return out


def test_write_report_of_a_collapsing_run(tmp_path, captured):
    d = synthetic_run(tmp_path, "memit", collapse_at=60)
    summary = write_report(d).read_text()
    # ppl_rel = 1 + (e/60)³ reaches 2 at 60 edits; σ_max = 20(1 + e/80) reaches 1.5× at 40 edits.
    assert "Collapse point: 60 edits (rule: first checkpoint with ppl ≥ 2 × pre-edit ppl" in summary
    assert f"Early warning: 40 edits: sigma_max of {L4} at 1.5× its pre-edit value" in summary
    assert "collapse at 60 edits: lead time 20 edits" in summary
    for column in ("ppl", "ppl_rel", "collapsed", "last_batch_efficacy_score", "glue_sst2_mcc",
                   "protected_left_mean", "complement_over_sigma_k_mean", "delta_rel_max"):
        assert f"| {column} |" in summary or f" {column} |" in summary
    assert "| 60 | 40.0000 | 2.0000 | yes |" in summary  # edits, ppl, ppl_rel, collapsed
    for name, min_rows in (("editing.png", 3), ("glue.png", 3), ("spectral.png", 3)):
        width, height = png_size(d / name)
        assert width <= 1600 and height >= 360 * min_rows, (name, width, height)
        panels = captured[name]
        assert len(panels) >= 3 * min_rows - 2
        # The collapse point on every panel: a dashed vertical line at 60 edits in the run's colour (C0).
        for title, vlines in panels:
            assert (60, "--", "C0") in vlines, title
            assert (40, ":", "C0") in vlines, title
    titles = [t for t, _ in captured["glue.png"]]
    assert titles[:2] == ["Perplexity (ME-PPL)", "Perplexity / pre-edit perplexity"]
    assert "GLUE SST2 MCC" in titles and "GLUE MMLU F1" in titles and "GLUE MMLU MCC" not in titles


def test_compare_marks_each_run(tmp_path, captured):
    a = synthetic_run(tmp_path, "memit", collapse_at=60)
    b = synthetic_run(tmp_path, "memit-revive", collapse_at=None)
    text = compare([a, b], tmp_path / "cmp").read_text()
    assert (tmp_path / "cmp" / "compare.md").read_text() == text
    assert "| memit | 100 | 60 edits | 40 edits: sigma_max of" in text
    assert "| memit-revive | 100 | none in 100 edits | none | no early warning; no collapse in 100 edits" in text
    assert "lead time 20 edits" in text
    for name in ("editing.png", "glue.png", "spectral.png"):
        assert png_size(tmp_path / "cmp" / name)[0] <= 1600
        for title, vlines in captured[name]:
            assert (60, "--", "C0") in vlines, title
            assert not any(c == "C1" for _, _, c in vlines), title  # the run that never collapses has no marker


def test_compare_puts_runs_of_different_lengths_side_by_side_at_their_last_shared_checkpoint(tmp_path):
    long = synthetic_run(tmp_path, "memit", collapse_at=60)       # 100 edits: the reference that went further
    short = synthetic_run(tmp_path, "lemoe", collapse_at=None)
    rows = (short / "metrics.jsonl").read_text().splitlines()
    (short / "metrics.jsonl").write_text("\n".join(rows[:6]) + "\n")  # 0 … 50 edits
    text = compare([long, short], tmp_path / "cmp").read_text()
    assert "The runs stop at different points (memit: 100, lemoe: 50 edits)" in text
    at, last = text.split("## Editing — at 50 edits")[1].split("## Editing — last checkpoint of each run")
    # ppl_rel = 1 + (e/60)³ for memit: 1.5787 at 50 edits, 5.6296 at 100; lemoe's 1 + e/1000
    assert "| memit | 31.5741 | 1.5787 | no |" in at and "| lemoe | 21.0000 | 1.0500 | no |" in at
    assert "| memit (100) | 112.5926 | 5.6296 | yes |" in last and "| lemoe (50) | 21.0000 | 1.0500 | no |" in last
    # runs of one length: one set of tables, at that length
    same = compare([long, synthetic_run(tmp_path, "memit-revive", collapse_at=None)], tmp_path / "same").read_text()
    assert "## Editing — at 100 edits" in same and "stop at different points" not in same


def test_superposition_figure_per_edit_step_with_the_checkpoints_collapse(tmp_path, captured):
    a = synthetic_run(tmp_path, "rome", collapse_at=60)
    b = synthetic_run(tmp_path, "rome-revive", collapse_at=None)  # no steps.jsonl: no line, no figure of its own
    steps = [{"edits": e, "superposition/interference": e / 100, "superposition/kurtosis": 3 + e / 10}
             for e in range(1, 101)]
    (a / "steps.jsonl").write_text("".join(json.dumps(s) + "\n" for s in steps))
    write_report(a)
    panels = dict(captured["superposition.png"])
    assert list(panels) == ["Interference on earlier edits", "Kurtosis of edited keys' cosines"]
    for vlines in panels.values():  # collapse and warning from metrics.jsonl, not from the step lines
        assert (60, "--", "C0") in vlines and (40, ":", "C0") in vlines
    write_report(b)
    assert not (b / "superposition.png").exists()
    captured.clear()
    compare([a, b], tmp_path / "cmp")
    assert "superposition.png" in captured and (tmp_path / "cmp" / "superposition.png").exists()
    assert not any(c == "C1" for vlines in dict(captured["superposition.png"]).values() for _, _, c in vlines)


@pytest.mark.parametrize("run", ["smollm2-100-edits/smollm2-memit", "smollm2-zsre-20-edits"])
def test_old_runs_in_docs_results_still_render(tmp_path, run):
    src = ROOT / "docs" / "results" / run
    d = tmp_path / "old"
    d.mkdir()
    for f in ("config.yaml", "metrics.jsonl"):
        shutil.copy(src / f, d / f)
    rows = read_rows(d)
    assert not any("ppl" in r or "collapsed" in r for r in rows)  # the test's premise: old-style rows
    summary = write_report(d).read_text()
    assert "Collapse point: not measured (no perplexity)" in summary
    assert "Early warning: none" in summary
    assert "Not recorded by this run" in summary  # protected-subspace monitors
    assert "| edits | ls_mean | ss_mean | fro_norm_mean | sigma_max_mean | sigma_max_growth_max |" in summary
    for name in ("editing.png", "glue.png", "spectral.png"):
        width, height = png_size(d / name)
        assert width <= 1600 and height >= 360
    out = compare([d, synthetic_run(tmp_path, "new", collapse_at=60)], tmp_path / "cmp").read_text()
    assert "not measured (no perplexity)" in out and "| new | 100 | 60 edits |" in out


def test_spectral_means_skip_k_and_flags():
    r = {"edits": 5, "spectral/a/ls": 0.5, "spectral/b/ls": 1.0, "spectral/a/k": 3, "spectral/a/flag": True,
         "spectral/a/protected_left": 0.2, "spectral/b/protected_left": 0.4}
    assert spectral_means(r) == pytest.approx({"ls_mean": 0.75, "protected_left_mean": 0.3})
    assert report._glue_keys([{"glue_rte_f1": 1, "glue_rte_accuracy": 1, "glue_rte_f1_rel": 1,
                               "glue_sst2_mcc": 0}]) == ["glue_rte_accuracy", "glue_rte_f1", "glue_sst2_mcc"]
