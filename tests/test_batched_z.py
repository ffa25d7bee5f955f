"""Batched z optimisation against easyeditor's own compute_z, and the `batched_z:` hparams switch."""
import pytest
import torch

from revive_plugin.adapters import batched_z as bz
from revive_plugin.adapters import compat, easyedit
from revive_plugin.adapters.compat import import_easyeditor
from revive_plugin.adapters.models import load_model

from test_easyedit import MEMIT, editor_for, edited_weights, load, write_hparams

TEMPLATES = [["{}"], ["The day began. {}", "I think that {}"]]
REQUESTS = [
    {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux", "target_new": " English"},
    {"prompt": "The capital of {} is", "subject": "Italy", "target_new": " Paris"},
    {"prompt": "{} plays the", "subject": "Miles Davis", "target_new": " violin"},
]


@pytest.fixture
def model_tok(tiny_model_dir):
    model, tok = load_model(str(tiny_model_dir), padding_side="right")
    return model, tok


#: z at layer 0, loss at layer 1. (With loss layer = z layer easyeditor's TraceDict hooks the same module twice
#: and adds δ twice; the batched path adds it once, as intended, so that case is not compared.)
Z_LAYER = 0


def hparams(tmp_path, tiny_model_dir, **extra):
    return load("MEMIT", write_hparams(tmp_path, {**MEMIT, "layers": [0], "v_loss_layer": 1, **extra},
                                       tiny_model_dir))


def original_z(model, tok, request, hp, layer):
    compute_z = import_easyeditor("easyeditor.models.memit.compute_z").compute_z
    with compat.cuda_redirect(torch.device("cpu")):
        return compute_z(model, tok, dict(request), hp, layer, TEMPLATES)


def test_batched_equals_easyeditor_request_by_request(tmp_path, enabled, model_tok, tiny_model_dir):
    model, tok = model_tok
    hp = hparams(tmp_path, tiny_model_dir, v_num_grad_steps=6)
    expected = [original_z(model, tok, r, hp, Z_LAYER).detach() for r in REQUESTS]
    for chunk in (1, 2, 16):  # chunking changes shapes, not results
        got = bz.compute_zs(model, tok, REQUESTS, hp, Z_LAYER, TEMPLATES, chunk=chunk, progress=False)
        for e, g in zip(expected, got):
            assert torch.allclose(e, g, rtol=1e-4, atol=1e-5), (chunk, float((e - g).abs().max()))
    # The optimisation moved every vector (a test that cannot pass with δ = 0).
    init = bz.compute_zs(model, tok, REQUESTS, hparams(tmp_path, tiny_model_dir, v_num_grad_steps=1),
                         Z_LAYER, TEMPLATES, progress=False)
    assert all(float((g - i).norm()) > 1e-3 for g, i in zip(got, init))


def test_a_stopped_request_is_frozen_and_the_others_go_on(tmp_path, enabled, model_tok, tiny_model_dir, monkeypatch):
    model, tok = model_tok
    hp = hparams(tmp_path, tiny_model_dir, v_num_grad_steps=8)
    free = bz.compute_zs(model, tok, REQUESTS, hp, Z_LAYER, TEMPLATES, progress=False)
    # A threshold between the requests' losses stops some early: each must still equal its solo run.
    alone_free = [bz.compute_zs(model, tok, [r], hp, Z_LAYER, TEMPLATES, progress=False)[0] for r in REQUESTS]
    monkeypatch.setattr(bz, "STOP_LOSS", 8.5)
    stopped = bz.compute_zs(model, tok, REQUESTS, hp, Z_LAYER, TEMPLATES, progress=False)
    alone = [bz.compute_zs(model, tok, [r], hp, Z_LAYER, TEMPLATES, progress=False)[0] for r in REQUESTS]
    for a, s in zip(alone, stopped):
        assert torch.allclose(a, s, rtol=1e-4, atol=1e-5)
    # In chunks, a stopped request's rows are cut out of its chunk's saved prefix: one prefix pass per chunk.
    prefix_passes = []
    real_legacy = bz._legacy
    monkeypatch.setattr(bz, "_legacy", lambda past: prefix_passes.append(1) or real_legacy(past))
    chunked = bz.compute_zs(model, tok, REQUESTS, hp, Z_LAYER, TEMPLATES, chunk=2, progress=False)
    assert len(prefix_passes) == 2
    for a, c in zip(alone, chunked):
        assert torch.allclose(a, c, rtol=1e-4, atol=1e-5)
    for a, f in zip(alone_free, free):
        assert torch.allclose(a, f, rtol=1e-4, atol=1e-5)
    differs = [not torch.allclose(s, f, atol=1e-5) for s, f in zip(stopped, free)]
    assert any(differs), "the threshold stopped nothing: the test would not see a freezing bug"


def test_yaml_switch_runs_memit_with_batched_z(tmp_path, enabled, tiny_model_dir, monkeypatch):
    calls = []
    main = import_easyeditor("easyeditor.models.memit.memit_main")
    original = main.compute_z
    monkeypatch.setattr(main, "compute_z", lambda *a, **k: calls.append(1) or original(*a, **k))
    batch = dict(prompts=["The mother tongue of Danielle Darrieux is", "The capital of Italy is"],
                 target_new=["English", "Paris"], ground_truth=["French", "Rome"],
                 subject=["Danielle Darrieux", "Italy"])
    results = {}
    for name, extra in (("easyeditor", {}), ("batched", {"batched_z": {"chunk": 1}}),
                        ("batched-full-passes", {"batched_z": {"chunk": 1, "early_exit": False}})):
        hp = hparams(tmp_path, tiny_model_dir, **extra)
        torch.manual_seed(0)
        editor = editor_for(hp)
        weights = edited_weights(editor, hp)
        w0 = {n: w.detach().clone() for n, w in weights.items()}
        calls.clear()
        top = []  # forward passes that reached the final norm
        hook = editor.model.model.norm.register_forward_hook(lambda *a: top.append(1))
        try:
            editor.batch_edit(**batch, keep_original_weight=False, verbose=False)
        finally:
            hook.remove()
        results[name] = ({n: w.detach() - w0[n] for n, w in weights.items()}, len(calls), len(top))
    (plain, plain_calls, _), (batched, batched_calls, _) = results["easyeditor"], results["batched"]
    assert plain_calls == 2 and batched_calls == 0  # easyeditor's compute_z never ran on the batched path
    assert results["batched-full-passes"][1] == 0
    assert results["batched"][2] < results["batched-full-passes"][2]  # early exit skipped the top of the model
    for n in plain:  # stopping the key/representation passes early changes no number
        assert torch.allclose(batched[n], results["batched-full-passes"][0][n], rtol=1e-4, atol=1e-7)
    assert main.compute_z is not None and main.compute_z.__name__ == "<lambda>"  # restored after the step
    repr_tools = import_easyeditor("easyeditor.models.rome.repr_tools")
    assert repr_tools.nethook is import_easyeditor("easyeditor.util.nethook")  # restored too
    for n in plain:
        assert float(plain[n].norm()) > 0
        assert torch.allclose(plain[n], batched[n], rtol=1e-3, atol=1e-5 * float(plain[n].abs().max()))


@pytest.mark.parametrize("value", [0, "yes", {"chunk": 0}, {"chunks": 4}, {"chunk": True}, {"early_exit": "no"}])
def test_bad_batched_z_block_is_named(tmp_path, enabled, tiny_model_dir, value):
    with pytest.raises(ValueError, match=r"batched_z must be true, false or \{chunk: N, early_exit: true\|false\}"):
        load("MEMIT", write_hparams(tmp_path, {**MEMIT, "batched_z": value}, tiny_model_dir))


def test_chunk_must_be_positive(tmp_path, enabled, model_tok, tiny_model_dir):
    model, tok = model_tok
    with pytest.raises(ValueError, match="chunk must be a positive"):
        bz.compute_zs(model, tok, REQUESTS, hparams(tmp_path, tiny_model_dir), Z_LAYER, TEMPLATES, chunk=0)


def test_prefix_cache_is_used_and_exact(tmp_path, enabled, model_tok, tiny_model_dir, monkeypatch):
    model, tok = model_tok
    hp = hparams(tmp_path, tiny_model_dir, v_num_grad_steps=5)
    splits = []
    real = bz._split_at_lookup
    monkeypatch.setattr(bz, "_split_at_lookup", lambda b, fill, **kw: splits.append(real(b, fill, **kw)) or splits[-1])
    cached = bz.compute_zs(model, tok, REQUESTS, hp, Z_LAYER, TEMPLATES, chunk=2, progress=False)
    assert splits and all(s is not None for s in splits)  # every step ran on cached prefixes
    full = bz.compute_zs(model, tok, REQUESTS, hp, Z_LAYER, TEMPLATES, chunk=2, progress=False, prefix_cache=False)
    for c, f in zip(cached, full):
        assert torch.allclose(c, f, rtol=1e-4, atol=1e-5)
    # A lookup at a row's first token leaves nothing to cache: that batch runs in full.
    b = {"enc": {"input_ids": torch.tensor([[5, 6, 7]]), "attention_mask": torch.ones(1, 3, dtype=torch.long)},
         "idxs": torch.tensor([0]), "t_pos": torch.tensor([2]), "t_rows": torch.tensor([0])}
    assert real(b, 0) is None
    b["idxs"] = torch.tensor([1])
    split = real(b, 0)
    assert split["prefix"]["input_ids"].tolist() == [[5]] and split["enc"]["input_ids"].tolist() == [[6, 7]]
    assert split["enc"]["position_ids"].tolist() == [[1, 2]] and split["t_pos"].tolist() == [1]


def test_layers_up_to_z_run_once_per_chunk_and_exactly(tmp_path, enabled):
    """z at layer 1 of 3: later steps reuse layers 0–1's output; the vectors are the same tensors as without."""
    from revive_plugin.eval.testing import tiny_llama, tiny_tokenizer

    tok = tiny_tokenizer(add_bos=False)
    d = tmp_path / "three-layers"
    tiny_llama(vocab_size=len(tok), seed=1, num_hidden_layers=3).save_pretrained(d)
    tok.save_pretrained(d)
    model, tok = load_model(str(d), padding_side="right")
    hp = load("MEMIT", write_hparams(tmp_path, {**MEMIT, "layers": [1], "v_loss_layer": 2, "v_num_grad_steps": 5}, d))
    calls = []
    hook = model.model.layers[0].mlp.register_forward_hook(lambda *a: calls.append(1))  # runs only when layer 0 computes
    reused = bz.compute_zs(model, tok, REQUESTS, hp, 1, TEMPLATES, chunk=2, progress=False)
    n_reused = len(calls)
    calls.clear()
    full = bz.compute_zs(model, tok, REQUESTS, hp, 1, TEMPLATES, chunk=2, progress=False, skip_lower=False)
    hook.remove()
    assert len(calls) > n_reused  # without reuse, layer 0 runs at every step
    for r, f in zip(reused, full):
        assert torch.equal(r, f)
    assert all(float((r - full_r).abs().max()) == 0 for r, full_r in zip(reused, full))
    # the optimisation moved the vectors (δ ≠ 0), so equality is not trivially between two zero updates
    init = bz.compute_zs(model, tok, REQUESTS, load("MEMIT", write_hparams(
        tmp_path, {**MEMIT, "layers": [1], "v_loss_layer": 2, "v_num_grad_steps": 1}, d)), 1, TEMPLATES, progress=False)
    assert all(float((r - i).norm()) > 1e-3 for r, i in zip(reused, init))
    assert not any("forward" in vars(m) for m in model.model.layers)  # the layers' own forwards are back


def test_requests_of_similar_length_share_a_chunk():
    widths = [(8, 20), (2, 12), (8, 18), (3, 9), (2, 15)]
    assert bz.chunk_requests(widths, 2) == [[1, 4], [2, 3], [0]]
    assert bz.chunk_requests(widths, 16) == [[0, 1, 2, 3, 4]]
    assert sorted(i for c in bz.chunk_requests(widths, 1) for i in c) == [0, 1, 2, 3, 4]


@pytest.fixture
def three_layers(tmp_path):
    """A tiny LLaMA of 3 layers: an edited layer with layers below and above it, and a loss layer above that
    (at the last layer δ reaches only its own position, so the target tokens' loss would not move)."""
    from revive_plugin.eval.testing import tiny_llama, tiny_tokenizer

    tok = tiny_tokenizer(add_bos=False)
    d = tmp_path / "three-layers"
    tiny_llama(vocab_size=len(tok), seed=1, num_hidden_layers=3).save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.mark.parametrize("layer", [0, 1])
def test_rome_compute_v_on_the_batched_path_equals_easyeditors(tmp_path, enabled, three_layers, layer):
    """δ on the MLP's output (ROME's compute_v), at the first layer (nothing below to reuse) and above it."""
    from test_easyedit import ROME

    model, tok = load_model(str(three_layers), padding_side="right")
    hp = load("ROME", write_hparams(tmp_path, {**ROME, "layers": [layer], "v_loss_layer": 2, "v_num_grad_steps": 6},
                                    three_layers))
    main = import_easyeditor("easyeditor.models.rome.rome_main")
    original = import_easyeditor("easyeditor.models.rome.compute_v").compute_v
    templates = [t for group in TEMPLATES for t in group]
    left = torch.randn(model.config.intermediate_size, generator=torch.Generator().manual_seed(0))
    for r in REQUESTS:
        with compat.cuda_redirect(torch.device("cpu")):
            expected = original(model, tok, dict(r), hp, layer, left, templates)
            with easyedit.batched_compute_v(main=main):
                assert main.compute_v is not original
                got = main.compute_v(model, tok, dict(r), hp, layer, left, templates)
        assert torch.allclose(expected, got, rtol=1e-4, atol=1e-5), float((expected - got).abs().max())
    assert main.compute_v is original
    # the optimisation moved the target (the right vector differs from the one of the initial target)
    with compat.cuda_redirect(torch.device("cpu")):
        hp.v_num_grad_steps = 1
        unmoved = original(model, tok, dict(REQUESTS[-1]), hp, layer, left, templates)
    assert float((unmoved - expected).norm()) > 1e-3


def test_rome_with_batched_z_edits_as_easyeditor_does(tmp_path, enabled, three_layers):
    from test_easyedit import ROME

    main = import_easyeditor("easyeditor.models.rome.rome_main")
    deltas = {}
    for name, extra in (("easyeditor", {}), ("batched", {"batched_z": True})):
        (tmp_path / name).mkdir()
        hp = load("ROME", write_hparams(tmp_path / name, {**ROME, "v_loss_layer": 2, "v_num_grad_steps": 6, **extra},
                                        three_layers))
        torch.manual_seed(0)
        editor = editor_for(hp)
        weights = edited_weights(editor, hp)
        w0 = {n: w.detach().clone() for n, w in weights.items()}
        calls = []
        real = main.compute_v
        main.compute_v = lambda *a, **k: calls.append(1) or real(*a, **k)
        try:
            editor.edit(prompts=["The mother tongue of Danielle Darrieux is"], target_new=["English"],
                        ground_truth=["French"], subject=["Danielle Darrieux"], keep_original_weight=False,
                        verbose=False)
        finally:
            main.compute_v = real
        deltas[name] = ({n: w.detach() - w0[n] for n, w in weights.items()}, len(calls))
    assert deltas["easyeditor"][1] == 1 and deltas["batched"][1] == 0  # easyeditor's compute_v never ran
    for n, plain in deltas["easyeditor"][0].items():
        assert float(plain.norm()) > 0
        torch.testing.assert_close(deltas["batched"][0][n], plain, rtol=1e-3, atol=1e-5 * float(plain.abs().max()))
