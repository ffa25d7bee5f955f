"""Real easyeditor edits (MEMIT, ROME, FT) through enable_easyedit on a tiny in-process LLaMA, and the YAML switch."""
import math
import os
import types

import pytest
import torch
import yaml

from revive_plugin import EditRejected, get_plugin_manager, hookimpl, protected_basis, safe_update
from revive_plugin.adapters import easyedit
from revive_plugin.adapters.compat import import_easyeditor

COMMON = {
    "device": 0,
    "model_parallel": False,
    "rewrite_module_tmp": "model.layers.{}.mlp.down_proj",
    "layer_module_tmp": "model.layers.{}",
    "mlp_module_tmp": "model.layers.{}.mlp",
    "attn_module_tmp": "model.layers.{}.self_attn",
    "ln_f_module": "model.norm",
    "lm_head_module": "lm_head",
}
MEMIT = {
    **COMMON, "alg_name": "MEMIT", "stats_dir": "unused", "layers": [0, 1], "clamp_norm_factor": 4,
    "layer_selection": "all", "fact_token": "subject_last", "v_num_grad_steps": 4, "v_lr": 0.5,
    "v_loss_layer": 1, "v_weight_decay": 0.001, "kl_factor": 0.0625, "mom2_adjustment": True,
    "mom2_update_weight": 100, "mom2_dataset": "me-ppl", "mom2_n_samples": 64, "mom2_dtype": "float32",
    "max_length": 40, "batch_size": 1,
}
ROME = {
    **COMMON, "alg_name": "ROME", "stats_dir": "unused", "layers": [1], "fact_token": "subject_last",
    "v_num_grad_steps": 4, "v_lr": 0.5, "v_loss_layer": 1, "v_weight_decay": 0.001, "clamp_norm_factor": 4,
    "kl_factor": 0.0625, "mom2_adjustment": True, "context_template_length_params": [[5, 5]],
    "mom2_dataset": "me-ppl", "mom2_n_samples": 64, "mom2_dtype": "float32",
}
FT = {
    **COMMON, "alg_name": "FT", "layers": [1], "num_steps": 3, "lr": 0.05, "weight_decay": 0.0,
    "kl_factor": 0.0, "norm_constraint": 5e-2, "batch_size": 1, "max_length": 40,
}
REQUEST = dict(prompts=["The mother tongue of Danielle Darrieux is"], target_new=["English"],
               ground_truth=["French"], subject=["Danielle Darrieux"])
REQUEST2 = dict(prompts=["The capital of Italy is"], target_new=["Paris"], ground_truth=["Rome"], subject=["Italy"])


def write_hparams(tmp_path, base, model_dir, **extra):
    cfg = {**base, "model_name": str(model_dir), **extra}
    p = tmp_path / f"{base['alg_name']}.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def hparams_class(alg):
    return {
        "MEMIT": "easyeditor.models.memit.memit_hparams:MEMITHyperParams",
        "ROME": "easyeditor.models.rome.rome_hparams:ROMEHyperParams",
        "FT": "easyeditor.models.ft.ft_hparams:FTHyperParams",
    }[alg]


def load(alg, path):
    module, _, name = hparams_class(alg).partition(":")
    return getattr(import_easyeditor(module), name).from_hparams(str(path))


def editor_for(hp):
    return import_easyeditor("easyeditor.editors.editor").BaseEditor.from_hparams(hp)


def edited_weights(editor, hp):
    return {f"{hp.rewrite_module_tmp.format(l)}.weight": editor.model.get_parameter(
        f"{hp.rewrite_module_tmp.format(l)}.weight") for l in hp.layers}


def test_yaml_switch_pops_and_validates_the_revive_block(tmp_path, enabled, tiny_model_dir):
    on = load("MEMIT", write_hparams(tmp_path, MEMIT, tiny_model_dir, revive={"tau": 0.2, "basis": "current"}))
    assert on.plugin_configs == {"revive": {"tau": 0.2, "basis": "current"}}
    off = load("MEMIT", write_hparams(tmp_path, MEMIT, tiny_model_dir))
    assert not hasattr(off, "plugin_configs")
    bad = write_hparams(tmp_path, MEMIT, tiny_model_dir, revive={"tau": 2})
    with pytest.raises(ValueError, match=r"MEMIT\.yaml.*tau"):
        load("MEMIT", bad)
    typo = write_hparams(tmp_path, MEMIT, tiny_model_dir, revive={"taus": 0.1})
    with pytest.raises(ValueError, match="unknown revive setting.*taus"):
        load("MEMIT", typo)
    order = write_hparams(tmp_path, MEMIT, tiny_model_dir, edit_plugins={"order": "revive"})
    with pytest.raises(ValueError, match="order must be a list"):
        load("MEMIT", order)


def test_disable_restores_easyeditor(tmp_path, tiny_model_dir):
    alg_dict = import_easyeditor("easyeditor.util.alg_dict").ALG_DICT
    original = dict(alg_dict)
    easyedit.enable_easyedit(device="cpu")
    assert alg_dict["MEMIT"] is not original["MEMIT"]
    easyedit.disable_easyedit()
    assert alg_dict == original
    with pytest.raises(TypeError):  # EasyEdit's own dataclass rejects the unknown block again
        load("MEMIT", write_hparams(tmp_path, MEMIT, tiny_model_dir, revive={"tau": 0.1}))


@pytest.mark.parametrize("alg,base", [("MEMIT", MEMIT), ("ROME", ROME), ("FT", FT)])
def test_revive_filters_every_written_delta(tmp_path, enabled, tiny_model_dir, alg, base):
    tau = 0.3
    hp = load(alg, write_hparams(tmp_path, base, tiny_model_dir, revive={"tau": tau}))
    torch.manual_seed(0)
    editor = editor_for(hp)
    weights = edited_weights(editor, hp)
    w0 = {n: w.detach().clone() for n, w in weights.items()}
    editor.edit(**REQUEST, keep_original_weight=False, verbose=False)
    editor.edit(**REQUEST2, keep_original_weight=False, verbose=False)  # sequential: accumulates
    records = easyedit.step_records(editor.model)
    assert [r.editor for r in records] == [alg, alg]
    changed = 0
    for n, w in weights.items():
        total = w.detach() - w0[n]
        if not torch.any(total):
            continue
        changed += 1
        b = protected_basis(w0[n], tau)  # basis "original": W₀ before the first edit
        assert b.k >= 1
        scale = float(total.norm())
        assert float((b.u.T.float() @ total).norm()) <= 1e-4 * scale + 1e-6
        assert float((total @ b.v.float()).norm()) <= 1e-4 * scale + 1e-6
    assert changed >= 1


def test_without_block_the_editor_is_untouched(tmp_path, enabled, tiny_model_dir):
    hp = load("MEMIT", write_hparams(tmp_path, MEMIT, tiny_model_dir))
    torch.manual_seed(0)
    editor = editor_for(hp)
    weights = edited_weights(editor, hp)
    w0 = {n: w.detach().clone() for n, w in weights.items()}
    editor.edit(**REQUEST, keep_original_weight=False, verbose=False)
    rec = easyedit.step_records(editor.model)[-1]
    assert rec.changed and rec.transformed == []
    # MEMIT's raw delta reaches into W₀'s dominant subspace — exactly what REVIVE removes.
    n = rec.changed[-1]
    total = weights[n].detach() - w0[n]
    b = protected_basis(w0[n], 0.3)
    assert float((b.u.T.float() @ total).norm()) > 1e-3 * float(total.norm())


def test_rejected_update_leaves_weights_exactly(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("REVIVE_CACHE", str(tmp_path / "cache"))
    broken = types.ModuleType("broken")

    @hookimpl
    def easyedit_transform_delta(delta):
        return delta * math.nan

    broken.easyedit_transform_delta = easyedit_transform_delta
    pm = get_plugin_manager(pinned=[])
    pm.register(broken, name="broken")
    easyedit.enable_easyedit(device="cpu", pm=pm)
    try:
        hp = load("FT", write_hparams(tmp_path, FT, tiny_model_dir))
        editor = editor_for(hp)
        before = {n: p.detach().clone() for n, p in editor.model.named_parameters()}
        with pytest.raises(EditRejected, match="broken.*non-finite"):
            editor.edit(**REQUEST, keep_original_weight=False, verbose=False)
        for n, p in editor.model.named_parameters():
            assert torch.equal(p.detach(), before[n]), n
    finally:
        easyedit.disable_easyedit()


def test_copy_true_edits_the_returned_model_only(tmp_path, enabled, tiny_model_dir):
    hp = load("FT", write_hparams(tmp_path, FT, tiny_model_dir, revive={"tau": 0.3}))
    editor = editor_for(hp)
    name = "model.layers.1.mlp.down_proj.weight"
    w0 = editor.model.get_parameter(name).detach().clone()
    requests = editor._prepare_requests(REQUEST["prompts"], REQUEST["target_new"], REQUEST["ground_truth"],
                                        subject=REQUEST["subject"])
    edited, _ = editor.apply_algo(editor.model, editor.tok, requests, hp, copy=True, return_orig_weights=True)
    assert edited is not editor.model
    assert torch.equal(editor.model.get_parameter(name), w0)
    delta = edited.get_parameter(name).detach() - w0
    assert torch.any(delta)
    torch.testing.assert_close(delta, safe_update(delta, w0, 0.3), atol=1e-5, rtol=1e-4)


def test_every_shipped_hparams_file_loads(enabled):
    from pathlib import Path

    from revive_plugin.adapters.editors import hparams_classes, passes_through

    files = sorted((Path(__file__).resolve().parent.parent / "hparams").glob("*/*.yaml"))
    assert len(files) >= 20
    classes = hparams_classes()
    for path in files:
        alg = path.parent.name
        if alg not in classes:  # the GitHub tree's editors: tests/tree loads them
            assert alg == "AlphaEdit", path
            continue
        hp = classes[alg].from_hparams(str(path))
        assert hp.alg_name == alg
        if passes_through(alg):  # adds modules (LEMoE): nothing for REVIVE to filter, so no block
            assert not getattr(hp, "plugin_configs", None), path
            continue
        assert hp.plugin_configs["revive"]["tau"] == 0.1, path
        assert "{}" in hp.rewrite_module_tmp


def test_non_weight_editors_pass_through_with_a_clear_warning():
    calls = []

    def fake_ike(model, tok, request, hparams, **kwargs):
        calls.append(request)
        return "icl examples"

    wrapped = easyedit._wrap_apply("IKE", fake_ike)
    hp = types.SimpleNamespace(plugin_configs={"revive": {"tau": 0.1}})
    model = torch.nn.Linear(2, 2)
    with pytest.warns(UserWarning, match="IKE does not write model weights.*revive"):
        assert wrapped(model, None, "req", hp) == "icl examples"
    assert calls == ["req"]
    # no step to filter, yet its run is the run's editor time (resources.jsonl's edit_seconds)
    host = easyedit.host_for(model)
    assert host.seconds["edit"] > 0 and not host.history


def test_gpt2_conv1d_weights_are_marked_transposed():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50, n_positions=32))
    hp = types.SimpleNamespace(rewrite_module_tmp="transformer.h.{}.mlp.c_proj", layers=[1])
    targets = {t.name: t for t in easyedit.target_weights(model, hp)}
    assert set(targets) == {"transformer.h.1.mlp.c_proj.weight", "transformer.h.1.mlp.c_proj.bias"}
    w = targets["transformer.h.1.mlp.c_proj.weight"]
    assert w.transposed and tuple(w.tensor.shape) == (64, 16) and tuple(w.view().shape) == (16, 64)
    assert not targets["transformer.h.1.mlp.c_proj.bias"].transposed


def test_revive_layers_must_select_a_weight_the_editor_writes(tmp_path, enabled, tiny_model_dir):
    for layers in ([99], [0], ["model.layers.1.mlp.down_prj"]):
        path = write_hparams(tmp_path, FT, tiny_model_dir, revive={"tau": 0.3, "layers": layers})
        with pytest.raises(ValueError, match=r"FT\.yaml: `revive:` block: revive\.layers entries .* select none of "
                                             r"the weights FT writes.*layers \[1\]: "
                                             r"\['model\.layers\.1\.mlp\.down_proj\.weight'\]"):
            load("FT", path)
    for layers in ([1], ["model.layers.1.mlp.down_proj"], ["model.layers.1"]):
        hp = load("FT", write_hparams(tmp_path, FT, tiny_model_dir, revive={"tau": 0.3, "layers": layers}))
        assert hp.plugin_configs["revive"]["layers"] == layers


def test_revive_layers_are_checked_again_before_each_edit(tmp_path, enabled, tiny_model_dir):
    """hparams changed after loading (as a run's hparams_overrides do): refused before the editor runs."""
    hp = load("FT", write_hparams(tmp_path, FT, tiny_model_dir, revive={"tau": 0.3, "layers": [1]}))
    hp.layers = [0]
    editor = editor_for(hp)
    before = {n: p.detach().clone() for n, p in editor.model.named_parameters()}
    with pytest.raises(EditRejected, match=r"weights untouched.*revive\.layers entries \[1\] select none of the "
                                           r"weights FT writes.*it writes layers \[0\]"):
        editor.edit(**REQUEST, keep_original_weight=False, verbose=False)
    for n, p in editor.model.named_parameters():
        assert torch.equal(p.detach(), before[n]), n


def test_unknown_top_level_keys_name_themselves_and_the_plugins(tmp_path, enabled, tiny_model_dir):
    with pytest.raises(ValueError, match=r"FT\.yaml: unknown top-level key\(s\) \['reviv'\].*discovered plugins: "
                                         r"\[.*'revive'.*\].*'reviv': did you mean 'revive'\?"):
        load("FT", write_hparams(tmp_path, FT, tiny_model_dir, reviv={"tau": 0.1}))
    with pytest.raises(ValueError, match=r"\['num_step'\].*did you mean 'num_steps'"):
        load("FT", write_hparams(tmp_path, FT, tiny_model_dir, num_step=3))


def test_plugin_order_naming_an_unknown_plugin_fails_at_load(tmp_path, enabled, tiny_model_dir):
    with pytest.raises(ValueError, match=r"edit_plugins\.order names \['nope'\], which are not installed.*"
                                         r"installed plugins: \[.*'revive'"):
        load("MEMIT", write_hparams(tmp_path, MEMIT, tiny_model_dir, revive={},
                                    edit_plugins={"order": ["nope", "revive"]}))


def test_blocks_of_an_excluded_plugin_are_dropped_with_a_warning(tmp_path, tiny_model_dir, monkeypatch):
    """EASYEDIT_PLUGINS leaves a plugin out: its block no longer reaches EasyEdit's dataclass (TypeError today)."""
    monkeypatch.setenv("REVIVE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("EASYEDIT_PLUGINS", "")
    easyedit.enable_easyedit(device="cpu")
    try:
        path = write_hparams(tmp_path, FT, tiny_model_dir, revive={"tau": 0.3})
        with pytest.warns(UserWarning, match=r"\['revive'\] have no effect.*excluded by EASYEDIT_PLUGINS=''"):
            hp = load("FT", path)
        assert not hasattr(hp, "plugin_configs")
    finally:
        easyedit.disable_easyedit()


def test_attach_plugin_configs_validates_like_the_yaml(tmp_path, enabled, tiny_model_dir):
    hp = load("FT", write_hparams(tmp_path, FT, tiny_model_dir))
    with pytest.raises(ValueError, match=r"unknown top-level key\(s\) \['reviv'\]"):
        easyedit.attach_plugin_configs(hp, reviv={"tau": 0.2})
    with pytest.raises(ValueError, match=r"revive\.layers entries \[7\] select none"):
        easyedit.attach_plugin_configs(hp, revive={"layers": [7]})
    assert easyedit.attach_plugin_configs(hp, revive=None).plugin_configs == {"revive": {}}


def test_revive_editors_on_the_release(capsys):
    """`revive editors` accounts for every ALG_DICT entry of the release: its three tested weight editors, and
    the non-weight ones passed through."""
    from revive_plugin.adapters.editors import catalogue
    from revive_plugin.cli import main

    alg_dict = import_easyeditor("easyeditor.util.alg_dict").ALG_DICT
    rows = {r.name: r for r in catalogue()}
    assert list(rows) == list(alg_dict)
    assert {n for n, r in rows.items() if r.runs_here == "tested"} == {"MEMIT", "ROME", "FT"}
    assert rows["IKE"].plugins.startswith("passed through") and rows["MEMIT"].plugins == "filtered"
    assert main(["editors"]) == 0
    out = capsys.readouterr().out
    assert "easyeditor: release 0.0.1.dev0" in out
    assert all(f"| {name} |" in out for name in alg_dict)
    assert "| LEMoE | adds modules |" in out  # this package's own editor, listed before enable_easyedit() adds it


def test_a_source_tree_is_chosen_before_easyeditor_is_imported(tmp_path, monkeypatch):
    """EASYEDIT_SOURCE (or a run's easyedit_source) must name a checkout, and cannot switch easyeditors after
    one was imported: both are errors that say what to do."""
    from revive_plugin.adapters.compat import SOURCE_ENV, easyeditor_origin
    from revive_plugin.eval.harness import RunConfig, use_easyedit_source

    monkeypatch.delenv(SOURCE_ENV, raising=False)
    assert easyeditor_origin()["kind"] == "release"  # this session's easyeditor
    with pytest.raises(ModuleNotFoundError, match=r"EASYEDIT_SOURCE=.*nowhere: no easyeditor/__init__.py"):
        use_easyedit_source(str(tmp_path / "nowhere"))
    (tmp_path / "tree" / "easyeditor").mkdir(parents=True)
    (tmp_path / "tree" / "easyeditor" / "__init__.py").write_text("")
    with pytest.raises(ModuleNotFoundError, match=r"it is the package itself: set EASYEDIT_SOURCE=.*tree"):
        use_easyedit_source(str(tmp_path / "tree" / "easyeditor"))
    with pytest.raises(ImportError, match="easyeditor was already imported from .*site-packages"):
        use_easyedit_source(str(tmp_path / "tree"))
    with pytest.raises(ValueError, match="easyedit_source must be the path of an EasyEdit checkout"):
        RunConfig(name="x", hparams="h.yaml", easyedit_source=3)
    assert SOURCE_ENV not in os.environ  # each refused choice left the process as it was
    for name in ("smollm2-alphaedit", "smollm2-alphaedit-revive"):
        cfg = RunConfig.from_yaml(name)
        assert cfg.easyedit_source == ".venv/src/EasyEdit-14cea82" and cfg.batch_size == 100
        assert cfg.transforms == (["revive"] if name.endswith("revive") else [])


def test_revive_in_loop_solves_later_layers_against_filtered_earlier_ones(tmp_path, enabled, tiny_model_dir,
                                                                          monkeypatch):
    """revive.in_loop: when MEMIT computes layer 1's keys, layer 0 already holds W₀ + P(Δ₀); the final edit keeps
    REVIVE's invariant; layer 0's delta is the same as with the filter after the step, layer 1's is not."""
    tau = 0.3
    main = import_easyeditor("easyeditor.models.memit.memit_main")
    seen = []
    finals = {}
    for in_loop in (False, True):
        easyedit.disable_easyedit()
        easyedit.enable_easyedit(device="cpu")
        (tmp_path / str(in_loop)).mkdir()
        hp = load("MEMIT", write_hparams(tmp_path / str(in_loop), MEMIT, tiny_model_dir,
                                         revive={"tau": tau, "in_loop": in_loop}))
        torch.manual_seed(0)
        editor = editor_for(hp)
        weights = edited_weights(editor, hp)
        w0 = {n: w.detach().clone() for n, w in weights.items()}
        layer0 = "model.layers.0.mlp.down_proj.weight"
        original = main.compute_ks

        def spy(*args, **kwargs):
            seen.append((in_loop, weights[layer0].detach() - w0[layer0]))
            return original(*args, **kwargs)

        monkeypatch.setattr(main, "compute_ks", spy)
        editor.edit(**REQUEST, keep_original_weight=False, verbose=False)
        monkeypatch.setattr(main, "compute_ks", original)
        finals[in_loop] = {n: w.detach() - w0[n] for n, w in weights.items()}
        for n, total in finals[in_loop].items():
            b = protected_basis(w0[n], tau)
            assert float((b.u.T.float() @ total).norm()) <= 1e-4 * float(total.norm()) + 1e-6
    # The keys of layer 1 (second compute_ks call of the step) were computed on layer 0's update as written:
    # raw after the step-level filter's editor run, projected with in_loop.
    raw_at_layer1 = [d for flag, d in seen if not flag][1]
    filtered_at_layer1 = [d for flag, d in seen if flag][1]
    assert len(seen) == 4  # one compute_ks per layer and run
    b0 = protected_basis(w0["model.layers.0.mlp.down_proj.weight"], tau)
    assert float((b0.u.T.float() @ raw_at_layer1).norm()) > 1e-3 * float(raw_at_layer1.norm())
    assert float((b0.u.T.float() @ filtered_at_layer1).norm()) <= 1e-4 * float(filtered_at_layer1.norm()) + 1e-7
    torch.testing.assert_close(filtered_at_layer1, finals[False]["model.layers.0.mlp.down_proj.weight"],
                               rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(finals[True]["model.layers.0.mlp.down_proj.weight"],
                               finals[False]["model.layers.0.mlp.down_proj.weight"], rtol=1e-4, atol=1e-6)
    l1 = "model.layers.1.mlp.down_proj.weight"
    assert float((finals[True][l1] - finals[False][l1]).norm()) > 1e-3 * float(finals[False][l1].norm())


def test_revive_in_loop_is_refused_for_an_editor_without_a_layer_loop(tmp_path, enabled, tiny_model_dir):
    hp = load("FT", write_hparams(tmp_path, FT, tiny_model_dir, revive={"tau": 0.3, "in_loop": True}))
    editor = editor_for(hp)
    w = {n: t.detach().clone() for n, t in edited_weights(editor, hp).items()}
    with pytest.raises(ValueError, match="revive.in_loop: FT has no MEMIT-style layer loop"):
        editor.edit(**REQUEST, keep_original_weight=False, verbose=False)
    assert all(torch.equal(t.detach(), w[n]) for n, t in edited_weights(editor, hp).items())


def _delta_recorder():
    """A plugin that records each raw delta the editor wrote (placed first in the chain) and changes nothing."""
    recorder, seen = types.ModuleType("recorder"), {}

    @hookimpl
    def easyedit_transform_delta(name, delta):
        seen[name] = delta.detach().clone()

    recorder.easyedit_transform_delta = easyedit_transform_delta
    return recorder, seen


def test_constrained_statistics_are_the_constrained_solutions():
    """in_solve's statistics, read the way MEMIT and ROME read them, give the least-squares solutions with
    ΔW·Vₖ = 0 computed directly in coordinates of the complement B of Vₖ."""
    from revive_plugin.adapters.easyedit import constrained_statistics

    g = torch.Generator().manual_seed(0)
    d, k, n, m, lam = 12, 3, 5, 7, 4.0
    a = torch.randn(d, 3 * d, generator=g, dtype=torch.float64)
    c = a @ a.T / (3 * d)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    v, b = q[:, :k], q[:, k:]
    keys = torch.randn(d, n, generator=g, dtype=torch.float64)
    resid = torch.randn(m, n, generator=g, dtype=torch.float64)
    # MEMIT: ΔW = R Kᵀ (λC' + KKᵀ)⁻¹ against X Bᵀ with X = R KᵀB (Bᵀ(λC + KKᵀ)B)⁻¹.
    c_in = constrained_statistics(c.float(), v, inverse=False)
    assert c_in.dtype == torch.float64
    memit = resid @ torch.linalg.solve(lam * c_in + keys @ keys.T, keys).T
    direct = resid @ keys.T @ b @ torch.linalg.inv(b.T @ (lam * c + keys @ keys.T) @ b) @ b.T
    torch.testing.assert_close(memit, direct, rtol=1e-4, atol=1e-7)
    assert float((memit @ v).norm()) <= 1e-5 * float(memit.norm())
    # ROME: C⁻¹ becomes B (BᵀCB)⁻¹ Bᵀ exactly, so its key vector C⁻¹k avoids Vₖ.
    inv = constrained_statistics(torch.linalg.inv(c), v, inverse=True)
    torch.testing.assert_close(inv, b @ torch.linalg.inv(b.T @ c @ b) @ b.T, rtol=1e-8, atol=1e-10)
    unconstrained = resid @ torch.linalg.solve(lam * c + keys @ keys.T, keys).T
    assert float((unconstrained @ v).norm()) > 0.1 * float(unconstrained.norm())  # the constraint does something


@pytest.mark.parametrize("alg", ["MEMIT", "ROME"])
def test_revive_in_solve_solves_with_the_key_side_constraint(tmp_path, tiny_model_dir, monkeypatch, alg):
    """revive.in_solve: the editor's own delta (before REVIVE's filter) already has ΔW·Vₖ ≈ 0, which it has not
    without; the final edit keeps REVIVE's invariant; the fed statistics are back in the cache after the step."""
    from revive_plugin.adapters.easyedit import _statistics_cache, editor_module_of

    monkeypatch.setenv("REVIVE_CACHE", str(tmp_path / "cache"))
    tau, base = 0.3, {"MEMIT": MEMIT, "ROME": ROME}[alg]
    raw = {}
    for in_solve in (False, True):
        recorder, seen = _delta_recorder()
        pm = get_plugin_manager()
        pm.register(recorder, name="recorder")
        easyedit.enable_easyedit(device="cpu", pm=pm)
        try:
            (tmp_path / str(in_solve)).mkdir()
            hp = load(alg, write_hparams(tmp_path / str(in_solve), base, tiny_model_dir,
                                         revive={"tau": tau, "in_solve": in_solve},
                                         edit_plugins={"order": ["recorder", "revive"]}))
            torch.manual_seed(0)
            editor = editor_for(hp)
            weights = edited_weights(editor, hp)
            w0 = {n: w.detach().clone() for n, w in weights.items()}
            owner, attr, _ = _statistics_cache(editor_module_of(alg))
            editor.edit(**REQUEST, keep_original_weight=False, verbose=False)
            cache = getattr(owner, attr)
            assert not isinstance(cache, easyedit._ReadLog) and all(s.dtype == torch.float32 for s in cache.values())
            raw[in_solve] = {n: seen[n] for n in weights}
            for n, w in weights.items():
                b = protected_basis(w0[n], tau)
                total = w.detach() - w0[n]
                assert float(total.norm()) > 0
                assert float((b.u.T.float() @ total).norm()) <= 1e-4 * float(total.norm()) + 1e-6
                assert float((total @ b.v.float()).norm()) <= 1e-4 * float(total.norm()) + 1e-6
                leak = float((raw[in_solve][n] @ b.v.float()).norm()) / float(raw[in_solve][n].norm())
                assert leak <= 1e-4 if in_solve else leak > 1e-2
        finally:
            easyedit.disable_easyedit()


@pytest.mark.parametrize("basis, built", [("original", 1), ("current", 2)])
def test_revive_in_solve_builds_constrained_statistics_once_per_basis(tmp_path, enabled, tiny_model_dir,
                                                                     monkeypatch, basis, built):
    """With W₀'s basis the constrained statistics of a layer are built once and reused by later steps; with
    the current weight's basis (new every step) they are built again."""
    monkeypatch.setenv("REVIVE_CACHE", str(tmp_path / "cache"))
    calls = []
    real = easyedit.constrained_statistics
    monkeypatch.setattr(easyedit, "constrained_statistics", lambda *a, **k: calls.append(1) or real(*a, **k))
    hp = load("MEMIT", write_hparams(tmp_path, MEMIT, tiny_model_dir,
                                     revive={"tau": 0.3, "in_solve": True, "basis": basis}))
    editor = editor_for(hp)
    for request in (REQUEST, REQUEST2):
        editor.edit(**request, keep_original_weight=False, verbose=False)
    assert len(calls) == built * len(hp.layers)


def test_revive_in_solve_is_refused_where_it_cannot_enter_the_solve(tmp_path, enabled, tiny_model_dir):
    """FT has no statistics-regularised solve; ROME without mom2_adjustment reads no statistics: both are refused
    before anything is written."""
    for alg, base, expected in (
        ("FT", FT, "revive.in_solve: FT's solve is not regularised by covariance statistics"),
        ("ROME", {**ROME, "mom2_adjustment": False}, "revive.in_solve needs the covariance statistics"),
    ):
        hp = load(alg, write_hparams(tmp_path, base, tiny_model_dir, revive={"tau": 0.3, "in_solve": True}))
        editor = editor_for(hp)
        w = {n: t.detach().clone() for n, t in edited_weights(editor, hp).items()}
        with pytest.raises(ValueError, match=expected):
            editor.edit(**REQUEST, keep_original_weight=False, verbose=False)
        assert all(torch.equal(t.detach(), w[n]) for n, t in edited_weights(editor, hp).items())


def test_revive_in_solve_refuses_a_step_whose_solve_did_not_read_the_statistics(tmp_path, enabled, tiny_model_dir,
                                                                                 monkeypatch):
    """An editor that solves without reading the statistics cache would silently ignore in_solve: the step is
    an error naming the layers, and every weight is back to what it was."""
    hp = load("MEMIT", write_hparams(tmp_path, MEMIT, tiny_model_dir, revive={"tau": 0.3, "in_solve": True}))
    editor = editor_for(hp)
    main = import_easyeditor("easyeditor.models.memit.memit_main")
    size = editor.model.get_parameter("model.layers.0.mlp.down_proj.weight").shape[1]
    monkeypatch.setattr(main, "get_cov", lambda *args, **kwargs: torch.eye(size))  # reads no cache
    w = {n: t.detach().clone() for n, t in edited_weights(editor, hp).items()}
    with pytest.raises(ValueError, match=r"revive.in_solve: MEMIT did not read the covariance statistics of "
                                         r"\['model.layers.0.mlp.down_proj.weight', 'model.layers.1"):
        editor.edit(**REQUEST, keep_original_weight=False, verbose=False)
    assert all(torch.equal(t.detach(), w[n]) for n, t in edited_weights(editor, hp).items())
