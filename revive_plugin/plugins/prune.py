"""PRUNE as a ΔW transform: restrain the large singular values of the accumulated edit.

PRUNE ("Perturbation-Restrained Sequential Model Editing", Ma et al., ICLR 2025; code: mjy1111/PRUNE,
``PRUNE.reduce_weights`` with ``func_log``/``func_logn``) bounds the condition number of an edited matrix. With
W₀ the unedited weight, s₀ = σ_max(W₀) and the accumulated edit Δ = W_t − W₀ = Σ σᵢ uᵢ vᵢᵀ, every singular value
σᵢ ≥ s₀ of Δ is replaced by

    f(σ) = log_α(σ) − log_α(s₀) + s₀

(σᵢ < s₀ untouched, singular vectors unchanged). α = e is the source's ``log`` variant, 1.2, 1.5 and 2 its
``log1_2``, ``log1_5``, ``log2`` (the repository's ``PRUNE`` class defaults to ``log1_2``). f(s₀) = s₀ and
f′(σ) = 1/(σ ln α), so f(σ) < σ for σ > s₀ only where s₀ ≥ 1/ln α (≈ 5.5 for α = 1.2, 1 for α = e); on a
matrix with a smaller σ_max(W₀) (a tiny test model) f enlarges singular values just above s₀, as the source
would. SmolLM2-135M's edited down_proj weights have σ_max ≈ 22–27.

The official code applies f once, after all edits. This plugin applies it at every edit step to the
accumulated edit — the *sequential form*: the step's delta is replaced by

    delta_out = prune(W_before + delta − W₀) − (W_before − W₀)

so that after the step W₀ + Δ_accumulated is the pruned matrix. A direction that stays above s₀ is mapped
again at the next step (f is not idempotent), so the sequential form pulls the top singular values of the
accumulated edit towards s₀ faster than one application at the end. The source also truncates Δ to its
numerical rank before rebuilding it; here components with σ < s₀ are left exactly as they are (only the
mapped ones are subtracted), which differs from that by the discarded ~0 singular values only.

State: W₀ (a copy of the weight, in its dtype) and s₀ per parameter, cached the first time the plugin sees the
parameter change (its ``weight`` argument is then W_before), in ``context.state["prune"]``; saved to and
restored from checkpoints through ``easyedit_state_save``/``easyedit_state_load``. Cost per changed matrix and
step: one thin SVD of the accumulated edit in float64 (and one σ_max when W₀ is cached).

Settings (the ``prune:`` block; an empty ``prune:`` line takes the defaults)::

    prune:
      alpha: e   # base of the logarithm: e (default), or a number > 1 (the paper's variants: 1.2, 1.5, 2)

Without a ``prune:`` block the plugin does nothing. Order with REVIVE: ``[prune, revive]`` projects the pruned
step delta (REVIVE's invariant holds exactly; the singular values of the final accumulated edit are at most
those of the pruned one, as the projection is a contraction); ``[revive, prune]`` prunes the projected
accumulated edit, whose singular vectors lie outside W₀'s protected subspace, so the invariant holds there too
(up to rounding) and the accumulated edit is exactly the pruned one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import torch

from revive_plugin.hookspecs import EditContext, hookimpl

NAME = "prune"
DEFAULT_ALPHA = math.e


def settings(config: Any) -> dict:
    """The validated ``prune:`` block (None → defaults): ``{"alpha": float}`` (``e`` becomes math.e)."""
    config = {} if config is None else config
    if not isinstance(config, Mapping):
        raise ValueError(f"the prune block must be a mapping such as {{alpha: e}}, got {config!r}")
    unknown = sorted(set(config) - {"alpha"})
    if unknown:
        raise ValueError(f"unknown prune setting(s) {unknown}; the only setting is `alpha` (base of the logarithm)")
    alpha = config.get("alpha", DEFAULT_ALPHA)
    if alpha == "e":
        alpha = math.e
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 1:
        raise ValueError(f"prune.alpha must be e or a number > 1, the base of the logarithm (e is the default; "
                         f"1.2, 1.5 and 2 are the paper's variants), got {alpha!r}")
    return {"alpha": float(alpha)}


def restrain(sigma: torch.Tensor, sigma0: float, alpha: float = DEFAULT_ALPHA) -> torch.Tensor:
    """f(σ) = log_α(σ) − log_α(s₀) + s₀ where σ ≥ s₀, σ elsewhere."""
    mapped = torch.log(sigma.clamp_min(sigma0)) / math.log(alpha) - math.log(sigma0) / math.log(alpha) + sigma0
    return torch.where(sigma >= sigma0, mapped, sigma)


def prune_matrix(delta: torch.Tensor, sigma0: float, alpha: float = DEFAULT_ALPHA) -> tuple[torch.Tensor, int]:
    """(Δ with every singular value σ ≥ s₀ replaced by f(σ), how many were), in float64.

    Only the mapped components change: Δ − Σ_{σᵢ ≥ s₀} (σᵢ − f(σᵢ)) uᵢ vᵢᵀ.
    """
    d = delta.double()
    if sigma0 <= 0 or not math.isfinite(sigma0):
        raise ValueError(f"σ_max(W₀) must be a positive number, got {sigma0!r}")
    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    big = s >= sigma0
    count = int(big.sum())
    if count == 0:
        return d, 0
    shrink = s[big] - restrain(s[big], sigma0, alpha)
    return d - (u[:, big] * shrink) @ vh[big], count


def sequential_delta(delta: torch.Tensor, weight: torch.Tensor, w0: torch.Tensor, sigma0: float,
                     alpha: float = DEFAULT_ALPHA) -> tuple[torch.Tensor, int]:
    """(delta_out, how many singular values were mapped): W_before + delta_out − W₀ = prune(W_before + delta − W₀)."""
    before = weight.double() - w0.double()
    pruned, count = prune_matrix(before + delta.double(), sigma0, alpha)
    return pruned - before, count


@dataclass
class PruneState:
    """PRUNE's per-model state: W₀ and σ_max(W₀) by parameter name, and the current step's metrics."""

    w0: dict[str, torch.Tensor] = field(default_factory=dict)
    sigma0: dict[str, float] = field(default_factory=dict)
    step: dict[str, float] = field(default_factory=dict)

    def observe(self, name: str, weight: torch.Tensor) -> None:
        """Cache ``weight`` as W₀ of ``name`` at first sight (a shape change afterwards is an error)."""
        if name not in self.w0:
            self.w0[name] = weight.detach().clone()
            self.sigma0[name] = float(torch.linalg.matrix_norm(weight.detach().double(), ord=2))
        elif self.w0[name].shape != weight.shape:
            raise ValueError(f"parameter {name!r} has shape {tuple(weight.shape)} but PRUNE's W₀ was cached with "
                             f"{tuple(self.w0[name].shape)}")

    def tensors(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for name, w0 in self.w0.items():
            out[f"{name}::w0"] = w0
            out[f"{name}::sigma0"] = torch.tensor(self.sigma0[name], dtype=torch.float64)
        return out

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, Any]) -> "PruneState":
        state = cls()
        names = sorted({key.rsplit("::", 1)[0] for key in tensors})
        for name in names:
            w0, s0 = tensors.get(f"{name}::w0"), tensors.get(f"{name}::sigma0")
            if not isinstance(w0, torch.Tensor) or not isinstance(s0, torch.Tensor):
                raise ValueError(f"{name!r} needs both '{name}::w0' and '{name}::sigma0' tensors")
            if w0.ndim != 2 or s0.numel() != 1 or not (float(s0) > 0) or not torch.isfinite(w0).all():
                raise ValueError(f"{name!r}: W₀ must be a finite matrix and σ_max(W₀) a positive number")
            state.w0[name], state.sigma0[name] = w0, float(s0)
        return state


def _state(context_state: dict[str, Any]) -> PruneState:
    state = context_state.get(NAME)
    if not isinstance(state, PruneState):
        state = context_state[NAME] = PruneState()
    return state


@hookimpl
def easyedit_validate_config(config: Any) -> dict:
    return settings(config)


@hookimpl
def easyedit_edit_step_start(context: EditContext) -> None:
    if NAME in context.configs and isinstance(context.state.get(NAME), PruneState):
        context.state[NAME].step = {}  # metrics of a refused step are not carried into this one


@hookimpl
def easyedit_transform_delta(
    name: str, delta: torch.Tensor, weight: torch.Tensor, context: EditContext
) -> Optional[torch.Tensor]:
    if NAME not in context.configs:
        return None
    alpha = settings(context.configs[NAME])["alpha"]
    state = _state(context.state)
    state.observe(name, weight)
    w0 = state.w0[name].to(device=weight.device)
    out, count = sequential_delta(delta, weight, w0, state.sigma0[name], alpha)
    state.step[f"prune/{name}/mapped"] = float(count)
    if count == 0:
        return None  # nothing reaches σ_max(W₀): the editor's delta stays bit for bit
    return out.to(dtype=delta.dtype)


@hookimpl
def easyedit_edit_step_end(context: EditContext) -> Optional[dict[str, float]]:
    if NAME not in context.configs:
        return None
    state = _state(context.state)
    metrics, state.step = state.step, {}
    return metrics


@hookimpl
def easyedit_state_save(state: Mapping[str, Any]) -> Optional[dict[str, torch.Tensor]]:
    prune_state = state.get(NAME)
    if not isinstance(prune_state, PruneState) or not prune_state.w0:
        return None
    return prune_state.tensors()


@hookimpl
def easyedit_state_load(state: dict[str, Any], tensors: Mapping[str, Any],
                        weights: Mapping[str, torch.Tensor]) -> None:
    restored = PruneState.from_tensors(tensors)
    for name, w0 in restored.w0.items():
        if name not in weights:
            raise ValueError(f"it holds W₀ of {name!r}, which is not an edited matrix of this model")
        if tuple(w0.shape) != tuple(weights[name].shape) or w0.dtype != weights[name].dtype:
            raise ValueError(f"W₀ of {name!r} is {tuple(w0.shape)} {w0.dtype}, the model's weight is "
                             f"{tuple(weights[name].shape)} {weights[name].dtype}")
    state[NAME] = restored
