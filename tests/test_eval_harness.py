"""The sequential harness on a tiny in-process LLaMA: schedule, resume equality, Ctrl-C, CLI, reports, extending a
run, plugin blocks."""
import importlib
import json
import sys

import pytest
import torch
import yaml

from revive_plugin.adapters import easyedit
from revive_plugin.cli import main
from revive_plugin.eval.harness import Run, RunConfig, apply_overrides

TINY_MEMIT = {
    "alg_name": "MEMIT", "model_name": "unset", "stats_dir": "unused", "device": 0, "layers": [0, 1],
    "clamp_norm_factor": 4, "layer_selection": "all", "fact_token": "subject_last", "v_num_grad_steps": 3,
    "v_lr": 0.5, "v_loss_layer": 1, "v_weight_decay": 0.001, "kl_factor": 0.0625, "mom2_adjustment": True,
    "mom2_update_weight": 100, "rewrite_module_tmp": "model.layers.{}.mlp.down_proj",
    "layer_module_tmp": "model.layers.{}", "mlp_module_tmp": "model.layers.{}.mlp",
    "attn_module_tmp": "model.layers.{}.self_attn", "ln_f_module": "model.norm", "lm_head_module": "lm_head",
    "mom2_dataset": "me-ppl", "mom2_n_samples": 32, "mom2_dtype": "float32", "max_length": 40,
    "batch_size": 1, "model_parallel": False,
}


@pytest.fixture
def run_config(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("REVIVE_CACHE", str(tmp_path / "cache"))
    hp = tmp_path / "tiny-memit.yaml"
    hp.write_text(yaml.safe_dump({**TINY_MEMIT, "model_name": str(tiny_model_dir)}))

    def make(name, **extra):
        data = {"name": name, "hparams": str(hp), "transforms": ["revive"], "revive": {"tau": 0.3},
                "edits": 4, "batch_size": 2, "eval_every": 2, "eval_facts": "all",
                "glue": {"tasks": ["sst2"], "n_per_task": 6, "few_shot": 0, "dir": None},
                "output": str(tmp_path / "runs" / "{name}"), "device": "cpu", **extra}
        return RunConfig.from_dict(data)

    yield make
    easyedit.disable_easyedit()


def rows(run_dir, name="metrics.jsonl"):
    return [json.loads(line) for line in (run_dir / name).read_text().splitlines()]


def test_overrides_and_validation():
    assert apply_overrides({"revive": {"tau": 0.1}}, ["revive.tau=0.2", "edits=20"]) == {"revive": {"tau": 0.2}, "edits": 20}
    assert apply_overrides({}, ["hparams_overrides.lr=5e-4"]) == {"hparams_overrides": {"lr": 5e-4}}
    with pytest.raises(ValueError, match="key=value"):
        apply_overrides({}, ["edits"])
    with pytest.raises(ValueError, match="edits must be a positive integer"):
        RunConfig(name="x", hparams="h.yaml", edits=0)
    with pytest.raises(ValueError, match=r"eval_every \(50\) must be a multiple of batch_size \(20\).*eval_every: 40"):
        RunConfig(name="x", hparams="h.yaml", edits=100, batch_size=20, eval_every=50)
    with pytest.raises(ValueError, match="unknown run setting.*edit_count"):
        RunConfig.from_dict({"name": "x", "hparams": "h", "edit_count": 3})
    with pytest.raises(ValueError, match="revive.tau"):
        RunConfig(name="x", hparams="h", transforms=["revive"], revive={"tau": 3})
    with pytest.raises(ValueError, match=r"run config: batched_z must be true, false or \{chunk: N"):
        RunConfig(name="x", hparams="h", batched_z={"chunk": -1})


def test_shipped_configs_load():
    for name in ("smollm2-memit", "smollm2-memit-revive"):
        cfg = RunConfig.from_yaml(name, ["revive.tau=0.2"])
        assert cfg.edits == 200 and cfg.batch_size == 100  # the batch size MEMIT was calibrated at
        assert cfg.hparams_overrides == {}                 # the calibrated hparams file as shipped
    for name in ("smollm2-rome", "smollm2-rome-revive", "smollm2-ft", "smollm2-ft-revive"):
        cfg = RunConfig.from_yaml(name)
        assert cfg.transforms == (["revive"] if name.endswith("revive") else [])
    rome_prune = RunConfig.from_yaml("smollm2-rome-prune-revive")
    assert rome_prune.transforms == ["prune", "revive"] and rome_prune.batch_size == 1
    control = RunConfig.from_yaml("smollm2-rome-prune")  # the same without REVIVE
    assert control.transforms == ["prune"] and control.plugins == rome_prune.plugins and control.batch_size == 1


def test_schedule_resume_equals_uninterrupted(run_config):
    straight = Run.start(run_config("straight")).execute()
    r1 = rows(straight)
    assert [r["edits"] for r in r1] == [0, 2, 4]
    assert r1[0]["glue_sst2_accuracy"] == r1[0]["glue_sst2_accuracy"]  # baseline present
    # the pre-edit row scores the facts of the first checkpoint (2 here) and the first batch, before editing them
    assert r1[0]["facts_evaluated"] == 2 and "efficacy_score" in r1[0] and "last_batch_efficacy_score" in r1[0]
    assert r1[0]["efficacy_magnitude"] != r1[-1]["efficacy_magnitude"]  # measured before the edits, not after
    assert "efficacy_score" in r1[-1] and r1[-1]["facts_evaluated"] == 4
    assert r1[-1]["fluency_prompts"] == 4 and r1[-1]["fluency"] >= 0.0
    assert any(k.startswith("spectral/") and k.endswith("/ls") for k in r1[-1])
    res = [json.loads(line) for line in (straight / "resources.jsonl").read_text().splitlines()]
    assert [r["edits"] for r in res] == [0, 2, 4]
    assert res[0]["edit_seconds"] == 0 and all(r["edit_seconds"] > 0 and r["filter_seconds"] > 0 for r in res[1:])
    assert all(0 < r["rss_mb"] <= r["peak_rss_mb"] + 1 and r["eval_seconds"] > 0 for r in res)
    assert all(r["live_tensors"] > 0 and r["live_tensor_mb"] > 0 and r["window_peak_rss_mb"] <= r["peak_rss_mb"] for r in res)
    assert all(r["threads"] == torch.get_num_threads() and 0 < r["cpu_share"] <= 1.05 for r in res)
    assert all(r["matmul_gflops"] > 0 and isinstance(r["cpu_model"], str) for r in res)

    part = Run.start(run_config("resumed"))
    part.execute(stop_after=2)
    assert [r["edits"] for r in rows(part.run_dir)] == [0, 2]
    # A run from before pre-edit fact scores: its first row gets them on resume, from the unedited model.
    metrics = part.run_dir / "metrics.jsonl"
    old = rows(part.run_dir)
    facts = ("efficacy", "generalization", "specificity", "last_batch", "easyedit", "fluency", "facts_evaluated")
    old[0] = {k: v for k, v in old[0].items() if not k.startswith(facts)}
    assert "efficacy_score" not in old[0] and "ppl" in old[0]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in old))
    easyedit.disable_easyedit()  # a new process would start from nothing
    resumed = Run.resume(part.run_dir).execute()
    r2 = rows(resumed)
    assert [r["edits"] for r in r2] == [0, 2, 4]
    for a, b in zip(r1, r2):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), k
    from safetensors.torch import load_file

    wa = load_file(str(straight / "checkpoint" / "weights.safetensors"))
    wb = load_file(str(resumed / "checkpoint" / "weights.safetensors"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6)
    assert (resumed / "summary.md").exists() and (resumed / "spectral.png").exists()


def _keyboard_interrupt() -> None:
    raise KeyboardInterrupt


def interrupt_editor_call(monkeypatch, n, interrupt=_keyboard_interrupt):
    """The n-th editor call through the adapter runs ``interrupt`` first (default: Ctrl-C); returns the adapter's
    own ``_wrap_apply`` to put back."""
    original = easyedit._wrap_apply
    calls = {"n": 0}

    def wrap(alg, fn):
        wrapped = original(alg, fn)

        def apply(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == n:
                interrupt()
            return wrapped(*args, **kwargs)
        apply.__revive_wrapped__ = fn
        return apply

    monkeypatch.setattr(easyedit, "_wrap_apply", wrap)
    return original


def test_ctrl_c_leaves_a_usable_checkpoint(run_config, monkeypatch):
    run = Run.start(run_config("interrupted", edits=4, eval_every=4))
    original = interrupt_editor_call(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        run.execute()
    state = json.loads((run.run_dir / "checkpoint" / "state.json").read_text())
    assert state["edits_done"] == 2
    monkeypatch.setattr(easyedit, "_wrap_apply", original)
    easyedit.disable_easyedit()
    done = Run.resume(run.run_dir).execute()
    assert [r["edits"] for r in rows(done)] == [0, 4]


def test_interrupt_during_a_checkpoint_evaluation_is_redone_on_resume(run_config, monkeypatch):
    run = Run.start(run_config("eval-interrupted", edits=2, eval_every=2))
    original = Run._evaluate

    def interrupting(self, done, *args, **kwargs):
        if done == 2:
            raise KeyboardInterrupt
        return original(self, done, *args, **kwargs)

    monkeypatch.setattr(Run, "_evaluate", interrupting)
    with pytest.raises(KeyboardInterrupt):
        run.execute()
    assert json.loads((run.run_dir / "checkpoint" / "state.json").read_text())["edits_done"] == 2
    assert [r["edits"] for r in rows(run.run_dir)] == [0]
    monkeypatch.setattr(Run, "_evaluate", original)
    easyedit.disable_easyedit()
    done = Run.resume(run.run_dir).execute()
    assert [r["edits"] for r in rows(done)] == [0, 2]


def test_cli_eval_and_compare(run_config, tmp_path, capsys):
    cfg = run_config("cli-a", edits=2, eval_every=2)
    path = tmp_path / "cli.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    assert main(["eval", str(path), "--output", str(tmp_path / "a")]) == 0
    assert main(["eval", str(path), "--output", str(tmp_path / "a")]) == 2  # refuses to clobber a run
    assert main(["eval", str(path), "--set", "transforms=[]", "--set", "name=cli-b",
                 "--output", str(tmp_path / "b")]) == 0
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--output", str(tmp_path / "cmp")]) == 0
    text = (tmp_path / "cmp" / "compare.md").read_text()
    assert "cli-a" in text and "cli-b" in text and (tmp_path / "cmp" / "editing.png").exists()


def test_batched_z_from_the_run_config(run_config, monkeypatch):
    from revive_plugin.adapters.compat import import_easyeditor

    main_mod = import_easyeditor("easyeditor.models.memit.memit_main")
    calls = []
    original = main_mod.compute_z
    monkeypatch.setattr(main_mod, "compute_z", lambda *a, **k: calls.append(1) or original(*a, **k))
    done = Run.start(run_config("batched", batched_z=True, edits=2)).execute()
    assert [r["edits"] for r in rows(done)] == [0, 2]
    assert rows(done)[-1]["facts_evaluated"] == 2
    assert calls == []  # easyeditor's per-request compute_z was replaced for the whole run


def lean(run_config, name, **extra):
    """A run_config without GLUE and perplexity (what these tests check does not need them)."""
    return run_config(name, glue={"tasks": [], "n_per_task": 0, "few_shot": 0, "dir": None}, ppl=None, **extra)


def test_extending_a_run_with_resume_edits_equals_an_uninterrupted_run(run_config, tmp_path, capsys):
    from safetensors.torch import load_file

    straight = Run.start(lean(run_config, "six", edits=6, fluency_prompts=0)).execute()
    easyedit.disable_easyedit()
    four = Run.start(lean(run_config, "four", edits=4, fluency_prompts=0)).execute()
    assert [r["edits"] for r in rows(four)] == [0, 2, 4]
    easyedit.disable_easyedit()
    assert main(["eval", "--resume", str(four), "--edits", "6"]) == 0
    assert yaml.safe_load((four / "config.yaml").read_text())["edits"] == 6
    r1, r2 = rows(straight), rows(four)
    assert [r["edits"] for r in r2] == [0, 2, 4, 6]
    for a, b in zip(r1, r2):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), (a["edits"], k)
    wa = load_file(str(straight / "checkpoint" / "weights.safetensors"))
    wb = load_file(str(four / "checkpoint" / "weights.safetensors"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6)
    capsys.readouterr()
    assert main(["eval", "--resume", str(four), "--edits", "2"]) == 2  # a run is never shortened
    assert "--edits 2 is below the 6 edits" in capsys.readouterr().err


@pytest.mark.parametrize("extra, named", [
    (["--set", "revive.tau=0.2"], "--set"), (["--seed", "3"], "--seed"), (["--data", "x.json"], "--data"),
    (["--overwrite"], "--overwrite would delete it"),
])
def test_resume_refuses_overrides_other_than_edits(tmp_path, capsys, extra, named):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("sentinel")
    assert main(["eval", "--resume", str(run_dir), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("revive: error: ") and named in err and "Traceback" not in err
    assert (run_dir / "config.yaml").read_text() == "sentinel"


HALF_PLUGIN = '''
"""A third-party plugin for the tests: scales each delta by its block's `scale`; records what it was given."""
from revive_plugin import hookimpl

SEEN = []


@hookimpl
def easyedit_transform_delta(name, delta, weight, context):
    block = context.configs.get("half")
    if block is None:
        return None
    SEEN.append(dict(block))
    return delta * float(block.get("scale", 0.5))
'''


@pytest.fixture
def half_plugin(tmp_path, monkeypatch):
    """Installs the plugin `half` for real: a module and a dist-info with its entry point on sys.path."""
    site = tmp_path / "site"
    dist = site / "revive_test_half-0.1.dist-info"
    dist.mkdir(parents=True)
    (site / "revive_test_half.py").write_text(HALF_PLUGIN)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: revive-test-half\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[easyedit.plugins]\nhalf = revive_test_half\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delenv("EASYEDIT_PLUGINS", raising=False)
    module = importlib.import_module("revive_test_half")
    module.SEEN.clear()
    yield module
    sys.modules.pop("revive_test_half", None)


def test_run_config_plugins_blocks_and_set_reach_any_plugin(run_config, half_plugin, tmp_path):
    cfg = lean(run_config, "half", transforms=["half", "revive"], plugins={"half": {"scale": 0.5}}, edits=2,
               fluency_prompts=0, eval_last_batch=False)
    path = tmp_path / "half.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    assert main(["eval", str(path), "--set", "plugins.half.scale=0.25", "--output", str(tmp_path / "h")]) == 0
    assert half_plugin.SEEN and all(block == {"scale": 0.25} for block in half_plugin.SEEN)
    saved = yaml.safe_load((tmp_path / "h" / "config.yaml").read_text())
    assert saved["plugins"] == {"half": {"scale": 0.25}} and saved["revive"] == {"tau": 0.3}


def test_plugin_blocks_are_checked_against_transforms():
    base = {"name": "x", "hparams": "h.yaml"}
    assert RunConfig.from_dict({**base, "transforms": ["revive"], "plugins": {"revive": {"tau": 0.2}}}) \
        .plugin_block("revive") == {"tau": 0.2}
    assert RunConfig.from_dict({**base, "transforms": ["revive"], "revive": {"tau": 0.2}}).plugin_block("revive") \
        == {"tau": 0.2}
    with pytest.raises(ValueError, match="revive.tau"):
        RunConfig.from_dict({**base, "transforms": ["revive"], "plugins": {"revive": {"tau": 3}}})
    with pytest.raises(ValueError, match=r"revive block is given twice"):
        RunConfig.from_dict({**base, "transforms": ["revive"], "revive": {"tau": 0.2},
                             "plugins": {"revive": {"tau": 0.3}}})
    with pytest.raises(ValueError, match=r"plugins.half is set but 'half' is not in transforms \['revive'\]"):
        RunConfig.from_dict({**base, "transforms": ["revive"], "plugins": {"half": {"scale": 0.5}}})
    with pytest.raises(ValueError, match=r"plugins.half must be a mapping"):
        RunConfig.from_dict({**base, "transforms": ["half"], "plugins": {"half": 0.5}})
    with pytest.raises(ValueError, match=r"unknown run setting.*'half'.*--set plugins.half.KEY=VALUE"):
        RunConfig.from_dict(apply_overrides({**base, "transforms": ["half"]}, ["half.scale=0.25"]))


def test_a_transform_that_is_not_installed_fails_before_anything_is_made(run_config, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("EASYEDIT_PLUGINS", raising=False)
    cfg = run_config("nope", transforms=["nope"])
    path = tmp_path / "nope.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    assert main(["eval", str(path), "--output", str(tmp_path / "nope-run")]) == 2
    err = capsys.readouterr().err
    assert "transforms names plugin(s) ['nope'] that are not installed; discovered plugins: [" in err
    assert "'revive'" in err and "Traceback" not in err
    assert not (tmp_path / "nope-run").exists()


def test_stop_at_collapse_ends_the_run_at_its_first_collapsed_checkpoint(run_config, monkeypatch, capsys):
    from revive_plugin.eval import perplexity as ppl_module
    from revive_plugin.eval.study import StudyRun

    calls = []

    def rising(model, tok, texts, **kwargs):  # ×1 before the edits, then ×3: the first checkpoint collapses
        calls.append(1)
        return {"ppl": 10.0 * (1 + 2 * (len(calls) > 1)), "ppl_nll": 1.0, "ppl_tokens": 5}

    monkeypatch.setattr(ppl_module, "perplexity", rising)
    with pytest.raises(ValueError, match="stop_at_collapse needs the perplexity measure"):
        run_config("no-ppl", stop_at_collapse=True, ppl=None)
    cfg = run_config("stops", stop_at_collapse=True, edits=6, eval_facts=1, eval_all_at_end=True, fluency_prompts=0)
    run_dir = Run.start(cfg).execute()
    r = rows(run_dir)
    assert [x["edits"] for x in r] == [0, 2] and r[1]["collapsed"] and r[1]["ppl_rel"] == pytest.approx(3.0)
    assert r[0]["facts_evaluated"] == 1 and r[1]["facts_evaluated"] == 2  # the last checkpoint scores every fact
    state = json.loads((run_dir / "checkpoint" / "state.json").read_text())
    assert state["edits_done"] == 2 and state["stopped_at_collapse"] == 2
    assert "collapsed at 2 edits" in capsys.readouterr().out
    # A resume edits nothing more and says how to go on; a study counts the run as finished.
    easyedit.disable_easyedit()
    assert [x["edits"] for x in rows(Run.resume(run_dir).execute())] == [0, 2]
    assert "stop_at_collapse: false" in capsys.readouterr().out
    study_run = StudyRun("stops", "unused", ["edits=6"], run_dir)
    assert study_run.finished() and study_run.reached(4) and "collapsed at 2 edits" in study_run.state()
