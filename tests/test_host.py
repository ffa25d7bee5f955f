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


# -- isolation: the host's snapshot is its own ----------------------------------------------------------
def test_plugin_writing_into_its_weight_changes_neither_result_nor_next_plugin():
    seen = []

    def vandal(weight, delta):
        weight.mul_(0).add_(100)  # documented read-only: it is the plugin's own copy
        weight.data.fill_(7)      # even past the version counter
        return delta * 2

    def spy(weight, delta):
        seen.append(weight.clone())
        return None

    w = torch.nn.Parameter(torch.randn(4, 3), requires_grad=False)
    w0 = w.data.clone()
    d = torch.randn(4, 3)
    host = host_with(make_plugin("vandal", vandal), make_plugin("spy", spy), order=["vandal", "spy"])
    with pytest.warns(RuntimeWarning, match="'vandal' wrote into the 'weight' argument"):
        _, rec = host.run_step("MOCK", [TargetWeight("layers.0.w", w)], mocked_editor(w, d))
    torch.testing.assert_close(w.data, w0 + 2 * d)
    assert torch.equal(seen[0], w0) and rec.transformed == ["layers.0.w"]


def test_plugin_writing_into_its_weight_does_not_spoil_the_restore():
    def vandal(weight, delta):
        weight.data.fill_(7)
        return delta

    def broken(delta):
        raise RuntimeError("later plugin fails")

    w = torch.nn.Parameter(torch.randn(4, 3), requires_grad=False)
    w0 = w.data.clone()
    host = host_with(make_plugin("vandal", vandal), make_plugin("broken", broken), order=["vandal", "broken"])
    with pytest.warns(RuntimeWarning), pytest.raises(EditRejected, match="'broken'"):
        host.run_step("MOCK", [TargetWeight("layers.0.w", w)], mocked_editor(w, torch.ones(4, 3)))
    assert torch.equal(w.data, w0)
    # The next step starts from the true W₀, not from what the plugin wrote.
    host2 = host_with(make_plugin("noop", lambda delta: None))
    host2.run_step("MOCK", [TargetWeight("layers.0.w", w)], mocked_editor(w, torch.ones(4, 3)))
    assert torch.equal(w.data, w0 + 1)


def test_plugin_mutating_its_delta_and_returning_none_changes_nothing():
    def sneaky(delta):
        delta.mul_(0)
        return None

    w = torch.nn.Parameter(torch.zeros(2, 2), requires_grad=False)
    host = host_with(make_plugin("sneaky", sneaky))
    with pytest.warns(RuntimeWarning, match="'sneaky' wrote into the 'delta'"):
        _, rec = host.run_step("MOCK", [TargetWeight("w", w)], mocked_editor(w, torch.ones(2, 2)))
    assert torch.equal(w.data, torch.ones(2, 2)) and rec.transformed == []


def test_returning_the_delta_modified_in_place_is_written_back():
    w = torch.nn.Parameter(torch.zeros(2, 2), requires_grad=False)
    host = host_with(make_plugin("inplace", lambda delta: delta.mul_(3)))
    _, rec = host.run_step("MOCK", [TargetWeight("w", w)], mocked_editor(w, torch.ones(2, 2)))
    assert torch.equal(w.data, torch.full((2, 2), 3.0)) and rec.transformed == ["w"]


@pytest.mark.parametrize("how", ["inplace", "data", "transposed"])
def test_step_start_writing_into_weights_refuses_the_step_before_the_editor(how):
    def start(weights):
        w = weights["layers.0.w"]
        if how == "inplace":
            w.add_(1)
        elif how == "data":
            w.data.add_(1)
        else:
            w.T.mul_(2)

    w = torch.nn.Parameter(torch.randn(3, 3), requires_grad=False)
    w0 = w.data.clone()
    ran = []
    host = host_with(make_plugin("vandal", start=start))
    written = r"'vandal' wrote into the read-only \['layers.0.w'\] in easyedit_edit_step_start"
    with pytest.raises(EditRejected, match=written):
        host.run_step("MOCK", [TargetWeight("layers.0.w", w)], lambda: ran.append(1))
    assert torch.equal(w.data, w0) and ran == [] and host.step == 0


def test_step_end_writing_into_weights_or_deltas_refuses_and_restores():
    for target in ("weights", "deltas"):
        def end(weights, deltas, target=target):
            (weights if target == "weights" else deltas)["w"].add_(1)

        w = torch.nn.Parameter(torch.randn(3, 3), requires_grad=False)
        w0 = w.data.clone()
        host = host_with(make_plugin("vandal", end=end))
        with pytest.raises(EditRejected, match="'vandal' wrote into the read-only .*easyedit_edit_step_end"):
            host.run_step("MOCK", [TargetWeight("w", w)], mocked_editor(w, torch.ones(3, 3)))
        assert torch.equal(w.data, w0)


def test_step_hook_mappings_are_read_only():
    def start(weights):
        weights["w"] = torch.zeros(1)

    w = torch.nn.Parameter(torch.zeros(2, 2), requires_grad=False)
    host = host_with(make_plugin("mapper", start=start))
    with pytest.raises(EditRejected, match="'mapper' failed in easyedit_edit_step_start.*TypeError"):
        host.run_step("MOCK", [TargetWeight("w", w)], mocked_editor(w, torch.ones(2, 2)))


# -- errors name the plugin -----------------------------------------------------------------------------
def test_step_hook_errors_name_the_plugin():
    def start(context):
        raise RuntimeError("no GPU")

    def end(context):
        raise KeyError("k")

    w = torch.nn.Parameter(torch.zeros(2, 2), requires_grad=False)
    ran = []
    failed = r"plugin 'starter' failed in easyedit_edit_step_start .*MOCK: RuntimeError: no GPU"
    with pytest.raises(EditRejected, match=failed):
        host_with(make_plugin("starter", start=start)).run_step("MOCK", [TargetWeight("w", w)], lambda: ran.append(1))
    assert ran == []
    with pytest.raises(EditRejected, match=r"plugin 'ender' failed in easyedit_edit_step_end .*KeyError"):
        host_with(make_plugin("ender", end=end)).run_step("MOCK", [TargetWeight("w", w)],
                                                          mocked_editor(w, torch.ones(2, 2)))
    assert torch.equal(w.data, torch.zeros(2, 2))


def test_hook_wrappers_are_refused_by_name():
    mod = types.ModuleType("wrapper")

    def easyedit_transform_delta(delta):
        yield

    mod.easyedit_transform_delta = hookimpl(hookwrapper=True)(easyedit_transform_delta)
    w = torch.nn.Parameter(torch.zeros(2, 2), requires_grad=False)
    with pytest.raises(EditRejected, match="'wrapper' implements easyedit_transform_delta as a hook wrapper"):
        host_with(mod).run_step("MOCK", [TargetWeight("w", w)], mocked_editor(w, torch.ones(2, 2)))
    assert torch.equal(w.data, torch.zeros(2, 2))


def test_env_pin_of_a_missing_plugin_lists_the_installed_ones(monkeypatch):
    monkeypatch.setenv("EASYEDIT_PLUGINS", "nope")
    with pytest.raises(ValueError, match=r"EASYEDIT_PLUGINS='nope' names plugin\(s\) \['nope'\] that are not "
                                         r"installed; installed plugins: \[.*'revive'.*\]"):
        get_plugin_manager()


# -- validation of plugin blocks ------------------------------------------------------------------------
def validating_plugin(calls):
    def validate(name, config, editor, targets):
        calls.append((name, config, editor, targets))
        if not isinstance(config.get("scale"), (int, float)):
            raise ValueError(f"half.scale must be a number, got {config.get('scale')!r}")
        return {"scale": float(config["scale"]), "checked": True}

    def transform(delta, context):
        return delta * context.configs["half"]["scale"] if "half" in context.configs else None

    mod = make_plugin("half", transform)
    mod.easyedit_validate_config = hookimpl(validate)
    return mod


def test_validate_hook_refuses_a_block_before_the_editor_runs():
    calls = []
    w = torch.nn.Parameter(torch.zeros(2, 2), requires_grad=False)
    host = host_with(validating_plugin(calls))
    ran = []
    refused = r"before the editor ran.*`half:` block: half\.scale must be a number, got 'abc'"
    with pytest.raises(EditRejected, match=refused):
        host.run_step("FT", [TargetWeight("layers.1.w", w), TargetWeight("layers.1.b", torch.zeros(2))],
                      lambda: ran.append(1), configs={"half": {"scale": "abc"}})
    assert ran == [] and calls == [("half", {"scale": "abc"}, "FT", ["layers.1.w"])]
    _, rec = host.run_step("FT", [TargetWeight("layers.1.w", w)], mocked_editor(w, torch.ones(2, 2)),
                           configs={"half": {"scale": 0.5}, "edit_plugins": {"order": ["half"]}})
    assert torch.equal(w.data, torch.full((2, 2), 0.5))  # the plugin's returned block reached its transform


def test_validate_hook_is_called_only_for_its_own_plugin_and_bugs_are_named():
    calls = []
    other = make_plugin("other")

    def broken_validate(config):
        raise AttributeError("oops")

    other.easyedit_validate_config = hookimpl(broken_validate)
    pm = get_plugin_manager(pinned=[])
    pm.register(validating_plugin(calls), name="half")
    pm.register(other, name="other")
    from revive_plugin.host import validate_configs

    assert validate_configs(pm, {"half": {"scale": 1}, "edit_plugins": {}}) == {
        "half": {"scale": 1.0, "checked": True}, "edit_plugins": {}}
    assert [c[0] for c in calls] == ["half"]
    with pytest.raises(ValueError, match="plugin 'other' failed validating it: AttributeError: oops"):
        validate_configs(pm, {"other": {"x": 1}})


@pytest.mark.parametrize("layers,message", [
    ([99], r"revive\.layers entries \[99\] select none of the weights MOCK writes.*layers \[4, 5\]"),
    ([0, 4], r"entries \[0\] select none"),
    (["model.layers.4.mlp.down_prj"], r"entries \['model\.layers\.4\.mlp\.down_prj'\] select none"),
])
def test_revive_layers_selecting_nothing_are_refused_before_editing(layers, message):
    ws = {f"model.layers.{i}.mlp.down_proj.weight": torch.nn.Parameter(torch.randn(6, 8), requires_grad=False)
          for i in (4, 5)}
    before = {n: w.data.clone() for n, w in ws.items()}
    ran = []
    host = PluginHost(get_plugin_manager(pinned=["revive"]))
    with pytest.raises(EditRejected, match=message):
        host.run_step("MOCK", [TargetWeight(n, w) for n, w in ws.items()], lambda: ran.append(1),
                      configs={"revive": {"tau": 0.2, "layers": layers}})
    assert ran == [] and all(torch.equal(w.data, before[n]) for n, w in ws.items())


def test_revive_layers_selecting_written_weights_filter_only_those():
    ws = {f"model.layers.{i}.mlp.down_proj.weight": torch.nn.Parameter(torch.randn(6, 8, dtype=torch.float64),
                                                                       requires_grad=False) for i in (4, 5)}
    w0 = {n: w.data.clone() for n, w in ws.items()}
    d = torch.randn(6, 8, dtype=torch.float64)

    def run():
        with torch.no_grad():
            for w in ws.values():
                w.add_(d)

    for layers in ([5], ["model.layers.5.mlp.down_proj"], ["model.layers.5.mlp.down_proj.weight"]):
        for n, w in ws.items():
            w.data.copy_(w0[n])
        host = PluginHost(get_plugin_manager(pinned=["revive"]))
        _, rec = host.run_step("MOCK", [TargetWeight(n, w) for n, w in ws.items()], run,
                               configs={"revive": {"tau": 0.2, "layers": layers}})
        assert rec.transformed == ["model.layers.5.mlp.down_proj.weight"], layers
        n5 = "model.layers.5.mlp.down_proj.weight"
        torch.testing.assert_close(ws[n5].data, w0[n5] + safe_update(d, w0[n5], 0.2))
    # A disabled block is not checked: it filters nothing by choice.
    host = PluginHost(get_plugin_manager(pinned=["revive"]))
    host.run_step("MOCK", [TargetWeight(n, w) for n, w in ws.items()], run,
                  configs={"revive": {"layers": [99], "enabled": False}})


def test_returning_the_untouched_delta_keeps_the_editor_write_bit_exact():
    w = torch.nn.Parameter(torch.randn(4, 4), requires_grad=False)
    d = torch.randn(4, 4) * 1e-3
    expected = w.data + d
    host = host_with(make_plugin("echo", lambda delta: delta))
    _, rec = host.run_step("MOCK", [TargetWeight("w", w)], mocked_editor(w, d))
    assert torch.equal(w.data, expected) and rec.transformed == []
