"""The `revive` command line: help texts, argument checks before anything loads, damaged hparams files.

Fast: argument parsing and validation only; every model loader is replaced by one that fails the test.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import pytest
import yaml

from revive_plugin import cli
from revive_plugin.adapters import demo
from revive_plugin.cli import build_parser, main
from revive_plugin.eval.harness import CONFIG_DIR

SHIPPED_MEMIT = Path(demo.DEFAULT_HPARAMS)
COMMANDS = ("plugins", "editors", "prepare-model", "edit-stats", "demo", "eval", "calibrate", "study", "sweep",
            "ablate", "compare")


def help_text(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--help"])
    assert exc.value.code == 0
    return capsys.readouterr().out


@pytest.fixture(autouse=True)
def narrow_terminal(monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if anything would load a model or easyeditor."""
    from revive_plugin.adapters import compat, easyedit, models

    def forbidden(*args, **kwargs):
        pytest.fail("a model or easyeditor was loaded before the arguments were checked")

    monkeypatch.setattr(models, "load_model", forbidden)
    monkeypatch.setattr(models, "embedded_model_dir", forbidden)
    monkeypatch.setattr(easyedit, "enable_easyedit", forbidden)
    monkeypatch.setattr(compat, "import_easyeditor", forbidden)


# -- help -------------------------------------------------------------------------------------------
def test_top_level_help_is_plain_text_with_commands_and_environment(capsys):
    out = help_text(capsys)
    assert "``" not in out and ":class:" not in out  # no reST
    lines = out.splitlines()
    for name in COMMANDS:
        # one line per command: its name followed by its help on the same line
        line = next((ln for ln in lines if ln.strip().split(" ")[0] == name), None)
        assert line is not None and len(line.split()) > 1, (name, out)
    assert "REVIVE_CACHE" in out and "~/.cache/revive-plugin" in out
    assert "EASYEDIT_PLUGINS" in out and "empty = none" in out


def test_eval_help_lists_configs_set_keys_formats_overwrite_and_environment(capsys):
    out = help_text(capsys, "eval")
    shipped = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    assert shipped and all(name in out for name in shipped)
    for key in ("revive.KEY", "plugins.NAME.KEY", "hparams_overrides.KEY", "glue.KEY", "ppl.KEY", "tau",
                "n_per_task", "max_tokens", "batch_size", "eval_every", "eval_facts", "transforms", "order"):
        assert key in out, key
    for fmt in ("ROME format", "MEND/EasyEdit", ".json.gz", "zsRE in MEND format", "order=seeded"):
        assert fmt in out, fmt
    assert "--overwrite" in out and "DELETES" in out
    assert "REVIVE_CACHE" in out and "EASYEDIT_PLUGINS" in out


def test_eval_help_follows_the_config_dir(capsys, monkeypatch, tmp_path):
    from revive_plugin.eval import harness

    (tmp_path / "my-run.yaml").write_text("# A run config made for this test.\nname: my-run\nhparams: x.yaml\n")
    monkeypatch.setattr(harness, "CONFIG_DIR", tmp_path)
    out = help_text(capsys, "eval")
    assert "my-run" in out and "A run config made for this test." in out


def test_every_argument_of_every_command_has_help():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) == set(COMMANDS)
    for name, p in sub.choices.items():
        for action in p._actions:
            assert action.help, (name, action.dest)
        assert p.description, name


@pytest.mark.parametrize("command, example", [
    ("calibrate", "revive calibrate smollm2-memit --data ../shared/data/counterfact/counterfact.json.gz"),
    ("calibrate", "--grid 'run.transforms=[[],[revive]]'"),
    ("study", "revive study length --status"),
    ("sweep", "RAY_ADDRESS=ray://head:10001 revive sweep"),
    ("ablate", "revive ablate docs/results/length/memit-revive"),
])
def test_calibrate_and_study_help_have_an_example(capsys, command, example):
    out = help_text(capsys, command)
    assert example in out


def test_demo_grad_steps_defaults_to_the_hparams_file():
    args = build_parser().parse_args(["demo"])
    assert args.grad_steps is None
    checked = demo.check_demo_args()
    assert checked.grad_steps == yaml.safe_load(SHIPPED_MEMIT.read_text())["v_num_grad_steps"]
    assert not checked.grad_steps_given
    assert demo.check_demo_args(grad_steps=15).grad_steps == 15


# -- demo: every argument checked before anything loads ----------------------------------------------------
def run_cli(capsys, *argv: str) -> tuple[int, str]:
    start = time.monotonic()
    rc = main(list(argv))
    assert time.monotonic() - start < 10
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("argv, needles", [
    (["--tau", "0"], ["--tau 0.0", "0 < tau <= 1", "--tau 0.1"]),
    (["--tau", "1.5"], ["--tau 1.5", "0 < tau <= 1"]),
    (["--tau", "nan"], ["--tau nan", "0 < tau <= 1"]),
    (["--edits", "0"], ["--edits 0", "from 1 to 6"]),
    (["--edits", "7"], ["--edits 7", "from 1 to 6"]),
    (["--grad-steps", "0"], ["--grad-steps 0", "positive whole number", "leave it out"]),
    (["--grad-steps", "-3"], ["--grad-steps -3", "positive whole number"]),
])
def test_demo_bad_argument_fails_fast_without_loading(capsys, no_model, argv, needles):
    rc, err = run_cli(capsys, "demo", *argv)
    assert rc == 2
    assert err.startswith("revive: error: ")
    for needle in needles:
        assert needle in err, (needle, err)


def test_demo_hparams_checked_before_loading(capsys, no_model, tmp_path):
    memit = yaml.safe_load(SHIPPED_MEMIT.read_text())

    rc, err = run_cli(capsys, "demo", "--hparams", str(tmp_path / "missing.yaml"))
    assert rc == 2 and "missing.yaml" in err and "not found" in err

    rome = tmp_path / "rome.yaml"
    rome.write_text(yaml.safe_dump({**memit, "alg_name": "ROME"}))
    rc, err = run_cli(capsys, "demo", "--hparams", str(rome))
    assert rc == 2 and str(rome) in err and "'ROME'" in err and "alg_name: MEMIT" in err

    partial = tmp_path / "partial.yaml"
    partial.write_text(yaml.safe_dump({k: v for k, v in memit.items() if k not in ("v_lr", "kl_factor")}))
    rc, err = run_cli(capsys, "demo", "--hparams", str(partial))
    assert rc == 2 and str(partial) in err and "not a valid hparams YAML" in err
    assert "'v_lr'" in err and "'kl_factor'" in err

    broken = tmp_path / "broken.yaml"
    broken.write_text("alg_name: MEMIT\nlayers: [4, 5\n")
    rc, err = run_cli(capsys, "demo", "--hparams", str(broken))
    assert rc == 2 and str(broken) in err and "not a valid hparams YAML" in err

    steps = tmp_path / "steps.yaml"
    steps.write_text(yaml.safe_dump({**memit, "v_num_grad_steps": 0}))
    rc, err = run_cli(capsys, "demo", "--hparams", str(steps))
    assert rc == 2 and str(steps) in err and "v_num_grad_steps" in err and "--grad-steps" in err

    bad_block = tmp_path / "block.yaml"
    bad_block.write_text(yaml.safe_dump({**memit, "revive": {"taus": 0.1}}))
    rc, err = run_cli(capsys, "demo", "--hparams", str(bad_block))
    assert rc == 2 and str(bad_block) in err and "taus" in err

    yml = tmp_path / "memit.yml"
    yml.write_text(yaml.safe_dump(memit))
    rc, err = run_cli(capsys, "demo", "--hparams", str(yml))
    assert rc == 2 and ".yaml" in err


class FakeEditor:
    """BaseEditor stand-in: records the hparams it was built from and the edits; no model."""

    built: list = []

    def __init__(self, hp):
        import torch

        self.hp, self.tok, self.edits = hp, None, []
        weights = {f"{hp.rewrite_module_tmp.format(layer)}.weight": torch.randn(8, 6) for layer in hp.layers}
        self.model = type("Model", (), {"get_parameter": lambda _, name: weights[name]})()
        FakeEditor.built.append(self)

    @classmethod
    def from_hparams(cls, hp):
        return cls(hp)

    def edit(self, **request):
        self.edits.append(request)


class FakeHparams:
    """MEMITHyperParams stand-in: the YAML's settings, plugin blocks popped as the adapter pops them."""

    @classmethod
    def from_hparams(cls, path):
        from revive_plugin.adapters.easyedit import BATCHED_Z_BLOCK, PLUGIN_CONFIGS_ATTR, batched_z_options

        hp = cls()
        settings = yaml.safe_load(Path(path).read_text())
        blocks = {k: settings.pop(k) for k in ("revive", BATCHED_Z_BLOCK) if k in settings}
        if BATCHED_Z_BLOCK in blocks:
            blocks[BATCHED_Z_BLOCK] = batched_z_options(blocks[BATCHED_Z_BLOCK])
        vars(hp).update(settings)
        setattr(hp, PLUGIN_CONFIGS_ATTR, blocks)
        return hp


@pytest.fixture
def fake_easyeditor(monkeypatch):
    """run_demo's easyeditor and model replaced by stand-ins: the demo's own logic only, in milliseconds."""
    from revive_plugin.adapters import compat, easyedit

    modules = {"easyeditor.editors.editor": type("M", (), {"BaseEditor": FakeEditor}),
               "easyeditor.models.memit.memit_hparams": type("M", (), {"MEMITHyperParams": FakeHparams})}
    monkeypatch.setattr(compat, "import_easyeditor", lambda name: modules[name])
    monkeypatch.setattr(easyedit, "enable_easyedit", lambda *a, **k: None)
    monkeypatch.setattr(demo, "_probs", lambda model, tok, cases: [(0.1, 0.2)] * len(cases))
    FakeEditor.built = []
    return FakeEditor.built


def test_demo_runs_the_files_grad_steps_on_the_batched_z_path(fake_easyeditor, capsys, tmp_path):
    from revive_plugin.adapters.easyedit import BATCHED_Z_BLOCK, PLUGIN_CONFIGS_ATTR

    assert demo.run_demo(edits=2, tau=0.2) == 0
    plain, revive = fake_easyeditor
    file_steps = yaml.safe_load(SHIPPED_MEMIT.read_text())["v_num_grad_steps"]
    for editor in (plain, revive):
        assert editor.hp.v_num_grad_steps == file_steps  # not a forced CPU profile
        assert getattr(editor.hp, PLUGIN_CONFIGS_ATTR)[BATCHED_Z_BLOCK] == {"chunk": 16, "early_exit": True}
        assert len(editor.edits) == 2
    assert "revive" not in getattr(plain.hp, PLUGIN_CONFIGS_ATTR)
    assert getattr(revive.hp, PLUGIN_CONFIGS_ATTR)["revive"]["tau"] == 0.2
    assert f"v_num_grad_steps={file_steps} from the hparams file, batched z" in capsys.readouterr().out

    fake_easyeditor.clear()
    assert demo.run_demo(edits=1, grad_steps=3) == 0
    assert [e.hp.v_num_grad_steps for e in fake_easyeditor] == [3, 3]

    # the hparams file's own batched_z block wins, even `false`
    off = tmp_path / "off.yaml"
    off.write_text(yaml.safe_dump({**yaml.safe_load(SHIPPED_MEMIT.read_text()), "batched_z": False}))
    fake_easyeditor.clear()
    assert demo.run_demo(edits=1, hparams=str(off)) == 0
    assert [getattr(e.hp, PLUGIN_CONFIGS_ATTR)[BATCHED_Z_BLOCK] for e in fake_easyeditor] == [None, None]
    assert "easyeditor's compute_z" in capsys.readouterr().out


# -- edit-stats: damaged hparams files are named --------------------------------------------------------
@pytest.mark.parametrize("content, needle", [
    ("model_name: x\nlayers: [1, 2\n", "does not parse"),
    ("- just\n- a list\n", "not a mapping"),
    ("", "not a mapping"),
    ("model_name: x\nlayers: [1]\n", "missing ['rewrite_module_tmp']"),
    ("model_name: x\nlayers: 3\nrewrite_module_tmp: 'model.layers.{}.mlp'\n", "layers is 3"),
    ("model_name: x\nlayers: [1]\nrewrite_module_tmp: 'model.mlp'\n", "rewrite_module_tmp is 'model.mlp'"),
    ("model_name: x\nlayers: [1]\nrewrite_module_tmp: 'm.{}'\nmom2_n_samples: lots\n", "mom2_n_samples"),
])
def test_edit_stats_names_a_malformed_hparams_file(capsys, no_model, tmp_path, content, needle):
    path = tmp_path / "hp.yaml"
    path.write_text(content)
    rc, err = run_cli(capsys, "edit-stats", "--hparams", str(path))
    assert rc == 2, err
    assert err.startswith("revive: error: ") and str(path) in err and needle in err, err
    if needle != "mom2_n_samples":
        assert "not a valid hparams YAML" in err
        assert "model_name" in err and "layers" in err and "rewrite_module_tmp" in err  # what is expected


def test_edit_stats_missing_or_directory_hparams(capsys, no_model, tmp_path):
    rc, err = run_cli(capsys, "edit-stats", "--hparams", str(tmp_path / "nope.yaml"))
    assert rc == 2 and "nope.yaml" in err and "not found" in err
    rc, err = run_cli(capsys, "edit-stats", "--hparams", str(tmp_path))
    assert rc == 2 and str(tmp_path) in err and "directory" in err


def test_read_hparams_yaml_accepts_the_shipped_files():
    for path in sorted((SHIPPED_MEMIT.parent.parent).glob("*/smollm2-135m.yaml")):
        hp = cli.read_hparams_yaml(path, cli.HPARAMS_KEYS, "test")
        assert hp["layers"]
