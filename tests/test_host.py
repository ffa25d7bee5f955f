"""The plugin host with mocked editors and mocked plugins: chaining, order, discovery, nothing lost."""
import math
import sys
import types

import pytest
import torch

from revive_plugin import EditRejected, PluginHost, get_plugin_manager, hookimpl, safe_update
from revive_plugin.host import TargetWeight, describe_plugins, layer_index


def make_plugin(name, fn=None, start=None, end=None):
    mod = types.ModuleType(name)
    if fn is not None:
        mod.easyedit_transform_delta = hookimpl(fn)
    if start is not None:
        mod.easyedit_edit_step_start = hookimpl(start)
    if end is not None:
        mod.easyedit_edit_step_end = hookimpl(end)
    return mod


def host_with(*plugins, order=None):
    pm = get_plugin_manager(pinned=[])  # nothing from entry points: only what the test registers
    for p in plugins:
        pm.register(p, name=p.__name__)
    return PluginHost(pm, order=order)


def mocked_editor(param, delta):
    """Stands for an editor's apply function: writes W += delta in place."""
    def run():
        with torch.no_grad():
            param.add_(delta)
        return "edited"
    return run


def test_layer_index():
    assert layer_index("model.layers.12.mlp.down_proj.weight") == 12
    assert layer_index("transformer.h.3.mlp.c_proj.weight") == 3
    assert layer_index("lm_head.weight") is None


def test_chain_runs_in_configured_order_and_composes():
    calls = []

    def double(name, delta):
        calls.append("double")
        return delta * 2

    def plus_one(delta):
        calls.append("plus_one")
        return delta + 1

    w = torch.nn.Parameter(torch.zeros(2, 3), requires_grad=False)
    d = torch.ones(2, 3)
    host = host_with(make_plugin("double", double), make_plugin("plus_one", plus_one), order=["double", "plus_one"])
    result, rec = host.run_step("MOCK", [TargetWeight("layers.0.w", w)], mocked_editor(w, d))
    assert result == "edited" and calls == ["double", "plus_one"]
    assert torch.equal(w.data, torch.full((2, 3), 3.0))  # (1*2)+1
    assert rec.changed == ["layers.0.w"] and rec.transformed == ["layers.0.w"]

    calls.clear()
    w2 = torch.nn.Parameter(torch.zeros(2, 3), requires_grad=False)
    host2 = host_with(make_plugin("double", double), make_plugin("plus_one", plus_one), order=["plus_one", "double"])
    host2.run_step("MOCK", [TargetWeight("layers.0.w", w2)], mocked_editor(w2, d))
    assert calls == ["plus_one", "double"] and torch.equal(w2.data, torch.full((2, 3), 4.0))


def test_unknown_plugin_in_order_is_an_error():
    host = host_with(make_plugin("double", lambda delta: delta * 2), order=["rect"])
    w = torch.nn.Parameter(torch.zeros(2, 2), requires_grad=False)
    with pytest.raises(EditRejected, match="rect"):
        host.run_step("MOCK", [TargetWeight("w", w)], mocked_editor(w, torch.ones(2, 2)))
    assert torch.equal(w.data, torch.zeros(2, 2))


def test_none_result_leaves_editor_write_bit_exact():
    w = torch.nn.Parameter(torch.randn(4, 4), requires_grad=False)
    d = torch.randn(4, 4) * 1e-3
    expected = w.data + d
    host = host_with(make_plugin("noop", lambda delta: None))
    _, rec = host.run_step("MOCK", [TargetWeight("w", w)], mocked_editor(w, d))
    assert torch.equal(w.data, expected) and rec.transformed == []


def test_transposed_weights_are_seen_out_by_in():
    seen = {}

    def spy(name, delta, weight):
        seen["delta"], seen["weight"] = delta.shape, weight.shape
        return delta * 0.5

    w = torch.nn.Parameter(torch.zeros(3, 5), requires_grad=False)  # Conv1D storage: in×out
    d = torch.ones(3, 5)
    host = host_with(make_plugin("spy", spy))
    host.run_step("MOCK", [TargetWeight("h.0.c_proj.weight", w, transposed=True)], mocked_editor(w, d))
    assert seen == {"delta": (5, 3), "weight": (5, 3)}
    assert torch.equal(w.data, torch.full((3, 5), 0.5))


@pytest.mark.parametrize("bad", ["raise", "shape", "nan", "type"])
def test_bad_plugin_output_restores_weights_exactly(bad):
    def broken(delta):
        if bad == "raise":
            raise RuntimeError("boom")
        if bad == "shape":
            return delta.T
        if bad == "nan":
            return delta * math.nan
        return "not a tensor"

    w1 = torch.nn.Parameter(torch.randn(3, 3), requires_grad=False)
    w2 = torch.nn.Parameter(torch.randn(3, 4), requires_grad=False)
    before = (w1.data.clone(), w2.data.clone())

    def run():
        with torch.no_grad():
            w1.add_(1)
            w2.add_(1)

    host = host_with(make_plugin("broken", broken))
    with pytest.raises(EditRejected, match="broken"):
        host.run_step("MOCK", [TargetWeight("a", w1), TargetWeight("b", w2)], run)
    assert torch.equal(w1.data, before[0]) and torch.equal(w2.data, before[1])
    assert host.step == 0  # the rejected step does not count


def test_non_finite_editor_update_is_rejected_and_restored():
    w = torch.nn.Parameter(torch.randn(3, 3), requires_grad=False)
    before = w.data.clone()
    d = torch.zeros(3, 3)
    d[1, 1] = math.inf
    host = host_with(make_plugin("noop", lambda delta: None))
    with pytest.raises(EditRejected, match="non-finite"):
        host.run_step("MOCK", [TargetWeight("w", w)], mocked_editor(w, d))
    assert torch.equal(w.data, before)


def test_editor_exception_restores_and_propagates():
    w = torch.nn.Parameter(torch.randn(3, 3), requires_grad=False)
    before = w.data.clone()

    def run():
        with torch.no_grad():
            w.mul_(7)
        raise KeyboardInterrupt

    host = host_with()
    with pytest.raises(KeyboardInterrupt):
        host.run_step("MOCK", [TargetWeight("w", w)], run)
    assert torch.equal(w.data, before)


def test_failing_end_hook_restores():
    def end(context, deltas, weights):
        raise ValueError("monitor broke")

    w = torch.nn.Parameter(torch.randn(3, 3), requires_grad=False)
    before = w.data.clone()
    host = host_with(make_plugin("mon", end=end))
    with pytest.raises(EditRejected, match="monitor broke"):
        host.run_step("MOCK", [TargetWeight("w", w)], mocked_editor(w, torch.ones(3, 3)))
    assert torch.equal(w.data, before)


def test_step_hooks_receive_context_and_metrics_merge():
    seen = []

    def start(context, weights):
        seen.append(("start", context.editor, context.step, sorted(weights)))

    def end(context, deltas):
        return {"n": float(len(deltas))}

    w = torch.nn.Parameter(torch.zeros(2, 2), requires_grad=False)
    host = host_with(make_plugin("mon", start=start, end=end))
    _, r0 = host.run_step("FT", [TargetWeight("w", w)], mocked_editor(w, torch.ones(2, 2)))
    _, r1 = host.run_step("FT", [TargetWeight("w", w)], mocked_editor(w, torch.ones(2, 2)))
    assert seen == [("start", "FT", 0, ["w"]), ("start", "FT", 1, ["w"])]
    assert r1.metrics == {"n": 1.0} and host.step == 2


def test_revive_plugin_filters_only_with_its_config_block():
    w = torch.nn.Parameter(torch.randn(6, 10, dtype=torch.float64), requires_grad=False)
    w0 = w.data.clone()
    d = torch.randn(6, 10, dtype=torch.float64)
    host = PluginHost(get_plugin_manager(pinned=["revive"]))
    host.run_step("MOCK", [TargetWeight("layers.2.w", w)], mocked_editor(w, d))  # no revive block: untouched
    torch.testing.assert_close(w.data, w0 + d)

    w.data.copy_(w0)
    host2 = PluginHost(get_plugin_manager(pinned=["revive"]))
    _, rec = host2.run_step("MOCK", [TargetWeight("layers.2.w", w)], mocked_editor(w, d), configs={"revive": {"tau": 0.2}})
    torch.testing.assert_close(w.data, w0 + safe_update(d, w0, 0.2))
    assert rec.metrics["revive/layers.2.w/k"] >= 1


def test_entry_point_discovery_finds_revive():
    plugins = describe_plugins(get_plugin_manager())
    revive = [p for p in plugins if p["name"] == "revive"]
    assert revive and "easyedit_transform_delta" in revive[0]["hooks"]
    assert revive[0]["source"].startswith("entry point of revive-plugin")


def test_env_pin(monkeypatch):
    monkeypatch.setenv("EASYEDIT_PLUGINS", "")
    assert describe_plugins(get_plugin_manager()) == []
    monkeypatch.setenv("EASYEDIT_PLUGINS", "revive,nope")
    with pytest.raises(ValueError, match="nope"):
        get_plugin_manager()


def test_third_party_entry_point_is_discovered(tmp_path, monkeypatch):
    """A pip-installed plugin (simulated by a dist-info on sys.path) is found by the entry-point group."""
    pkg = tmp_path / "myplugin.py"
    pkg.write_text(
        "from revive_plugin import hookimpl\n"
        "@hookimpl\n"
        "def easyedit_transform_delta(delta):\n"
        "    return delta * 0\n"
    )
    dist = tmp_path / "myplugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: myplugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[easyedit.plugins]\nzero = myplugin\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    names = {p["name"]: p for p in describe_plugins(get_plugin_manager())}
    assert "zero" in names and names["zero"]["source"] == "entry point of myplugin 1.0"
    sys.modules.pop("myplugin", None)


def test_cli_lists_plugins(capsys):
    import json

    from revive_plugin.cli import main

    assert main(["plugins", "--json"]) == 0
    names = [p["name"] for p in json.loads(capsys.readouterr().out)]
    assert "revive" in names
