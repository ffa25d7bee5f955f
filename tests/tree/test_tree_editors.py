"""EasyEdit's GitHub tree through enable_easyedit: real edits of MEMIT, ROME, FT, AlphaEdit, EMMET, R-ROME and
PMET on a tiny LLaMA with REVIVE's invariant checked, AlphaEdit's update against a hand computation of its
formula, the baselines stacked with REVIVE on the tree's MEMIT, and ``revive editors``."""
import os
from pathlib import Path

import pytest
import torch
from test_baselines import TAU, assert_revive_invariant
from test_easyedit import COMMON, FT, MEMIT, REQUEST, REQUEST2, ROME, edited_weights, editor_for, write_hparams

from revive_plugin.adapters import compat, easyedit
from revive_plugin.adapters.editors import KINDS, TESTED, catalogue, hparams_classes

pytestmark = pytest.mark.usefixtures("one_thread")

STATS = {"mom2_dataset": "me-ppl", "mom2_n_samples": 64, "mom2_dtype": "float32", "stats_dir": "unused"}
Z = {"fact_token": "subject_last", "v_num_grad_steps": 4, "v_lr": 0.5, "v_loss_layer": 1, "v_weight_decay": 0.001,
     "clamp_norm_factor": 4, "kl_factor": 0.0625}
ALPHAEDIT = {**COMMON, **STATS, **Z, "alg_name": "AlphaEdit", "layers": [0, 1], "layer_selection": "all",
             "mom2_adjustment": True, "mom2_update_weight": 100, "nullspace_threshold": 2e-2, "L2": 1.0,
             "P_loc": "./null_space_project.pt", "max_length": 40, "batch_size": 1}
EMMET = {**MEMIT, "alg_name": "EMMET", "update_norm_lambda": 0, "emmet_lambda": 0.1}
R_ROME = {**ROME, "alg_name": "R-ROME", "enable_prompt_keys": False, "enable_random_prefix_keys": True}
PMET = {**MEMIT, "alg_name": "PMET", "nll_loss_factor": 1.0, "layers": [1],
        "rewrite_module_tmps": ["model.layers.{}.mlp.down_proj", "model.layers.{}.self_attn.o_proj"]}
FT_TREE = {**FT, "objective_optimization": "target_new"}
EDITORS = {"MEMIT": MEMIT, "ROME": ROME, "FT": FT_TREE, "AlphaEdit": ALPHAEDIT, "EMMET": EMMET, "R-ROME": R_ROME,
           "PMET": PMET}


@pytest.fixture
def enabled(tmp_path, monkeypatch):
    monkeypatch.setenv("REVIVE_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)  # anything an editor writes to its working directory lands here
    easyedit.enable_easyedit(device="cpu")
    yield
    easyedit.disable_easyedit()


def load(alg, path):
    return hparams_classes()[alg].from_hparams(str(path))


def test_the_shipped_alphaedit_hparams_load_with_their_revive_block(enabled):
    path = Path(__file__).resolve().parents[2] / "hparams" / "AlphaEdit" / "smollm2-135m.yaml"
    hp = hparams_classes()["AlphaEdit"].from_hparams(str(path))
    assert hp.plugin_configs["revive"] == {"tau": 0.1, "basis": "original"} and hp.layers == [4, 5, 6, 7, 8]
    assert hp.plugin_configs["batched_z"] == {"chunk": 16, "early_exit": True}


def test_the_session_uses_the_tree():
    origin = compat.easyeditor_origin()
    assert origin["kind"] == "source tree"
    assert Path(origin["path"]).parent == Path(os.environ[compat.SOURCE_ENV]).resolve()
    assert {"AlphaEdit", "EMMET", "R-ROME", "PMET"} <= set(hparams_classes())


@pytest.mark.parametrize("alg", list(EDITORS))
def test_revive_filters_the_trees_editors(tmp_path, enabled, tiny_model_dir, alg):
    hp = load(alg, write_hparams(tmp_path, EDITORS[alg], tiny_model_dir, revive={"tau": TAU}))
    torch.manual_seed(0)
    editor = editor_for(hp)
    weights = {n: editor.model.get_parameter(n) for n in easyedit.written_matrices(vars(hp))}
    w0 = {n: w.detach().clone() for n, w in weights.items()}
    editor.edit(**REQUEST, verbose=False, sequential_edit=True)
    editor.edit(**REQUEST2, verbose=False, sequential_edit=True)  # sequential: the edits accumulate
    assert [r.editor for r in easyedit.step_records(editor.model)] == [alg, alg]
    final = {n: w.detach().clone() for n, w in weights.items()}
    assert any(not torch.equal(final[n], w0[n]) for n in w0)  # the editor wrote something
    assert_revive_invariant(w0, final)
    assert not (tmp_path / "null_space_project.pt").exists()  # AlphaEdit wrote no pickle


def test_the_tree_writes_what_it_wrote_before_without_a_block(tmp_path, enabled, tiny_model_dir):
    """With no plugin block the host is a pass-through: the tree's MEMIT writes W₀ + its own ΔW."""
    hp = load("MEMIT", write_hparams(tmp_path, MEMIT, tiny_model_dir))
    torch.manual_seed(0)
    editor = editor_for(hp)
    w = edited_weights(editor, hp)
    before = {n: t.detach().clone() for n, t in w.items()}
    editor.edit(**REQUEST, verbose=False, sequential_edit=True)
    assert any(not torch.equal(before[n], t) for n, t in w.items())
    (record,) = easyedit.step_records(editor.model)
    assert record.editor == "MEMIT"


# -- AlphaEdit's update by hand --------------------------------------------------------------------------
def _key_and_output(model, tok, prompt, subject, layer_module, down_proj):
    """Input of ``down_proj`` and output of the z layer at the subject's last token (one template: "{}")."""
    text = prompt.format(subject)
    prefix = tok(prompt[: prompt.index("{}")] + subject)["input_ids"]
    index = len(prefix) - 1
    seen = {}
    hooks = [down_proj.register_forward_pre_hook(lambda m, a: seen.__setitem__("k", a[0][0, index].detach())),
             layer_module.register_forward_hook(
                 lambda m, a, o: seen.__setitem__("z", (o[0] if isinstance(o, tuple) else o)[0, index].detach()))]
    try:
        with torch.no_grad():
            model(**tok(text, return_tensors="pt"))
    finally:
        for h in hooks:
            h.remove()
    return seen["k"].double(), seen["z"].double()


def test_alphaedit_update_matches_its_formula(tmp_path, enabled, tiny_model_dir, monkeypatch):
    """ΔW = R K₁ᵀ P (K_p K_pᵀ P + K₁K₁ᵀ P + αI)⁻¹, P the projector onto the eigenvectors of K₀K₀ᵀ with eigenvalue
    below the threshold, K_p the keys of earlier edits — computed here from hooks and the fed statistics."""
    cfg = {**ALPHAEDIT, "layers": [1], "L2": 0.01}  # a small α, so that K_p K_pᵀ weighs in the solve
    hp = load("AlphaEdit", write_hparams(tmp_path, cfg, tiny_model_dir))
    main = compat.import_easyeditor("easyeditor.models.alphaedit.AlphaEdit_main")
    monkeypatch.setattr(main, "CONTEXT_TEMPLATES_CACHE", [["{}"]])
    targets = {}
    torch.manual_seed(0)
    z_fixed = torch.randn(32)

    def fixed_z(model, tok, request, hparams, layer, templates):
        targets[request["subject"]] = z_fixed + len(targets)  # a distinct target per edit
        return targets[request["subject"]].clone()

    monkeypatch.setattr(main, "compute_z", fixed_z)
    editor = editor_for(hp)
    model, tok = editor.model, editor.tok
    name = "model.layers.1.mlp.down_proj.weight"
    w = model.get_parameter(name)
    layer_module, down_proj = model.model.layers[1], model.model.layers[1].mlp.down_proj

    # K₀K₀ᵀ: the statistics the adapter feeds the editor (local corpus, as in the hparams), eigen-decomposed
    # here; the threshold splits the spectrum in half so that P protects some directions and frees others.
    from revive_plugin.adapters.stats import load_corpus, second_moments

    module = "model.layers.1.mlp.down_proj"
    cov = second_moments(model, tok, [module], load_corpus("me-ppl"), n_samples=64, dtype="float32",
                         model_id=model.config._name_or_path.replace("/", "_"))[module].double()
    evals, evecs = torch.linalg.eigh(cov)
    hp.nullspace_threshold = float(evals[31] + evals[32]) / 2
    null = evecs[:, evals < hp.nullspace_threshold]
    assert null.shape[1] == 32
    P = null @ null.T

    keys_before = torch.zeros(64, 64, dtype=torch.float64)
    for request, subject in ((REQUEST, "Danielle Darrieux"), (REQUEST2, "Italy")):
        prompt = request["prompts"][0].replace(subject, "{}")
        k, z_now = _key_and_output(model, tok, prompt, subject, layer_module, down_proj)
        w_before = w.detach().double().clone()
        editor.edit(**request, verbose=False, sequential_edit=True)
        r = (targets[subject].double() - z_now)[:, None]  # residual at the (only, last) layer
        K = k[:, None]
        expected = torch.linalg.solve(P @ (K @ K.T + keys_before) + 0.01 * torch.eye(64, dtype=torch.float64),
                                      P @ K @ r.T).T
        got = w.detach().double() - w_before
        error = float((got - expected).norm() / expected.norm())
        assert error < 1e-4, error  # float32 solve inside AlphaEdit; leaving out K_p gives ≈1e-2
        assert float((got @ (torch.eye(64, dtype=torch.float64) - P)).abs().max()) < 1e-5  # rows live in P's span
        keys_before = keys_before + K @ K.T


# -- baselines stacked with REVIVE on the tree's editors -------------------------------------------------
@pytest.mark.parametrize("alg,order", [("MEMIT", ["rect", "revive"]), ("MEMIT", ["prune", "revive"]),
                                       ("AlphaEdit", ["rect", "revive"])])
def test_baselines_stack_with_revive_on_the_tree(tmp_path, enabled, tiny_model_dir, alg, order):
    blocks = {"revive": {"tau": TAU}, "edit_plugins": {"order": order},
              order[0]: {"top": 0.4} if order[0] == "rect" else {"alpha": "e"}}
    hp = load(alg, write_hparams(tmp_path, EDITORS[alg], tiny_model_dir, **blocks))
    torch.manual_seed(0)
    editor = editor_for(hp)
    weights = edited_weights(editor, hp)
    w0 = {n: w.detach().clone() for n, w in weights.items()}
    editor.edit(**REQUEST, verbose=False, sequential_edit=True)
    (record,) = easyedit.step_records(editor.model)
    assert any(k.startswith(f"{order[0]}/") for k in record.metrics)  # the baseline ran on the step
    assert_revive_invariant(w0, {n: w.detach().clone() for n, w in weights.items()})


def test_revive_editors_accounts_for_every_entry(capsys):
    from revive_plugin.cli import main

    alg_dict = compat.import_easyeditor("easyeditor.util.alg_dict").ALG_DICT
    rows = {r.name: r for r in catalogue()}
    assert list(rows) == list(alg_dict)
    assert set(alg_dict) <= set(KINDS)  # every entry of this tree is catalogued by reading its code
    for name in TESTED["source tree"]:
        assert rows[name].runs_here == "tested"
    assert rows["DeepEdit-Api"].runs_here.startswith("no:") and "zhipuai" in rows["DeepEdit-Api"].runs_here
    assert rows["IKE"].plugins.startswith("passed through")
    main(["editors"])
    out = capsys.readouterr().out
    assert "source tree" in out
    for name in alg_dict:
        assert f"| {name} |" in out


# -- AlphaEdit in the harness: batched z, checkpoint and resume -------------------------------------------
def test_alphaedit_batched_z_writes_what_its_own_compute_z_writes(tmp_path, enabled, tiny_model_dir):
    two = dict(prompts=REQUEST["prompts"] + REQUEST2["prompts"], target_new=REQUEST["target_new"] + REQUEST2[
        "target_new"], ground_truth=REQUEST["ground_truth"] + REQUEST2["ground_truth"],
        subject=REQUEST["subject"] + REQUEST2["subject"])
    written = []
    for name, blocks in (("own", {}), ("batched", {"batched_z": True})):
        easyedit.disable_easyedit()
        easyedit.enable_easyedit(device="cpu")
        (tmp_path / name).mkdir()
        # z at layer 0, loss at layer 1: with both at one layer easyeditor's compute_z adds δ twice (its
        # TraceDict hooks the module twice) and the batched path once, as in tests/test_batched_z.py.
        cfg = {**ALPHAEDIT, "layers": [0], "batch_size": 2}
        hp = load("AlphaEdit", write_hparams(tmp_path / name, cfg, tiny_model_dir, **blocks))
        torch.manual_seed(0)
        editor = editor_for(hp)
        before = {n: w.detach().clone() for n, w in edited_weights(editor, hp).items()}
        editor.batch_edit(**two, verbose=False, sequential_edit=True)
        written.append({n: w.detach() - before[n] for n, w in edited_weights(editor, hp).items()})
    for n in written[0]:
        assert torch.any(written[0][n] != 0)  # the edit wrote something
        error = float((written[1][n] - written[0][n]).norm() / written[0][n].norm())
        assert error < 1e-4, (n, error)
    with pytest.raises(ValueError, match="batched_z applies to .*MEMIT.*AlphaEdit.*ROME.*not to EMMET"):
        load("EMMET", write_hparams(tmp_path, EMMET, tiny_model_dir, batched_z=True))
    # ROME's batched compute_v follows the release's compute_v, which the tree changed
    with pytest.raises(ValueError, match="batched_z for ROME reproduces the PyPI release's compute_v"):
        load("ROME", write_hparams(tmp_path, ROME, tiny_model_dir, batched_z=True))


@pytest.fixture
def alphaedit_run(tmp_path, tiny_model_dir, monkeypatch):
    from revive_plugin.eval.harness import RunConfig

    monkeypatch.setenv("REVIVE_CACHE", str(tmp_path / "cache"))
    hp = tmp_path / "tiny-alphaedit.yaml"
    hp.write_text(__import__("yaml").safe_dump({**ALPHAEDIT, "model_name": str(tiny_model_dir), "batch_size": 2}))

    def make(name, **extra):
        return RunConfig.from_dict({
            "name": name, "hparams": str(hp), "transforms": ["revive"], "revive": {"tau": TAU}, "edits": 4,
            "batch_size": 2, "eval_every": 2, "eval_facts": "all", "fluency_prompts": 0, "eval_last_batch": False,
            "glue": {"tasks": [], "n_per_task": 0, "few_shot": 0, "dir": None}, "ppl": None,
            "output": str(tmp_path / "runs" / "{name}"), "device": "cpu",
            "easyedit_source": os.environ[compat.SOURCE_ENV], **extra})  # a run config naming the tree

    yield make
    easyedit.disable_easyedit()


def test_an_alphaedit_run_resumed_midway_equals_an_uninterrupted_one(alphaedit_run):
    """AlphaEdit's accumulated keys K_p K_pᵀ (cache_c) are in the checkpoint: without them the resumed run's
    second step would solve without the first step's keys."""
    from safetensors.torch import load_file

    from revive_plugin.eval.harness import Run

    straight = Run.start(alphaedit_run("straight")).execute()
    easyedit.disable_easyedit()
    part = Run.start(alphaedit_run("resumed"))
    part.execute(stop_after=2)
    keys = load_file(str(part.run_dir / "checkpoint" / "editor.safetensors"))["cache_c"]
    assert keys.shape == (2, 64, 64) and float(keys.abs().sum()) > 0  # two layers' K_p K_pᵀ after one step
    easyedit.disable_easyedit()  # a new process starts from nothing
    resumed = Run.resume(part.run_dir).execute()
    wa = load_file(str(straight / "checkpoint" / "weights.safetensors"))
    wb = load_file(str(resumed / "checkpoint" / "weights.safetensors"))
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-6)
    ka = load_file(str(straight / "checkpoint" / "editor.safetensors"))["cache_c"]
    kb = load_file(str(resumed / "checkpoint" / "editor.safetensors"))["cache_c"]
    torch.testing.assert_close(kb, ka, rtol=1e-5, atol=1e-6)


def test_a_rejected_step_leaves_alphaedits_keys_as_they_were(tmp_path, enabled, tiny_model_dir, monkeypatch):
    from revive_plugin import EditRejected

    hp = load("AlphaEdit", write_hparams(tmp_path, ALPHAEDIT, tiny_model_dir, revive={"tau": TAU}))
    torch.manual_seed(0)
    editor = editor_for(hp)
    editor.edit(**REQUEST, verbose=False, sequential_edit=True)
    main = compat.import_easyeditor("easyeditor.models.alphaedit.AlphaEdit_main")
    keys = main.cache_c.clone()
    weights = {n: w.detach().clone() for n, w in edited_weights(editor, hp).items()}
    original = main.execute_AlphaEdit

    def poisoned(*args, **kwargs):
        deltas = original(*args, **kwargs)  # cache_c has taken this step's keys by now
        return {n: d * float("nan") for n, d in deltas.items()}

    monkeypatch.setattr(main, "execute_AlphaEdit", poisoned)
    with pytest.raises(EditRejected):
        editor.apply_algo(editor.model, editor.tok, [dict(prompt="The capital of {} is", subject="Italy",
                                                          target_new="Paris", ground_truth="Rome")], hp)
    assert torch.equal(main.cache_c, keys)
    for n, w in edited_weights(editor, hp).items():
        assert torch.equal(w.detach(), weights[n])


@pytest.mark.parametrize("alg", ["MEMIT", "EMMET", "PMET", "R-ROME"])
def test_revive_in_solve_enters_the_trees_statistics_solves(tmp_path, enabled, tiny_model_dir, alg):
    """revive.in_solve on the tree's editors whose solve reads the covariance statistics: every filtered layer's
    statistics are read in the step (else the step is refused), and the edit keeps REVIVE's invariant."""
    hp = load(alg, write_hparams(tmp_path, EDITORS[alg], tiny_model_dir, revive={"tau": TAU, "in_solve": True}))
    torch.manual_seed(0)
    editor = editor_for(hp)
    weights = {n: editor.model.get_parameter(n) for n in easyedit.written_matrices(vars(hp))}
    w0 = {n: w.detach().clone() for n, w in weights.items()}
    editor.edit(**REQUEST, verbose=False, sequential_edit=True)
    editor.edit(**REQUEST2, verbose=False, sequential_edit=True)
    final = {n: w.detach().clone() for n, w in weights.items()}
    assert any(not torch.equal(final[n], w0[n]) for n in w0)
    assert_revive_invariant(w0, final)


def test_revive_in_solve_is_refused_for_alphaedit(tmp_path, enabled, tiny_model_dir):
    """AlphaEdit solves with its own null-space projector, not with the statistics: in_solve is refused, and
    nothing is written."""
    hp = load("AlphaEdit", write_hparams(tmp_path, ALPHAEDIT, tiny_model_dir, revive={"tau": TAU, "in_solve": True}))
    editor = editor_for(hp)
    weights = {n: editor.model.get_parameter(n) for n in easyedit.written_matrices(vars(hp))}
    w0 = {n: w.detach().clone() for n, w in weights.items()}
    with pytest.raises(ValueError, match="revive.in_solve: AlphaEdit's solve is not regularised"):
        editor.edit(**REQUEST, verbose=False, sequential_edit=True)
    assert all(torch.equal(w.detach(), w0[n]) for n, w in weights.items())


def test_alphaedit_calibration_points_each_start_without_earlier_keys(tmp_path, tiny_model_dir, monkeypatch):
    """AlphaEdit keeps the keys of its earlier edits (cache_c) in its module: restoring the weights alone would
    solve the second point against the first point's keys."""
    from test_eval_calibrate import assert_same_point, calibration_config

    from revive_plugin.eval.calibrate import calibrate, parse_grid

    monkeypatch.setenv("REVIVE_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    config = calibration_config(tmp_path, {**ALPHAEDIT, "model_name": str(tiny_model_dir)}, batched_z=True)
    try:
        # α small against the keys' K Kᵀ, so that the first point's keys in the second solve would halve its update
        rows = calibrate(config, parse_grid(["L2=[0.001, 0.001]"]), 3, tmp_path / "out")
    finally:
        easyedit.disable_easyedit()
    assert rows[1]["ppl"] != rows[0]["ppl"]
    assert_same_point(rows[1], rows[2])
