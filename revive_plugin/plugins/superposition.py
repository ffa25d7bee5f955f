"""Knowledge-in-Superposition monitor: how much each edit step disturbs the facts edited before it, and how far
the edited facts' keys are from orthogonal. A monitor only: it implements no ``easyedit_transform_delta`` and
never changes an edit; its metrics come from ``easyedit_edit_step_end``.

Source: Hu, Cao, Chen, Liu, Zhao, "Knowledge in Superposition: Unveiling the Failures of Lifelong Knowledge
Editing for Large Language Models" (arXiv:2408.07413); code: github.com/ChenhuiHu/knowledge_in_superposition
(``Compute_PMatrix.py``, ``Compute_Activation_Cos.py``, ``compute.py``).

What the paper derives (restated here in this module's notation)
----------------------------------------------------------------
A locate-then-edit weight is a linear associative memory W k ≈ v with key covariance C. ROME's closed-form
update for one fact (k, v) is

    Ŵ = W + Λ (C⁻¹k)ᵀ,    Λ = (v − W k) / ((C⁻¹k)ᵀ k),                                            (1)

so Ŵ k = v exactly. Editing facts 1, 2, …, n in sequence, each with (1) on the weight the previous edits left,
the output at an earlier fact's key k_i is, by linearity,

    W_n k_i = v_i + Σ_{j>i} Λ_j (C⁻¹k_j)ᵀ k_i = v_i + Σ_{j>i} (v_j − W_{j−1} k_j) · p_ji,            (2)

    p_ji = (C⁻¹k_j)ᵀ k_i / ((C⁻¹k_j)ᵀ k_j)         (the paper's P matrix, ``Compute_PMatrix.py``)    (3)

The sum in (2) is the interference term: it vanishes for every earlier fact only when the keys are orthogonal
(in the C⁻¹ inner product), i.e. when knowledge is not in superposition. The paper measures superposition by
the distribution of normalised inner products between knowledge representations — the cosines

    c_ij = k_i·k_j / (‖k_i‖ ‖k_j‖)                 (``Compute_Activation_Cos.py``; whitened: C⁻¹ inner product)  (4)

— and finds them centred near zero, heavy-tailed and of high kurtosis in every model it studies.

What this monitor logs
----------------------
Per edited weight W (every 2-D weight the step changed), at step t, with K_t the keys of the step's requests
(``context.keys``, evaluated before the editor ran; ``revive_plugin.adapters.keys``), ΔW_t the **final** delta
written (after every transform: REVIVE's, RECT's, …) and M the memory of earlier edited keys of W, each k_i kept
with a_i = ‖ΔW_{s(i)} k_i‖, the output change its own step s(i) < t made at it:

* ``superposition/<W>/interference`` = sqrt( Σ_{i∈M} ‖ΔW_t k_i‖² / Σ_{i∈M} a_i² ) — the step's output change at the
  earlier facts' keys, relative to the change their own edits made there (root-mean-square over M; 0 when the
  step is orthogonal to every earlier key, 1 when it moves them as much as their own edits did). This is the
  t-th summand of (2) measured directly on the written delta, for any editor.
* ``superposition/<W>/leakage`` = RMS_{i∈M} ‖ΔW_t k_i‖ / RMS_{j∈step} ‖ΔW_t k_j‖ — the same change relative to the
  step's change at its own keys. For a rank-one update (1) and one earlier key it is exactly |p_ti| of (3), read
  off the delta without knowing C.
* over the memory after the step (M with step t's keys), the pairwise cosines (4), i < j:
  ``mean_cos`` = mean c; ``kurtosis`` = m₄ / m₂² with m_r = mean (c − mean c)^r (Pearson's: 3 for a normal
  distribution, higher for a heavy-tailed one); ``tail_mass`` = share of pairs with |c − mean c| > tail_sigma·√m₂
  (0.0027 for a normal distribution at 3σ);
* ``superposition/<W>/keys`` = |M| after the step;
* ``superposition/<metric>`` (no weight): the mean over the step's weights that have that metric.

A metric without a value is left out (no NaN): interference and leakage at a weight's first step (no earlier
keys) or with a zero denominator; kurtosis and tail_mass without spread (fewer than 2 distinct cosines).

Where this monitor chose (the paper fixes none of these for a monitor)
----------------------------------------------------------------------
* Keys: the adapter's (the request's own prompt, subject's last token, no context templates), kept as they were
  at their own step — the fixed-key view of (2) — not recomputed as later edits change the layers below.
* Activation-space cosines only: the whitened ones (C⁻¹) need the editor's covariance, which plugins do not see.
* Interference relative to the earlier facts' own edits (the issue's wording), as a ratio of root-mean-squares: a
  per-key ratio would explode on a key its own step barely moved. Leakage is logged beside it for the link to P.
* Kurtosis is Pearson's (not excess); tails are counted in standard deviations from the mean.
* The memory keeps the ``max_keys`` most recent edited keys per weight (first in, first out).

Settings (the ``superposition:`` block of the hparams YAML, or ``plugins: {superposition: {...}}`` with
``monitors: [superposition]`` in a run config; an empty ``superposition:`` line takes the defaults)::

    superposition:
      max_keys: 2000     # edited keys kept per weight (≥ 2); memory and cost grow with it (n² cosines per step)
      tail_sigma: 3      # tail_mass counts cosines further than this many standard deviations from their mean

State: per weight, the memory's keys (float32, n × d_in), their a_i (float64) and the step each was added at, in
``context.state["superposition"]``, saved to and restored from checkpoints through the state hooks. Rows of a step
that was refused after this plugin ran are dropped when the step index is used again (the host does not advance
its step counter on a refused step), so a rolled-back edit leaves no keys behind.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import torch

from revive_plugin.hookspecs import EditContext, hookimpl

NAME = "superposition"
DEFAULT_MAX_KEYS = 2000
DEFAULT_TAIL_SIGMA = 3.0
#: Metrics of one weight, in the order they are reported.
METRICS = ("interference", "leakage", "mean_cos", "kurtosis", "tail_mass", "keys")


def settings(config: Any) -> dict:
    """The validated ``superposition:`` block (None → defaults): ``{"max_keys": int, "tail_sigma": float}``."""
    config = {} if config is None else config
    if not isinstance(config, Mapping):
        raise ValueError(f"the superposition block must be a mapping such as {{max_keys: 2000}}, got {config!r}")
    unknown = sorted(set(config) - {"max_keys", "tail_sigma"})
    if unknown:
        raise ValueError(f"unknown superposition setting(s) {unknown}; the settings are `max_keys` (edited keys kept "
                         "per weight) and `tail_sigma` (tail threshold in standard deviations)")
    max_keys = config.get("max_keys", DEFAULT_MAX_KEYS)
    if isinstance(max_keys, bool) or not isinstance(max_keys, int) or max_keys < 2:
        raise ValueError(f"superposition.max_keys must be an integer >= 2, the edited keys kept per weight "
                         f"(default {DEFAULT_MAX_KEYS}), got {max_keys!r}")
    tail = config.get("tail_sigma", DEFAULT_TAIL_SIGMA)
    if isinstance(tail, bool) or not isinstance(tail, (int, float)) or not math.isfinite(tail) or tail <= 0:
        raise ValueError(f"superposition.tail_sigma must be a number > 0, the tail threshold in standard deviations "
                         f"(default {DEFAULT_TAIL_SIGMA:g}), got {tail!r}")
    return {"max_keys": max_keys, "tail_sigma": float(tail)}


# -- the measures, on plain tensors ------------------------------------------------------------------------
def output_changes(delta: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """‖ΔW k‖ for each row k of ``keys`` (n × d_in; ΔW out × d_in), in float64."""
    return torch.linalg.vector_norm(keys.double() @ delta.double().T, dim=1)


def interference(delta: torch.Tensor, old_keys: torch.Tensor, old_own: torch.Tensor) -> Optional[float]:
    """sqrt(Σᵢ ‖ΔW kᵢ‖² / Σᵢ aᵢ²) over the earlier keys, or None without earlier keys or with Σ aᵢ² = 0."""
    if old_keys.shape[0] == 0:
        return None
    den = float((old_own.double() ** 2).sum())
    if den == 0:
        return None
    return math.sqrt(float((output_changes(delta, old_keys) ** 2).sum()) / den)


def leakage(delta: torch.Tensor, old_keys: torch.Tensor, new_keys: torch.Tensor) -> Optional[float]:
    """RMS ‖ΔW kᵢ‖ over the earlier keys / RMS ‖ΔW kⱼ‖ over the step's own, or None (no earlier keys, or 0)."""
    if old_keys.shape[0] == 0 or new_keys.shape[0] == 0:
        return None
    den = float((output_changes(delta, new_keys) ** 2).mean())
    if den == 0:
        return None
    return math.sqrt(float((output_changes(delta, old_keys) ** 2).mean()) / den)


def unit_rows(keys: torch.Tensor) -> torch.Tensor:
    """Each key divided by its norm, in float64 (a zero key stays zero)."""
    k = keys.double()
    return k / torch.linalg.vector_norm(k, dim=1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)


def cosine_stats(cosines: torch.Tensor, tail_sigma: float = DEFAULT_TAIL_SIGMA) -> dict[str, float]:
    """mean_cos, kurtosis (m₄/m₂²) and tail_mass (share with |c − mean| > tail_sigma·√m₂) of pairwise cosines;
    kurtosis and tail_mass only when m₂ > 0, nothing for no pairs."""
    c = cosines.double().reshape(-1)
    if c.numel() == 0:
        return {}
    mean = c.mean()
    centred = c - mean
    m2 = float((centred ** 2).mean())
    out = {"mean_cos": float(mean)}
    if m2 > 0:
        out["kurtosis"] = float((centred ** 4).mean()) / (m2 * m2)
        out["tail_mass"] = float((centred.abs() > tail_sigma * math.sqrt(m2)).double().mean())
    return out


def pair_cosines(gram: torch.Tensor) -> torch.Tensor:
    """The entries above the diagonal of a cosine (Gram) matrix: one per pair i < j."""
    m = gram.shape[0]
    return gram[torch.triu(torch.ones(m, m, dtype=torch.bool, device=gram.device), diagonal=1)]


# -- the per-weight memory ---------------------------------------------------------------------------------
@dataclass
class Memory:
    """Edited keys of one weight: keys (n × d_in), their own step's output change aᵢ, the step that added them."""

    keys: torch.Tensor
    own: torch.Tensor
    steps: torch.Tensor
    gram: Optional[torch.Tensor] = None  # cosines of the keys (n × n, float64), rebuilt when missing

    @classmethod
    def empty(cls, d_in: int, dtype: torch.dtype = torch.float32, device: Any = None) -> "Memory":
        return cls(torch.zeros(0, d_in, dtype=dtype, device=device), torch.zeros(0, dtype=torch.float64, device=device),
                   torch.zeros(0, dtype=torch.int64, device=device), torch.zeros(0, 0, dtype=torch.float64,
                                                                                 device=device))

    def __len__(self) -> int:
        return int(self.keys.shape[0])

    def to(self, device: Any) -> "Memory":
        if self.keys.device != torch.device(device):
            self.keys, self.own, self.steps = self.keys.to(device), self.own.to(device), self.steps.to(device)
            self.gram = self.gram.to(device) if self.gram is not None else None
        return self

    def _keep(self, rows: torch.Tensor) -> None:
        self.keys, self.own, self.steps = self.keys[rows], self.own[rows], self.steps[rows]
        if self.gram is not None:
            self.gram = self.gram[rows][:, rows]

    def drop_from(self, step: int) -> None:
        """Forget the keys of steps ≥ ``step`` (a refused step whose index is being used again)."""
        if len(self) and bool((self.steps >= step).any()):
            self._keep(self.steps < step)

    def keep_last(self, n: int) -> None:
        """Keep the ``n`` most recent keys."""
        if len(self) > n:
            self._keep(torch.arange(len(self) - n, len(self), device=self.keys.device))

    def add(self, keys: torch.Tensor, own: torch.Tensor, step: int) -> None:
        new_units = unit_rows(keys)
        if self.gram is None:
            self.gram = unit_rows(self.keys) @ unit_rows(self.keys).T
        cross = unit_rows(self.keys) @ new_units.T
        self.gram = torch.cat([torch.cat([self.gram, cross], 1), torch.cat([cross.T, new_units @ new_units.T], 1)])
        self.keys = torch.cat([self.keys, keys.to(self.keys.dtype)])
        self.own = torch.cat([self.own, own.double()])
        self.steps = torch.cat([self.steps, torch.full((keys.shape[0],), step, dtype=torch.int64,
                                                       device=self.steps.device)])

    def last_gram(self, n: int) -> torch.Tensor:
        """Cosines among the ``n`` most recent keys."""
        if self.gram is None:
            self.gram = unit_rows(self.keys) @ unit_rows(self.keys).T
        return self.gram[-n:, -n:] if n < len(self) else self.gram


@dataclass
class SuperpositionState:
    """The monitor's per-model state: a memory per weight, and whether a missing ``context.keys`` was reported."""

    memories: dict[str, Memory] = field(default_factory=dict)
    warned: bool = False

    def tensors(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for name, mem in self.memories.items():
            out[f"{name}::keys"] = mem.keys
            out[f"{name}::own"] = mem.own
            out[f"{name}::steps"] = mem.steps
        return out

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, Any]) -> "SuperpositionState":
        state = cls()
        for name in sorted({key.rsplit("::", 1)[0] for key in tensors}):
            keys, own, steps = (tensors.get(f"{name}::{part}") for part in ("keys", "own", "steps"))
            if not all(isinstance(t, torch.Tensor) for t in (keys, own, steps)):
                raise ValueError(f"{name!r} needs the tensors '{name}::keys', '{name}::own' and '{name}::steps'")
            if keys.ndim != 2 or own.ndim != 1 or steps.ndim != 1 or not own.shape[0] == steps.shape[0] == keys.shape[0]:
                raise ValueError(f"{name!r}: keys must be n × d_in and own, steps n long; got {tuple(keys.shape)}, "
                                 f"{tuple(own.shape)}, {tuple(steps.shape)}")
            if not torch.isfinite(keys).all() or not torch.isfinite(own).all() or steps.is_floating_point():
                raise ValueError(f"{name!r}: keys and own must be finite, steps integers")
            state.memories[name] = Memory(keys, own.double(), steps.long())
        return state


def _state(context_state: dict[str, Any]) -> SuperpositionState:
    state = context_state.get(NAME)
    if not isinstance(state, SuperpositionState):
        state = context_state[NAME] = SuperpositionState()
    return state


def step_metrics(memory: Memory, keys: torch.Tensor, delta: torch.Tensor, step: int, max_keys: int,
                 tail_sigma: float = DEFAULT_TAIL_SIGMA) -> dict[str, float]:
    """One weight's metrics at a step (see the module docstring); adds the step's keys to ``memory``."""
    memory.to(delta.device)
    memory.drop_from(step)
    memory.keep_last(max_keys)
    keys = keys.to(device=delta.device)
    out: dict[str, float] = {}
    for metric, value in (("interference", interference(delta, memory.keys, memory.own)),
                          ("leakage", leakage(delta, memory.keys, keys))):
        if value is not None:
            out[metric] = value
    memory.add(keys, output_changes(delta, keys), step)
    n = min(len(memory), max_keys)
    out.update(cosine_stats(pair_cosines(memory.last_gram(n)), tail_sigma))
    out["keys"] = float(n)
    return out


# -- hooks -------------------------------------------------------------------------------------------------
@hookimpl
def easyedit_validate_config(config: Any) -> dict:
    return settings(config)


@hookimpl
def easyedit_edit_step_end(context: EditContext, deltas: Mapping[str, torch.Tensor]) -> Optional[dict[str, float]]:
    if NAME not in context.configs:
        return None
    cfg = settings(context.configs[NAME])
    state = _state(context.state)
    for memory in state.memories.values():
        memory.drop_from(context.step)  # rows of a refused attempt at this step index
    if context.keys is None:
        if not state.warned:
            state.warned = True
            warnings.warn("the superposition monitor needs the keys of a step's requests (context.keys), which this "
                          "driver does not provide; it logs nothing", RuntimeWarning, stacklevel=2)
        return None
    metrics: dict[str, float] = {}
    per_metric: dict[str, list[float]] = {}
    for name, delta in deltas.items():
        if delta.ndim != 2:
            continue
        keys = context.keys(name)
        memory = state.memories.setdefault(name, Memory.empty(keys.shape[1], keys.dtype, delta.device))
        if memory.keys.shape[1] != keys.shape[1]:
            raise ValueError(f"keys of {name!r} have {keys.shape[1]} columns; the monitor's earlier keys have "
                             f"{memory.keys.shape[1]}")
        values = step_metrics(memory, keys, delta, context.step, cfg["max_keys"], cfg["tail_sigma"])
        for metric in METRICS:
            if metric in values:
                metrics[f"{NAME}/{name}/{metric}"] = values[metric]
                per_metric.setdefault(metric, []).append(values[metric])
    for metric, values in per_metric.items():
        metrics[f"{NAME}/{metric}"] = sum(values) / len(values)
    return metrics


@hookimpl
def easyedit_state_save(state: Mapping[str, Any]) -> Optional[dict[str, torch.Tensor]]:
    mine = state.get(NAME)
    if not isinstance(mine, SuperpositionState) or not mine.memories:
        return None
    return mine.tensors()


@hookimpl
def easyedit_state_load(state: dict[str, Any], tensors: Mapping[str, Any], weights: Mapping[str, torch.Tensor]) -> None:
    restored = SuperpositionState.from_tensors(tensors)
    for name, memory in restored.memories.items():
        if name not in weights:
            raise ValueError(f"it holds keys of {name!r}, which is not an edited matrix of this model")
        if weights[name].ndim != 2 or memory.keys.shape[1] != weights[name].shape[1]:
            raise ValueError(f"the keys of {name!r} have {memory.keys.shape[1]} entries; the weight is "
                             f"{tuple(weights[name].shape)} (out × in): keys must have its input size")
    state[NAME] = restored
