"""The whole plugin contract: pluggy hook specifications of the editing host (project name "easyedit").

A plugin is a plain module (or object) with functions decorated by ``revive_plugin.hookimpl`` (the same as
``pluggy.HookimplMarker("easyedit")``), declared in its package's ``pyproject.toml`` under
``[project.entry-points."easyedit.plugins"]``. The entry-point name is the plugin's name: its settings are
the ``<name>:`` block of the hparams YAML (``context.configs["<name>"]``), the name in
``edit_plugins: {order: [...]}`` and in ``$EASYEDIT_PLUGINS``. All hooks take keyword arguments; a plugin
may implement any subset of the hooks and accept any subset of each hook's arguments. A plugin whose block
is absent from the step's configuration should do nothing.

Loading the hparams
-------------------
``easyedit_validate_config`` checks a plugin's own block when the hparams load, so a bad setting fails
before a model is loaded or an editor runs; the host calls it again at every edit step, before the editor,
with the weights the editor will write. Top-level YAML keys that are neither settings of the editor's
hparams class nor blocks of an installed plugin are an error; blocks of plugins that are installed but not
loaded (``$EASYEDIT_PLUGINS``) are removed with a warning that they have no effect.

The edit step
-------------
One call of an editor's apply function (one ROME/MEMIT/FT update of one batch of requests) is one *edit
step*. The host snapshots the weights the editor may write (its own copy, never handed to a plugin), runs
the editor, and for every changed 2-D weight takes ΔW = W_after − W_before. Then, in order:

0. ``easyedit_validate_config`` — each present plugin block, with the step's target weights;
   then ``easyedit_select_layers`` where the driver lets plugins choose the step's layers (see "Layers of a step");
1. ``easyedit_edit_step_start`` — before the editor runs (weights still W_before);
2. ``easyedit_transform_delta`` — once per changed weight, as a *chain* (below);
3. the host writes W_before + ΔW_final into the model;
4. ``easyedit_edit_step_end`` — after the write-back; returns metrics to log.

Chaining of transforms
----------------------
``easyedit_transform_delta`` is not a plain pluggy broadcast: the host calls the implementations one after
another, each receiving the delta returned by the one before (an implementation returning None leaves the
delta unchanged). The order is

* the ``order`` list of the step's configuration (the ``edit_plugins: {order: [...]}`` block of the hparams
  YAML, or ``PluginHost(order=...)``): plugins named there run first, in that order — e.g.
  ``[rect, revive]`` runs RECT, then REVIVE on RECT's output;
* then every other implementation in pluggy's own call order (``tryfirst``/``trylast`` respected, otherwise
  the most recently registered first).

The step hooks, too, are called one plugin at a time (pluggy's call order), so that an error names its
plugin. Hook wrappers (``hookwrapper=True``/``wrapper=True``) are not supported on any of these hooks.

Checkpoints
-----------
A plugin's per-model state (``context.state[name]``: REVIVE's cached W₀ bases, PRUNE's W₀, …) lives only in
memory. A driver that checkpoints a session (``revive eval`` does, at every evaluation) asks each plugin for
it through ``easyedit_state_save`` and hands it back through ``easyedit_state_load`` on resume, so a resumed
run continues with the state an uninterrupted one would have. A plugin that keeps state across edit steps
and implements neither hook is resumed without it (it starts over as if it had never run).

Keys of a step
--------------
Locate-then-edit editors (ROME, MEMIT, …) treat a weight as a linear associative memory W k ≈ v whose *key* k
of a request is the weight's input at the request's subject. A plugin that needs them (e.g. the
``superposition`` monitor) calls ``context.keys(name)`` in any hook of the step: an ``n × d_in`` float tensor,
row i the input of the module owning parameter ``name`` (``model.layers.4.mlp.down_proj`` for
``model.layers.4.mlp.down_proj.weight``; ``d_in`` = the second dimension of the out×in view) at the last
token of the subject of the step's i-th request, evaluated on the model **before the editor ran** (W_before
of every target of the step, whichever hook asks: the host hands its snapshot to the driver, which evaluates
the model with those values without writing into it). Keys are computed lazily, for all 2-D targets at
once, on the first call of the step (a step whose plugins never call it costs nothing) and handed out as a
fresh copy on every call. ``context.keys`` is None when the driver does not know the step's requests (a
``PluginHost`` driven directly, without ``keys=``); ``revive_plugin.adapters.easyedit`` provides it for every
weight-editing EasyEdit editor (see ``revive_plugin.adapters.keys`` for the exact definition: the request's
own prompt, no context templates; a request whose subject is not in its prompt uses the prompt's last
token). ``context.keys(name)`` raises ``KeyError`` for a name that is not a 2-D target of the step.

Layers of a step
----------------
A plugin may choose which layers an edit step writes, per step, instead of the fixed ``layers`` of the
editor's hparams (e.g. the ``wilke`` plugin: the layer whose FFN best matches the request's subject). Two hooks:

* ``easyedit_layer_candidates`` — called only on the plugin registered under ``name`` when its block is
  present: the layers it may choose among. The layers a step *may* write are the editor's ``layers`` and every
  such candidate: the driver snapshots all of them, hands all of them to ``easyedit_validate_config`` (as
  ``targets``) and ``easyedit_edit_step_start`` (so a plugin caching W₀, as REVIVE does, sees every candidate
  layer unedited at the first step, whichever step first writes it), and checkpoints all of them.
* ``easyedit_select_layers`` — called after ``easyedit_validate_config`` and before
  ``easyedit_edit_step_start`` (the weights are still W_before), with those candidate layers, on the plugins
  whose block is present only. The first of them (pluggy's call order) that returns a list decides: the editor
  then runs with ``layers`` set to it for this step only (restored after the step, also when it fails). None
  from every plugin: the editor's own layers.

``revive_plugin.adapters.easyedit`` calls them for every EasyEdit editor whose hparams have ``layers``; a
``PluginHost`` driven directly does so through ``PluginHost.select_layers``. ``easyedit_select_layers`` gets
``trial``: ``trial(layers) -> {name: ΔW}``, the deltas (out×in) the editor itself would write to each 2-D weight
with ``layers`` set to the given list, run on the model as it is now and then undone bit for bit (weights,
random-number state and the editor's own accumulated state; no plugin sees a trial). It costs one editor run per
call.

Isolation and failures
----------------------
The host's snapshot of W_before is its own: no hook ever receives it. ``easyedit_transform_delta`` gets
its own copies of ``delta`` and ``weight``: writing into them changes nothing (the host warns about a write
into ``weight``); return the new delta instead. The ``weights`` and ``deltas`` of the step hooks are
read-only views of the model: a plugin that writes into them has the step refused (``EditRejected``) and
every weight restored to W_before. If any implementation raises, returns a tensor of the wrong shape or a
non-finite delta, the host restores every weight of the step to W_before exactly and raises
``EditRejected`` naming the plugin (and the parameter, for transforms). A block refused by
``easyedit_validate_config`` raises ``ValueError`` at load time, ``EditRejected`` at an edit step (before
the editor ran: the weights are untouched). So does ``easyedit_select_layers`` when it raises or returns
something other than a non-empty list of candidate layers, or when a weight differs after it (a trial that
was not undone): every weight is restored first.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence

import pluggy
import torch

PROJECT_NAME = "easyedit"
ENTRY_POINT_GROUP = "easyedit.plugins"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@dataclass
class EditContext:
    """What a hook knows about the edit step it is called for.

    editor:  the editor's name (``alg_name``: "MEMIT", "ROME", "FT", …).
    step:    0-based index of this edit step on this model (counts every call of the editor).
    layer:   layer index parsed from the parameter name (``model.layers.12.mlp…`` → 12), or None;
             set per parameter for ``easyedit_transform_delta``, None for the step hooks.
    configs: the plugin blocks of the hparams YAML, by plugin name (``configs["revive"]`` is the
             ``revive:`` block, as ``easyedit_validate_config`` returned it); a plugin whose block is
             absent should do nothing.
    state:   scratch space that lives as long as the host session (one model): plugins keep their
             caches under their own key, e.g. ``state["revive"]``.
    keys:    ``keys(name) -> Tensor[n, d_in]``, the keys of the step's n requests at the 2-D weight ``name``,
             evaluated before the editor ran and computed only when first called (see "Keys of a step"
             above), or None when the driver does not know the step's requests.
    """

    editor: str
    step: int
    layer: Optional[int] = None
    configs: Mapping[str, Any] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)
    keys: Optional[Callable[[str], torch.Tensor]] = None


@hookspec
def easyedit_validate_config(
    name: str, config: Any, editor: Optional[str], targets: Optional[Sequence[str]]
) -> Optional[Any]:
    """Check this plugin's block of the hparams YAML before anything is edited.

    Called only on the plugin registered under ``name``, and only when its block is present: when the
    hparams load (``from_hparams``, ``attach_plugin_configs``) and again at the start of every edit step,
    before the editor runs. Not called for a plugin that implements no such hook (its block is accepted).

    :param name: the plugin's name (= the block's key and the entry-point name).
    :param config: the block as written (a mapping, a scalar, or None for an empty ``name:`` line).
    :param editor: the editor's name (``alg_name``: "MEMIT", "FT", …), or None when unknown.
    :param targets: the parameter names of the 2-D weights the editor will write: at load time those given
        by the hparams' ``rewrite_module_tmp`` × ``layers`` (None when the hparams do not say), at an edit
        step the weights the host snapshotted. Check that settings naming layers or parameters select some.
    :return: None to keep the block as written, or the block to use instead (e.g. with defaults filled in);
        it is what ``context.configs[name]`` holds in the other hooks.
    :raises ValueError: a message naming the bad setting, its value and what is accepted (the host adds the
        file and the plugin's name). Any other exception is reported the same way, as a bug of the plugin.
    """


@hookspec
def easyedit_transform_delta(
    name: str, delta: torch.Tensor, weight: torch.Tensor, context: EditContext
) -> Optional[torch.Tensor]:
    """Transform the weight delta of one parameter at one edit step.

    :param name: the parameter's full name in the model (``model.layers.12.mlp.down_proj.weight``).
    :param delta: ΔW proposed so far (out×in; the output of the previous transform in the chain). The
        plugin's own copy: writing into it has no effect unless the plugin returns it.
    :param weight: the weight before this step, W_before (out×in). The plugin's own copy of the host's
        snapshot: writing into it has no effect on the result or on a restore (the host warns).
    :param context: the step's ``EditContext``; ``context.layer`` is this parameter's layer.
    :return: the new delta (same shape, finite), or None to leave it unchanged. A returned tensor is written
        back as W_before + delta; None from every plugin keeps the editor's own write bit for bit.
    """


@hookspec
def easyedit_edit_step_start(context: EditContext, weights: Mapping[str, torch.Tensor]) -> None:
    """Called before the editor runs at an edit step.

    :param context: the step's ``EditContext`` (``layer`` is None).
    :param weights: the weights the editor may write, by parameter name, out×in, as they are now:
        read-only views of the live model (they change when the editor writes; ``clone()`` what you keep).
        Writing into them refuses the step (``EditRejected``) before the editor runs.
    :raises: anything: the step is refused (``EditRejected`` naming the plugin), the weights untouched.
    """


@hookspec
def easyedit_edit_step_end(
    context: EditContext, deltas: Mapping[str, torch.Tensor], weights: Mapping[str, torch.Tensor]
) -> Optional[Mapping[str, float]]:
    """Called after the filtered deltas were written into the model.

    :param context: the step's ``EditContext`` (``layer`` is None).
    :param deltas: the final delta written per changed parameter (out×in, read-only).
    :param weights: the weights after the write-back, by parameter name (out×in, read-only views of the
        model: writing into them, or into ``deltas``, refuses the step and restores W_before).
    :return: metrics to log for this step, e.g. ``{"revive/model.layers.4.mlp.down_proj.weight/k": 12}``,
        or None. The host merges the dicts of all plugins.
    :raises: anything: the step is refused (``EditRejected`` naming the plugin) and every weight restored.
    """


@hookspec
def easyedit_layer_candidates(
    name: str, config: Any, editor: Optional[str], layers: Optional[Sequence[int]]
) -> Optional[Sequence[int]]:
    """The layers this plugin may choose for an edit step through ``easyedit_select_layers``.

    Called only on the plugin registered under ``name``, and only when its block is present: when the hparams
    load and whenever the driver needs the weights a step may write (before each step, for checkpoints). The
    step's targets are then the editor's rewrite templates × (``layers`` ∪ the returned layers); a layer the
    model does not have selects no weight (check it in ``easyedit_validate_config``, whose ``targets`` are
    those weights).

    :param name: the plugin's name (= the block's key).
    :param config: the block as written (not yet through ``easyedit_validate_config``).
    :param editor: the editor's name, or None when unknown.
    :param layers: the editor's own ``layers`` (its hparams), or None when it has none.
    :return: layer indices (ints ≥ 0), or None for none beyond the editor's own.
    :raises ValueError: the block does not say which layers (the host adds the block's name).
    """


@hookspec(firstresult=True)
def easyedit_select_layers(
    editor: str,
    requests: Optional[Sequence[Mapping[str, Any]]],
    layers: Sequence[int],
    context: EditContext,
    weights: Mapping[str, torch.Tensor],
    trial: Optional[Callable[[Sequence[int]], Mapping[str, torch.Tensor]]],
) -> Optional[Sequence[int]]:
    """Choose the layers this edit step writes, before the editor runs (see "Layers of a step" above).

    Called only on plugins whose block is present (``context.configs``), in pluggy's call order, until one
    returns a list.

    :param editor: the editor's name (``alg_name``).
    :param requests: the step's requests as the editor receives them (``prompt``, ``subject``,
        ``target_new``, …); read them, do not change them. None when the driver does not know them.
    :param layers: the candidate layers, sorted: the editor's own ``layers`` and every layer a present plugin
        returned from ``easyedit_layer_candidates``. Their weights are ``context.keys``' names.
    :param context: the step's ``EditContext`` (``layer`` is None); ``context.keys`` gives the requests' keys at
        every candidate weight, on W_before.
    :param weights: the 2-D weights of every candidate layer, by parameter name, out×in, as they are now (W_before):
        read-only views of the live model (a weight that differs after the call refuses the step).
    :param trial: ``trial(layers) -> {parameter name: ΔW}``: what the editor alone would write with ``layers``
        (a subset of the candidates), undone after; None when the driver cannot run the editor on trial.
    :return: the layers to write (a non-empty subset of ``layers``), or None to leave the choice to the next
        plugin and finally to the editor's own ``layers``.
    :raises: anything: the step is refused (``EditRejected`` naming the plugin), the weights untouched.
    """


#: Metadata key the checkpoint writer reserves in a plugin's state file (the plugin's name).
STATE_PLUGIN_KEY = "easyedit.plugin"


@hookspec
def easyedit_state_save(name: str, state: Mapping[str, Any]) -> Optional[Mapping[str, Any]]:
    """This plugin's per-model state, for a checkpoint (called when the driver saves one, between edit steps).

    Called only on the plugin registered under ``name``. ``revive eval`` writes what it returns to one
    safetensors file per plugin in the checkpoint (``plugin-<name>.safetensors``; REVIVE's keeps its historical
    name ``revive.safetensors``), before the checkpoint is marked complete, and hands the same mapping back to
    ``easyedit_state_load`` on resume.

    :param name: the plugin's name.
    :param state: the per-model state (``context.state`` of the other hooks, every plugin's keys; read your
        own, e.g. ``state[name]``). Read-only: do not change it here.
    :return: None when there is nothing to save (the plugin never ran on this model), else a mapping of
        string keys to ``torch.Tensor`` (saved as they are: any dtype and shape; the driver copies them to the
        CPU) or to ``str`` (small settings, e.g. a JSON string; stored as the file's metadata). The key
        ``"easyedit.plugin"`` is reserved.
    """


@hookspec
def easyedit_state_load(
    name: str,
    state: dict[str, Any],
    tensors: Mapping[str, Any],
    config: Any,
    weights: Mapping[str, torch.Tensor],
) -> None:
    """Restore this plugin's per-model state from what ``easyedit_state_save`` returned (on resume).

    Called only on the plugin registered under ``name``, before anything of the checkpoint is applied: a
    ``ValueError`` refuses the whole checkpoint (the driver names the file) and leaves the model untouched.

    :param name: the plugin's name.
    :param state: the per-model state to restore into: set your own key(s), e.g. ``state[name] = ...``; the
        driver merges it into the model's ``context.state`` once every file of the checkpoint was read.
    :param tensors: what ``easyedit_state_save`` returned (tensors on the CPU, strings as saved). A file
        written before this plugin saved through these hooks may lack keys: say what is missing.
    :param config: the plugin's block of the session being resumed (as ``easyedit_validate_config`` returned
        it), or None when the block is absent.
    :param weights: the weights the checkpoint restores, by parameter name, out×in, read-only: check that
        the state fits them (shapes, names) and raise ``ValueError`` naming what does not.
    :raises ValueError: the tensors are not a state of this plugin, or not for these weights.
    """
