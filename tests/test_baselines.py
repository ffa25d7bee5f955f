"""The baselines RECT and PRUNE as plugins: hand computations, validation, the plugin state in checkpoints, real
easyeditor edits on a tiny LLaMA stacked with REVIVE in both orders, and a PRUNE run resumed mid-way."""
import math
import shutil
import types

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from test_easyedit import FT, MEMIT, REQUEST, REQUEST2, editor_for, edited_weights, load, write_hparams
from test_eval_harness import lean, rows, run_config  # noqa: F401  (run_config is a fixture)
from test_host import mocked_editor

from revive_plugin import PluginHost, ReviveFilter, get_plugin_manager, hookimpl, protected_basis, safe_update
from revive_plugin.adapters import easyedit
from revive_plugin.eval import harness
from revive_plugin.eval.harness import CheckpointError, Run, RunConfig
from revive_plugin.host import DEFAULT_PLUGINS, TargetWeight, installed_plugins, validate_configs
from revive_plugin.plugins import prune as prune_plugin
from revive_plugin.plugins import rect as rect_plugin
from revive_plugin.plugins.prune import PruneState, prune_matrix, restrain, sequential_delta
from revive_plugin.plugins.rect import rect, rect_mask, threshold_rank


# -- RECT by hand --------------------------------------------------------------------------------------
# W and the relative changes r = |ΔW| / (|W| + 1e-8) chosen by hand: ΔW = ±r·|W|, all r distinct.
W_HAND = torch.tensor([[1.0, -2.0, 0.5, 4.0], [-1.0, 1.0, 2.0, -0.5], [8.0, -1.0, 1.0, 2.0]], dtype=torch.float64)
R_HAND = torch.tensor([[3.0, 11.0, 1.0, 7.0], [5.0, 2.0, 12.0, 4.0], [6.0, 9.0, 10.0, 8.0]], dtype=torch.float64)
SIGNS = torch.tensor([[1, -1, 1, 1], [-1, 1, -1, 1], [1, 1, -1, -1]], dtype=torch.float64)
D_HAND = SIGNS * R_HAND * W_HAND.abs()


def test_rect_keeps_the_entries_at_or_above_the_kth_smallest_relative_change():
    # n = 12, top = 0.4: k = ⌊12·0.6⌋ = 7, the threshold is the 7th smallest r (= 7), kept: r ∈ {7, …, 12},
    # that is 6 = ⌈12·0.4⌉ + 1 entries (the source keeps one more than ⌈n·top⌉).
    assert threshold_rank(12, 0.4) == 7
    kept = rect_mask(D_HAND, W_HAND, 0.4)
    assert torch.equal(kept, R_HAND >= 7)
    assert int(kept.sum()) == 6 == math.ceil(12 * 0.4) + 1
    out = rect(D_HAND, W_HAND, 0.4)
    assert torch.equal(out[kept], D_HAND[kept])  # kept entries unchanged: no rescaling
    assert torch.equal(out[~kept], torch.zeros(6, dtype=torch.float64))
    # 0.2 (the original RECT on ROME): k = ⌊9.6⌋ = 9, kept r ∈ {9, …, 12}.
    assert torch.equal(rect_mask(D_HAND, W_HAND, 0.2), R_HAND >= 9)
    # The ranking is global over the matrix: a row can keep all or none of its entries.
    assert rect_mask(D_HAND, W_HAND, 0.4)[2].tolist() == [False, True, True, True]


def test_rect_relative_change_divides_by_abs_weight_plus_eps():
    w = torch.tensor([[0.0, -1.0, 1.0, 2.0]])
    d = torch.tensor([[1e-6, 0.9, -0.5, 1.0]])  # r = [100, 0.9, 0.5, 0.5]: the entry on W = 0 ranks first
    assert torch.allclose(rect_plugin.relative_change(d, w), torch.tensor([[1e-6 / 1e-8, 0.9, 0.5, 0.5]],
                                                                          dtype=torch.float64))
    # n = 4, top = 0.25: k = 3, threshold = 3rd smallest = 0.9, kept r ≥ 0.9.
    assert rect_mask(d, w, 0.25).tolist() == [[True, True, False, False]]
    # A negative W counts by its magnitude (the source's |ΔW / (W + ε)| ranks the same here).
    assert torch.equal(rect_mask(d, -w, 0.25), rect_mask(d, w, 0.25))


def test_rect_ties_at_the_threshold_are_all_kept():
    w = torch.ones(1, 6, dtype=torch.float64)
    d = torch.tensor([[1.0, 2.0, 2.0, 2.0, 5.0, 6.0]], dtype=torch.float64)
    # top = 0.4: k = ⌊3.6⌋ = 3, threshold = 3rd smallest = 2: all three 2s are kept (5 entries, not 4).
    assert rect_mask(d, w, 0.4).tolist() == [[False, True, True, True, True, True]]
    # All r equal: the threshold equals every r, everything is kept whatever top is.
    assert bool(rect_mask(torch.full((3, 3), 0.5), torch.ones(3, 3), 0.1).all())


def test_rect_edge_values_of_top():
    n = D_HAND.numel()
    assert torch.equal(rect(D_HAND, W_HAND, 1.0), D_HAND)               # k = 0: unchanged
    assert torch.equal(rect(D_HAND, W_HAND, 0.95), D_HAND)              # k = ⌊0.6⌋ = 0: unchanged
    assert int(rect_mask(D_HAND, W_HAND, 0.9).sum()) == n                 # k = ⌊1.2⌋ = 1: every r ≥ the minimum
    assert torch.equal(rect_mask(D_HAND, W_HAND, 1e-9), R_HAND >= 11)    # k = n − 1: the two largest
    assert torch.equal(rect_mask(D_HAND, W_HAND, 0.5), R_HAND >= 6)      # k = 6: 7 entries
    # k from the decimal value, as the source's integer arithmetic int(n · (100 − p) / 100):
    for p in (20, 40, 50, 60, 75):
        for m in range(1, 400):
            assert threshold_rank(m, p / 100) == int(m * (100 - p) / 100), (m, p)
    assert threshold_rank(10, 0.4) == 6  # not 5, which the binary double 0.4000000000000000222 would give


def test_rect_block_validation():
    assert rect_plugin.settings(None) == {"top": 0.4}
    assert rect_plugin.settings({"top": 0.2}) == {"top": 0.2}
    assert rect_plugin.settings({"top": 1}) == {"top": 1.0}
    for bad in (0, -0.1, 1.5, 40, "abc", True, float("nan"), None):
        with pytest.raises(ValueError, match=r"rect.top must be a number with 0 < top <= 1"):
            rect_plugin.settings({"top": bad})
    with pytest.raises(ValueError, match=r"unknown rect setting\(s\) \['p'\]"):
        rect_plugin.settings({"p": 40})
    with pytest.raises(ValueError, match="must be a mapping"):
        rect_plugin.settings(0.4)


# -- PRUNE by hand -------------------------------------------------------------------------------------
def orthonormal(m, k, seed):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
    return q


def with_spectrum(sigma, m=5, n=6, seed=0):
    """U diag(σ) Vᵀ with random orthonormal U (m×r), V (n×r): a matrix whose singular values are ``sigma``."""
    s = torch.tensor(sigma, dtype=torch.float64)
    u, v = orthonormal(m, len(sigma), seed), orthonormal(n, len(sigma), seed + 100)
    return (u * s) @ v.T, u, v


W0_HAND, _, _ = with_spectrum([3.0, 2.0, 1.0, 0.5, 0.1], seed=1)  # σ_max(W₀) = 3


def log_rule(sigma, s0, alpha):
    return math.log(sigma, alpha) - math.log(s0, alpha) + s0


@pytest.mark.parametrize("alpha", [math.e, 1.2, 1.5, 2.0])
def test_prune_maps_singular_values_at_or_above_sigma_max_w0_by_the_log_rule(alpha):
    s0 = float(torch.linalg.matrix_norm(W0_HAND, ord=2))
    assert s0 == pytest.approx(3.0)
    sigma = [10.0, 5.0, 2.5, 0.5]  # two above σ_max(W₀), two below
    delta, u, v = with_spectrum(sigma, seed=2)
    expected_sigma = [log_rule(10.0, s0, alpha), log_rule(5.0, s0, alpha), 2.5, 0.5]
    expected = (u * torch.tensor(expected_sigma, dtype=torch.float64)) @ v.T
    out, mapped = prune_matrix(delta, s0, alpha)
    assert mapped == 2
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    got = torch.linalg.svdvals(out)[:4].tolist()
    assert got == pytest.approx(sorted(expected_sigma, reverse=True), abs=1e-12)
    # the elementwise map, by hand: f(σ₀) = σ₀, below σ₀ the identity
    assert restrain(torch.tensor([s0, 2.0, 10.0], dtype=torch.float64), s0, alpha).tolist() == pytest.approx(
        [s0, 2.0, log_rule(10.0, s0, alpha)], abs=1e-12)


def test_prune_leaves_an_edit_below_sigma_max_w0_untouched():
    delta, _, _ = with_spectrum([2.9, 1.0, 0.2], seed=3)
    out, mapped = prune_matrix(delta, 3.0)
    assert mapped == 0 and torch.equal(out, delta)
    host = PluginHost(get_plugin_manager(pinned=["prune"]))
    w = torch.nn.Parameter(W0_HAND.clone(), requires_grad=False)
    _, rec = host.run_step("MOCK", [TargetWeight("layers.0.w", w)], mocked_editor(w, delta), configs={"prune": {}})
    assert torch.equal(w.data, W0_HAND + delta)  # the plugin returned None: the editor's write, bit for bit
    assert rec.transformed == [] and rec.metrics == {"prune/layers.0.w/mapped": 0.0}


def test_prune_sequential_form_over_two_steps_prunes_the_accumulated_edit():
    s0 = 3.0
    d1, _, _ = with_spectrum([8.0, 1.0], seed=4)
    d2, _, _ = with_spectrum([6.0, 4.0, 0.5], seed=5)
    w = torch.nn.Parameter(W0_HAND.clone(), requires_grad=False)
    host = PluginHost(get_plugin_manager(pinned=["prune"]))
    configs = {"prune": {"alpha": 2}}
    host.run_step("MOCK", [TargetWeight("layers.0.w", w)], mocked_editor(w, d1), configs=configs)
    after1 = w.data.clone()
    torch.testing.assert_close(after1 - W0_HAND, prune_matrix(d1, s0, 2.0)[0], rtol=0, atol=1e-12)
    _, rec = host.run_step("MOCK", [TargetWeight("layers.0.w", w)], mocked_editor(w, d2), configs=configs)
    accumulated = (after1 - W0_HAND) + d2  # W₀ + Δ before this step's pruning
    torch.testing.assert_close(w.data - W0_HAND, prune_matrix(accumulated, s0, 2.0)[0], rtol=0, atol=1e-12)
    assert rec.metrics["prune/layers.0.w/mapped"] >= 1
    # Every σ of the accumulated edit is below σ₀ or the image f(σ) of one of the unpruned accumulated edit.
    raw = torch.linalg.svdvals(accumulated)
    expected = torch.where(raw >= s0, restrain(raw, s0, 2.0), raw).sort(descending=True).values
    torch.testing.assert_close(torch.linalg.svdvals(w.data - W0_HAND), expected, rtol=0, atol=1e-12)
    # W₀ and σ_max(W₀) were cached at the first step and kept.
    state = host.state["prune"]
    assert torch.equal(state.w0["layers.0.w"], W0_HAND) and state.sigma0["layers.0.w"] == pytest.approx(s0)
    # Not the official once-at-the-end result: the first step's large direction was mapped twice.
    assert not torch.allclose(w.data - W0_HAND, prune_matrix(d1 + d2, s0, 2.0)[0], atol=1e-3)
    # The transform itself, as documented: W_before + delta_out − W₀ = prune(W_before + delta − W₀).
    out, _ = sequential_delta(d2, after1, W0_HAND, s0, 2.0)
    torch.testing.assert_close(after1 + out - W0_HAND, prune_matrix(accumulated, s0, 2.0)[0], rtol=0, atol=1e-12)


def test_prune_block_validation():
    assert prune_plugin.settings(None) == {"alpha": math.e}
    assert prune_plugin.settings({"alpha": "e"}) == {"alpha": math.e}
    assert prune_plugin.settings({"alpha": 1.2}) == {"alpha": 1.2}
    assert prune_plugin.settings({"alpha": 2}) == {"alpha": 2.0}
    for bad in (1, 0.5, 0, -2, "ten", True, float("inf"), None):
        with pytest.raises(ValueError, match=r"prune.alpha must be e or a number > 1"):
            prune_plugin.settings({"alpha": bad})
    with pytest.raises(ValueError, match=r"unknown prune setting\(s\) \['base'\]"):
        prune_plugin.settings({"base": 2})


def test_blocks_validate_through_the_host_and_absent_blocks_do_nothing():
    pm = get_plugin_manager(pinned=["rect", "prune"])
    assert validate_configs(pm, {"rect": None, "prune": {"alpha": "e"}}) == {"rect": {"top": 0.4},
                                                                            "prune": {"alpha": math.e}}
    with pytest.raises(ValueError, match=r"`rect:` block: rect.top must be"):
        validate_configs(pm, {"rect": {"top": 0}})
    w = torch.nn.Parameter(W0_HAND.clone(), requires_grad=False)
    d, _, _ = with_spectrum([9.0, 7.0], seed=6)
    _, rec = PluginHost(pm).run_step("MOCK", [TargetWeight("layers.0.w", w)], mocked_editor(w, d))
    assert torch.equal(w.data, W0_HAND + d) and rec.transformed == [] and rec.metrics == {}


def test_both_are_registered_like_revive():
    assert DEFAULT_PLUGINS["rect"] == "revive_plugin.plugins.rect"
    assert DEFAULT_PLUGINS["prune"] == "revive_plugin.plugins.prune"
    installed = installed_plugins()
    for name in ("rect", "prune"):
        assert installed[name].startswith("entry point of revive-plugin"), installed  # pip install -e . ran


# -- plugin state in checkpoints -----------------------------------------------------------------------
def prune_host():
    host = PluginHost(get_plugin_manager(pinned=["prune", "revive"]))
    w = torch.nn.Parameter(W0_HAND.clone().float(), requires_grad=False)
    d, _, _ = with_spectrum([8.0, 1.0], seed=4)
    configs = {"prune": {}, "revive": {"tau": 0.5}}
    host.run_step("MOCK", [TargetWeight("layers.0.w", w)], mocked_editor(w, d.float()), configs=configs)
    return host, {"layers.0.w": w.data.clone()}


def test_plugin_states_round_trip_through_their_checkpoint_files(tmp_path):
    host, weights = prune_host()
    assert sorted(harness._write_plugin_states(tmp_path, host)) == ["prune", "revive"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plugin-prune.safetensors", "revive.safetensors"]
    restored = harness._read_plugin_states(tmp_path, host.pm, {"revive": {"tau": 0.5}}, weights, "FIX", "MISMATCH")
    assert isinstance(restored["prune"], PruneState) and isinstance(restored["revive"], ReviveFilter)
    assert torch.equal(restored["prune"].w0["layers.0.w"], W0_HAND.float())
    assert restored["prune"].sigma0 == host.state["prune"].sigma0
    assert restored["revive"].config == host.state["revive"].config
    saved, fresh = host.state["revive"].reference("layers.0.w"), restored["revive"].reference("layers.0.w")
    assert torch.equal(saved.u, fresh.u) and torch.equal(saved.v, fresh.v) and saved.k == fresh.k
    # An older checkpoint's revive.safetensors (ReviveFilter.save, no plugin key) reads the same way.
    (tmp_path / "plugin-prune.safetensors").unlink()
    host.state["revive"].save(tmp_path / "revive.safetensors")
    old = harness._read_plugin_states(tmp_path, host.pm, {}, weights, "FIX", "MISMATCH")
    assert list(old) == ["revive"] and torch.equal(old["revive"].reference("layers.0.w").u, saved.u)


def test_plugin_state_files_that_cannot_be_used_are_named(tmp_path):
    host, weights = prune_host()
    harness._write_plugin_states(tmp_path, host)
    path = tmp_path / "plugin-prune.safetensors"

    def refused(pm=host.pm, matrices=weights):
        with pytest.raises(CheckpointError) as e:
            harness._read_plugin_states(tmp_path, pm, {}, matrices, "FIX", "MISMATCH")
        return str(e.value)

    # the plugin is not loaded in the resuming process
    assert "holds the state of plugin 'prune', which is not loaded" in refused(pm=get_plugin_manager(pinned=["revive"]))
    # the weights are of another shape
    message = refused(matrices={"layers.0.w": torch.zeros(5, 7)})
    assert str(path) in message and "W₀ of 'layers.0.w' is (5, 6)" in message and "MISMATCH" in message
    # a file renamed to another plugin's name
    shutil.copy(path, tmp_path / "plugin-rect.safetensors")
    assert "holds the state of plugin 'prune', not of 'rect'" in refused()
    (tmp_path / "plugin-rect.safetensors").unlink()
    # a damaged file
    tensors = load_file(str(path))
    del tensors["layers.0.w::sigma0"]
    save_file(tensors, str(path), metadata={"easyedit.plugin": "prune"})
    assert "needs both 'layers.0.w::w0' and 'layers.0.w::sigma0'" in refused()
    path.write_bytes(b"garbage" * 10)
    assert f"{path} is damaged (not a readable safetensors file" in refused()


# -- real edits through easyeditor: the baselines stacked with REVIVE ----------------------------------
def probe(name):
    """A plugin that records the delta and W_before it is handed, and changes nothing."""
    mod = types.ModuleType(name)
    mod.SEEN = []

    @hookimpl
    def easyedit_transform_delta(name, delta, weight, context):
        mod.SEEN.append((context.step, name, delta.clone(), weight.clone()))

    mod.easyedit_transform_delta = easyedit_transform_delta
    return mod


@pytest.fixture
def probes(tmp_path, monkeypatch):
    """enable_easyedit with rect, prune, revive and two probes, `seen_in` and `seen_mid`, for the order list."""
    monkeypatch.setenv("REVIVE_CACHE", str(tmp_path / "cache"))
    pm = get_plugin_manager(pinned=["rect", "prune", "revive"])
    mods = types.SimpleNamespace(seen_in=probe("seen_in"), seen_mid=probe("seen_mid"))
    pm.register(mods.seen_in, name="seen_in")
    pm.register(mods.seen_mid, name="seen_mid")
    easyedit.enable_easyedit(device="cpu", pm=pm)
    yield mods
    easyedit.disable_easyedit()


TAU = 0.3


def edit_twice(tmp_path, model_dir, base, order, **blocks):
    hp = load(base["alg_name"], write_hparams(tmp_path, base, model_dir, edit_plugins={"order": order}, **blocks))
    torch.manual_seed(0)
    editor = editor_for(hp)
    weights = edited_weights(editor, hp)
    w0 = {n: w.detach().clone() for n, w in weights.items()}
    editor.edit(**REQUEST, keep_original_weight=False, verbose=False)
    editor.edit(**REQUEST2, keep_original_weight=False, verbose=False)
    final = {n: w.detach().clone() for n, w in weights.items()}
    return w0, final, easyedit.step_records(editor.model)


def assert_revive_invariant(w0, final, exact=True):
    """U₀ₖᵀ(W − W₀) ≈ 0 and (W − W₀)V₀ₖ ≈ 0 for every changed weight; returns the worst relative residual."""
    worst = 0.0
    for n in w0:
        total = (final[n] - w0[n]).double()
        if not torch.any(total):
            continue
        b = protected_basis(w0[n], TAU)
        scale = float(total.norm())
        worst = max(worst, float((b.u.T.double() @ total).norm()) / scale, float((total @ b.v.double()).norm()) / scale)
    if exact:
        assert worst <= 1e-4, worst
    return worst


def test_memit_rect_then_revive(tmp_path, probes, tiny_model_dir):
    w0, final, records = edit_twice(tmp_path, tiny_model_dir, MEMIT, ["seen_in", "rect", "seen_mid", "revive"],
                                    rect={"top": 0.4}, revive={"tau": TAU})
    assert len(probes.seen_in.SEEN) == len(probes.seen_mid.SEEN) == 4  # 2 steps × 2 layers
    expected = {n: torch.zeros_like(w) for n, w in w0.items()}
    for (step, name, d_in, w_before), (step2, name2, d_mid, w_mid) in zip(probes.seen_in.SEEN, probes.seen_mid.SEEN):
        assert (step, name) == (step2, name2) and torch.equal(w_before, w_mid)
        # RECT's property on what it handed on: the kept set of the rule, values unchanged, the rest zero.
        assert torch.equal(d_mid, rect(d_in, w_before, 0.4))
        kept = int((d_mid != 0).sum())
        assert kept == int(rect_mask(d_in, w_before, 0.4).sum()) >= math.ceil(0.4 * d_in.numel())
        assert records[step].metrics[f"rect/{name}/kept"] == pytest.approx(kept / d_in.numel())
        expected[name] += safe_update(d_mid, w0[name], TAU)  # REVIVE then projects it (basis of W₀)
    for n in w0:
        torch.testing.assert_close(final[n] - w0[n], expected[n], rtol=1e-4, atol=1e-6)
    assert_revive_invariant(w0, final)  # REVIVE last: exact


def test_memit_prune_then_revive(tmp_path, probes, tiny_model_dir):
    w0, final, records = edit_twice(tmp_path, tiny_model_dir, MEMIT, ["seen_in", "prune", "seen_mid", "revive"],
                                    prune={"alpha": "e"}, revive={"tau": TAU})
    assert len(probes.seen_mid.SEEN) == 4
    last_pruned, last_raw = {}, {}
    for (step, name, d_in, w_before), (_, _, d_mid, _) in zip(probes.seen_in.SEEN, probes.seen_mid.SEEN):
        s0 = float(torch.linalg.matrix_norm(w0[name].double(), ord=2))
        out, mapped = sequential_delta(d_in, w_before, w0[name], s0)
        assert mapped >= 1 and records[step].metrics[f"prune/{name}/mapped"] == mapped  # MEMIT's Δ reaches σ₀ here
        torch.testing.assert_close(d_mid.double(), out, rtol=1e-5, atol=1e-5)
        # PRUNE's property on what it handed on: W₀ + Δ is the pruned accumulated edit ...
        pruned = (w_before - w0[name]).double() + d_mid.double()
        raw = (w_before - w0[name]).double() + d_in.double()
        sig = torch.linalg.svdvals(raw)
        expected = torch.where(sig >= s0, restrain(sig, s0), sig).sort(descending=True).values
        torch.testing.assert_close(torch.linalg.svdvals(pruned), expected, rtol=1e-5, atol=1e-5)
        last_pruned[name], last_raw[name] = pruned, raw
    for name in w0:
        # ... and REVIVE (last) projects it: the final edit is P(pruned), whose σ are at most the pruned ones
        # (the earlier steps' edit is already outside the protected subspace, so P leaves it as it is).
        total = (final[name] - w0[name]).double()
        torch.testing.assert_close(total, safe_update(last_pruned[name], w0[name].double(), TAU),
                                   rtol=1e-4, atol=1e-5)
        assert bool((torch.linalg.svdvals(total) <= torch.linalg.svdvals(last_pruned[name]) + 1e-5).all())
        assert float(torch.linalg.svdvals(total)[0]) < float(torch.linalg.svdvals(last_raw[name])[0])
    assert_revive_invariant(w0, final)


def test_the_reverse_orders(tmp_path, probes, tiny_model_dir):
    """[revive, rect]: the final delta is sparse, REVIVE's invariant is lost. [revive, prune]: the accumulated
    edit is exactly the pruned one and the invariant still holds (PRUNE acts inside the edit's own subspace)."""
    ft = {**FT, "num_steps": 2}
    w0, final, _ = edit_twice(tmp_path, tiny_model_dir, ft, ["revive", "seen_mid", "rect"],
                              rect={"top": 0.4}, revive={"tau": TAU})
    (_, name, d_mid, w_before) = probes.seen_mid.SEEN[-1]
    step_delta = final[name] - w_before
    assert torch.equal(step_delta, rect(d_mid, w_before, 0.4).to(step_delta.dtype)) or \
        torch.allclose(step_delta, rect(d_mid, w_before, 0.4).float(), atol=1e-7)
    assert int((step_delta != 0).sum()) <= int(rect_mask(d_mid, w_before, 0.4).sum())  # sparse
    assert assert_revive_invariant(w0, final, exact=False) > 1e-3  # sparsifying re-enters the protected subspace

    easyedit.disable_easyedit()
    probes.seen_mid.SEEN.clear()
    pm = get_plugin_manager(pinned=["prune", "revive"])
    pm.register(probes.seen_mid, name="seen_mid")
    easyedit.enable_easyedit(device="cpu", pm=pm)
    w0, final, records = edit_twice(tmp_path, tiny_model_dir, ft, ["revive", "seen_mid", "prune"],
                                    prune={"alpha": 1.5}, revive={"tau": TAU})
    (step, name, d_mid, w_before) = probes.seen_mid.SEEN[-1]
    s0 = float(torch.linalg.matrix_norm(w0[name].double(), ord=2))
    expected, mapped = prune_matrix((w_before - w0[name]).double() + d_mid.double(), s0, 1.5)
    assert mapped >= 1
    torch.testing.assert_close((final[name] - w0[name]).double(), expected, rtol=1e-5, atol=1e-6)
    assert_revive_invariant(w0, final)


def test_bad_baseline_blocks_fail_when_the_hparams_load(tmp_path, probes, tiny_model_dir):
    with pytest.raises(ValueError, match=r"MEMIT\.yaml: `rect:` block: rect.top must be a number with 0 < top <= 1"):
        load("MEMIT", write_hparams(tmp_path, MEMIT, tiny_model_dir, rect={"top": 40}))
    with pytest.raises(ValueError, match=r"MEMIT\.yaml: `prune:` block: prune.alpha must be e or a number > 1"):
        load("MEMIT", write_hparams(tmp_path, MEMIT, tiny_model_dir, prune={"alpha": 1}))
    hp = load("MEMIT", write_hparams(tmp_path, MEMIT, tiny_model_dir, rect=None, prune=None))
    assert hp.plugin_configs == {"rect": {"top": 0.4}, "prune": {"alpha": math.e}}


# -- run configs and resume ----------------------------------------------------------------------------
def test_shipped_baseline_run_configs():
    expected = {"smollm2-memit-rect": ["rect"], "smollm2-memit-rect-revive": ["rect", "revive"],
                "smollm2-memit-prune": ["prune"], "smollm2-memit-prune-revive": ["prune", "revive"]}
    pm = get_plugin_manager(pinned=["rect", "prune", "revive"])
    for name, transforms in expected.items():
        cfg = RunConfig.from_yaml(name)
        assert cfg.transforms == transforms and cfg.edits == 200 and cfg.batch_size == 100, name
        blocks = validate_configs(pm, {n: cfg.plugin_block(n) for n in transforms})
        assert blocks.get("rect", {"top": 0.4}) == {"top": 0.4} and blocks.get("prune", {"alpha": math.e}) == \
            {"alpha": math.e}, name
        if "revive" in transforms:
            assert cfg.plugin_block("revive") == {"tau": 0.1, "basis": "original"}


def test_a_prune_run_resumed_midway_equals_an_uninterrupted_one(run_config, tiny_model_dir):  # noqa: F811
    from transformers import AutoModelForCausalLM

    def config(name):
        return lean(run_config, name, transforms=["prune", "revive"], plugins={"prune": {"alpha": 1.5}},
                    fluency_prompts=0, eval_last_batch=False)

    straight = Run.start(config("prune-straight")).execute()
    easyedit.disable_easyedit()
    part = Run.start(config("prune-resumed"))
    part.execute(stop_after=2)
    ckpt = part.run_dir / "checkpoint"
    assert yaml.safe_load((part.run_dir / "config.yaml").read_text())["plugins"] == {"prune": {"alpha": 1.5}}
    # The checkpoint at 2 edits holds PRUNE's W₀: the unedited weights, which the edited model no longer has.
    saved = load_file(str(ckpt / "plugin-prune.safetensors"))
    original = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    for layer in (0, 1):
        name = f"model.layers.{layer}.mlp.down_proj.weight"
        assert torch.equal(saved[f"{name}::w0"], original.get_parameter(name).detach())
    assert (ckpt / "revive.safetensors").exists()
    easyedit.disable_easyedit()  # a new process would start from nothing
    resumed = Run.resume(part.run_dir).execute()
    assert [r["edits"] for r in rows(resumed)] == [0, 2, 4]
    for a, b in zip(rows(straight), rows(resumed)):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), k
    wa = load_file(str(straight / "checkpoint" / "weights.safetensors"))
    wb = load_file(str(resumed / "checkpoint" / "weights.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6)
