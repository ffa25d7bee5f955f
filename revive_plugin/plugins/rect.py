"""RECT as a ΔW transform: keep the entries of the delta with the largest relative change, zero the rest.

RECT ("Model Editing Harms General Abilities of Large Language Models: Regularization to the Rescue", Gu et al.,
2024) regularises an edit by its relative size: after the editor's solve, an entry ΔWᵢⱼ is kept only if its
relative change rᵢⱼ = |ΔWᵢⱼ| / (|Wᵢⱼ| + 1e-8) is among the top ``top`` share of all r of that weight matrix,
and set to zero otherwise; the kept entries are not rescaled. W is the weight the delta is added to (W_before
of the edit step, the ``weight`` argument), so in a sequential run it is the current, already edited weight.

The ranking is **global over one parameter's whole matrix** (not per row or column), and the kept set is the
one of the public implementation this reproduces, MEMIT-RECT in the AlphaEdit repository (jianghoucheng/AlphaEdit,
``memit/memit_rect_main.py``, ``k_percent = 40``): with n entries and k = ⌊n·(1 − top)⌋,

* the threshold t is the k-th smallest r (``torch.kthvalue``), and every entry with r ≥ t is kept;
* without ties that is the ⌈n·top⌉ + 1 largest r — one more than ⌈n·top⌉, as in the source (40.0001% of a
  576×1536 matrix at top = 0.4); entries tied with the threshold are all kept, so ties can only add entries;
* k is computed exactly from the decimal value of ``top`` (0.4 → k = ⌊3n/5⌋, as the source's integer
  ``n·60/100``); when k = 0 (top = 1, or n·(1 − top) < 1) every entry is kept (the delta is unchanged).

One difference from the source: it divides by |W + 1e-8|, this plugin by |W| + 1e-8 (never zero, so r is always
finite); they differ only for entries with |W| within a few ε of zero, i.e. not in the ranking of real weights.

Settings (the ``rect:`` block of the hparams YAML; an empty ``rect:`` line takes the defaults)::

    rect:
      top: 0.4   # share of entries kept, 0 < top <= 1. 0.4 = AlphaEdit's MEMIT-RECT (p = 40);
                 # the original RECT on ROME kept the top 20% (0.2)

Without a ``rect:`` block the plugin does nothing. In a chain, ``edit_plugins: {order: [rect, revive]}``
sparsifies the editor's delta and then projects it (REVIVE's invariant holds exactly on the final weights,
the sparsity pattern does not survive the projection); ``[revive, rect]`` sparsifies the projected delta
(the final delta is sparse, REVIVE's invariant holds only approximately).
"""
from __future__ import annotations

import math
from fractions import Fraction
from typing import Any, Mapping, Optional

import torch

from revive_plugin.hookspecs import EditContext, hookimpl

NAME = "rect"
#: Default share of entries kept: AlphaEdit's MEMIT-RECT (k_percent = 40).
DEFAULT_TOP = 0.4
#: The ε of the relative change |ΔW| / (|W| + ε).
EPS = 1e-8


def settings(config: Any) -> dict:
    """The validated ``rect:`` block (None → defaults): ``{"top": float}``."""
    config = {} if config is None else config
    if not isinstance(config, Mapping):
        raise ValueError(f"the rect block must be a mapping such as {{top: 0.4}}, got {config!r}")
    unknown = sorted(set(config) - {"top"})
    if unknown:
        raise ValueError(f"unknown rect setting(s) {unknown}; the only setting is `top` (share of entries kept)")
    top = config.get("top", DEFAULT_TOP)
    if isinstance(top, bool) or not isinstance(top, (int, float)) or not math.isfinite(top) or not 0 < top <= 1:
        raise ValueError(f"rect.top must be a number with 0 < top <= 1, the share of ΔW's entries kept (0.4 keeps "
                         f"the top 40%, as AlphaEdit's MEMIT-RECT; 0.2 as the original RECT), got {top!r}")
    return {"top": float(top)}


def threshold_rank(n: int, top: float) -> int:
    """k = ⌊n·(1 − top)⌋ with ``top`` taken as the decimal it was written as (0.4 is 2/5, not the nearest
    binary double): the rank, among the n relative changes in increasing order, of the threshold."""
    return math.floor(n * (1 - Fraction(repr(float(top)))))


def relative_change(delta: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """r = |ΔW| / (|W| + 1e-8), in float64."""
    return delta.double().abs() / (weight.double().abs() + EPS)


def rect_mask(delta: torch.Tensor, weight: torch.Tensor, top: float) -> torch.Tensor:
    """The entries RECT keeps: r ≥ the k-th smallest r, k = ⌊n·(1 − top)⌋ (all of them when k = 0)."""
    if delta.shape != weight.shape:
        raise ValueError(f"delta shape {tuple(delta.shape)} != weight shape {tuple(weight.shape)}")
    r = relative_change(delta, weight)
    k = threshold_rank(r.numel(), top)
    if k < 1:
        return torch.ones_like(r, dtype=torch.bool)
    threshold = torch.kthvalue(r.reshape(-1), k).values
    return r >= threshold


def rect(delta: torch.Tensor, weight: torch.Tensor, top: float = DEFAULT_TOP) -> torch.Tensor:
    """ΔW with every entry outside ``rect_mask`` set to zero (kept entries unchanged, no rescaling)."""
    return torch.where(rect_mask(delta, weight, top), delta, torch.zeros_like(delta))


@hookimpl
def easyedit_validate_config(config: Any) -> dict:
    return settings(config)


@hookimpl
def easyedit_transform_delta(
    name: str, delta: torch.Tensor, weight: torch.Tensor, context: EditContext
) -> Optional[torch.Tensor]:
    if NAME not in context.configs:
        return None
    mask = rect_mask(delta, weight, settings(context.configs[NAME])["top"])
    # Reported at the end of the step: the share of entries kept (ties at the threshold included).
    context.state.setdefault(NAME, {})[name] = float(mask.sum()) / mask.numel()
    return torch.where(mask, delta, torch.zeros_like(delta))


@hookimpl
def easyedit_edit_step_end(context: EditContext) -> Optional[dict[str, float]]:
    if NAME not in context.configs:
        return None
    return {f"rect/{name}/kept": kept for name, kept in context.state.pop(NAME, {}).items()}
