"""The whole plugin contract: pluggy hook specifications of the editing host (project name "easyedit").

A plugin is a plain module (or object) with functions decorated by ``revive_plugin.hookimpl``, found
through the entry-point group ``easyedit.plugins`` (see ``revive_plugin.host``). All hooks take keyword
arguments; a plugin may implement any subset and accept any subset of each hook's arguments.

The edit step
-------------
One call of an editor's apply function (one ROME/MEMIT/FT update of one batch of requests) is one *edit
step*. The host snapshots the weights the editor may write, runs it, and for every changed 2-D weight takes
ΔW = W_after − W_before. Then, in order:

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

If any implementation raises or returns a tensor of the wrong shape, or a non-finite delta, the host restores
every weight of the step to W_before exactly and raises ``EditRejected`` naming the plugin and parameter.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

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
             ``revive:`` block); a plugin whose block is absent should do nothing.
    state:   scratch space that lives as long as the host session (one model): plugins keep their
             caches under their own key, e.g. ``state["revive"]``.
    """

    editor: str
    step: int
    layer: Optional[int] = None
    configs: Mapping[str, Any] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)


@hookspec
def easyedit_transform_delta(
    name: str, delta: torch.Tensor, weight: torch.Tensor, context: EditContext
) -> Optional[torch.Tensor]:
    """Transform the weight delta of one parameter at one edit step.

    :param name: the parameter's full name in the model (``model.layers.12.mlp.down_proj.weight``).
    :param delta: ΔW proposed so far (out×in; the output of the previous transform in the chain).
    :param weight: the weight before this step, W_before (out×in, read-only: do not modify).
    :param context: the step's ``EditContext``; ``context.layer`` is this parameter's layer.
    :return: the new delta (same shape, finite), or None to leave it unchanged.
    """


@hookspec
def easyedit_edit_step_start(context: EditContext, weights: Mapping[str, torch.Tensor]) -> None:
    """Called before the editor runs at an edit step.

    :param context: the step's ``EditContext`` (``layer`` is None).
    :param weights: the weights the editor may write, by parameter name, out×in, as they are now
        (read-only views).
    """


@hookspec
def easyedit_edit_step_end(
    context: EditContext, deltas: Mapping[str, torch.Tensor], weights: Mapping[str, torch.Tensor]
) -> Optional[Mapping[str, float]]:
    """Called after the filtered deltas were written into the model.

    :param context: the step's ``EditContext`` (``layer`` is None).
    :param deltas: the final delta written per changed parameter (out×in).
    :param weights: the weights after the write-back, by parameter name (out×in, read-only).
    :return: metrics to log for this step, e.g. ``{"revive/model.layers.4.mlp.down_proj.weight/k": 12}``,
        or None. The host merges the dicts of all plugins.
    """
