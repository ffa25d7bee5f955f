"""The REVIVE plugin: replaces each edited weight's delta by its spectrally safe version.

Active for an edit step when the hparams carry a ``revive:`` block (``context.configs["revive"]``) that is
not ``enabled: false``. Its per-model state (cached W₀ bases) is a ``ReviveFilter`` kept in
``context.state["revive"]``. The block is validated through ``easyedit_validate_config`` like any
plugin's: its settings (``ReviveConfig``) when the hparams load, and ``layers`` against the weights the
editor writes (at load time from ``rewrite_module_tmp`` × ``layers``, again before every edit step).
Its state goes into checkpoints through ``easyedit_state_save``/``easyedit_state_load``: the cached bases
(``ReviveFilter.state_dict``) and the filter's config as the string ``revive_config`` — the layout of
``ReviveFilter.save``, so a file written by ``ReviveFilter.save`` (older checkpoints) loads the same way.
"""
from __future__ import annotations

import json
from typing import Any, Mapping, Optional, Sequence

import torch

from revive_plugin.config import ReviveConfig
from revive_plugin.filter import ReviveFilter
from revive_plugin.hookspecs import EditContext, hookimpl

NAME = "revive"


@hookimpl
def easyedit_validate_config(
    config: Any, editor: Optional[str], targets: Optional[Sequence[str]]
) -> Optional[dict]:
    """The ``revive:`` block: a valid ``ReviveConfig``, and ``layers`` entries that select a written weight."""
    from revive_plugin.host import layer_index

    parsed = ReviveConfig.from_dict(config)
    if targets is not None and parsed.enabled:
        parsed.check_layers({name: layer_index(name) for name in targets}, editor)
    return {} if config is None else None


def active_filter(context: EditContext) -> Optional[ReviveFilter]:
    """The model's ReviveFilter for this step, or None when REVIVE is off for it."""
    if NAME not in context.configs:
        return None
    config = ReviveConfig.from_dict(context.configs[NAME])
    if not config.enabled:
        return None
    filt = context.state.get(NAME)
    if filt is None:
        filt = context.state[NAME] = ReviveFilter(config)
    elif filt.config != config:
        filt = context.state[NAME] = filt.reconfigured(config)
    return filt


@hookimpl
def easyedit_edit_step_start(context: EditContext, weights: Mapping[str, torch.Tensor]) -> None:
    # Cache W₀ before the first edit ever touches these weights.
    filt = active_filter(context)
    if filt is None or filt.config.basis != "original":
        return
    from revive_plugin.host import layer_index

    for name, w in weights.items():
        if w.ndim == 2 and filt.selects(name, layer_index(name)):
            filt.observe(name, w)


@hookimpl
def easyedit_transform_delta(
    name: str, delta: torch.Tensor, weight: torch.Tensor, context: EditContext
) -> Optional[torch.Tensor]:
    filt = active_filter(context)
    if filt is None or not filt.selects(name, context.layer):
        return None
    return filt.filter(name, delta, weight, layer=context.layer)


@hookimpl
def easyedit_edit_step_end(
    context: EditContext, deltas: Mapping[str, torch.Tensor], weights: Mapping[str, torch.Tensor]
) -> Optional[Mapping[str, float]]:
    filt = active_filter(context)
    if filt is None:
        return None
    metrics: dict[str, float] = {}
    for name, delta in deltas.items():
        basis = filt.reference(name)
        if basis is None:
            continue
        metrics[f"revive/{name}/k"] = basis.k
        metrics[f"revive/{name}/delta_norm"] = float(torch.linalg.vector_norm(delta.double()))
        metrics[f"revive/{name}/fro_norm"] = float(torch.linalg.vector_norm(weights[name].double()))
    return metrics


#: Key of the filter's config (JSON) among the saved state, as ``ReviveFilter.save`` writes it (metadata).
CONFIG_KEY = "revive_config"


@hookimpl
def easyedit_state_save(state: Mapping[str, Any]) -> Optional[dict[str, Any]]:
    filt = state.get(NAME)
    if not isinstance(filt, ReviveFilter):
        return None
    return {**filt.state_dict(), CONFIG_KEY: json.dumps(filt.config.to_dict())}


@hookimpl
def easyedit_state_load(
    state: dict[str, Any], tensors: Mapping[str, Any], config: Any, weights: Mapping[str, torch.Tensor]
) -> None:
    """The saved filter, each basis checked against its weight's (out, in) shape."""
    raw = tensors.get(CONFIG_KEY)
    if raw is not None and not isinstance(raw, str):
        raise ValueError(f"{CONFIG_KEY!r} must be the filter's config as a JSON string, got a {type(raw).__name__}")
    try:
        filt = ReviveFilter(ReviveConfig.from_dict(json.loads(raw) if raw is not None else config))
        filt.load_state_dict({k: v for k, v in tensors.items() if k != CONFIG_KEY})
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:  # JSONDecodeError is a ValueError
        raise ValueError(f"not a REVIVE filter state ({e})") from e
    for name in sorted({key.rsplit("::", 1)[0] for key in tensors if key != CONFIG_KEY}):
        basis = filt.reference(name)
        if name not in weights:
            raise ValueError(f"it holds a basis for {name!r}, which is not an edited matrix of this model")
        got, expected = (basis.u.shape[0], basis.v.shape[0]), tuple(weights[name].shape)
        if basis.u.ndim != 2 or basis.v.ndim != 2 or got != expected:
            raise ValueError(f"the basis of {name!r} is for a {got} weight, the model's is {expected}")
    state[NAME] = filt
