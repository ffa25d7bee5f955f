"""WilKE layer selection: each edit step writes the candidate layer that best matches the edited fact, instead of
the editor's fixed layer. It changes no delta (no ``easyedit_transform_delta``): it chooses, before the editor runs,
the layer a ROME-style single-layer editor writes (``easyedit_select_layers``; "Layers of a step" in
``revive_plugin.hookspecs``), and logs its choice.

Source: Hu, Cao, Chen, Liu, Zhao, "WilKE: Wise-Layer Knowledge Editor for Lifelong Knowledge Editing"
(arXiv:2402.10987, Findings of ACL 2024); code: github.com/ChenhuiHu/WilKE (``wilke/wilke_main.py``,
``apply_wilke_to_model``; ``hparams/WilKE/gpt2-xl.json``: ``scanning_ceiling: 24``). Only the abstract, the public
code and a third-party summary of the method could be read here, not the paper's own equations; what follows says
which formula comes from where.

What WilKE does (notation of this module)
-----------------------------------------
A transformer layer's FFN is a key-value memory, FFN^l(x) = W^l σ(W_fc^l x), with W^l the written weight (LLaMA's
``mlp.down_proj``, GPT-2's ``mlp.c_proj``; out×in) and k^l = σ(W_fc^l x) the *key* of input x: the activation of
the layer's FFN keys (the rows of W_fc^l) by the subject's representation x. The paper's *pattern matching
degree* of a fact at layer l is how strongly that layer's keys match the subject; a layer whose keys do not match
the fact ("pattern unmatch") needs a large change of W^l to store it, and the paper traces lifelong editing's
"toxicity buildup" and "toxicity flash" to such edits. WilKE edits each fact at the layer needing the smallest
relative change. The public code does this literally: for every layer l it scans (layers 0–23 of GPT2-XL's 48),
it makes the ROME edit of the fact at layer l alone, measures

    LA_l = ‖ΔW^l‖_F / ‖W^l‖_F                       (``LA = torch.norm((W_edited − W) / torch.norm(W))``)    (1)

undoes it, and edits at l* = argmin_l LA_l (the first such layer on a tie, ``LAs.index(min(LAs))``).

Why (1) measures the pattern match: the smallest change of W^l that adds δ to the FFN's output at key k is
ΔW = δ kᵀ / ‖k‖², of Frobenius norm ‖δ‖ / ‖k‖, so

    LA_l = ‖δ_l‖ / (‖k^l‖ · ‖W^l‖_F)                                                                     (2)

with δ_l the output change the edit needs at layer l — the key's magnitude ‖k^l‖ (the pattern matching degree) in
the denominator: the better the layer's keys match the subject, the smaller the change. (2) is derived here (ROME's
own update uses C⁻¹k instead of k, which changes the constant, not the argument); a third-party summary of the paper
gives the selection as l* = argmin_l of δ_l·‖W^l‖² / ‖σ(x W_fc^l)‖², the same quantities.

What this plugin computes
-------------------------
For each edit step, over the candidate layers l of its block (``criterion``):

* ``edit`` (default; the public code): LA_l of (1), with ΔW^l what the step's editor itself writes with
  ``layers: [l]`` (``trial([l])``: run on the model as it is, then undone), ‖ΔW^l‖ and ‖W^l‖ over every 2-D weight
  of layer l (root of the sum of squares). Costs one editor run per candidate, besides the step's own.
* ``keys`` (cheap): (2) with one δ for every layer — the assumption MEMIT makes when it spreads one residual over
  its layers — i.e. score_l = 1 / (‖k^l‖ · ‖W^l‖_F), k^l from ``context.keys`` (the written module's input at the
  subject's last token of the request's own prompt; root-mean-square over the step's requests). One forward pass.

The step writes l* = argmin_l score_l (the lowest such layer on a tie). Step metrics (``easyedit_edit_step_end``):
``wilke/layer`` = l*, ``wilke/score/<l>`` = score_l of each candidate, ``wilke/chose/<l>`` = 1 for l*, else 0 (their
mean over a window of steps is the share of steps that chose l). With ``edit``, where the driver gives the step's
keys, the ``keys`` criterion is also evaluated on the same model (one forward pass) and logged beside it, never
used: ``wilke/keys_score/<l>``, its choice ``wilke/keys_layer`` and ``wilke/keys_agrees`` (1 when it picked l*; its
mean is how often the cheap criterion would have chosen as WilKE's), so a run with ``edit`` says whether ``keys``
could stand in for it.

Where this plugin chose (the paper and its code fix none of these for a plugin)
-------------------------------------------------------------------------------
* The candidates are listed in the block (the code scans layers 0 … scanning_ceiling − 1 of every model).
* LA is taken on the editor's own ΔW, before any transform (REVIVE, RECT, …): ROME+WilKE and ROME+WilKE+REVIVE choose
  by the same rule. The trial edit of the chosen layer is not reused: the step runs the editor again at l* (for ROME
  the same update: the same model, templates and optimiser), so its cost is (candidates + 1) editor runs.
* A step of several requests (MEMIT-style batches) gets one layer for all of them; WilKE edits one fact per step
  (ROME's one request per call: per-edit choice = per-step choice).
* The ``keys`` criterion is this plugin's approximation, not the paper's: it ignores how δ_l differs between layers.

State: none that outlives a step (the choice depends only on the model and the step's requests), so nothing goes
into checkpoints: a resumed run chooses exactly as an uninterrupted one. The step's choice is kept in
``context.state["wilke"]`` from ``easyedit_select_layers`` to ``easyedit_edit_step_end``.

Settings (the ``wilke:`` block of the hparams YAML, or ``plugins: {wilke: {...}}`` with ``monitors: [wilke]`` in a
run config)::

    wilke:
      candidates: [3, 4, 5, 6, 7, 8, 9]   # layers to choose among (required); each must have a weight the editor writes
      criterion: edit                     # edit: the editor's own update per layer, eq. (1) | keys: eq. (2), one δ
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Optional, Sequence

import torch

from revive_plugin.hookspecs import EditContext, hookimpl

NAME = "wilke"
CRITERIA = ("edit", "keys")
DEFAULT_CRITERION = "edit"


def settings(config: Any) -> dict:
    """The validated ``wilke:`` block: ``{"candidates": sorted layer indices, "criterion": "edit" | "keys"}``."""
    if not isinstance(config, Mapping):
        raise ValueError(f"the wilke block must be a mapping such as {{candidates: [3, 4, 5, 6, 7, 8]}}, got {config!r}")
    unknown = sorted(set(config) - {"candidates", "criterion"})
    if unknown:
        raise ValueError(f"unknown wilke setting(s) {unknown}; the settings are `candidates` (the layers to choose "
                         f"among) and `criterion` (one of {list(CRITERIA)})")
    candidates = config.get("candidates")
    if not isinstance(candidates, (list, tuple)) or not candidates or any(
            isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in candidates):
        raise ValueError(f"wilke.candidates must be a non-empty list of layer indices (integers >= 0), e.g. "
                         f"[3, 4, 5, 6, 7, 8], got {candidates!r}")
    if len(set(candidates)) != len(candidates):
        raise ValueError(f"wilke.candidates lists a layer twice: {list(candidates)}")
    criterion = config.get("criterion", DEFAULT_CRITERION)
    if criterion not in CRITERIA:
        raise ValueError(f"wilke.criterion must be one of {list(CRITERIA)} (edit: the relative size of the editor's "
                         f"own update at each layer; keys: from the keys' norms), got {criterion!r}")
    return {"candidates": sorted(candidates), "criterion": criterion}


# -- the criteria, on plain tensors ------------------------------------------------------------------------
def _frobenius(tensors: Sequence[torch.Tensor]) -> float:
    return math.sqrt(sum(float(torch.linalg.vector_norm(t.double())) ** 2 for t in tensors))


def relative_change(deltas: Sequence[torch.Tensor], weights: Sequence[torch.Tensor]) -> float:
    """LA of eq. (1): ‖ΔW‖_F / ‖W‖_F over one layer's weights (root of the sum of squares of each); inf for ‖W‖ = 0."""
    den = _frobenius(weights)
    return _frobenius(deltas) / den if den > 0 else math.inf


def key_score(keys: Sequence[torch.Tensor], weights: Sequence[torch.Tensor]) -> float:
    """Eq. (2) with a common δ: 1 / (‖k‖ · ‖W‖_F), ‖k‖ the root-mean-square over the requests of the key norms
    (summed in squares over the layer's weights); inf when either is 0."""
    n = max(int(k.shape[0]) for k in keys)
    k_norm = math.sqrt(sum(float((k.double() ** 2).sum()) for k in keys) / n) if n else 0.0
    den = k_norm * _frobenius(weights)
    return 1.0 / den if den > 0 else math.inf


def best_layer(scores: Mapping[int, float]) -> int:
    """argmin of the scores; the lowest layer among equal ones."""
    return min(sorted(scores), key=lambda layer: scores[layer])


def by_layer(names: Sequence[str]) -> dict[int, list[str]]:
    """Parameter names grouped by their layer index (names without one are left out)."""
    from revive_plugin.host import layer_index

    out: dict[int, list[str]] = {}
    for name in names:
        layer = layer_index(name)
        if layer is not None:
            out.setdefault(layer, []).append(name)
    return out


def scores_by_edit(candidates: Sequence[int], weights: Mapping[str, torch.Tensor],
                   trial: Callable[[Sequence[int]], Mapping[str, torch.Tensor]]) -> dict[int, float]:
    """LA_l (1) of each candidate layer: the editor's own update at that layer alone (``trial([l])``)."""
    groups = by_layer([n for n, w in weights.items() if w.ndim == 2])
    out = {}
    for layer in candidates:
        deltas = trial([layer])
        names = sorted(set(groups.get(layer, [])) | {n for n in deltas if n in weights})
        out[layer] = relative_change([deltas[n] for n in names if n in deltas], [weights[n] for n in names])
    return out


def scores_by_keys(candidates: Sequence[int], weights: Mapping[str, torch.Tensor],
                   keys: Callable[[str], torch.Tensor]) -> dict[int, float]:
    """Eq. (2) with a common δ for each candidate layer, from the step's keys at its weights."""
    groups = by_layer([n for n, w in weights.items() if w.ndim == 2])
    return {layer: key_score([keys(n) for n in groups[layer]], [weights[n] for n in groups[layer]])
            for layer in candidates}


# -- hooks -------------------------------------------------------------------------------------------------
@hookimpl
def easyedit_validate_config(config: Any, editor: Optional[str], targets: Optional[Sequence[str]]) -> dict:
    """The block's settings; at an edit step (``targets`` are the weights the model has), every candidate must
    have a weight the editor writes."""
    cfg = settings(config)
    if targets is not None:
        have = by_layer(list(targets))
        missing = [layer for layer in cfg["candidates"] if layer not in have]
        if missing:
            raise ValueError(f"wilke.candidates {missing} have no weight {editor or 'the editor'} writes (the model "
                             f"may have fewer layers): its weights there are {sorted(targets)}; choose among the "
                             f"layers {sorted(have)}")
    return cfg


@hookimpl
def easyedit_layer_candidates(config: Any) -> list[int]:
    return settings(config)["candidates"]


@hookimpl
def easyedit_select_layers(
    editor: str, layers: Sequence[int], context: EditContext, weights: Mapping[str, torch.Tensor],
    trial: Optional[Callable[[Sequence[int]], Mapping[str, torch.Tensor]]],
) -> Optional[list[int]]:
    if NAME not in context.configs:
        return None
    cfg = settings(context.configs[NAME])
    candidates = [layer for layer in cfg["candidates"] if layer in layers]
    missing = sorted(set(cfg["candidates"]) - set(candidates))
    groups = by_layer([n for n, w in weights.items() if w.ndim == 2])
    missing += [layer for layer in candidates if layer not in groups]
    if missing:
        raise ValueError(f"wilke.candidates {sorted(set(missing))} are not layers this step of {editor} may write "
                         f"(candidates of the step: {list(layers)})")
    if cfg["criterion"] == "edit":
        if trial is None:
            raise ValueError("wilke.criterion 'edit' needs the driver's trial runs of the editor (the EasyEdit "
                             "adapter provides them); use criterion: keys with this driver")
        scores = scores_by_edit(candidates, weights, trial)
        if context.keys is not None:  # the cheap criterion on the same state, logged to measure how often it agrees
            context.state[f"{NAME}/keys"] = {"step": context.step,
                                              "scores": scores_by_keys(candidates, weights, context.keys)}
    else:
        if context.keys is None:
            raise ValueError("wilke.criterion 'keys' needs the keys of the step's requests (context.keys), which "
                             "this driver does not provide")
        scores = scores_by_keys(candidates, weights, context.keys)
    chosen = best_layer(scores)
    context.state[NAME] = {"step": context.step, "layer": chosen, "scores": dict(scores)}
    return [chosen]


@hookimpl
def easyedit_edit_step_end(context: EditContext) -> Optional[dict[str, float]]:
    if NAME not in context.configs:
        return None
    choice = context.state.get(NAME)
    if not isinstance(choice, Mapping) or choice.get("step") != context.step:
        return None
    metrics = {f"{NAME}/layer": float(choice["layer"])}
    for layer, score in sorted(choice["scores"].items()):
        if math.isfinite(score):
            metrics[f"{NAME}/score/{layer}"] = float(score)
        metrics[f"{NAME}/chose/{layer}"] = 1.0 if layer == choice["layer"] else 0.0
    beside = context.state.get(f"{NAME}/keys")
    if isinstance(beside, Mapping) and beside.get("step") == context.step:
        keys_layer = best_layer(beside["scores"])
        metrics[f"{NAME}/keys_layer"] = float(keys_layer)
        metrics[f"{NAME}/keys_agrees"] = 1.0 if keys_layer == choice["layer"] else 0.0
        for layer, score in sorted(beside["scores"].items()):
            if math.isfinite(score):
                metrics[f"{NAME}/keys_score/{layer}"] = float(score)
    return metrics
