"""The plugin author's path, end to end: the README's example plugin (tests/fixtures/easyedit-half) is
pip-installed for real into a temporary directory, discovered through its entry point, configured from its
`half:` hparams block (validated when the hparams load), ordered with REVIVE, and run on real easyeditor FT
edits of a tiny LLaMA."""
import importlib
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from revive_plugin import EditRejected, protected_basis
from revive_plugin.adapters import easyedit
from revive_plugin.adapters.compat import import_easyeditor
from revive_plugin.host import describe_plugins, get_plugin_manager, installed_plugins

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "easyedit-half"
PARAM = "model.layers.1.mlp.down_proj.weight"
FT = {
    "alg_name": "FT", "device": 0, "model_parallel": False, "layers": [1], "num_steps": 3, "lr": 0.05,
    "weight_decay": 0.0, "kl_factor": 0.0, "norm_constraint": 5e-2, "batch_size": 1, "max_length": 40,
    "rewrite_module_tmp": "model.layers.{}.mlp.down_proj", "layer_module_tmp": "model.layers.{}",
    "mlp_module_tmp": "model.layers.{}.mlp", "attn_module_tmp": "model.layers.{}.self_attn",
    "ln_f_module": "model.norm", "lm_head_module": "lm_head",
}
REQUEST = dict(prompts=["The mother tongue of Danielle Darrieux is"], target_new=["English"],
               ground_truth=["French"], subject=["Danielle Darrieux"])


@pytest.fixture(scope="module")
def installed_half(tmp_path_factory):
    """`pip install` of the example plugin package into a private target directory put on sys.path."""
    tmp = tmp_path_factory.mktemp("half")
    src = tmp / "src"
    shutil.copytree(FIXTURE, src)  # the build writes egg-info/build next to the sources: not into the repo
    site = tmp / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(site), str(src)], check=True, capture_output=True)
    sys.path.insert(0, str(site))
    importlib.invalidate_caches()
    yield site
    sys.path.remove(str(site))
    sys.modules.pop("easyedit_half", None)


@pytest.fixture
def session(installed_half, tmp_path, monkeypatch):
    monkeypatch.setenv("REVIVE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("EASYEDIT_PLUGINS", raising=False)
    yield
    easyedit.disable_easyedit()


def hparams_file(tmp_path, model_dir, **blocks):
    path = tmp_path / f"ft-{len(list(tmp_path.glob('ft-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump({**FT, "model_name": str(model_dir), **blocks}))
    return path


def load(path):
    return import_easyeditor("easyeditor.models.ft.ft_hparams").FTHyperParams.from_hparams(str(path))


def edit(path):
    """One real FT edit step; returns (W_before, W_after) of the edited weight and the step's record."""
    hp = load(path)
    torch.manual_seed(0)
    editor = import_easyeditor("easyeditor.editors.editor").BaseEditor.from_hparams(hp)
    w0 = editor.model.get_parameter(PARAM).detach().clone()
    editor.edit(**REQUEST, keep_original_weight=False, verbose=False)
    return w0, editor.model.get_parameter(PARAM).detach().clone(), easyedit.step_records(editor.model)[-1]


def test_installed_plugin_is_discovered_by_its_entry_point_name(installed_half, monkeypatch):
    monkeypatch.delenv("EASYEDIT_PLUGINS", raising=False)
    assert installed_plugins()["half"] == "entry point of easyedit-half 0.1.0"
    plugins = {p["name"]: p for p in describe_plugins(get_plugin_manager())}
    assert plugins["half"]["module"] == "easyedit_half"
    assert plugins["half"]["hooks"] == ["easyedit_edit_step_end", "easyedit_transform_delta",
                                        "easyedit_validate_config"]
    monkeypatch.setenv("EASYEDIT_PLUGINS", "half")
    assert [p["name"] for p in describe_plugins(get_plugin_manager())] == ["half"]


def test_bad_block_fails_when_the_hparams_load(session, tmp_path, tiny_model_dir):
    easyedit.enable_easyedit(device="cpu")
    with pytest.raises(ValueError, match=r"ft-0\.yaml: `half:` block: half\.scale must be a number .*got 'abc'"):
        load(hparams_file(tmp_path, tiny_model_dir, half={"scale": "abc"}))
    with pytest.raises(ValueError, match=r"unknown half setting\(s\) \['scael'\]"):
        load(hparams_file(tmp_path, tiny_model_dir, half={"scael": 0.5}))
    # The block the plugin returned (defaults filled in) is what its hooks will see.
    assert load(hparams_file(tmp_path, tiny_model_dir, half=None)).plugin_configs == {"half": {"scale": 0.5}}


def test_settings_reach_a_real_edit_and_no_block_means_no_effect(session, tmp_path, tiny_model_dir):
    easyedit.enable_easyedit(device="cpu")
    w0, raw, rec = edit(hparams_file(tmp_path, tiny_model_dir))  # plugin installed, no `half:` block
    assert rec.changed and rec.transformed == [] and rec.metrics == {}
    w0b, scaled, rec = edit(hparams_file(tmp_path, tiny_model_dir, half={"scale": 0.25}))
    assert torch.equal(w0, w0b) and rec.transformed == [PARAM]
    torch.testing.assert_close(scaled - w0, 0.25 * (raw - w0), rtol=1e-5, atol=1e-7)
    assert rec.metrics[f"half/{PARAM}/delta_in_norm"] == pytest.approx(float((raw - w0).norm()), rel=1e-5)


def test_order_decides_which_plugin_sees_the_raw_delta(session, tmp_path, tiny_model_dir):
    easyedit.enable_easyedit(device="cpu")
    blocks = {"half": {"scale": 0.5}, "revive": {"tau": 0.3}}
    w0, raw, _ = edit(hparams_file(tmp_path, tiny_model_dir))
    _, half_first, rec_h = edit(hparams_file(tmp_path, tiny_model_dir, **blocks,
                                             edit_plugins={"order": ["half", "revive"]}))
    _, revive_first, rec_r = edit(hparams_file(tmp_path, tiny_model_dir, **blocks,
                                               edit_plugins={"order": ["revive", "half"]}))
    key = f"half/{PARAM}/delta_in_norm"
    raw_norm = float((raw - w0).norm())
    assert rec_h.metrics[key] == pytest.approx(raw_norm, rel=1e-5)  # half ran first: the editor's delta
    b = protected_basis(w0, 0.3)
    u, v, delta = b.u.double(), b.v.double(), (raw - w0).double()
    filtered = delta - u @ (u.T @ delta)
    filtered = (filtered - (filtered @ v) @ v.T).float()
    assert rec_r.metrics[key] == pytest.approx(float(filtered.norm()), rel=1e-4)  # after REVIVE's projection
    assert rec_r.metrics[key] < raw_norm
    # Both transforms are linear, so both orders write 0.5 × the filtered delta.
    torch.testing.assert_close(half_first - w0, 0.5 * filtered, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(revive_first - w0, 0.5 * filtered, rtol=1e-4, atol=1e-6)


def test_excluded_plugin_block_is_dropped_with_a_warning(session, tmp_path, tiny_model_dir, monkeypatch):
    easyedit.enable_easyedit(device="cpu")
    w0, raw, _ = edit(hparams_file(tmp_path, tiny_model_dir))
    easyedit.disable_easyedit()
    monkeypatch.setenv("EASYEDIT_PLUGINS", "revive")
    easyedit.enable_easyedit(device="cpu")
    path = hparams_file(tmp_path, tiny_model_dir, half={"scale": 0.25}, edit_plugins={"order": ["half"]})
    with pytest.warns(UserWarning, match=r"\['half'\] have no effect.*EASYEDIT_PLUGINS='revive'"):
        hp = load(path)  # easyeditor would raise TypeError on the unknown `half` field
    assert hp.plugin_configs == {"edit_plugins": {"order": []}}
    with pytest.warns(UserWarning, match="no effect"):
        _, after, rec = edit(path)
    assert rec.transformed == [] and torch.equal(after, raw)


def test_a_plugin_refusing_its_block_at_an_edit_step_leaves_the_weights(session, tmp_path, tiny_model_dir):
    """Blocks set after loading (as a run harness does) are validated again before the editor runs."""
    easyedit.enable_easyedit(device="cpu")
    hp = load(hparams_file(tmp_path, tiny_model_dir))
    hp.plugin_configs = {"half": {"scale": 2}}
    editor = import_easyeditor("easyeditor.editors.editor").BaseEditor.from_hparams(hp)
    before = {n: p.detach().clone() for n, p in editor.model.named_parameters()}
    with pytest.raises(EditRejected, match=r"before the editor ran.*half\.scale .*got 2"):
        editor.edit(**REQUEST, keep_original_weight=False, verbose=False)
    assert all(torch.equal(p.detach(), before[n]) for n, p in editor.model.named_parameters())


def test_readme_shows_the_tested_plugin():
    """The README's "Writing a plugin" section shows exactly the files this test installs."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### Writing a plugin"):]
    section = section[: section.index("\n## ")]
    blocks = re.findall(r"```(\w+)\n(.*?)```", section, flags=re.S)
    code = {lang: body for lang, body in blocks}
    assert code["python"] == (FIXTURE / "easyedit_half.py").read_text()
    assert code["toml"] == (FIXTURE / "pyproject.toml").read_text()
