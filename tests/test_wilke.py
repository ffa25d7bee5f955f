"""WilKE layer selection (issue 12): the easyedit_select_layers / easyedit_layer_candidates hooks in the host and the
EasyEdit adapter (trials undone bit for bit, targets and checkpoints over every candidate layer), the plugin's
criteria against hand computations, and real ROME edits on a tiny LLaMA where one layer's FFN was crafted to match
the subject: WilKE picks it, the edit writes only it, REVIVE's invariant holds there with W₀ of that layer, and
without the block ROME stays on its fixed layer."""
import math
import random
import time
import types

import numpy as np
import pytest
import torch
import yaml
from test_easyedit import ROME, editor_for, load, write_hparams
from test_eval_harness import rows
from test_superposition import keys_by_hand

from revive_plugin import EditRejected, PluginHost, get_plugin_manager, hookimpl, protected_basis
from revive_plugin.adapters import easyedit
from revive_plugin.adapters.layers import candidate_layers, choose_layers, make_trial, with_candidates
from revive_plugin.eval.harness import Run, RunConfig
from revive_plugin.eval.testing import save_tiny_llama, tiny_llama
from revive_plugin.host import DEFAULT_PLUGINS, TargetWeight, installed_plugins, validate_configs
from revive_plugin.plugins import wilke

pytestmark = pytest.mark.usefixtures("one_thread")

LAYERS = 4
DOWN = "model.layers.{}.mlp.down_proj.weight"
DANIELLE = dict(prompts=["The mother tongue of Danielle Darrieux is"], target_new=["English"],
                ground_truth=["French"], subject=["Danielle Darrieux"])
ITALY = dict(prompts=["The capital of Italy is"], target_new=["Paris"], ground_truth=["Rome"], subject=["Italy"])
#: ROME on the 4-layer tiny LLaMA: its own layer is 1; the loss is read at the last layer.
ROME4 = {**ROME, "v_loss_layer": LAYERS - 1}


@pytest.fixture(scope="module")
def tiny4_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama-4"), num_hidden_layers=LAYERS)


def mlp_input(model, tok, prompt, subject, layer):
    """The input of layer ``layer``'s MLP (post-attention norm output) at the subject's last token."""
    got = {}
    mlp = model.model.layers[layer].mlp
    handle = mlp.register_forward_pre_hook(lambda m, args: got.setdefault("x", args[0][0].detach().clone()))
    try:
        with torch.no_grad():
            model(**tok(prompt, return_tensors="pt"))
    finally:
        handle.remove()
    return got["x"][len(tok(prompt[: prompt.index(subject) + len(subject)])["input_ids"]) - 1]


def craft(model, tok, request, layer, away=None, rows=8, scale=30.0):
    """Make ``layer``'s FFN keys match ``request``'s subject: ``rows`` rows of its gate and up projections become the
    subject's representation at that MLP's input (norm ``scale``), plus a little seeded noise that keeps the rows
    distinct (the keys' covariance, which ROME inverts, stays regular). The SiLU gate then makes these neurons fire
    on this subject far more than on the statistics corpus' text — the match ROME's C⁻¹-weighted update rewards (at
    a norm of 1 the corpus activates them as much and the layer is no better than before). With ``away`` (another
    request), the direction is first made orthogonal to that subject's representation there. The new neurons get no
    value (their columns of the down projection are zero), so the layers above see the model they saw before."""
    x = mlp_input(model, tok, request["prompts"][0], request["subject"][0], layer)
    if away is not None:
        y = mlp_input(model, tok, away["prompts"][0], away["subject"][0], layer)
        x = x - (x @ y) / (y @ y) * y
    noise = torch.randn(2, rows, x.shape[0], generator=torch.Generator().manual_seed(layer)) * 0.05
    keys = x / x.norm() + noise
    keys = scale * keys / keys.norm(dim=-1, keepdim=True)
    mlp = model.model.layers[layer].mlp
    with torch.no_grad():
        mlp.gate_proj.weight[:rows] = keys[0]
        mlp.up_proj.weight[:rows] = keys[1]
        mlp.down_proj.weight[:, :rows] = 0.0  # keys without values yet: the model computes as before elsewhere


def downs(model):
    return {DOWN.format(i): model.get_parameter(DOWN.format(i)).detach().clone() for i in range(LAYERS)}


# -- the hooks in the host ------------------------------------------------------------------------------
def chooser(fn, name="chooser"):
    mod = types.ModuleType(name)
    mod.easyedit_select_layers = hookimpl(fn)
    return mod


def host_with(*plugins):
    pm = get_plugin_manager(pinned=[])
    for p in plugins:
        pm.register(p, name=p.__name__)
    return PluginHost(pm)


def targets2():
    return [TargetWeight(f"layers.{i}.w", torch.nn.Parameter(torch.full((2, 3), float(i)), requires_grad=False))
            for i in (0, 1)]


def test_select_layers_in_the_host():
    seen = []

    def pick(editor, requests, layers, context, weights, trial):
        seen.append((editor, requests, layers, context.step, sorted(weights), trial))
        return [1, 1]

    host = host_with(chooser(pick))
    ts = targets2()
    # without its block a plugin is not asked (and nothing is snapshotted)
    assert host.select_layers("MOCK", ts, [0, 1], configs={}) is None and seen == []
    assert host.select_layers("MOCK", ts, [1, 0], configs={"chooser": {}}, requests=[{"prompt": "p"}]) == [1]
    assert seen == [("MOCK", [{"prompt": "p"}], [0, 1], 0, ["layers.0.w", "layers.1.w"], None)]

    for bad, match in (([], "non-empty list"), ("1", "non-empty list"), ([True], "non-empty list"),
                       ([0, 2], r"chose layers \[2\].*not candidates \[0, 1\]")):
        host = host_with(chooser(lambda bad=bad: bad))
        with pytest.raises(EditRejected, match=match):
            host.select_layers("MOCK", ts, [0, 1], configs={"chooser": {}})

    def boom():
        raise RuntimeError("no layer")

    with pytest.raises(EditRejected, match=r"plugin 'chooser' failed in easyedit_select_layers.*RuntimeError: no layer"):
        host_with(chooser(boom)).select_layers("MOCK", ts, [0, 1], configs={"chooser": {}})

    def leaves_a_trial(weights, trial):  # the driver's trial that forgot to undo itself
        trial([0])
        return [0]

    def bad_trial(layers):
        with torch.no_grad():
            ts[0].tensor.add_(1.0)
        return {}

    host = host_with(chooser(leaves_a_trial))
    with pytest.raises(EditRejected, match=r"weights \['layers.0.w'\] changed during plugin 'chooser'"):
        host.select_layers("MOCK", ts, [0, 1], configs={"chooser": {}}, trial=bad_trial)
    assert torch.equal(ts[0].tensor, torch.zeros(2, 3))  # restored

    # the first plugin that answers decides; one that returns None passes
    first, second = chooser(lambda: None, "first"), chooser(lambda: [0], "second")
    assert host_with(first, second).select_layers("MOCK", ts, [0, 1], {"first": {}, "second": {}}) == [0]


# -- the adapter's pieces -------------------------------------------------------------------------------
def test_trials_are_undone_bit_for_bit():
    ts = targets2()
    w0 = {t.name: t.tensor.detach().clone() for t in ts}
    hp = types.SimpleNamespace(layers=[1])
    main = types.SimpleNamespace(cache_c=torch.zeros(3))
    seen = []

    def editor():
        seen.append(list(hp.layers))
        torch.rand(3)
        random.random()
        np.random.rand()
        main.cache_c += 1
        with torch.no_grad():
            for layer in hp.layers:
                ts[layer].tensor.add_(torch.arange(6.0).reshape(2, 3) * (layer + 1))

    trial = make_trial(editor, hp, ts, [0, 1], main=main)
    torch.manual_seed(5)
    random.seed(5)
    np.random.seed(5)
    state = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    deltas = trial([0])
    assert seen == [[0]] and hp.layers == [1] and sorted(deltas) == ["layers.0.w"]
    assert torch.equal(deltas["layers.0.w"], torch.arange(6.0).reshape(2, 3))
    assert sorted(trial([1, 0])) == ["layers.0.w", "layers.1.w"]
    for t in ts:
        assert torch.equal(t.tensor, w0[t.name])
    assert torch.equal(main.cache_c, torch.zeros(3))
    assert torch.equal(torch.get_rng_state(), state[0]) and random.getstate() == state[1]
    assert np.array_equal(np.random.get_state()[1], state[2])
    with pytest.raises(ValueError, match=r"non-empty subset of the candidates \[0, 1\]"):
        trial([2])

    def fails():
        with torch.no_grad():
            ts[0].tensor.add_(1.0)
        raise RuntimeError("mid-edit")

    with pytest.raises(RuntimeError, match="mid-edit"):
        make_trial(fails, hp, ts, [0, 1])([0])
    assert torch.equal(ts[0].tensor, w0["layers.0.w"]) and hp.layers == [1]


def test_candidates_join_the_layers_a_step_may_write():
    pm = get_plugin_manager(pinned=["wilke"])
    block = {"wilke": {"candidates": [3, 0]}}
    assert candidate_layers(pm, block, "ROME", [1]) == [0, 3]
    assert with_candidates(pm, block, "ROME", [1]) == [0, 1, 3]
    assert with_candidates(pm, {}, "ROME", [1]) == [1] and with_candidates(pm, block, "ROME", None) is None
    with pytest.raises(ValueError, match=r"`wilke:` block: wilke.candidates must be a non-empty list"):
        candidate_layers(pm, {"wilke": {"candidates": []}}, "ROME", [1])
    model = tiny_llama(vocab_size=40, num_hidden_layers=LAYERS)
    hp = types.SimpleNamespace(rewrite_module_tmp="model.layers.{}.mlp.down_proj", layers=[1], alg_name="ROME",
                               plugin_configs={"wilke": {"candidates": [3, 0, 99]}})
    assert [t.name for t in easyedit.target_weights(model, hp)] == [DOWN.format(i) for i in (0, 1, 3)]
    hp.plugin_configs = {}
    assert [t.name for t in easyedit.target_weights(model, hp)] == [DOWN.format(1)]
    with pytest.raises(EditRejected, match=r"null-space projector per layer.*\['wilke'\]"):
        choose_layers(PluginHost(pm), pm, "AlphaEdit", types.SimpleNamespace(layers=[1]),
                      {"wilke": {"candidates": [0]}}, [], None, None, lambda r: None, projector="P.safetensors")


# -- the plugin's own parts -----------------------------------------------------------------------------
def test_settings_and_registration():
    assert wilke.settings({"candidates": [5, 3]}) == {"candidates": [3, 5], "criterion": "edit"}
    assert wilke.settings({"candidates": [2], "criterion": "keys"})["criterion"] == "keys"
    for bad in ([], None, [1.5], [-1], [True], "3"):
        with pytest.raises(ValueError, match=r"wilke.candidates must be a non-empty list of layer indices"):
            wilke.settings({"candidates": bad})
    with pytest.raises(ValueError, match="lists a layer twice"):
        wilke.settings({"candidates": [3, 3]})
    with pytest.raises(ValueError, match=r"wilke.criterion must be one of \['edit', 'keys'\]"):
        wilke.settings({"candidates": [3], "criterion": "norm"})
    with pytest.raises(ValueError, match=r"unknown wilke setting\(s\) \['layers'\]"):
        wilke.settings({"candidates": [3], "layers": [3]})
    with pytest.raises(ValueError, match="must be a mapping"):
        wilke.settings(None)
    pm = get_plugin_manager(pinned=["wilke"])
    names = [DOWN.format(i) for i in (0, 1)]
    assert validate_configs(pm, {"wilke": {"candidates": [1, 0]}}, "ROME", names) == {
        "wilke": {"candidates": [0, 1], "criterion": "edit"}}
    with pytest.raises(ValueError, match=r"wilke.candidates \[7\] have no weight ROME writes.*layers \[0, 1\]"):
        validate_configs(pm, {"wilke": {"candidates": [0, 7]}}, "ROME", names)
    assert DEFAULT_PLUGINS["wilke"] == "revive_plugin.plugins.wilke"
    assert installed_plugins()["wilke"].startswith("entry point of revive-plugin")  # pip install -e . ran


def test_criteria_by_hand():
    # eq. (1): ‖ΔW‖/‖W‖ over a layer's weights; the argmin; the lowest layer on a tie
    w = {DOWN.format(0): torch.full((2, 2), 1.0), DOWN.format(1): torch.full((2, 2), 2.0),
         DOWN.format(2): torch.full((2, 2), 1.0)}
    asked = []

    def trial(layers):
        asked.append(list(layers))
        (layer,) = layers
        return {DOWN.format(layer): torch.full((2, 2), [0.5, 0.5, 0.25][layer])}

    scores = wilke.scores_by_edit([0, 1, 2], w, trial)
    assert asked == [[0], [1], [2]]
    assert scores == pytest.approx({0: 0.5, 1: 0.25, 2: 0.25})
    assert wilke.best_layer(scores) == 1 and wilke.best_layer({4: 1.0, 2: 1.0, 3: 2.0}) == 2
    assert wilke.relative_change([torch.ones(2, 2)], [torch.zeros(2, 2)]) == math.inf
    # eq. (2) with one δ: 1 / (‖k‖ ‖W‖_F), ‖k‖ the RMS over requests
    keys = {DOWN.format(0): torch.tensor([[3.0, 4.0]]), DOWN.format(1): torch.tensor([[1.0, 0.0], [0.0, 7.0]]),
            DOWN.format(2): torch.tensor([[0.0, 0.0]])}
    scores = wilke.scores_by_keys([0, 1, 2], w, keys.__getitem__)
    assert scores[0] == pytest.approx(1 / (5 * 2)) and scores[1] == pytest.approx(1 / (math.sqrt(25) * 4))
    assert scores[2] == math.inf and wilke.best_layer(scores) == 1


def test_the_hook_needs_its_block_and_says_what_it_chose():
    pm = get_plugin_manager(pinned=["wilke"])
    host = PluginHost(pm)
    ts = targets2()
    ts = [TargetWeight(DOWN.format(i), t.tensor) for i, t in enumerate(ts)]
    with torch.no_grad():
        ts[0].tensor.fill_(1.0)
        ts[1].tensor.fill_(1.0)

    def trial(layers):
        return {DOWN.format(layers[0]): torch.full((2, 3), 0.1 * (2 - layers[0]))}

    assert host.select_layers("ROME", ts, [0, 1], configs={}, trial=trial) is None
    block = {"wilke": {"candidates": [0, 1], "criterion": "edit"}}
    assert host.select_layers("ROME", ts, [0, 1], configs=block, trial=trial) == [1]
    with pytest.raises(EditRejected, match="criterion 'edit' needs the driver's trial"):
        host.select_layers("ROME", ts, [0, 1], configs=block)
    with pytest.raises(EditRejected, match="criterion 'keys' needs the keys"):
        host.select_layers("ROME", ts, [0, 1], configs={"wilke": {"candidates": [0, 1], "criterion": "keys"}})
    with pytest.raises(EditRejected, match=r"wilke.candidates \[1\] are not layers this step of ROME may write"):
        host.select_layers("ROME", ts[:1], [0], configs=block, trial=trial)
    # the choice of the step, as step metrics; the trials' time is the step's editor time
    def slow_trial(layers):
        time.sleep(0.05)
        return trial(layers)

    host = PluginHost(pm)
    host.select_layers("ROME", ts, [0, 1], configs=block, trial=slow_trial)
    assert host.seconds["edit"] >= 0.1
    _, rec = host.run_step("ROME", ts, lambda: None, configs=block)
    assert rec.metrics == pytest.approx({"wilke/layer": 1.0, "wilke/score/0": 0.2, "wilke/score/1": 0.1,
                                         "wilke/chose/0": 0.0, "wilke/chose/1": 1.0})
    assert rec.edit_seconds >= 0.1
    assert host.seconds["edit"] == pytest.approx(rec.edit_seconds)  # the trials counted once, not twice
    first = rec.edit_seconds
    _, rec = host.run_step("ROME", ts, lambda: None, configs=block)  # a step it did not choose for: nothing
    assert rec.metrics == {}
    assert host.seconds["edit"] == pytest.approx(first + rec.edit_seconds)


# -- real ROME edits on the tiny LLaMA ------------------------------------------------------------------
def test_wilke_picks_the_crafted_layer_and_the_edit_writes_only_it(tmp_path, enabled, tiny4_dir):
    """Layer 3's FFN keys are made to fire on the subject (8 gate/up rows along its representation): WilKE, by the
    editor's own update (1) and by the keys (2), picks layer 3, not ROME's layer 1 nor the uncrafted model's best
    (layer 2); only layer 3 changes; the scores are (1) and (2) computed by hand."""
    probes, beside = {}, {}
    for criterion in ("edit", "keys"):
        (tmp_path / criterion).mkdir()
        hp = load("ROME", write_hparams(tmp_path / criterion, ROME4, tiny4_dir,
                                        wilke={"candidates": [0, 1, 2, 3], "criterion": criterion}))
        assert hp.plugin_configs == {"wilke": {"candidates": [0, 1, 2, 3], "criterion": criterion}}
        torch.manual_seed(0)
        editor = editor_for(hp)
        model, tok = editor.model, editor.tok
        craft(model, tok, DANIELLE, 3)
        w0 = downs(model)
        probes[criterion] = (model, tok, w0)
        editor.edit(**DANIELLE, keep_original_weight=False, verbose=False)
        rec = easyedit.step_records(model)[-1]
        assert hp.layers == [1]  # ROME's own layer again after the step
        assert rec.changed == [DOWN.format(3)] and rec.metrics["wilke/layer"] == 3.0
        assert rec.metrics["wilke/chose/3"] == 1.0 and sum(rec.metrics[f"wilke/chose/{i}"] for i in range(4)) == 1
        scores = {i: rec.metrics[f"wilke/score/{i}"] for i in range(4)}
        assert min(scores[i] for i in (0, 1, 2)) > 5 * scores[3]  # clearly: a match, not a near-tie
        after = downs(model)
        for i in (0, 1, 2):
            assert torch.equal(after[DOWN.format(i)], w0[DOWN.format(i)])
        delta = after[DOWN.format(3)] - w0[DOWN.format(3)]
        if criterion == "edit":
            # the keys criterion, evaluated beside it on the same model and logged, agrees here (a clear match)
            assert rec.metrics["wilke/keys_layer"] == 3.0 and rec.metrics["wilke/keys_agrees"] == 1.0
            beside = {i: rec.metrics[f"wilke/keys_score/{i}"] for i in range(4)}
            # the written update is ROME's trial update at layer 3: (1) of the chosen layer by hand
            assert scores[3] == pytest.approx(float(delta.norm() / w0[DOWN.format(3)].norm()), rel=1e-5)
            # and (1) of every layer by hand: plain ROME (no block) at that layer alone, on the same model
            plain = load("ROME", write_hparams(tmp_path, ROME4, tiny4_dir))
            for layer in range(4):
                with torch.no_grad():
                    for n, w in w0.items():
                        model.get_parameter(n).copy_(w)
                plain.layers = [layer]
                editor.apply_algo(model, tok, editor._prepare_requests(
                    DANIELLE["prompts"], DANIELLE["target_new"], DANIELLE["ground_truth"],
                    subject=DANIELLE["subject"]), plain, copy=False, return_orig_weights=False,
                    keep_original_weight=False)
                d = model.get_parameter(DOWN.format(layer)).detach() - w0[DOWN.format(layer)]
                assert scores[layer] == pytest.approx(float(d.norm() / w0[DOWN.format(layer)].norm()), rel=1e-4)
        else:
            for layer in range(4):  # (2): 1 / (‖k‖ ‖W‖), the key read off the model by hand
                module = model.get_submodule(DOWN.format(layer).rsplit(".", 1)[0])
                (k,) = keys_by_hand(model, tok, DANIELLE["prompts"], ["The mother tongue of Danielle Darrieux"],
                                    module)
                assert scores[layer] == pytest.approx(1 / float(k.norm() * w0[DOWN.format(layer)].norm()), rel=1e-4)
            assert beside == pytest.approx(scores, rel=1e-5)  # what the edit-criterion run logged beside its own
            assert not any(k.startswith("wilke/keys_") for k in rec.metrics)  # nothing beside the keys criterion


def test_without_the_block_rome_stays_on_its_layer(tmp_path, enabled, tiny4_dir):
    hp = load("ROME", write_hparams(tmp_path, ROME4, tiny4_dir))
    torch.manual_seed(0)
    editor = editor_for(hp)
    craft(editor.model, editor.tok, DANIELLE, 3)  # the same crafted model: nobody looks at layer 3
    w0 = downs(editor.model)
    editor.edit(**DANIELLE, keep_original_weight=False, verbose=False)
    rec = easyedit.step_records(editor.model)[-1]
    assert rec.changed == [DOWN.format(1)] and rec.metrics == {}
    assert [t.name for t in easyedit.target_weights(editor.model, hp)] == [DOWN.format(1)]
    after = downs(editor.model)
    assert [n for n in after if not torch.equal(after[n], w0[n])] == [DOWN.format(1)]


def test_revive_filters_whichever_layer_wilke_chose_against_its_w0(tmp_path, enabled, tiny4_dir):
    """Layer 3 matches Danielle Darrieux, layer 0 Italy (each made orthogonal to the other subject): the first edit
    writes layer 3, the second layer 0, never written before. REVIVE cached every candidate's W₀ at the first step
    and its invariant holds on both written layers with their own W₀."""
    tau = 0.3
    hp = load("ROME", write_hparams(tmp_path, ROME4, tiny4_dir, wilke={"candidates": [0, 2, 3]},
                                    revive={"tau": tau}))
    torch.manual_seed(0)
    editor = editor_for(hp)
    model, tok = editor.model, editor.tok
    craft(model, tok, DANIELLE, 3, away=ITALY)
    craft(model, tok, ITALY, 0, away=DANIELLE)
    w0 = downs(model)
    editor.edit(**DANIELLE, keep_original_weight=False, verbose=False)
    editor.edit(**ITALY, keep_original_weight=False, verbose=False)
    records = easyedit.step_records(model)
    assert [r.metrics["wilke/layer"] for r in records] == [3.0, 0.0]
    assert [r.changed for r in records] == [[DOWN.format(3)], [DOWN.format(0)]]
    assert [r.transformed for r in records] == [[DOWN.format(3)], [DOWN.format(0)]]
    filt = easyedit.host_for(model).state["revive"]
    # the step's targets: WilKE's candidates and ROME's own layer 1, all seen unedited at the first step
    assert sorted(filt._reference) == [DOWN.format(i) for i in (0, 1, 2, 3)]
    after = downs(model)
    for layer in (0, 3):
        n = DOWN.format(layer)
        b = protected_basis(w0[n], tau)
        ref = filt.reference(n)
        assert ref.k == b.k and torch.allclose(ref.u.abs(), b.u.abs(), atol=1e-5)
        total = after[n] - w0[n]
        assert float(total.norm()) > 0
        assert float((b.u.T.float() @ total).norm()) <= 1e-4 * float(total.norm()) + 1e-6
        assert float((total @ b.v.float()).norm()) <= 1e-4 * float(total.norm()) + 1e-6
    for layer in (1, 2):
        assert torch.equal(after[DOWN.format(layer)], w0[DOWN.format(layer)])


def test_a_candidate_the_model_lacks_is_refused_before_the_editor_runs(tmp_path, enabled, tiny4_dir):
    with pytest.raises(ValueError, match=r"ROME\.yaml: `wilke:` block: wilke.candidates must be a non-empty list"):
        load("ROME", write_hparams(tmp_path, ROME4, tiny4_dir, wilke={"candidates": []}))
    hp = load("ROME", write_hparams(tmp_path, ROME4, tiny4_dir, wilke={"candidates": [2, 9]}))
    editor = editor_for(hp)
    before = {n: p.detach().clone() for n, p in editor.model.named_parameters()}
    with pytest.raises(EditRejected, match=r"weights untouched.*wilke.candidates \[9\] have no weight ROME writes"):
        editor.edit(**DANIELLE, keep_original_weight=False, verbose=False)
    for n, p in editor.model.named_parameters():
        assert torch.equal(p.detach(), before[n]), n


# -- the harness ----------------------------------------------------------------------------------------
def test_harness_checkpoints_every_candidate_and_resumes_to_the_same_run(tmp_path, tiny_model_dir, monkeypatch):
    """ROME's own layer is 1; WilKE's only candidate is 0, so every edit writes layer 0, which the checkpoint must
    hold for a resumed run to equal an uninterrupted one (REVIVE's bases of both layers too)."""
    from safetensors.torch import load_file

    monkeypatch.setenv("REVIVE_CACHE", str(tmp_path / "cache"))
    hp = tmp_path / "tiny-rome.yaml"
    hp.write_text(yaml.safe_dump({**ROME, "model_name": str(tiny_model_dir)}))

    def config(name):
        return RunConfig.from_dict({
            "name": name, "hparams": str(hp), "transforms": ["revive"], "revive": {"tau": 0.3},
            "monitors": ["wilke"], "plugins": {"wilke": {"candidates": [0]}}, "edits": 4, "batch_size": 1,
            "eval_every": 2, "glue": {"tasks": [], "n_per_task": 0, "few_shot": 0, "dir": None}, "ppl": None,
            "fluency_prompts": 0, "eval_last_batch": False, "output": str(tmp_path / "runs" / "{name}"),
            "device": "cpu"})

    try:
        straight = Run.start(config("straight")).execute()
        r1 = rows(straight)
        assert [r["edits"] for r in r1] == [0, 2, 4]
        assert r1[1]["wilke/layer"] == 0.0 and r1[2]["wilke/chose/0"] == 1.0
        weights = load_file(str(straight / "checkpoint" / "weights.safetensors"))
        assert sorted(weights) == [DOWN.format(0), DOWN.format(1)]
        easyedit.disable_easyedit()
        part = Run.start(config("resumed"))
        part.execute(stop_after=2)
        easyedit.disable_easyedit()  # a new process would start from nothing
        resumed = Run.resume(part.run_dir).execute()
    finally:
        easyedit.disable_easyedit()
    r2 = rows(resumed)
    for a, b in zip(r1, r2):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), k
    wb = load_file(str(resumed / "checkpoint" / "weights.safetensors"))
    for k in weights:
        torch.testing.assert_close(weights[k], wb[k], rtol=1e-5, atol=1e-6)
    original = load_file(str(tiny_model_dir / "model.safetensors"))
    assert not torch.equal(weights[DOWN.format(0)], original[DOWN.format(0)])  # WilKE's layer, written
    assert torch.equal(weights[DOWN.format(1)], original[DOWN.format(1)])      # ROME's own, never written


def test_shipped_wilke_configs_load():
    for name in ("smollm2-rome-wilke", "smollm2-rome-wilke-revive"):
        cfg = RunConfig.from_yaml(name)
        assert cfg.monitors == ["wilke"] and cfg.plugin_block("wilke")["candidates"] == [3, 4, 5, 6, 7, 8, 9]
        assert cfg.transforms == (["revive"] if name.endswith("revive") else []) and cfg.batch_size == 1
