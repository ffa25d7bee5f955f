"""Collapse point, spectral early warning and lead time of a sequential-editing run, from its metric rows.

Pure functions over the rows of ``metrics.jsonl`` (one dict per checkpoint, ``edits`` = 0 is the pre-edit
row). Rows of older runs may lack any key used here; the functions then report "not measured" instead of
failing.

* **Collapse** is the harness's flag: ``collapsed`` is true once the ME-PPL perplexity reaches
  ``collapse_ppl_ratio`` × the pre-edit perplexity (default 2.0).
* **Early warning** fires at the first checkpoint where, for any edited layer (``spectral/{param}/…``),

  1. ``sigma_max`` / that layer's pre-edit ``sigma_max`` ≥ ``sigma_max_ratio`` (default 1.5), or
  2. ``delta_rel`` = ‖W − W₀‖_F / ‖W₀‖_F ≥ ``delta_rel`` (default 0.5), or
  3. only if ``ss_min`` is given: ``ss`` (mean |u₀ᵢᵀuₜᵢ| of the top-k singular vectors) ≤ ``ss_min``.

  Why these defaults: collapse of locate-then-edit methods comes with runaway norm growth of the edited
  matrices (REVIVE reports "abnormal weight norm growth"; Gupta et al. 2025, "Lifelong knowledge editing
  requires better regularization", trace MEMIT's collapse to it). σ_max is the layer's operator norm: in
  the healthy 100-edit MEMIT runs of docs/results it moved by < 0.2 %, so 1.5× — an edit direction half
  again as large as the largest pretrained one — is far outside normal drift yet well short of the
  several-fold growth seen at collapse. ``delta_rel`` ≥ 0.5 catches the same runaway where it spreads
  over many directions instead of one (σ_max then barely moves): the accumulated edit is then half the
  size of the whole pretrained layer, which no small set of rank-one fact edits comes near. SS is off by
  default because it matches singular vectors by rank and drops when two nearby σ swap order, without
  any damage (see ``spectral.protected_drift``). The thresholds are starting points, not values fitted
  on a collapsing run; every function takes them as arguments.
* **Lead time** = collapse edits − warning edits, at the resolution of the checkpoint schedule
  (``eval_every``): positive when the warning came first.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, NamedTuple, Optional, Sequence

__all__ = ["DEFAULT_DELTA_REL", "DEFAULT_SIGMA_MAX_RATIO", "EarlyWarning", "LeadTime", "collapse_point",
           "collapse_measured", "early_warning", "layer_values", "lead_time", "sigma_max_growth"]

DEFAULT_SIGMA_MAX_RATIO = 1.5
DEFAULT_DELTA_REL = 0.5

Row = dict[str, Any]


@dataclass(frozen=True)
class EarlyWarning:
    """The first checkpoint where a rule fired: which rule, on which layer, with what value."""

    edits: int
    rule: str        # "sigma_max_ratio" | "delta_rel" | "ss_min"
    layer: str       # the edited parameter's name
    value: float     # the measured ratio, delta_rel or ss
    threshold: float

    def describe(self) -> str:
        """Which rule fired and how, e.g. ``sigma_max of model.layers.7.mlp.down_proj.weight at 1.62× its
        pre-edit value (≥ 1.5×)``."""
        if self.rule == "sigma_max_ratio":
            return f"sigma_max of {self.layer} at {self.value:.3g}× its pre-edit value (≥ {self.threshold:g}×)"
        if self.rule == "delta_rel":
            return f"‖W − W₀‖_F / ‖W₀‖_F of {self.layer} at {self.value:.3g} (≥ {self.threshold:g})"
        return f"SS of {self.layer} at {self.value:.3g} (≤ {self.threshold:g})"


class LeadTime(NamedTuple):
    """``edits``: collapse − warning (None when either is absent); ``description``: one line for people."""

    edits: Optional[int]
    description: str


def _number(value: Any) -> Optional[float]:
    # bools are ints in Python; a flag is never a measurement. NaN is "not measured" too.
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        return None
    return float(value)


def layer_values(row: Row, metric: str) -> dict[str, float]:
    """``{param: value}`` of one spectral monitor (``spectral/{param}/{metric}``) in a row."""
    out = {}
    for key, value in row.items():
        if key.startswith("spectral/") and key.endswith("/" + metric):
            v = _number(value)
            if v is not None:
                out[key[len("spectral/"):-len(metric) - 1]] = v
    return out


def _baseline_sigma_max(rows: Sequence[Row]) -> dict[str, float]:
    for row in rows:
        if row.get("edits") == 0:
            return {p: s for p, s in layer_values(row, "sigma_max").items() if s > 0}
    return {}


def sigma_max_growth(rows: Sequence[Row]) -> list[Optional[float]]:
    """Per row, the largest sigma_max / pre-edit sigma_max over edited layers (None without a baseline)."""
    base = _baseline_sigma_max(rows)
    out: list[Optional[float]] = []
    for row in rows:
        ratios = [s / base[p] for p, s in layer_values(row, "sigma_max").items() if p in base]
        out.append(max(ratios) if ratios else None)
    return out


def collapse_measured(rows: Iterable[Row]) -> bool:
    """Whether any row carries the ``collapsed`` flag (runs without perplexity do not)."""
    return any("collapsed" in r for r in rows)


def collapse_point(rows: Sequence[Row]) -> Optional[int]:
    """``edits`` of the first row flagged ``collapsed`` (ppl ≥ ratio × pre-edit ppl); None if never."""
    for row in rows:
        if row.get("collapsed") is True:
            return int(row["edits"])
    return None


def early_warning(rows: Sequence[Row], sigma_max_ratio: float = DEFAULT_SIGMA_MAX_RATIO,
                  delta_rel: float = DEFAULT_DELTA_REL, ss_min: Optional[float] = None) -> Optional[EarlyWarning]:
    """The first checkpoint where a rule of the module docstring fires, or None.

    Rules are tried in the order sigma_max_ratio, delta_rel, ss_min; within the first rule that fires at
    that checkpoint the layer with the most extreme value is reported (deterministic, and the worst one).
    """
    if not sigma_max_ratio > 1:
        raise ValueError(f"sigma_max_ratio must be > 1 (the pre-edit row itself has ratio 1), got {sigma_max_ratio!r}")
    if not delta_rel > 0:
        raise ValueError(f"delta_rel must be > 0 (the pre-edit row itself has delta_rel 0), got {delta_rel!r}")
    if ss_min is not None and not 0 < ss_min < 1:
        raise ValueError(f"ss_min must be in (0, 1) or None (the pre-edit row itself has SS 1), got {ss_min!r}")
    base = _baseline_sigma_max(rows)
    for row in rows:
        edits = int(row["edits"])
        ratios = {p: s / base[p] for p, s in layer_values(row, "sigma_max").items() if p in base}
        fired = {p: r for p, r in ratios.items() if r >= sigma_max_ratio}
        if fired:
            p = max(fired, key=fired.__getitem__)
            return EarlyWarning(edits, "sigma_max_ratio", p, fired[p], sigma_max_ratio)
        fired = {p: d for p, d in layer_values(row, "delta_rel").items() if d >= delta_rel}
        if fired:
            p = max(fired, key=fired.__getitem__)
            return EarlyWarning(edits, "delta_rel", p, fired[p], delta_rel)
        if ss_min is not None:
            fired = {p: s for p, s in layer_values(row, "ss").items() if s <= ss_min}
            if fired:
                p = min(fired, key=fired.__getitem__)
                return EarlyWarning(edits, "ss_min", p, fired[p], ss_min)
    return None


def lead_time(rows: Sequence[Row], sigma_max_ratio: float = DEFAULT_SIGMA_MAX_RATIO,
              delta_rel: float = DEFAULT_DELTA_REL, ss_min: Optional[float] = None) -> LeadTime:
    """Collapse edits − early-warning edits (None when either is absent), with a one-line description."""
    collapse = collapse_point(rows)
    warning = early_warning(rows, sigma_max_ratio=sigma_max_ratio, delta_rel=delta_rel, ss_min=ss_min)
    last = max((int(r["edits"]) for r in rows), default=0)
    warned = f"early warning at {warning.edits} edits ({warning.rule} on {warning.layer})" if warning \
        else "no early warning"
    if collapse is None:
        why = "collapse not measured (no perplexity in these rows)" if not collapse_measured(rows) \
            else f"no collapse in {last} edits"
        return LeadTime(None, f"{warned}; {why}: no lead time")
    if warning is None:
        return LeadTime(None, f"collapse at {collapse} edits with no early warning: no lead time")
    lead = collapse - warning.edits
    if lead > 0:
        tail = f"lead time {lead} edits"
    elif lead == 0:
        tail = "lead time 0 edits (the warning fired at the collapse checkpoint itself)"
    else:
        tail = f"lead time {lead} edits (the warning came after the collapse)"
    return LeadTime(lead, f"{warned}; collapse at {collapse} edits: {tail}")
