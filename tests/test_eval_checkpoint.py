"""Checkpoints of `revive eval`: checked before anything is restored, damaged files named, atomic saves that
survive a kill, SIGTERM, and run directories whose results are never overwritten silently.

One short finished run (tiny LLaMA, MEMIT + REVIVE, no GLUE/perplexity/fluency) is made once per module and
copied into each test that damages it.
"""
import json
import os
import re
import shutil
import signal
from types import SimpleNamespace

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from test_eval_harness import TINY_MEMIT, interrupt_editor_call, rows

from revive_plugin.adapters import easyedit
from revive_plugin.cli import main
from revive_plugin.eval import harness
from revive_plugin.eval.harness import CheckpointError, Run, RunConfig, read_rows, recover_checkpoint
from revive_plugin.host import PluginHost

WEIGHTS = ["model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_model_dir):
    """Hparams of the tiny model and a statistics cache shared by the module's runs."""
    root = tmp_path_factory.mktemp("checkpoint")
    hp = root / "tiny-memit.yaml"
    hp.write_text(yaml.safe_dump({**TINY_MEMIT, "model_name": str(tiny_model_dir)}))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("REVIVE_CACHE", str(root / "cache"))
        yield SimpleNamespace(root=root, hparams=hp)
    easyedit.disable_easyedit()


@pytest.fixture(autouse=True)
def _fresh_integration():
    yield
    easyedit.disable_easyedit()  # each resume below stands for a new process


def lean_config(workspace, tmp_path, name, **extra):
    """4 edits in steps of 2, a checkpoint every 2; only the edited facts and the spectral monitors measured."""
    data = {"name": name, "hparams": str(workspace.hparams), "transforms": ["revive"], "revive": {"tau": 0.3},
            "edits": 4, "batch_size": 2, "eval_every": 2, "eval_facts": "all",
            "glue": {"tasks": [], "n_per_task": 0, "few_shot": 0, "dir": None}, "ppl": None,
            "fluency_prompts": 0, "eval_last_batch": False, "output": str(tmp_path / "{name}"), "device": "cpu",
            **extra}
    return RunConfig.from_dict(data)


@pytest.fixture(scope="module")
def finished(workspace):
    """A finished 4-edit run: the reference for resumed runs and the original of every damaged copy."""
    run_dir = Run.start(lean_config(workspace, workspace.root, "finished")).execute()
    easyedit.disable_easyedit()
    return run_dir


@pytest.fixture
def copy(finished, tmp_path):
    """A copy of the finished run to damage."""
    return shutil.copytree(finished, tmp_path / "copy")


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()


HP = SimpleNamespace(layers=[0, 1], rewrite_module_tmp="model.layers.{}.mlp.down_proj")


def refused(model, run_dir) -> CheckpointError:
    """The error restoring ``run_dir``'s checkpoint into ``model`` raises; asserts the model is left as it was."""
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError) as e:
        Run.resume(run_dir)._load(model, HP, PluginHost())
    changed = [k for k, v in model.state_dict().items() if not torch.equal(before[k], v)]
    assert changed == [], f"a refused checkpoint changed {changed}"
    return e.value


def assert_same_run(a, b):
    ra, rb = rows(a), rows(b)
    assert [r["edits"] for r in ra] == [r["edits"] for r in rb]
    for x, y in zip(ra, rb):
        assert x.keys() == y.keys()
        for k in x:
            assert x[k] == pytest.approx(y[k], rel=1e-5, abs=1e-6), k
    wa = load_file(str(a / "checkpoint" / "weights.safetensors"))
    wb = load_file(str(b / "checkpoint" / "weights.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6)


# -- every restored tensor is checked against the model ------------------------------------------
@pytest.mark.parametrize("bad", ["shape", "dtype"])
def test_a_tensor_of_the_wrong_shape_or_dtype_is_refused_and_nothing_is_restored(copy, model, bad):
    path = copy / "checkpoint" / "weights.safetensors"
    weights = load_file(str(path))
    # The last weight is the bad one: a restore that copied as it went would already have written the first.
    last = WEIGHTS[-1]
    weights[last] = weights[last][:1].clone() if bad == "shape" else weights[last].double()
    save_file(weights, str(path))
    expected = r"\(1, 64\) torch.float32, the model's weight is \(32, 64\)" if bad == "shape" else "torch.float64"
    message = str(refused(model, copy))
    assert re.search(rf"weights.safetensors: tensor '{last}' is .*{expected}", message), message
    assert "weights are untouched" in message


def test_a_wrong_shape_is_refused_by_revive_eval_without_a_traceback(copy, capsys):
    path = copy / "checkpoint" / "weights.safetensors"
    weights = load_file(str(path))
    weights[WEIGHTS[0]] = weights[WEIGHTS[0]][:1].clone()  # (1, 64) for a (32, 64) weight
    save_file(weights, str(path))
    before = (copy / "metrics.jsonl").read_bytes()
    assert main(["eval", "--resume", str(copy)]) == 2
    err = capsys.readouterr().err
    assert f"revive: error: {path}: tensor '{WEIGHTS[0]}' is (1, 64)" in err and "Traceback" not in err
    assert (copy / "metrics.jsonl").read_bytes() == before
    assert load_file(str(path))[WEIGHTS[0]].shape == (1, 64)  # the checkpoint is left as it was


def test_a_basis_for_a_weight_of_another_shape_is_refused(copy, model):
    path = copy / "checkpoint" / "monitor.safetensors"
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        meta, tensors = fh.metadata(), {k: fh.get_tensor(k) for k in fh.keys()}
    tensors[f"{WEIGHTS[1]}::u"] = torch.cat([tensors[f"{WEIGHTS[1]}::u"]] * 2)  # a basis for (64, 64)
    save_file(tensors, str(path), metadata=meta)
    assert re.search(rf"monitor.safetensors: the basis of '{WEIGHTS[1]}' is for a \(64, 64\)", str(refused(model, copy)))


# -- damaged files are named, with what to do ----------------------------------------------------
def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _garbage(path):
    path.write_bytes(b"this is not a safetensors file\n" * 8)


def _drop_tensor(path):
    weights = load_file(str(path))
    save_file({WEIGHTS[0]: weights[WEIGHTS[0]]}, str(path))


def _rng_of_wrong_size(path):
    save_file({"torch": torch.zeros(7, dtype=torch.uint8)}, str(path))


DAMAGE = {
    "weights truncated": ("weights.safetensors", _truncate, "not a readable safetensors file"),
    "weights garbage": ("weights.safetensors", _garbage, "not a readable safetensors file"),
    "weights missing a tensor": ("weights.safetensors", _drop_tensor, rf"lacks tensor\(s\) \['{WEIGHTS[1]}'\]"),
    "monitor truncated": ("monitor.safetensors", _truncate, "not a readable safetensors file"),
    "monitor garbage": ("monitor.safetensors", _garbage, "not a readable safetensors file"),
    "revive garbage": ("revive.safetensors", _garbage, "not a readable safetensors file"),
    "revive truncated": ("revive.safetensors", _truncate, "not a readable safetensors file"),
    "rng garbage": ("rng.safetensors", _garbage, "not a readable safetensors file"),
    "rng wrong size": ("rng.safetensors", _rng_of_wrong_size, r"'torch' is \(7,\)"),
    "rng missing": ("rng.safetensors", lambda p: p.unlink(), "is missing"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_a_damaged_checkpoint_file_is_named_and_nothing_is_restored(copy, model, case):
    name, damage, what = DAMAGE[case]
    path = copy / "checkpoint" / name
    damage(path)
    message = str(refused(model, copy))
    assert str(path) in message
    assert re.search(what, message), message
    assert "revive eval" in message  # says what to do


@pytest.mark.parametrize("content, what", [
    ('{"edits_done": 4, "host_st', "not valid JSON"),
    ("[1, 2, 3]", "expected a JSON object"),
    ('{"edits_done": 4}', "missing"),
])
def test_a_damaged_state_json_is_refused_by_revive_eval(copy, capsys, content, what):
    (copy / "checkpoint" / "state.json").write_text(content)
    assert main(["eval", "--resume", str(copy), "--edits", "6"]) == 2
    err = capsys.readouterr().err
    assert f"revive: error: {copy / 'checkpoint' / 'state.json'} is damaged ({what}" in err
    assert "revive eval" in err.split("revive: error:", 1)[1] and "Traceback" not in err
    assert yaml.safe_load((copy / "config.yaml").read_text())["edits"] == 4  # not extended


def test_an_unusable_random_state_in_state_json_is_damage(copy, model):
    path = copy / "checkpoint" / "state.json"
    state = json.loads(path.read_text())
    state["python_random"] = state["python_random"][:10]
    path.write_text(json.dumps(state))
    assert "state.json is damaged (unusable random-generator state" in str(refused(model, copy))


@pytest.mark.parametrize("content, what", [
    ("name: [unclosed\n", "not valid YAML"),
    ("- just\n- a list\n", "expected a mapping of run settings"),
    ("name: x\nhparams: h.yaml\nedits: -3\n", "edits must be a positive integer"),
])
def test_a_damaged_config_yaml_is_refused_by_revive_eval(copy, capsys, content, what):
    (copy / "config.yaml").write_text(content)
    assert main(["eval", "--resume", str(copy)]) == 2
    err = capsys.readouterr().err
    assert f"revive: error: {copy / 'config.yaml'} is damaged" in err and what in err and "Traceback" not in err


def test_metrics_jsonl_an_unfinished_last_line_is_dropped_a_damaged_one_is_named(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"edits": 0, "x": 1}\n{"edits": 2, "x"')  # a kill while appending the row at 2
    assert read_rows(path) == [{"edits": 0, "x": 1}]
    path.write_text('{"edits": 0}\nnot json\n{"edits": 4}\n')
    with pytest.raises(CheckpointError, match=r"metrics.jsonl is damaged \(line 2 is not JSON"):
        read_rows(path)


# -- atomic saves: a kill at any point leaves a usable checkpoint --------------------------------
class Killed(BaseException):
    """Stands for the process dying: nothing in the harness catches it, so no clean-up code runs."""


def test_recover_checkpoint_restores_the_previous_checkpoint_after_a_cut_between_the_renames(tmp_path):
    (tmp_path / "checkpoint.old").mkdir()
    (tmp_path / "checkpoint.old" / "state.json").write_text("old")
    (tmp_path / "checkpoint.partial").mkdir()
    assert "checkpoint.old restored" in recover_checkpoint(tmp_path)
    assert (tmp_path / "checkpoint" / "state.json").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]
    (tmp_path / "checkpoint.old").mkdir()  # the newer checkpoint is in place: the old one is stale
    assert recover_checkpoint(tmp_path) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]


@pytest.mark.parametrize("cut", ["between the renames", "while writing the new files"])
def test_a_kill_during_a_save_leaves_the_previous_checkpoint_and_resume_completes(workspace, finished, tmp_path,
                                                                                 monkeypatch, cut):
    run = Run.start(lean_config(workspace, tmp_path, "cut"))
    if cut == "between the renames":
        renames = []
        original = harness._rename

        def rename(src, dst):
            renames.append((src.name, dst.name))
            if (src.name, dst.name) == ("checkpoint.partial", "checkpoint") and len(renames) == 3:
                raise Killed  # the save at 2 edits: the checkpoint at 0 is now checkpoint.old
            original(src, dst)
        monkeypatch.setattr(harness, "_rename", rename)
    else:
        saves = []
        original = harness._write_plugin_states

        def save(directory, host):
            saves.append(directory)
            if len(saves) == 2:  # the plugins' states at 0, then at 2: killed while writing the new files
                raise Killed
            return original(directory, host)
        monkeypatch.setattr(harness, "_write_plugin_states", save)
    with pytest.raises(Killed):
        run.execute()
    monkeypatch.undo()
    present = sorted(p.name for p in run.run_dir.iterdir() if p.name.startswith("checkpoint"))
    assert present == (["checkpoint.old", "checkpoint.partial"] if cut == "between the renames"
                       else ["checkpoint", "checkpoint.partial"])
    assert [r["edits"] for r in rows(run.run_dir)] == [0, 2]  # the row at 2 was written, its checkpoint not
    easyedit.disable_easyedit()
    resumed = Run.resume(run.run_dir)
    assert json.loads((run.run_dir / "checkpoint" / "state.json").read_text())["edits_done"] == 0
    resumed.execute()
    assert sorted(p.name for p in run.run_dir.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint"]
    assert_same_run(finished, run.run_dir)


# -- SIGTERM is Ctrl-C -------------------------------------------------------------------------------
def test_sigterm_mid_run_saves_a_checkpoint_and_resume_completes(workspace, tmp_path, monkeypatch, capsys):
    cfg = lean_config(workspace, tmp_path, "terminated", eval_every=4)
    path = tmp_path / "terminated.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))

    def terminate():  # the second edit step: a scheduler or `kill` ends the sitting
        # Only with the harness's handler installed: the default one would end the test process.
        assert signal.getsignal(signal.SIGTERM) is harness._raise_interrupt
        os.kill(os.getpid(), signal.SIGTERM)

    original = interrupt_editor_call(monkeypatch, 2, terminate)
    run_dir = tmp_path / "terminated"
    assert main(["eval", str(path), "--output", str(run_dir)]) == 130
    assert "interrupted at 2 edits; checkpoint saved" in capsys.readouterr().out
    assert signal.getsignal(signal.SIGTERM) is not harness._raise_interrupt  # the previous handler is back
    assert json.loads((run_dir / "checkpoint" / "state.json").read_text())["edits_done"] == 2
    monkeypatch.setattr(easyedit, "_wrap_apply", original)
    easyedit.disable_easyedit()
    assert main(["eval", "--resume", str(run_dir)]) == 0
    assert [r["edits"] for r in rows(run_dir)] == [0, 4]
    assert json.loads((run_dir / "checkpoint" / "state.json").read_text())["edits_done"] == 4


# -- results are never overwritten silently ------------------------------------------------------
def test_resume_without_a_checkpoint_refuses_to_overwrite_results(copy, capsys):
    shutil.rmtree(copy / "checkpoint")
    before = (copy / "metrics.jsonl").read_bytes()
    assert main(["eval", "--resume", str(copy)]) == 2
    err = capsys.readouterr().err
    assert "has results in metrics.jsonl but no checkpoint/ to continue from" in err and "--overwrite" in err
    assert (copy / "metrics.jsonl").read_bytes() == before


def test_a_run_directory_in_use_is_refused_and_left_as_it_was(workspace, copy, capsys):
    """A second `revive eval` on a run another process is writing (two studies sharing a run) is refused before it
    recovers, extends, overwrites or edits anything; once the other process is done it goes ahead."""
    from filelock import FileLock

    before = {p.relative_to(copy): p.read_bytes() for p in copy.rglob("*") if p.is_file()}
    other = FileLock(str(harness.run_lock_path(copy)))
    with other:
        assert main(["eval", "--resume", str(copy), "--edits", "6"]) == 2
        assert f"{copy} is in use by another `revive eval`" in capsys.readouterr().err
        with pytest.raises(harness.RunInUseError, match="SIGTERM saves its checkpoint"):
            Run.start(lean_config(workspace, copy.parent, "again"), output=str(copy), overwrite=True)
        after = {p.relative_to(copy): p.read_bytes() for p in copy.rglob("*") if p.is_file()}
        assert after == before
    assert Run.resume(copy, edits=6).config.edits == 6


def test_a_new_run_refuses_a_directory_holding_results(workspace, copy):
    cfg = lean_config(workspace, copy.parent, "again")
    (copy / "checkpoint").rename(copy / "checkpoint.old")  # a save cut off between its renames: still a run
    with pytest.raises(FileExistsError, match="already holds a run; continue it with `revive eval --resume"):
        Run.start(cfg, output=str(copy))
    shutil.rmtree(copy / "checkpoint.old")
    before = (copy / "metrics.jsonl").read_bytes()
    with pytest.raises(FileExistsError, match=r"holds results \(metrics.jsonl\) but no checkpoint"):
        Run.start(cfg, output=str(copy))
    assert (copy / "metrics.jsonl").read_bytes() == before


def test_resume_of_a_directory_with_only_its_config_starts_from_the_first_edit(workspace, tmp_path, capsys):
    run_dir = tmp_path / "config-only"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(yaml.safe_dump(lean_config(workspace, tmp_path, "config-only").to_dict()))
    run = Run.resume(run_dir)
    assert "has no checkpoint (the run stopped before its first one): starting from the first edit" in \
        capsys.readouterr().out
    assert run.config.name == "config-only"


@pytest.mark.parametrize("existed", [False, True])
def test_a_start_that_fails_before_its_first_checkpoint_removes_what_it_created(workspace, tmp_path, monkeypatch,
                                                                                capsys, existed):
    run_dir = tmp_path / "failed"
    if existed:
        run_dir.mkdir()
        (run_dir / "notes.txt").write_text("mine")

    def disk_full(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Run, "_save", disk_full)
    run = Run.start(lean_config(workspace, tmp_path, "failed"), output=str(run_dir))
    with pytest.raises(OSError, match="No space left"):
        run.execute()
    err = capsys.readouterr().err
    assert "the run stopped before its first checkpoint" in err and "run the same command again" in err
    if existed:
        assert sorted(p.name for p in run_dir.iterdir()) == ["notes.txt"]  # what was there before is kept
    else:
        assert not run_dir.exists()


def test_a_sigterm_swallowed_where_it_arrived_still_stops_the_run(workspace, tmp_path, monkeypatch, capsys):
    """SIGTERM delivered inside a C callback (matplotlib's, say) prints "Exception ignored" and the code goes on:
    the run must still stop before its next edit step, with a checkpoint at the last completed one."""
    cfg = lean_config(workspace, tmp_path, "swallowed", eval_every=2, edits=6)
    path = tmp_path / "swallowed.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    from revive_plugin.eval import report

    original = report.write_report
    calls = {"n": 0}

    def report_swallowing_sigterm(run_dir, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:  # the report after the checkpoint at 2 edits (the first one the loop writes)
            try:
                os.kill(os.getpid(), signal.SIGTERM)
            except KeyboardInterrupt:
                pass  # what a C callback does with it
        return original(run_dir, *args, **kwargs)

    monkeypatch.setattr(report, "write_report", report_swallowing_sigterm)
    run_dir = tmp_path / "swallowed"
    assert main(["eval", str(path), "--output", str(run_dir)]) == 130
    assert "interrupted at 2 edits; checkpoint saved" in capsys.readouterr().out
    assert json.loads((run_dir / "checkpoint" / "state.json").read_text())["edits_done"] == 2
    assert not harness._TERM_REQUESTED.is_set()  # a later run in this process is not stopped by it
