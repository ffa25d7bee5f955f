"""LEMoE (adapters/lemoe.py) on the tiny LLaMA: its KV-anchor routing, frozen earlier experts, atomic batches,
the editor state in checkpoints (a resumed harness run equals an uninterrupted one), and the easyeditor hooks
(ALG_DICT, hparams class, catalogue, plugin blocks passed through, BaseEditor's undo)."""
import pytest
import torch
import yaml
from safetensors.torch import load_file

from revive_plugin.adapters import easyedit, lemoe
from revive_plugin.adapters.compat import import_easyeditor
from revive_plugin.adapters.editors import ADDS_MODULES, catalogue, hparams_classes
from revive_plugin.adapters.models import load_model

pytestmark = pytest.mark.usefixtures("one_thread")

LEMOE = {"alg_name": "LEMoE", "layers": [0], "mlp_module_tmp": "model.layers.{}.mlp",
         "rewrite_module_tmp": "model.layers.{}.mlp.down_proj", "expert_rank": 8, "route_threshold": 0.7,
         "num_steps": 20, "lr": 0.05, "stop_loss": 0.05, "device": 0, "batch_size": 1, "max_length": 40,
         "model_parallel": False}
DARRIEUX = dict(prompt="The mother tongue of Danielle Darrieux is", subject="Danielle Darrieux", target_new="English",
                ground_truth="French")
FRANCE = dict(prompt="The capital of France is", subject="France", target_new="Rome", ground_truth="Paris")
#: Prompts of the edited facts, with the token (by its text) that carries the fact's subject.
OWN_PROMPTS = [(DARRIEUX, "The mother tongue of Danielle Darrieux is English", "ux"),
               (DARRIEUX, "Danielle Darrieux's mother tongue is", "ux"),
               (FRANCE, "The capital of France is Rome", "ĠFrance"),
               (FRANCE, "Of all cities in France, the capital is", "ĠFrance")]
UNRELATED = ["Review : a great and moving film", "The capital of Italy is", "The mother tongue of Barack Obama is",
             "Is this sentence linguistically acceptable? Answer: Yes"]


def write_hparams(tmp_path, model_dir, **extra):
    path = tmp_path / "lemoe.yaml"
    path.write_text(yaml.safe_dump({**LEMOE, "model_name": str(model_dir), **extra}))
    return path


def editor_for(tmp_path, model_dir, **extra):
    hp = hparams_classes()["LEMoE"].from_hparams(str(write_hparams(tmp_path, model_dir, **extra)))
    return import_easyeditor("easyeditor.editors.editor").BaseEditor.from_hparams(hp), hp


def ffn_input(model, tok, text, layer=0):
    captured = []
    handle = model.model.layers[layer].mlp.register_forward_pre_hook(lambda m, a: captured.append(a[0][0]))
    try:
        with torch.no_grad():
            model(torch.tensor([tok(text)["input_ids"]]))
    finally:
        handle.remove()
    return captured[0]


def logits(model, tok, text):
    with torch.no_grad():
        return model(torch.tensor([tok(text)["input_ids"]])).logits[0]


def test_lemoe_is_an_easyeditor_editor_that_adds_modules(tmp_path, tiny_model_dir):
    assert hparams_classes()["LEMoE"] is lemoe.LEMoEHyperParams  # found before enable_easyedit, like the harness needs
    assert "LEMoE" not in {r.name for r in catalogue()}  # ALG_DICT's entries: LEMoE is there once enabled
    (row,) = [r for r in catalogue(own=True) if r.name == "LEMoE"]
    assert (row.kind, row.runs_here) == (ADDS_MODULES, "tested") and row.plugins.startswith("passed through")
    alg_dict = import_easyeditor("easyeditor.util.alg_dict").ALG_DICT
    assert "LEMoE" not in alg_dict
    easyedit.enable_easyedit(device="cpu")
    try:
        assert alg_dict["LEMoE"].__revive_wrapped__ is lemoe.apply_lemoe_to_model
        assert [r.kind for r in catalogue() if r.name == "LEMoE"] == [ADDS_MODULES]
        hp = hparams_classes()["LEMoE"].from_hparams(str(write_hparams(tmp_path, tiny_model_dir)))
        assert (hp.layers, hp.lr, hp.ffn_name) == ([0], 0.05, "model.layers.0.mlp")
    finally:
        easyedit.disable_easyedit()
    assert "LEMoE" not in alg_dict
    shipped = lemoe.LEMoEHyperParams.from_hparams("hparams/LEMoE/smollm2-135m.yaml")
    assert shipped.layers == [6] and shipped.lr == 0.01
    with pytest.raises(ValueError, match="exactly one FFN layer"):
        lemoe.LEMoEHyperParams(alg_name="LEMoE", model_name="m", layers=[0, 1])
    with pytest.raises(ValueError, match="route_margin must be ≥ 0"):
        lemoe.LEMoEHyperParams(alg_name="LEMoE", model_name="m", layers=[0], route_margin=-0.1)
    with pytest.raises(ValueError, match="unknown LEMoE setting"):
        lemoe.LEMoEHyperParams.from_hparams(str(write_hparams(tmp_path, tiny_model_dir, v_lr=0.5)))


def test_routing_sends_an_edited_facts_prompts_to_its_expert_and_unrelated_prompts_to_none(
        tmp_path, enabled, tiny_model_dir):
    editor, hp = editor_for(tmp_path, tiny_model_dir)
    model, tok = editor.model, editor.tok
    before = {t: logits(model, tok, t) for t in UNRELATED + [p for _, p, _ in OWN_PROMPTS]}
    for batch in ([DARRIEUX], [FRANCE]):  # two editing batches: experts 0 and 1
        editor.apply_algo(model, tok, batch, hp, copy=False, return_orig_weights=False, keep_original_weight=False)
    _, adaptor = lemoe.adaptor_of(model)
    assert len(adaptor.experts) == 2 and adaptor.owners.tolist() == [0, 1]
    expert_of = {DARRIEUX["subject"]: 0, FRANCE["subject"]: 1}
    for request, text, subject_token in OWN_PROMPTS:
        routes = adaptor.routes(ffn_input(model, tok, text)).tolist()
        tokens = tok.convert_ids_to_tokens(tok(text)["input_ids"])
        routed = {tokens[i]: e for i, e in enumerate(routes) if e >= 0}
        assert routed == {subject_token: expert_of[request["subject"]]}, (text, routed)
        assert not torch.equal(logits(model, tok, text), before[text])  # the expert changes what follows
    for text in UNRELATED:
        assert (adaptor.routes(ffn_input(model, tok, text)) == -1).all(), text
        assert torch.equal(logits(model, tok, text), before[text])  # no route: exactly the unedited model


def test_an_anchor_whose_threshold_a_token_misses_leaves_it_to_the_next_nearest_anchor():
    anchors = torch.eye(3)[:2]                      # anchor 0 = e0 (expert 0), anchor 1 = e1 (expert 1)
    owners = torch.tensor([0, 1])
    x = torch.tensor([[0.9, 0.6, 0.0], [0.1, 0.0, 1.0]])  # nearest to anchor 0 (cos 0.83, 0.55); far from both
    assert lemoe.route(x, anchors, owners, 0.5).tolist() == [0, -1]
    assert lemoe.route(x, anchors, owners, 0.5, torch.tensor([0.9, -1.0])).tolist() == [1, -1]  # anchor 0 raised
    assert lemoe.route(x, anchors, owners, 0.5, torch.tensor([0.9, 0.6])).tolist() == [-1, -1]
    assert lemoe.route(x, anchors, owners, 0.9, torch.tensor([-1.0, -1.0])).tolist() == [-1, -1]  # θ still counts


@pytest.mark.parametrize("with_reference", [False, True])
def test_no_token_of_the_reference_corpus_routes_and_edited_prompts_still_do(
        tmp_path, enabled, tiny_model_dir, with_reference):
    """θ so low that every token would route: the reference corpus's floors keep its texts (here the unrelated
    prompts) away from the expert, token for token, while the edited fact's subject still reaches it. Without
    the corpus the same texts are routed: the floors do the work."""
    corpus = tmp_path / "reference.txt"
    corpus.write_text("\n".join(UNRELATED) + "\n")
    extra = {"reference_corpus": str(corpus)} if with_reference else {}
    editor, hp = editor_for(tmp_path, tiny_model_dir, route_threshold=-0.99, **extra)
    model, tok = editor.model, editor.tok
    before = {t: logits(model, tok, t) for t in UNRELATED}
    editor.apply_algo(model, tok, [DARRIEUX], hp)
    adaptor = lemoe.adaptor_of(model)[1]
    routed = [bool((adaptor.routes(ffn_input(model, tok, t)) >= 0).any()) for t in UNRELATED]
    if with_reference:
        assert adaptor.floors.shape == (1,) and -0.99 < float(adaptor.floors[0]) < 1.0
        assert routed == [False] * len(UNRELATED)
        assert all(torch.equal(logits(model, tok, t), before[t]) for t in UNRELATED)
    else:
        assert adaptor.floors.tolist() == [-1.0] and all(routed)
    text = DARRIEUX["prompt"]
    tokens = tok.convert_ids_to_tokens(tok(text)["input_ids"])
    assert 0 in {e for t, e in zip(tokens, adaptor.routes(ffn_input(model, tok, text)).tolist()) if t == "ux"}


def test_an_edit_whose_prediction_is_routed_gets_its_target(tmp_path, enabled, tiny_model_dir):
    """When the subject's last token is the one predicting the target, the expert decides the prediction: both
    facts of a batch end up with their new target on top (the tiny model's logits span ~1 nat, so the NLL
    itself stays high)."""
    editor, hp = editor_for(tmp_path, tiny_model_dir)
    model, tok = editor.model, editor.tok
    batch = [dict(prompt="Danielle Darrieux", subject="Danielle Darrieux", target_new="positive"),
             dict(prompt="The capital of France", subject="France", target_new="True")]
    targets = [tok(f"{r['prompt']} {r['target_new']}")["input_ids"][len(tok(r["prompt"])["input_ids"])] for r in batch]
    assert [int(logits(model, tok, r["prompt"])[-1].argmax()) for r in batch] != targets
    editor.apply_algo(model, tok, batch, hp)
    losses = lemoe.adaptor_of(model)[1].last_losses
    assert losses[-1] < losses[0] - 0.5
    assert [int(logits(model, tok, r["prompt"])[-1].argmax()) for r in batch] == targets


def test_earlier_experts_stay_frozen_and_no_model_weight_changes(tmp_path, enabled, tiny_model_dir):
    editor, hp = editor_for(tmp_path, tiny_model_dir)
    model, tok = editor.model, editor.tok
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    editor.apply_algo(model, tok, [DARRIEUX], hp)
    first = {n: p.detach().clone() for n, p in lemoe.adaptor_of(model)[1].experts[0].named_parameters()}
    assert first["V"].abs().sum() > 0  # trained
    editor.apply_algo(model, tok, [FRANCE], hp)
    experts = lemoe.adaptor_of(model)[1].experts
    for n, p in experts[0].named_parameters():
        assert torch.equal(p, first[n]) and not p.requires_grad, n
    assert experts[1].V.abs().sum() > 0 and not any(p.requires_grad for p in experts[1].parameters())
    for n, p in model.named_parameters():
        if ".lemoe." not in n:
            assert torch.equal(p, base[n]), n  # LEMoE adds modules; it writes no weight of the model
    assert all(n.startswith("model.layers.0.mlp.lemoe.experts.") for n in set(dict(model.named_parameters())) - set(base))


def test_an_interrupted_batch_leaves_the_adaptor_as_it_was(tmp_path, enabled, tiny_model_dir, monkeypatch):
    editor, hp = editor_for(tmp_path, tiny_model_dir)
    model, tok = editor.model, editor.tok
    editor.apply_algo(model, tok, [DARRIEUX], hp)
    state = lemoe.lemoe_state(model)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(lemoe, "train_expert", interrupted)
    with pytest.raises(KeyboardInterrupt):
        editor.apply_algo(model, tok, [FRANCE], hp)
    after = lemoe.lemoe_state(model)
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)
    assert all(p.requires_grad for n, p in model.named_parameters() if ".lemoe." not in n)  # flags put back


def test_the_state_goes_into_a_fresh_model_and_a_mismatch_is_refused(tmp_path, enabled, tiny_model_dir):
    editor, hp = editor_for(tmp_path, tiny_model_dir)
    editor.apply_algo(editor.model, editor.tok, [DARRIEUX, FRANCE], hp)
    state = easyedit.editor_state("LEMoE", editor.model)
    assert state["lemoe.U"].shape == (1, 8, 32) and state["lemoe.anchors"].shape == (2, 32)
    assert state["lemoe.floors"].tolist() == [-1.0, -1.0]  # no reference corpus: θ alone
    fresh, tok = load_model(tiny_model_dir)
    for wrong, match in (({**vars(hp), "expert_rank": 4}, "experts U"), ({**vars(hp), "layers": [1]}, "layer")):
        with pytest.raises(ValueError, match=match):
            easyedit.restore_editor_state("LEMoE", state, model=fresh, hparams=lemoe.LEMoEHyperParams(**wrong))
        assert lemoe.adaptor_of(fresh) is None  # nothing was changed
    easyedit.restore_editor_state("LEMoE", state, model=fresh, hparams=hp)
    for _, text, _ in OWN_PROMPTS:
        torch.testing.assert_close(logits(fresh, tok, text), logits(editor.model, tok, text), rtol=0, atol=0)
    easyedit.restore_editor_state("LEMoE", {}, model=fresh, hparams=hp)  # the state of a run before its first edit
    assert lemoe.adaptor_of(fresh) is None
    older = {k: v for k, v in state.items() if k != "lemoe.floors"}  # a checkpoint from before per-anchor floors
    easyedit.restore_editor_state("LEMoE", older, model=fresh, hparams=hp)
    assert lemoe.adaptor_of(fresh)[1].floors.tolist() == [-1.0, -1.0] == state["lemoe.floors"].tolist()
    for _, text, _ in OWN_PROMPTS:
        torch.testing.assert_close(logits(fresh, tok, text), logits(editor.model, tok, text), rtol=0, atol=0)


def test_plugin_blocks_are_passed_through_with_a_warning(tmp_path, enabled, tiny_model_dir):
    editor, hp = editor_for(tmp_path, tiny_model_dir, revive={"tau": 0.1})
    assert set(getattr(hp, easyedit.PLUGIN_CONFIGS_ATTR)) == {"revive"}
    with pytest.warns(UserWarning, match="LEMoE does not write model weights"):
        editor.apply_algo(editor.model, editor.tok, [DARRIEUX], hp)
    assert len(lemoe.adaptor_of(editor.model)[1].experts) == 1
    assert easyedit.step_records(editor.model) == []  # the host never saw a delta


def test_base_editor_edits_accumulate_or_are_undone(tmp_path, enabled, tiny_model_dir):
    """The release's BaseEditor.edit: sequential (keep_original_weight=False) edits stay; with
    keep_original_weight=True it writes weights_copy back, which zeroes the new expert's V."""
    editor, _ = editor_for(tmp_path, tiny_model_dir)
    request = dict(prompts=[DARRIEUX["prompt"]], target_new=[DARRIEUX["target_new"]],
                   ground_truth=[DARRIEUX["ground_truth"]], subject=[DARRIEUX["subject"]])
    text = OWN_PROMPTS[0][1]
    before = logits(editor.model, editor.tok, text)
    editor.edit(**request, verbose=False, keep_original_weight=True)
    assert lemoe.adaptor_of(editor.model)[1].experts[0].V.abs().sum() == 0
    assert torch.equal(logits(editor.model, editor.tok, text), before)
    editor.edit(**request, verbose=False, keep_original_weight=False)
    assert len(lemoe.adaptor_of(editor.model)[1].experts) == 2
    assert not torch.equal(logits(editor.model, editor.tok, text), before)


# -- the harness: checkpoint and resume of the experts ------------------------------------------------------
@pytest.fixture
def lemoe_run(tmp_path, tiny_model_dir, monkeypatch):
    from revive_plugin.eval.harness import RunConfig

    monkeypatch.setenv("REVIVE_CACHE", str(tmp_path / "cache"))
    hp = write_hparams(tmp_path, tiny_model_dir, num_steps=5)

    def make(name):
        return RunConfig.from_dict({
            "name": name, "hparams": str(hp), "edits": 4, "batch_size": 2, "eval_every": 2, "eval_facts": "all",
            "fluency_prompts": 2, "fluency_tokens": 4, "glue": {"tasks": [], "n_per_task": 0, "few_shot": 0, "dir": None},
            "ppl": None, "output": str(tmp_path / "runs" / "{name}"), "device": "cpu"})

    yield make
    easyedit.disable_easyedit()


def test_a_lemoe_run_resumed_midway_equals_an_uninterrupted_one(lemoe_run, monkeypatch):
    """The experts and anchors are the checkpoint's editor.safetensors; a new process re-inserts them before it
    evaluates anything (the row at 2 edits, deleted as if the first process died while measuring it, is
    measured again with them), and its next batch trains on top of them as the uninterrupted run did."""
    from revive_plugin.eval.harness import Run, read_rows

    experts_seen = []  # (edits, experts in the model) at every evaluation
    evaluate = Run._evaluate

    def spy(self, done, model, *args, **kwargs):
        found = lemoe.adaptor_of(model)
        experts_seen.append((done, len(found[1].experts) if found else 0))
        return evaluate(self, done, model, *args, **kwargs)

    monkeypatch.setattr(Run, "_evaluate", spy)
    straight = Run.start(lemoe_run("straight")).execute()
    easyedit.disable_easyedit()
    part = Run.start(lemoe_run("resumed"))
    part.execute(stop_after=2)
    saved = load_file(str(part.run_dir / "checkpoint" / "editor.safetensors"))
    assert saved["lemoe.U"].shape == (1, 8, 32) and saved["lemoe.owners"].tolist() == [0, 0]
    rows = read_rows(part.run_dir / "metrics.jsonl")
    (part.run_dir / "metrics.jsonl").write_text("".join(__import__("json").dumps(r) + "\n" for r in rows[:1]))
    easyedit.disable_easyedit()  # a new process starts from nothing
    resumed = Run.resume(part.run_dir).execute()
    a = load_file(str(straight / "checkpoint" / "editor.safetensors"))
    b = load_file(str(resumed / "checkpoint" / "editor.safetensors"))
    assert a["lemoe.U"].shape == (2, 8, 32) and a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0)
    ra, rb = read_rows(straight / "metrics.jsonl"), read_rows(resumed / "metrics.jsonl")
    assert [r["edits"] for r in ra] == [r["edits"] for r in rb] == [0, 2, 4]
    for x, y in zip(ra, rb):
        for k, v in x.items():
            assert y[k] == pytest.approx(v, abs=1e-6), (x["edits"], k)
    # straight: 0, 2, 4 edits; then the stopped run (0, 2) and the resumed process re-measuring 2 and measuring 4
    assert experts_seen == [(0, 0), (2, 1), (4, 2), (0, 0), (2, 1), (2, 1), (4, 2)]
