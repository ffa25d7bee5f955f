"""`revive study` on a tiny LLaMA: runs side by side, skipped when finished, extended, stopped by SIGTERM and resumed."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from revive_plugin.eval.study import Study, run_study

from test_eval_harness import TINY_MEMIT


@pytest.fixture
def study_file(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("REVIVE_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    hp = tmp_path / "tiny-memit.yaml"
    hp.write_text(yaml.safe_dump({**TINY_MEMIT, "model_name": str(tiny_model_dir)}))
    base = {"hparams": str(hp), "edits": 4, "batch_size": 2, "eval_every": 2, "device": "cpu",
            "glue": {"tasks": ["sst2"], "n_per_task": 4, "few_shot": 0, "dir": None}, "fluency_prompts": 0,
            "ppl": {"data": None, "n": 8, "max_tokens": 32}}
    (tmp_path / "plain.yaml").write_text(yaml.safe_dump({"name": "plain", "transforms": [], **base}))
    (tmp_path / "filtered.yaml").write_text(yaml.safe_dump({"name": "filtered", "transforms": ["revive"],
                                                            "revive": {"tau": 0.3}, **base}))

    def write(edits=4, parallel=2, stages=()):
        spec = {"name": "tiny", "output": str(tmp_path / "study"), "parallel": parallel, "stages": list(stages),
                "runs": {"a": {"config": str(tmp_path / "plain.yaml"), "set": [f"edits={edits}"]},
                         "b": {"config": str(tmp_path / "filtered.yaml"), "set": [f"edits={edits}"]}},
                "compare": {"ab": ["a", "b"]}}
        path = tmp_path / "tiny-study.yaml"
        path.write_text(yaml.safe_dump(spec))
        return path
    return write


def rows(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_runs_finish_skip_and_extend(study_file, tmp_path, capsys):
    study = Study.load(study_file())
    assert run_study(study, poll_seconds=0.2) == 0
    a, b = study.runs["a"].run_dir, study.runs["b"].run_dir
    assert [r["edits"] for r in rows(a)] == [0, 2, 4] and [r["edits"] for r in rows(b)] == [0, 2, 4]
    assert yaml.safe_load((a / "config.yaml").read_text())["name"] == "a"
    assert (tmp_path / "study" / "compare-ab" / "compare.md").exists()
    # Running it again starts nothing.
    capsys.readouterr()
    assert run_study(Study.load(study_file()), poll_seconds=0.2) == 0
    out = capsys.readouterr().out
    assert "2 of 2 runs finished" in out and "--resume" not in out
    # Asking for more edits continues the same runs from their checkpoints.
    extended = Study.load(study_file(edits=6))
    assert extended.runs["a"].command()[-4:] == ["--resume", str(a), "--edits", "6"]
    assert run_study(extended, poll_seconds=0.2) == 0
    assert [r["edits"] for r in rows(a)] == [0, 2, 4, 6]


def test_sigterm_stops_the_runs_with_checkpoints_and_the_next_call_finishes(study_file, tmp_path):
    path = study_file(parallel=1)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "revive_plugin.cli", "study", str(path)], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    state = tmp_path / "study" / "a" / "checkpoint" / "state.json"
    deadline = time.time() + 300
    while time.time() < deadline and not (state.exists() and json.loads(state.read_text())["edits_done"] >= 2):
        time.sleep(0.2)
    assert state.exists(), proc.communicate()[0]
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 130, out
    assert "continue with: revive study" in out
    # the stopped run's log says how its process ended
    assert "the run stopped with exit status 130" in (tmp_path / "study" / "a" / "eval.log").read_text()
    study = Study.load(path)
    assert not study.runs["a"].finished() and not study.runs["b"].finished()
    assert run_study(study, poll_seconds=0.2) == 0
    assert [r["edits"] for r in rows(tmp_path / "study" / "a")] == [0, 2, 4]
    assert study.runs["b"].finished()


def test_stages_advance_the_runs_together(study_file, tmp_path, capsys):
    study = Study.load(study_file(parallel=1, stages=[2]))
    code = run_study(study, poll_seconds=0.2)
    out = capsys.readouterr().out
    assert code == 0, out  # the study's own account (which run stopped, with what exit status) if not
    events = [line for line in out.splitlines()
              if line.startswith(("[study] a: ", "[study] b: ")) and ("reached" in line or "finished" in line)]
    assert events == ["[study] a: reached 2 edits", "[study] b: reached 2 edits", "[study] a: finished",
                      "[study] b: finished"]
    # Pausing at a stage changes nothing: the rows are those of an uninterrupted schedule.
    assert [r["edits"] for r in rows(study.runs["a"].run_dir)] == [0, 2, 4]
    with pytest.raises(ValueError, match="stages must be an increasing list"):
        Study.load(study_file(stages=[3, 2]))


def test_a_run_ending_at_a_stage_finishes_in_that_round(tmp_path):
    """Runs to 4 and 2 edits with stages [2, 3]: the short run finishes in the first round, before the long one goes
    on to 3; with a run to 3 and stages [2, 4], that run (ending between the stages) finishes in the second round."""
    from revive_plugin.eval.study import _tasks

    spec = {"name": "t", "output": str(tmp_path / "out"), "stages": [2, 3],
            "runs": {"long": {"config": "c.yaml", "set": ["edits=4"]}, "short": {"config": "c.yaml", "set": ["edits=2"]}}}
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(spec))
    study = Study.load(tmp_path / "t.yaml")
    order = [(r.name, stage) for r, stage in _tasks(study, list(study.runs.values()))]
    assert order == [("long", 2), ("short", None), ("long", 3), ("long", None), ("short", None)]
    spec = {**spec, "stages": [2, 4], "runs": {**spec["runs"], "mid": {"config": "c.yaml", "set": ["edits=3"]}}}
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(spec))
    study = Study.load(tmp_path / "t.yaml")
    order = [(r.name, stage) for r, stage in _tasks(study, list(study.runs.values()))]
    assert order == [("long", 2), ("mid", 2), ("short", None), ("long", None), ("mid", None),  # runs in name order
                     ("long", None), ("mid", None), ("short", None)]


def test_common_overrides_go_to_every_run_before_its_own(tmp_path):
    spec = {"name": "c", "output": str(tmp_path / "out"), "data_root": "/data",
            "common": ["edits=8", "data={data_root}/cf.json", "revive.tau=0.1"],
            "runs": {"a": {"config": "x"}, "b": {"config": "x", "set": ["revive.tau=0.3"]}}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(spec))
    study = Study.load(path)
    assert study.runs["a"].overrides == ["edits=8", "data=/data/cf.json", "revive.tau=0.1"]
    assert study.runs["b"].overrides[-1] == "revive.tau=0.3" and study.runs["b"].target_edits == 8
    cmd = study.runs["b"].command()
    assert cmd.index("revive.tau=0.1") < cmd.index("revive.tau=0.3")  # the run's own setting wins
    path.write_text(yaml.safe_dump({**spec, "common": "edits=8"}))
    with pytest.raises(ValueError, match="common must be a list of KEY=VALUE"):
        Study.load(path)


def test_a_run_taken_from_another_study_is_that_run(tmp_path):
    """{from: STUDY}: the other study's run of the same name, its directory and settings, run once for both."""
    base = {"name": "base", "output": str(tmp_path / "base-out"), "common": ["edits=8"],
            "runs": {"ref": {"config": "x", "set": ["revive.tau=0.1"]}, "other": {"config": "y"}}}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    spec = {"name": "more", "output": str(tmp_path / "more-out"), "common": ["edits=4"],
            "runs": {"ref": {"from": "base"}, "new": {"config": "x", "set": ["revive.tau=0.4"]}},
            "compare": {"tau": ["ref", "new"]}}
    (tmp_path / "more.yaml").write_text(yaml.safe_dump(spec))
    study = Study.load(tmp_path / "more.yaml")
    ref = study.runs["ref"]
    assert ref.run_dir == tmp_path / "base-out" / "ref" and ref.overrides == ["edits=8", "revive.tau=0.1"]
    assert ref.command() == Study.load(tmp_path / "base.yaml").runs["ref"].command()
    assert study.runs["new"].run_dir == tmp_path / "more-out" / "new"
    (tmp_path / "more.yaml").write_text(yaml.safe_dump({**spec, "runs": {"missing": {"from": "base"}}}))
    with pytest.raises(ValueError, match=r"run 'missing' is taken from study 'base', which has no run 'missing'"):
        Study.load(tmp_path / "more.yaml")
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({**base, "runs": {"ref": {"from": "more"}}}))
    (tmp_path / "more.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(ValueError, match="in a circle"):
        Study.load(tmp_path / "more.yaml")
    (tmp_path / "more.yaml").write_text(yaml.safe_dump({**spec, "runs": {"ref": {"from": "base", "set": []}}}))
    with pytest.raises(ValueError, match=r"or \{from: STUDY\}"):
        Study.load(tmp_path / "more.yaml")


@pytest.mark.parametrize("name", ["length", "tau", "baselines", "variants", "wilke", "superposition"])
def test_shipped_studies_load(name):
    study = Study.load(name)
    assert study.runs and all(r.target_edits for r in study.runs.values())


def test_the_variants_study_switches_the_revive_variants_on():
    from revive_plugin.config import ReviveConfig
    from revive_plugin.eval.harness import RunConfig

    study = Study.load("variants")
    got = {}
    for name, run in study.runs.items():
        config = RunConfig.from_yaml(run.config, [o for o in run.overrides if o.startswith("revive.")])
        parsed = ReviveConfig.from_dict(config.revive)
        got[name] = (parsed.in_loop, parsed.in_solve, parsed.tau)
    # The references are the length study's runs (its directories), REVIVE after the solve as in the paper.
    assert got.pop("memit-revive") == (False, False, 0.1) and "memit" in got
    length = Study.load("length")
    assert study.runs.pop("memit").run_dir == length.runs["memit"].run_dir
    assert study.runs["memit-revive"].run_dir == length.runs["memit-revive"].run_dir
    got.pop("memit")
    assert got == {"in-loop": (True, False, 0.1), "in-solve": (False, True, 0.1), "in-loop-in-solve": (True, True, 0.1)}


def test_runs_share_the_machine_only_as_their_own_parallel_allows(tmp_path, monkeypatch):
    """Per-run ``parallel``: the FT-like runs (2) go two at once with half the threads each; a run that keeps the
    machine to itself (the study's default 1) starts only when nothing runs and nothing starts beside it."""
    import revive_plugin.eval.study as study_mod

    spec = {"name": "p", "output": str(tmp_path / "out"), "parallel": 1,
            "runs": {"alone": {"config": "x", "set": ["edits=2"]},
                     "ft": {"config": "x", "set": ["edits=2"], "parallel": 2},
                     "ft-revive": {"config": "x", "set": ["edits=2"], "parallel": 2},
                     "memit": {"config": "x", "set": ["edits=2"]}}}
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(spec))
    study = Study.load(path)
    assert [r.parallel for r in study.runs.values()] == [1, 2, 2, 1]
    done: set = set()
    running: set = set()
    launched = []

    class FakeProcess:
        """Ends at its second poll, its run then finished."""

        def __init__(self, name):
            self.name, self.polls, self.returncode, self.args = name, 0, None, ["py", "-m", name]

        def poll(self):
            self.polls += 1
            if self.polls < 2:
                return None
            running.discard(self.name)
            done.add(self.name)
            self.returncode = 0
            return 0

    def launch(self, stage, env, *a, **k):
        launched.append((self.name, env["OMP_NUM_THREADS"], sorted(running)))
        running.add(self.name)
        return FakeProcess(self.name), open(os.devnull, "w")

    monkeypatch.setattr(study_mod.StudyRun, "launch", launch)
    monkeypatch.setattr(study_mod, "_reached", lambda run, stage: run.name in done)
    monkeypatch.setattr(study_mod.Study, "write_comparisons", lambda self: [])
    monkeypatch.setattr(study_mod.os, "cpu_count", lambda: 2)
    assert run_study(study, poll_seconds=0.01) == 0
    assert launched == [("alone", "2", []), ("ft", "1", []), ("ft-revive", "1", ["ft"]), ("memit", "2", [])]
    # --parallel N overrides every run's own setting.
    study.set_parallel(1)
    assert {r.parallel for r in study.runs.values()} == {1}
    spec["runs"]["ft"]["parallel"] = 0
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(ValueError, match=r"runs.ft.parallel must be a positive integer \(runs at once\), got 0"):
        Study.load(path)
