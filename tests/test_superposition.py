"""The superposition monitor (issue 12): context.keys, its metrics against hand computations on known keys, the
rank-one link to Hu et al.'s P matrix, its memory (bound, refused steps, checkpoints), real MEMIT edits on the tiny
LLaMA checked against keys read off the model by hand, and the harness rows that carry it."""
import json
import math
import shutil
import types

import pytest
import torch
import yaml
from test_easyedit import MEMIT, editor_for, load, write_hparams
from test_eval_harness import interrupt_editor_call, lean, rows, run_config  # noqa: F401  (run_config is a fixture)

from revive_plugin import EditRejected, PluginHost, get_plugin_manager, hookimpl
from revive_plugin.adapters import easyedit
from revive_plugin.eval import harness
from revive_plugin.eval.harness import CheckpointError, Run, RunConfig, window_means
from revive_plugin.host import DEFAULT_PLUGINS, TargetWeight, installed_plugins, validate_configs
from revive_plugin.plugins import superposition as sp

pytestmark = pytest.mark.usefixtures("one_thread")

W = "layers.0.w"
R = 1 / math.sqrt(2)


def f64(rows_):
    return torch.tensor(rows_, dtype=torch.float64)


def edit_step(host, weight, delta, keys, block=None, name=W):
    """One host step: the editor writes ``delta`` into ``weight``; the driver's keys of the step are ``keys``."""
    calls = []

    def run():
        with torch.no_grad():
            weight.add_(delta)

    def provider(names, weights):
        calls.append({n: w.clone() for n, w in weights.items()})
        return {n: keys for n in names}

    configs = {"superposition": {} if block is None else block}
    _, rec = host.run_step("MOCK", [TargetWeight(name, weight)], run, configs=configs, keys=provider)
    return rec, calls


def monitor_host(*extra):
    pm = get_plugin_manager(pinned=["superposition"])
    for i, plugin in enumerate(extra):
        pm.register(plugin, name=f"extra{i}")
    return PluginHost(pm)


def moments(values):
    """mean, Pearson kurtosis and the values' deviations from the mean, in plain Python."""
    n = len(values)
    mean = sum(values) / n
    dev = [v - mean for v in values]
    m2 = sum(d * d for d in dev) / n
    m4 = sum(d ** 4 for d in dev) / n
    return mean, m4 / (m2 * m2), dev, m2


# -- context.keys ---------------------------------------------------------------------------------------
def test_context_keys_are_lazy_copied_and_taken_before_the_editor_ran():
    seen = types.ModuleType("seen")
    seen.GOT = []

    @hookimpl
    def easyedit_edit_step_end(context):
        if context.configs.get("ask"):
            first = context.keys(W)
            first.zero_()  # a copy: the next call is not affected
            seen.GOT.append(context.keys(W))
            with pytest.raises(KeyError, match="no keys for 'other'"):
                context.keys("other")

    seen.easyedit_edit_step_end = easyedit_edit_step_end
    pm = get_plugin_manager(pinned=[])
    pm.register(seen, name="seen")
    host = PluginHost(pm)
    w0 = f64([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    weight = torch.nn.Parameter(w0.clone(), requires_grad=False)
    keys = f64([[1.0, 0.0, 0.0]])
    calls = []

    def provider(names, weights):
        calls.append((list(names), {n: w.clone() for n, w in weights.items()}))
        return {n: keys for n in names}

    def run():
        with torch.no_grad():
            weight.add_(torch.ones(2, 3, dtype=torch.float64))

    # nobody asks: the provider is never called
    host.run_step("MOCK", [TargetWeight(W, weight)], run, configs={}, keys=provider)
    assert calls == []
    # asked twice in step_end (after the write-back): computed once, on W_before, not on the edited weight
    host.run_step("MOCK", [TargetWeight(W, weight)], run, configs={"ask": True}, keys=provider)
    assert len(calls) == 1 and calls[0][0] == [W]
    assert torch.equal(calls[0][1][W], w0 + 1) and torch.equal(weight.data, w0 + 2)
    assert torch.equal(seen.GOT[-1], keys)
    # no provider: context.keys is None
    got = []
    pm2 = get_plugin_manager(pinned=[])
    pm2.register(types.SimpleNamespace(easyedit_edit_step_end=hookimpl(lambda context: got.append(context.keys))),
                 name="none")
    PluginHost(pm2).run_step("MOCK", [TargetWeight(W, weight)], run, configs={})
    assert got == [None]


# -- the metrics by hand --------------------------------------------------------------------------------
def test_metrics_on_known_keys_by_hand():
    host = monitor_host()
    weight = torch.nn.Parameter(torch.zeros(2, 3, dtype=torch.float64), requires_grad=False)

    # Step 0: k1 = e1, k2 = 2·e2; ΔW₀ moves them by a1 = ‖ΔW₀k1‖ = 1, a2 = ‖(0, 2)‖ = 2.
    rec, calls = edit_step(host, weight, f64([[1, 0, 0], [0, 1, 0]]), f64([[1, 0, 0], [0, 2, 0]]))
    assert len(calls) == 1
    # No earlier keys: no interference, no leakage. One pair, cos(k1, k2) = 0, no spread: no kurtosis.
    assert rec.metrics == {f"superposition/{W}/mean_cos": 0.0, f"superposition/{W}/keys": 2.0,
                           "superposition/mean_cos": 0.0, "superposition/keys": 2.0}

    # Step 1: k3 = (1, 1, 0); ΔW₁ = ½[[1, 1, 0], [0, 0, 0]]: ‖ΔW₁k1‖ = ½, ‖ΔW₁k2‖ = 1, ‖ΔW₁k3‖ = 1.
    rec, _ = edit_step(host, weight, 0.5 * f64([[1, 1, 0], [0, 0, 0]]), f64([[1, 1, 0]]))
    m = {k.rsplit("/", 1)[1]: v for k, v in rec.metrics.items() if k.startswith(f"superposition/{W}/")}
    assert m["interference"] == pytest.approx(math.sqrt((0.25 + 1) / (1 + 4)), abs=1e-12)   # = 0.5
    assert m["leakage"] == pytest.approx(math.sqrt((0.25 + 1) / 2) / 1.0, abs=1e-12)
    # cosines of (k1, k2), (k1, k3), (k2, k3) = 0, 1/√2, 1/√2: deviations −2a, a, a (a = √2/6), kurtosis 6a⁴/(2a²)² = 1.5
    assert m["mean_cos"] == pytest.approx(2 * R / 3, abs=1e-12)
    assert m["kurtosis"] == pytest.approx(1.5, abs=1e-12)
    assert m["tail_mass"] == 0.0 and m["keys"] == 3.0
    assert rec.metrics["superposition/interference"] == m["interference"]  # one weight: its mean is itself

    # Step 2: a ROME update (eq. 1) with C = diag(1, 4, 1) for k4 = (0, 1, 1), Λ = (3, 4):
    # ΔW₂ = Λ (C⁻¹k4)ᵀ / ((C⁻¹k4)ᵀ k4) = Λ (0, ¼, 1) / (5/4); ΔW₂k4 = Λ and ΔW₂kᵢ = Λ·p₄ᵢ (eq. 2, 3).
    c_inv = torch.diag(f64([1, 0.25, 1]))
    k4 = f64([0, 1, 1])
    lam = f64([3, 4])
    u = c_inv @ k4
    delta = torch.outer(lam, u) / float(u @ k4)
    old = [f64([1, 0, 0]), f64([0, 2, 0]), f64([1, 1, 0])]
    p = [float(u @ k) / float(u @ k4) for k in old]
    assert p == pytest.approx([0.0, 0.4, 0.2], abs=1e-12)  # the P row of k4, by eq. 3
    rec, _ = edit_step(host, weight, delta, k4[None])
    m = {k.rsplit("/", 1)[1]: v for k, v in rec.metrics.items() if k.startswith(f"superposition/{W}/")}
    # leakage = RMS ‖Λ‖|p₄ᵢ| / ‖Λ‖ = sqrt(mean p²): for a rank-one edit, |P| read off the delta without C
    assert m["leakage"] == pytest.approx(math.sqrt(sum(x * x for x in p) / 3), abs=1e-12)
    # interference: Σ‖ΔW₂kᵢ‖² = 25·(0 + 0.16 + 0.04) = 5 over Σaᵢ² = 1 + 4 + 1
    assert m["interference"] == pytest.approx(math.sqrt(5 / 6), abs=1e-12)
    # cosines of the 4 keys: (1,2) 0, (1,3) 1/√2, (1,4) 0, (2,3) 1/√2, (2,4) 1/√2, (3,4) ½
    mean, kurt, dev, m2 = moments([0, R, 0, R, R, 0.5])
    assert m["mean_cos"] == pytest.approx(mean, abs=1e-12)
    assert m["kurtosis"] == pytest.approx(kurt, abs=1e-12)
    assert m["tail_mass"] == sum(abs(d) > 3 * math.sqrt(m2) for d in dev) / 6 == 0.0
    assert m["keys"] == 4.0


def test_a_rank_one_edit_leaks_exactly_p_onto_one_earlier_key():
    # One earlier key, a random C: leakage is |p_ji| of eq. 3, interference |p|·‖Λ_j‖ / a_i.
    g = torch.Generator().manual_seed(0)
    a = torch.randn(5, 5, generator=g, dtype=torch.float64)
    c_inv = torch.linalg.inv(a @ a.T + torch.eye(5, dtype=torch.float64))
    ki, kj = torch.randn(5, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)
    host = monitor_host()
    weight = torch.nn.Parameter(torch.zeros(3, 5, dtype=torch.float64), requires_grad=False)
    d_i = torch.randn(3, 5, generator=g, dtype=torch.float64)
    edit_step(host, weight, d_i, ki[None])
    lam = torch.randn(3, generator=g, dtype=torch.float64)
    u = c_inv @ kj
    rec, _ = edit_step(host, weight, torch.outer(lam, u) / float(u @ kj), kj[None])
    p = float(u @ ki) / float(u @ kj)
    assert rec.metrics[f"superposition/{W}/leakage"] == pytest.approx(abs(p), rel=1e-12)
    assert rec.metrics[f"superposition/{W}/interference"] == pytest.approx(
        abs(p) * float(lam.norm()) / float((d_i @ ki).norm()), rel=1e-12)
    assert rec.metrics[f"superposition/{W}/mean_cos"] == pytest.approx(float(ki @ kj / (ki.norm() * kj.norm())))


def test_tail_mass_and_kurtosis_of_a_heavy_tail_by_hand():
    # Six keys in R⁵: e1 … e5 and e1 again: 15 pairs, one cosine 1, fourteen 0 (p = 1/15).
    keys = torch.cat([torch.eye(5, dtype=torch.float64), torch.eye(5, dtype=torch.float64)[:1]])
    host = monitor_host()
    weight = torch.nn.Parameter(torch.zeros(2, 5, dtype=torch.float64), requires_grad=False)
    rec, _ = edit_step(host, weight, torch.ones(2, 5, dtype=torch.float64), keys)
    m = {k.rsplit("/", 1)[1]: v for k, v in rec.metrics.items() if k.startswith(f"superposition/{W}/")}
    # Bernoulli(p): mean p, σ = √(pq), Pearson kurtosis (1 − 3pq)/(pq) = 183/14; only the 1 is beyond 3σ (0.748)
    assert m["mean_cos"] == pytest.approx(1 / 15, abs=1e-12)
    assert m["kurtosis"] == pytest.approx(183 / 14, abs=1e-12)
    assert m["tail_mass"] == pytest.approx(1 / 15, abs=1e-12)
    # tail_sigma: at 0.2σ (0.0499) the fourteen zeros (|0 − 1/15| = 0.0667) are in the tail as well
    assert sp.cosine_stats(torch.tensor([1.0] + [0.0] * 14), tail_sigma=0.2)["tail_mass"] == 1.0
    assert sp.cosine_stats(torch.tensor([0.3])) == {"mean_cos": pytest.approx(0.3)}  # one pair: no spread
    assert sp.cosine_stats(torch.tensor([])) == {}


def test_the_memory_keeps_the_most_recent_max_keys():
    host = monitor_host()
    weight = torch.nn.Parameter(torch.zeros(2, 3, dtype=torch.float64), requires_grad=False)
    block = {"max_keys": 2}
    edit_step(host, weight, f64([[1, 0, 0], [0, 1, 0]]), f64([[1, 0, 0], [0, 2, 0]]), block)
    rec, _ = edit_step(host, weight, 0.5 * f64([[1, 1, 0], [0, 0, 0]]), f64([[1, 1, 0]]), block)
    m = {k.rsplit("/", 1)[1]: v for k, v in rec.metrics.items() if k.startswith(f"superposition/{W}/")}
    assert m["interference"] == pytest.approx(0.5)  # against k1, k2, as without a bound
    assert m["keys"] == 2.0 and m["mean_cos"] == pytest.approx(R)  # statistics of (k2, k3) only
    rec, _ = edit_step(host, weight, f64([[0, 1, 0], [0, 0, 0]]), f64([[0, 0, 1]]), block)
    # k1 is gone: the earlier keys are k2 (a = 2, ‖ΔW k2‖ = 2) and k3 (a = 1, ‖ΔW k3‖ = 1)
    assert rec.metrics[f"superposition/{W}/interference"] == pytest.approx(1.0)
    memory = host.state["superposition"].memories[W]
    # k2, k3 and this step's k4: the memory is cut to the newest max_keys when the next step begins
    assert memory.steps.tolist() == [0, 1, 2] and rec.metrics[f"superposition/{W}/keys"] == 2.0


def test_the_monitor_changes_nothing_and_needs_its_block():
    assert not hasattr(sp, "easyedit_transform_delta")
    host = monitor_host()
    w0 = f64([[0.5, -1, 2], [3, 0.25, -4]])
    weight = torch.nn.Parameter(w0.clone(), requires_grad=False)
    d = f64([[0.1, 0.2, 0.3], [-0.3, 0.7, 0.9]])
    rec, _ = edit_step(host, weight, d, f64([[1, 2, 3]]))
    assert torch.equal(weight.data, w0 + d) and rec.transformed == []  # the editor's write, bit for bit
    _, rec = host.run_step("MOCK", [TargetWeight(W, weight)], lambda: None, configs={}, keys=lambda n, w: 1 / 0)
    assert rec.metrics == {}  # no block: nothing computed (the provider would fail if it were called)

    def run():
        with torch.no_grad():
            weight.add_(d)

    with pytest.warns(RuntimeWarning, match="needs the keys of a step's requests"):
        _, rec = monitor_host().run_step("MOCK", [TargetWeight(W, weight)], run, configs={"superposition": {}})
    assert rec.metrics == {}


def test_a_refused_step_leaves_no_keys_behind():
    boom = types.ModuleType("boom")
    boom.armed = True

    @hookimpl(trylast=True)
    def easyedit_edit_step_end():
        if boom.armed:
            raise RuntimeError("boom")

    boom.easyedit_edit_step_end = easyedit_edit_step_end
    host, fresh = monitor_host(boom), monitor_host()
    weights = [torch.nn.Parameter(torch.zeros(2, 3, dtype=torch.float64), requires_grad=False) for _ in range(2)]
    first = (f64([[1, 0, 0], [0, 1, 0]]), f64([[1, 0, 0], [0, 2, 0]]))
    boom.armed = False
    edit_step(host, weights[0], *first)
    edit_step(fresh, weights[1], *first)
    boom.armed = True
    with pytest.raises(EditRejected, match="boom"):  # the monitor ran before it: its rows of step 1 are stale
        edit_step(host, weights[0], f64([[5, 5, 5], [5, 5, 5]]), f64([[0, 0, 7]]))
    assert host.step == 1 and torch.equal(weights[0].data, weights[1].data)
    boom.armed = False
    second = (0.5 * f64([[1, 1, 0], [0, 0, 0]]), f64([[1, 1, 0]]))
    rec, _ = edit_step(host, weights[0], *second)
    want, _ = edit_step(fresh, weights[1], *second)
    assert rec.metrics == want.metrics
    assert host.state["superposition"].memories[W].steps.tolist() == [0, 0, 1]


# -- checkpoints ----------------------------------------------------------------------------------------
def two_step_host():
    host = monitor_host()
    weight = torch.nn.Parameter(torch.zeros(2, 3, dtype=torch.float64), requires_grad=False)
    edit_step(host, weight, f64([[1, 0, 0], [0, 1, 0]]), f64([[1, 0, 0], [0, 2, 0]]))
    edit_step(host, weight, 0.5 * f64([[1, 1, 0], [0, 0, 0]]), f64([[1, 1, 0]]))
    return host, weight


def test_the_memory_round_trips_through_the_checkpoint_files(tmp_path):
    host, weight = two_step_host()
    assert harness._write_plugin_states(tmp_path, host) == ["superposition"]
    assert (tmp_path / "plugin-superposition.safetensors").exists()
    weights = {W: weight.data.clone()}
    restored = harness._read_plugin_states(tmp_path, host.pm, {"superposition": {}}, weights, "FIX", "MISMATCH")
    memory, saved = restored["superposition"].memories[W], host.state["superposition"].memories[W]
    assert torch.equal(memory.keys, saved.keys) and torch.equal(memory.own, saved.own)
    assert memory.steps.tolist() == [0, 0, 1]
    # A resumed host continues with the same numbers (its Gram matrix is rebuilt from the keys).
    resumed = monitor_host()
    resumed.state.update(restored)
    resumed.step = host.step
    w2 = torch.nn.Parameter(weight.data.clone(), requires_grad=False)
    step = (f64([[0, 1, 0], [1, 0, 1]]), f64([[0, 1, 1], [2, 0, 1]]))
    a, _ = edit_step(host, weight, *step)
    b, _ = edit_step(resumed, w2, *step)
    assert a.metrics.keys() == b.metrics.keys()
    for k in a.metrics:
        assert b.metrics[k] == pytest.approx(a.metrics[k], rel=1e-12, abs=1e-12), k
    # What cannot be used is named.
    with pytest.raises(CheckpointError, match=r"keys of 'layers.0.w' have 3 entries; the weight is \(2, 4\)"):
        harness._read_plugin_states(tmp_path, host.pm, {}, {W: torch.zeros(2, 4)}, "FIX", "MISMATCH")
    with pytest.raises(CheckpointError, match="keys of 'layers.0.w', which is not an edited matrix"):
        harness._read_plugin_states(tmp_path, host.pm, {}, {"other": torch.zeros(2, 3)}, "FIX", "MISMATCH")
    with pytest.raises(ValueError, match=r"needs the tensors 'layers.0.w::keys', 'layers.0.w::own' and"):
        sp.SuperpositionState.from_tensors({f"{W}::keys": torch.zeros(1, 3)})
    assert sp.easyedit_state_save(state={}) is None


# -- settings -------------------------------------------------------------------------------------------
def test_block_validation_and_registration():
    assert sp.settings(None) == {"max_keys": 2000, "tail_sigma": 3.0}
    assert sp.settings({"max_keys": 50, "tail_sigma": 2}) == {"max_keys": 50, "tail_sigma": 2.0}
    for bad in (1, 0, -5, 2.5, "many", True, None):
        with pytest.raises(ValueError, match=r"superposition.max_keys must be an integer >= 2"):
            sp.settings({"max_keys": bad})
    for bad in (0, -1, float("inf"), "x", False):
        with pytest.raises(ValueError, match=r"superposition.tail_sigma must be a number > 0"):
            sp.settings({"tail_sigma": bad})
    with pytest.raises(ValueError, match=r"unknown superposition setting\(s\) \['keys'\]"):
        sp.settings({"keys": 3})
    with pytest.raises(ValueError, match="must be a mapping"):
        sp.settings(5)
    pm = get_plugin_manager(pinned=["superposition"])
    assert validate_configs(pm, {"superposition": None}) == {"superposition": {"max_keys": 2000, "tail_sigma": 3.0}}
    assert DEFAULT_PLUGINS["superposition"] == "revive_plugin.plugins.superposition"
    assert installed_plugins()["superposition"].startswith("entry point of revive-plugin")  # pip install -e . ran


# -- real edits on the tiny LLaMA -----------------------------------------------------------------------
REQUESTS = [
    [{"prompt": "The mother tongue of Danielle Darrieux is", "subject": "Danielle Darrieux", "target_new": "English",
      "ground_truth": "French"}],
    [{"prompt": "The capital of Italy is", "subject": "Italy", "target_new": "Paris", "ground_truth": "Rome"},
     {"prompt": "The capital of France is", "subject": "France", "target_new": "Rome", "ground_truth": "Paris"}],
]
#: The text up to the end of each subject: its last token is where the key is read.
PREFIXES = [["The mother tongue of Danielle Darrieux"], ["The capital of Italy", "The capital of France"]]


def keys_by_hand(model, tok, prompts, prefixes, module):
    """The input of ``module`` at the subject's last token, one prompt at a time, on the model as it is now."""
    out = []
    for prompt, prefix in zip(prompts, prefixes):
        got = {}
        handle = module.register_forward_pre_hook(lambda m, args: got.setdefault("x", args[0][0].detach().clone()))
        try:
            with torch.no_grad():
                model(**tok(prompt, return_tensors="pt"))
        finally:
            handle.remove()
        out.append(got["x"][len(tok(prefix)["input_ids"]) - 1])
    return torch.stack(out)


def test_memit_on_the_tiny_llama_against_keys_and_metrics_by_hand(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("REVIVE_CACHE", str(tmp_path / "cache"))
    probe = types.ModuleType("probe")
    probe.HAND, probe.KEYS, probe.DELTAS = [], [], []

    @hookimpl
    def easyedit_edit_step_start(context, weights):
        model = probe.model  # the live model is W_before here: keys read off it by hand
        names = sorted(weights)
        step = REQUESTS[context.step]
        probe.HAND.append({n: keys_by_hand(model, probe.tok, [r["prompt"] for r in step], PREFIXES[context.step],
                                           model.get_submodule(n.rsplit(".", 1)[0])) for n in names})

    @hookimpl
    def easyedit_edit_step_end(context, deltas):
        # after the write-back: context.keys still gives the keys under W_before
        probe.KEYS.append({n: context.keys(n) for n in deltas})
        probe.DELTAS.append({n: d.clone() for n, d in deltas.items()})

    probe.easyedit_edit_step_start, probe.easyedit_edit_step_end = easyedit_edit_step_start, easyedit_edit_step_end
    pm = get_plugin_manager(pinned=["superposition"])
    pm.register(probe, name="probe")
    easyedit.enable_easyedit(device="cpu", pm=pm)
    try:
        hp = load("MEMIT", write_hparams(tmp_path, MEMIT, tiny_model_dir, superposition={"max_keys": 100}))
        assert hp.plugin_configs == {"superposition": {"max_keys": 100, "tail_sigma": 3.0}}
        torch.manual_seed(0)
        editor = editor_for(hp)
        probe.model, probe.tok = editor.model, editor.tok
        names = [f"model.layers.{layer}.mlp.down_proj.weight" for layer in (0, 1)]
        w0 = {n: editor.model.get_parameter(n).detach().clone() for n in names}
        for requests in REQUESTS:  # as the harness does: one editor call per batch, edits kept
            editor.apply_algo(editor.model, editor.tok, requests, hp, copy=False, return_orig_weights=False,
                              keep_original_weight=False)
        records = easyedit.step_records(editor.model)
    finally:
        easyedit.disable_easyedit()
    assert [sorted(d) for d in probe.DELTAS] == [names, names]  # MEMIT changed both layers at both steps
    for step in (0, 1):
        assert records[step].transformed == []
        for n in names:
            assert probe.KEYS[step][n].shape == (len(REQUESTS[step]), 64)  # intermediate size of the tiny LLaMA
            torch.testing.assert_close(probe.KEYS[step][n], probe.HAND[step][n], rtol=1e-5, atol=1e-6)
    for n in names:  # the monitor changed nothing: the weights are the editor's two deltas
        torch.testing.assert_close(editor.model.get_parameter(n).detach(),
                                   w0[n] + probe.DELTAS[0][n] + probe.DELTAS[1][n], rtol=0, atol=1e-6)

    for n in names:
        (k0,), (k1, k2) = probe.HAND[0][n].double(), probe.HAND[1][n].double()
        d0, d1 = probe.DELTAS[0][n].double(), probe.DELTAS[1][n].double()
        m0 = {k.rsplit("/", 1)[1]: v for k, v in records[0].metrics.items() if k.startswith(f"superposition/{n}/")}
        assert m0 == {"keys": 1.0}  # one key, no earlier ones: nothing else is defined
        m = {k.rsplit("/", 1)[1]: v for k, v in records[1].metrics.items() if k.startswith(f"superposition/{n}/")}
        # interference: the step's change at k0 over the change k0's own edit made
        assert m["interference"] == pytest.approx(float((d1 @ k0).norm() / (d0 @ k0).norm()), rel=1e-5)
        own = math.sqrt((float((d1 @ k1).norm()) ** 2 + float((d1 @ k2).norm()) ** 2) / 2)
        assert m["leakage"] == pytest.approx(float((d1 @ k0).norm()) / own, rel=1e-5)
        cos = [float(a @ b / (a.norm() * b.norm())) for a, b in ((k0, k1), (k0, k2), (k1, k2))]
        mean, kurt, _, _ = moments(cos)
        assert m["mean_cos"] == pytest.approx(mean, rel=1e-5, abs=1e-6)
        assert m["kurtosis"] == pytest.approx(kurt, rel=1e-4)
        assert m["tail_mass"] == 0.0 and m["keys"] == 3.0  # three values are never beyond 3σ (max |z| = √2)
    for metric in ("interference", "leakage", "mean_cos", "kurtosis"):  # the mean over the two layers
        per_layer = [records[1].metrics[f"superposition/{n}/{metric}"] for n in names]
        assert records[1].metrics[f"superposition/{metric}"] == pytest.approx(sum(per_layer) / 2)


# -- the harness ----------------------------------------------------------------------------------------
def test_run_configs_take_monitors():
    base = {"name": "x", "hparams": "h.yaml"}
    cfg = RunConfig.from_dict({**base, "monitors": ["superposition"], "plugins": {"superposition": {"max_keys": 9}}})
    assert cfg.plugin_block("superposition") == {"max_keys": 9} and cfg.to_dict()["monitors"] == ["superposition"]
    assert "monitors" not in RunConfig.from_dict(base).to_dict()  # configs without monitors are written as before
    with pytest.raises(ValueError, match=r"monitors must be a list of plugin names"):
        RunConfig.from_dict({**base, "monitors": "superposition"})
    with pytest.raises(ValueError, match=r"plugins.superposition is set but 'superposition' is not in transforms"):
        RunConfig.from_dict({**base, "plugins": {"superposition": {}}})
    with pytest.raises(ValueError, match=r"monitors names plugin\(s\) \['nope'\] that are not installed"):
        harness.check_monitors(["nope"])
    steps = [{"edits": 1, "a": 1.0}, {"edits": 2, "a": 3.0, "b": 5.0}, {"edits": 3, "a": 10.0}]
    assert window_means(steps, 0, 2) == {"a": 2.0, "b": 5.0} and window_means(steps, 2, 4) == {"a": 10.0}


def test_harness_rows_hold_the_monitor_means_and_survive_ctrl_c(run_config, monkeypatch):  # noqa: F811
    recorded = []
    original_run_step = PluginHost.run_step

    def recording(self, *args, **kwargs):
        result, record = original_run_step(self, *args, **kwargs)
        recorded.append(record)
        return result, record

    monkeypatch.setattr(PluginHost, "run_step", recording)

    def config(name):
        return lean(run_config, name, edits=4, batch_size=1, eval_every=2, fluency_prompts=0, eval_last_batch=False,
                    monitors=["superposition"], plugins={"superposition": {"max_keys": 50}})

    straight = Run.start(config("sup-straight")).execute()
    r1 = rows(straight)
    assert [r["edits"] for r in r1] == [0, 2, 4] and len(recorded) == 4
    assert not any(k.startswith("superposition/") for k in r1[0])
    for row, window in ((r1[1], recorded[0:2]), (r1[2], recorded[2:4])):
        keys = {k for rec in window for k in rec.metrics if k.startswith("superposition/")}
        assert keys and {k for k in row if k.startswith("superposition/")} == keys
        for k in keys:
            values = [rec.metrics[k] for rec in window if k in rec.metrics]
            assert row[k] == pytest.approx(sum(values) / len(values)), k
    assert r1[1]["superposition/keys"] == 1.5 and r1[2]["superposition/keys"] == 3.5  # keys 1, 2 | 3, 4
    assert "superposition/interference" in r1[1]  # step 2 has one earlier key
    summary = (straight / "summary.md").read_text()
    assert "## Knowledge superposition" in summary and "| edits | interference | leakage |" in summary
    assert yaml.safe_load((straight / "config.yaml").read_text())["monitors"] == ["superposition"]
    assert (straight / "superposition.png").exists()
    # steps.jsonl: every edit call's own monitor metrics, one line each
    s1 = rows(straight, harness.STEPS_FILE)
    assert [s["edits"] for s in s1] == [1, 2, 3, 4]
    for line, rec in zip(s1, recorded):
        assert {k: v for k, v in line.items() if k != "edits"} == pytest.approx(
            {k: v for k, v in rec.metrics.items() if k.startswith("superposition/")})

    # Ctrl-C after the third edit (mid-window): the checkpoint keeps that step's metrics and the monitor's keys.
    easyedit.disable_easyedit()
    run = Run.start(config("sup-interrupted"))
    original = interrupt_editor_call(monkeypatch, 4)
    with pytest.raises(KeyboardInterrupt):
        run.execute()
    state = json.loads((run.run_dir / "checkpoint" / "state.json").read_text())
    assert state["edits_done"] == 3 and "monitor_steps" not in state  # steps.jsonl is the record
    assert [s["edits"] for s in rows(run.run_dir, harness.STEPS_FILE)] == [1, 2, 3]
    assert (run.run_dir / "checkpoint" / "plugin-superposition.safetensors").exists()
    monkeypatch.setattr(easyedit, "_wrap_apply", original)
    easyedit.disable_easyedit()
    # A checkpoint from before steps.jsonl kept the window's steps in its state: resuming it writes them out.
    old_format = run.run_dir.with_name("sup-old-format")
    shutil.copytree(run.run_dir, old_format)
    kept = rows(old_format, harness.STEPS_FILE)[2]
    (old_format / harness.STEPS_FILE).unlink()
    state["monitor_steps"] = [[3, {k: v for k, v in kept.items() if k != "edits"}]]
    (old_format / "checkpoint" / "state.json").write_text(json.dumps(state))
    r3 = rows(Run.resume(old_format).execute())
    easyedit.disable_easyedit()
    assert [s["edits"] for s in rows(old_format, harness.STEPS_FILE)] == [3, 4]
    assert {k for k in r3[2] if k.startswith("superposition/")} == {k for k in r1[2] if k.startswith("superposition/")}
    for k in r1[2]:
        if k.startswith("superposition/"):
            assert r3[2][k] == pytest.approx(r1[2][k], rel=1e-4, abs=1e-6), k
    # as if a kill had come after a fourth step was logged but before any checkpoint held it: logged again
    with (run.run_dir / harness.STEPS_FILE).open("a") as fh:
        fh.write(json.dumps({"edits": 4, "superposition/keys": -1.0}) + "\n")
    r2 = rows(Run.resume(run.run_dir).execute())
    assert [r["edits"] for r in r2] == [0, 2, 4]
    s2 = rows(run.run_dir, harness.STEPS_FILE)
    assert [s["edits"] for s in s2] == [1, 2, 3, 4]
    for a, b in zip(s1, s2):
        assert b == pytest.approx(a, rel=1e-4, abs=1e-6)
    for a, b in zip(r1, r2):
        assert a.keys() == b.keys()
        for k in a:
            if k.startswith("superposition/"):
                assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), k
