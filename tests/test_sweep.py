"""`revive sweep` on a local Ray with the tiny LLaMA: a 2-point grid run, compared, skipped when finished, paused
and resumed to the numbers of an uninterrupted sweep, and stopped by SIGTERM with checkpoints."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from revive_plugin.cli import main
from revive_plugin.eval.harness import apply_overrides
from revive_plugin.eval.sweep import Sweep, point_names, run_sweep, yaml_value

from test_eval_harness import TINY_MEMIT

POINTS = ["transforms-none", "transforms-revive"]


# -- the sweep file (no Ray) ------------------------------------------------------------------------
def test_points_are_named_from_their_settings_stably_and_safely():
    keys = ["revive.tau", "transforms", "hparams", "x.basis", "y.basis"]
    values = [(0.02, [], "hparams/MEMIT/smollm2-135m.yaml", "a/b", None),
              (1e-05, ["revive", "rect"], "hparams/ROME/smollm2-135m.yaml", "a-b", True)]
    names = point_names(keys, values)
    assert names[0] == "tau-0.02_transforms-none_hparams-hparams-MEMIT-smollm2-135m.yaml_x.basis-a-b_y.basis-null"
    assert names[1] == "tau-1.0e-05_transforms-revive+rect_hparams-hparams-ROME-smollm2-135m.yaml_x.basis-a-b_y.basis-true"
    assert names == point_names(keys, values)  # stable
    # Two points whose names would be equal are told apart by a digest of their exact settings.
    twins = point_names(["p"], [("a/b",), ("a-b",)])
    assert twins[0] != twins[1] and all(t.startswith("p-a-b-") for t in twins)
    assert len(point_names(["k"], [("x" * 300,)])[0]) <= 80
    # Each value goes to the harness as YAML text that reads back as the same value.
    for value in (0.02, 1e-05, [], ["revive"], "current", None, True, {"chunk": 4}, "0.5"):
        assert apply_overrides({}, [f"k={yaml_value(value)}"])["k"] == value


def write_sweep(path, **spec):
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def test_sweep_file_grid_is_a_product_with_common_overrides_first(tmp_path):
    path = write_sweep(tmp_path / "s.yaml", name="s", output=str(tmp_path / "out"), config="smollm2-memit-revive",
                       data_root="/data", set=["edits=8", "data={data_root}/cf.json"],
                       grid={"revive.tau": [0.1, 0.2], "revive.basis": ["original", "current"]},
                       resources={"num_cpus": 2})
    sweep = Sweep.load(path)
    assert list(sweep.points) == ["tau-0.1_basis-original", "tau-0.1_basis-current", "tau-0.2_basis-original",
                                  "tau-0.2_basis-current"]
    run = sweep.points["tau-0.2_basis-current"]
    assert run.overrides == ["edits=8", "data=/data/cf.json", "revive.tau=0.2", "revive.basis=current"]
    assert run.run_dir == tmp_path / "out" / "tau-0.2_basis-current" and run.target_edits == 8
    assert sweep.settings[run.name] == {"revive.tau": 0.2, "revive.basis": "current"}
    assert sweep.resources == {"num_cpus": 2, "num_gpus": 0}
    assert "0 / 8 edits  not started" in sweep.status()


@pytest.mark.parametrize("change, message", [
    ({"grid": {"revive.tau": 0.1}}, "grid must map settings to non-empty lists"),
    ({"grid": {"revive.tau": []}}, "grid must map settings to non-empty lists"),
    ({"grid": {"name": ["a", "b"]}}, "name cannot be a grid key"),
    ({"grid": {"revive.tau": [0.1], "no_such_setting": [1]}}, "point tau-0.1_no_such_setting-1.*unknown run setting"),
    ({"resources": {"num_cpus": 0}}, "resources takes num_cpus"),
    ({"resources": {"cpus": 1}}, "resources takes num_cpus"),
    ({"set": "edits=8"}, "set must be a list of KEY=VALUE"),
    ({"stages": [1]}, "unknown sweep setting"),
    ({"config": None}, "config must name the base run config"),
])
def test_bad_sweep_files_are_refused_before_anything_runs(tmp_path, change, message):
    spec = {"name": "s", "config": "smollm2-memit-revive", "grid": {"revive.tau": [0.1, 0.2]}, **change}
    with pytest.raises(ValueError, match=message):
        Sweep.load(write_sweep(tmp_path / "s.yaml", **spec))


def test_without_ray_revive_sweep_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails
    path = write_sweep(tmp_path / "s.yaml", name="s", config="smollm2-memit-revive", grid={"revive.tau": [0.1]})
    assert main(["sweep", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("revive: error: ") and "pip install 'revive-plugin[sweep]'" in err
    assert not (tmp_path / "runs").exists()


def test_shipped_tau_sweep_loads():
    sweep = Sweep.load("tau")
    assert len(sweep.points) == 10 and "tau-0.1_basis-current" in sweep.points
    assert all(r.target_edits == 1000 for r in sweep.points.values())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl(PR_SET_PDEATHSIG) is Linux's")
def test_a_run_started_for_a_sweep_gets_sigterm_when_its_starter_dies(tmp_path):
    # The starter (a Ray worker, in a sweep) starts a child the way StudyRun.launch(die_with_parent=True) does,
    # then dies without a word; the child must not run on unseen.
    starter = (
        "import os, subprocess, sys\n"
        "from revive_plugin.eval.study import _term_with_parent\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'],\n"
        "                         preexec_fn=_term_with_parent(os.getpid()))\n"
        "print(child.pid, flush=True)\n"
        "os._exit(0)\n")
    pid = int(subprocess.run([sys.executable, "-c", starter], capture_output=True, text=True, check=True,
                             timeout=60).stdout)

    def alive():
        try:
            return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
        except FileNotFoundError:
            return False
    deadline = time.time() + 30
    while alive() and time.time() < deadline:
        time.sleep(0.1)
    assert not alive()


# -- real runs on a local Ray ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_model_dir):
    """A folder with the tiny MEMIT hparams and a base run config; cwd and REVIVE_CACHE point there."""
    root = tmp_path_factory.mktemp("sweep")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("REVIVE_CACHE", str(root / "cache"))
        mp.chdir(root)
        (root / "tiny-memit.yaml").write_text(yaml.safe_dump({**TINY_MEMIT, "model_name": str(tiny_model_dir)}))
        base = {"name": "base", "hparams": str(root / "tiny-memit.yaml"), "transforms": [], "revive": {"tau": 0.3},
                "edits": 2, "batch_size": 1, "eval_every": 1, "device": "cpu",
                "glue": {"tasks": ["sst2"], "n_per_task": 4, "few_shot": 0, "dir": None}, "fluency_prompts": 0,
                "ppl": {"data": None, "n": 8, "max_tokens": 32}}
        (root / "base.yaml").write_text(yaml.safe_dump(base))
        yield root


def tiny_sweep(root, output, edits=2):
    # The output is relative: the Ray tasks find it from the directory `revive sweep` was called in.
    return write_sweep(root / f"{output}.yaml", name=output, output=output, config=str(root / "base.yaml"),
                       set=[f"edits={edits}"], grid={"transforms": [[], ["revive"]]}, resources={"num_cpus": 1})


@pytest.fixture(scope="module")
def local_ray(workspace):
    ray = pytest.importorskip("ray", reason="revive sweep needs the sweep extra (pip install 'revive-plugin[sweep]')")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def rows(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def full(workspace, local_ray):
    """The 2-point sweep run uninterrupted: the reference for the paused one."""
    sweep = Sweep.load(tiny_sweep(workspace, "full"))
    assert run_sweep(sweep, progress=False) == 0
    return sweep


def test_sweep_runs_every_point_compares_and_skips_finished(full, workspace, capsys):
    assert list(full.points) == POINTS
    for name in POINTS:
        run_dir = workspace / "full" / name
        assert [r["edits"] for r in rows(run_dir)] == [0, 1, 2]
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert config["name"] == name and config["transforms"] == ([] if name.endswith("none") else ["revive"])
    compare = (workspace / "full" / "compare" / "compare.md").read_text()
    assert all(name in compare for name in POINTS)
    # Running it again starts nothing: no run is launched, the logs stay as they were.
    logs = {n: (workspace / "full" / n / "eval.log").read_text() for n in POINTS}
    capsys.readouterr()
    assert run_sweep(Sweep.load(tiny_sweep(workspace, "full")), progress=False) == 0
    out = capsys.readouterr().out
    assert "2 points, 2 finished" in out and out.count("edits  finished") == 2
    assert not any(line.startswith(("[sweep] transforms-", "[sweep] failed")) for line in out.splitlines())
    assert logs == {n: (workspace / "full" / n / "eval.log").read_text() for n in POINTS}


def test_paused_points_resume_to_the_numbers_of_an_uninterrupted_sweep(full, workspace, capsys):
    sweep = Sweep.load(tiny_sweep(workspace, "paused"))
    assert run_sweep(sweep, stop_after=1, progress=False) == 0
    assert capsys.readouterr().out.count("paused at 1 of 2 edits") == 2
    for run in sweep.points.values():
        assert run.progress() == (1, 2) and not run.finished() and [r["edits"] for r in rows(run.run_dir)] == [0, 1]
    assert not (workspace / "paused" / "compare").exists()  # only at the end of a sweep that was not paused
    assert run_sweep(sweep, progress=False) == 0
    for name, run in sweep.points.items():
        assert "--resume" in (run.run_dir / "eval.log").read_text()
        ref, got = rows(full.points[name].run_dir), rows(run.run_dir)
        assert [r["edits"] for r in got] == [0, 1, 2]
        for x, y in zip(ref, got):
            assert x.keys() == y.keys()
            for k in x:
                if k != "name":
                    assert y[k] == pytest.approx(x[k], rel=1e-5, abs=1e-6), (name, k)
        wa = load_file(str(full.points[name].run_dir / "checkpoint" / "weights.safetensors"))
        wb = load_file(str(run.run_dir / "checkpoint" / "weights.safetensors"))
        assert wa.keys() == wb.keys() and all((wa[k] == wb[k]).all() for k in wa)
    assert (workspace / "paused" / "compare" / "compare.md").exists()


def test_sigterm_to_revive_sweep_checkpoints_its_runs_and_the_next_call_finishes(workspace, local_ray):
    # One CPU for the sweep's own Ray instance: the first point runs, the second waits for it.
    path = tiny_sweep(workspace, "killed", edits=4)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "revive_plugin.cli", "sweep", str(path), "--local-cpus", "1",
                             "--no-progress"], cwd=workspace, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    def started():  # the point Ray ran first (either), once it has a checkpoint
        for name in POINTS:
            state = workspace / "killed" / name / "checkpoint" / "state.json"
            try:
                if json.loads(state.read_text())["edits_done"] >= 1:
                    return workspace / "killed" / name
            except (OSError, ValueError):
                pass  # not there yet, or being written
        return None
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and started() is None:
        time.sleep(0.2)
    first = started()
    assert first is not None, proc.communicate()[0]
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 130, out
    assert "continue with: revive sweep" in out and "checkpoint kept" in out
    sweep = Sweep.load(path)
    assert not any(r.finished() for r in sweep.points.values())
    assert "checkpoint saved" in (first / "eval.log").read_text()  # the run got SIGTERM and saved one
    assert run_sweep(sweep, progress=False) == 0
    for run in sweep.points.values():
        assert [r["edits"] for r in rows(run.run_dir)] == [0, 1, 2, 3, 4]
    assert (workspace / "killed" / "compare" / "compare.md").exists()
