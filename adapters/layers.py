"""The layers of an EasyEdit edit step, chosen by plugins (see "Layers of a step" in ``revive_plugin.hookspecs``).

* ``with_candidates`` — an editor's ``layers`` and every layer a plugin whose block is present may choose
  (``easyedit_layer_candidates``): what ``easyedit.target_weights`` snapshots, validates and checkpoints;
* ``choose_layers`` — the step's ``easyedit_select_layers`` call, with ``trial``: the editor run on the model as
  it is, with other ``layers``, and undone bit for bit (weights, random-number states, AlphaEdit-style
  accumulated keys).

``revive_plugin.adapters.easyedit`` calls these from ``_wrap_apply`` for every editor whose hparams have ``layers``.
"""
from __future__ import annotations

import copy
import random
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
import torch

from revive_plugin.host import EditRejected, PluginHost, TargetWeight, call_impl, hook_impls

from . import compat


def candidate_layers(pm: Any, configs: Mapping[str, Any], editor: Optional[str], layers: Any) -> list[int]:
    """The layers the plugins whose blocks are in ``configs`` may choose (``easyedit_layer_candidates``), sorted.

    Raises ``ValueError`` naming the block when a plugin refuses its block or returns something other than
    layer indices.
    """
    if not configs:
        return []
    own = list(layers) if isinstance(layers, (list, tuple)) else None
    out: set[int] = set()
    for impl in hook_impls(pm, "easyedit_layer_candidates"):
        name = impl.plugin_name
        if name not in configs:
            continue
        try:
            got = call_impl(impl.function, name=name, config=configs[name], editor=editor, layers=own)
        except ValueError as e:
            raise ValueError(f"`{name}:` block: {e}") from e
        if got is None:
            continue
        if isinstance(got, (str, bytes)) or not isinstance(got, Sequence) or any(
                isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in got):
            raise ValueError(f"`{name}:` block: plugin {name!r} returned {got!r} from easyedit_layer_candidates; "
                             "expected a list of layer indices (integers >= 0)")
        out.update(got)
    return sorted(out)


def with_candidates(pm: Any, configs: Mapping[str, Any], editor: Optional[str], layers: Any) -> Any:
    """``layers`` (an editor's hparams ``layers``) with every candidate layer of ``configs``' plugins added,
    sorted; ``layers`` itself when it is not a list or no plugin adds a layer."""
    if not configs or not isinstance(layers, (list, tuple)):
        return layers
    extra = candidate_layers(pm, configs, editor, layers)
    if not set(extra) - set(layers):
        return layers
    return sorted(set(layers) | set(extra))


def _rng_states(devices: list[int]) -> tuple:
    cuda = [torch.cuda.get_rng_state(d) for d in devices]
    return torch.get_rng_state(), cuda, random.getstate(), np.random.get_state()


def _set_rng_states(states: tuple, devices: list[int]) -> None:
    cpu, cuda, py, npy = states
    torch.set_rng_state(cpu)
    for d, s in zip(devices, cuda):
        torch.cuda.set_rng_state(s, d)
    random.setstate(py)
    np.random.set_state(npy)


def make_trial(
    run_editor: Callable[[], Any],
    hparams: Any,
    targets: Sequence[TargetWeight],
    candidates: Sequence[int],
    main: Any = None,
) -> Callable[[Sequence[int]], dict[str, torch.Tensor]]:
    """``trial(layers) -> {name: ΔW}``: ``run_editor()`` (the bare editor on the step's requests) with
    ``hparams.layers`` set to ``layers``, the 2-D deltas it wrote to
    ``targets`` (out×in, float copies), and everything undone: the weights, the random-number states (CPU,
    the model's CUDA devices, ``random``, numpy) and ``main.cache_c`` (AlphaEdit-style accumulated keys)."""
    allowed = sorted(set(candidates))
    devices = sorted({t.tensor.device.index or 0 for t in targets if t.tensor.device.type == "cuda"})

    def trial(layers: Sequence[int]) -> dict[str, torch.Tensor]:
        chosen = sorted({int(x) for x in layers})
        if not chosen or set(chosen) - set(allowed):
            raise ValueError(f"trial layers {list(layers)!r} must be a non-empty subset of the candidates {allowed}")
        before = {t.name: t.tensor.detach().clone() for t in targets}
        cache = getattr(main, "cache_c", None)
        cache = cache.clone() if isinstance(cache, torch.Tensor) else None
        states = _rng_states(devices)
        try:
            with compat.temporarily(hparams, "layers", chosen):
                run_editor()
            with torch.no_grad():
                out = {}
                for t in targets:
                    if t.tensor.ndim != 2 or torch.equal(t.tensor, before[t.name]):
                        continue
                    out[t.name] = (t.view(t.tensor.detach()) - t.view(before[t.name])).clone()
            return out
        finally:
            with torch.no_grad():
                for t in targets:
                    t.tensor.data.copy_(before[t.name])
            if cache is not None:
                main.cache_c = cache
            _set_rng_states(states, devices)

    return trial


def choose_layers(
    host: PluginHost,
    pm: Any,
    alg: str,
    hparams: Any,
    configs: Mapping[str, Any],
    targets: Sequence[TargetWeight],
    requests: Any,
    keys: Any,
    run_editor: Callable[[Any], Any],
    main: Any = None,
    projector: Any = None,
) -> Optional[list[int]]:
    """The layers the plugins chose for this step (``PluginHost.select_layers``), or None: the editor's own.

    ``run_editor(requests)`` runs the bare editor (no plugin) on ``requests`` (a trial hands it a deep copy of the
    step's); ``targets`` are the weights of
    every candidate layer. Editors without a ``layers`` list get no choice. AlphaEdit-style editors (a
    null-space ``projector``, one per hparams layer, by position) refuse a choice of other layers.
    """
    layers = getattr(hparams, "layers", None)
    if not isinstance(layers, (list, tuple)):
        return None
    candidates = with_candidates(pm, configs, alg, layers)
    choosers = [i.plugin_name for i in hook_impls(pm, "easyedit_select_layers") if i.plugin_name in configs]
    if not choosers:
        return None
    if projector is not None:
        raise EditRejected(f"{alg} keeps a null-space projector per layer of its hparams (by position), so its layers "
                           f"cannot be chosen per step (weights untouched); remove the block(s) {choosers}")
    reqs = requests

    def run() -> Any:
        return run_editor(copy.deepcopy(reqs))

    trial = make_trial(run, hparams, targets, candidates, main=main)
    listed = requests if isinstance(requests, (list, tuple)) else None
    return host.select_layers(alg, targets, candidates, configs, requests=listed, keys=keys, trial=trial)
