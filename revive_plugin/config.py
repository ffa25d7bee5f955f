"""ReviveConfig: the validated settings of the REVIVE filter, built from a dict or a YAML mapping."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence, Union

BASES = ("original", "current")
SVD_METHODS = ("full", "randomized")  # how protected_basis computes Uₖ, Vₖ

LayerSelector = Union[int, str]


def selector_matches(sel: LayerSelector, name: str, layer: Optional[int]) -> bool:
    """Whether one ``layers`` entry selects parameter ``name`` (in layer ``layer``, if known): a layer index,
    or a parameter name given exactly, as its module name, or as a module-name prefix."""
    if isinstance(sel, int):
        return layer is not None and layer == sel
    return name == sel or name.startswith(sel.rstrip(".") + ".")


@dataclass(frozen=True)
class ReviveConfig:
    """Settings of the REVIVE filter.

    tau:     share of the singular-value mass (σ, not σ²) to protect, 0 < tau ≤ 1 (paper default 0.1;
             useful range 0.05–0.30).
    basis:   "original" — the subspace of W₀, the weight as first seen, cached once per parameter;
             "current"  — the subspace of the weight at each step.
    layers:  optional subset to filter: parameter names (exact, or a module name prefix) and/or layer
             indices; None filters every edited weight.
    enabled: False turns the filter into a no-op without removing the block.
    svd:     "full" (exact SVD) or "randomized" (exact σ for k, then a seeded randomized range finder for
             Uₖ, Vₖ; faster where k ≪ min(m, n), e.g. 4096×14336 weights at τ = 0.1).
    in_loop: True filters each layer's update inside a MEMIT-style editor's layer loop, so that later layers
             are solved against the filtered update of earlier ones (the adapter does it; editors without
             such a loop refuse it). False: the whole step's ΔW is filtered after the editor, as in the paper.
    in_solve: True puts REVIVE's key-side projector inside the editor's least-squares solve, the way AlphaEdit
             puts its null-space projector there: editors whose solve is regularised by covariance statistics
             (MEMIT, PMET, EMMET, ROME with mom2_adjustment, …) are solved with ΔW·Vₖ = 0 as a constraint
             instead of having that part cut afterwards (the adapter does it; other editors refuse it). The
             output side is still projected after the editor: for a least-squares layer objective that
             projection of the solve's result is already the constrained optimum.
    """

    tau: float = 0.1
    basis: str = "original"
    layers: Optional[tuple[LayerSelector, ...]] = None
    enabled: bool = True
    svd: str = "full"
    in_loop: bool = False
    in_solve: bool = False

    def __post_init__(self) -> None:
        tau = self.tau
        if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not (0.0 < float(tau) <= 1.0):
            raise ValueError(f"revive.tau must be a number with 0 < tau <= 1 (e.g. 0.1), got {tau!r}")
        object.__setattr__(self, "tau", float(tau))
        if self.basis not in BASES:
            raise ValueError(f"revive.basis must be one of {list(BASES)}, got {self.basis!r}")
        if self.svd not in SVD_METHODS:
            raise ValueError(f"revive.svd must be one of {list(SVD_METHODS)}, got {self.svd!r}")
        for flag in ("in_loop", "in_solve", "enabled"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"revive.{flag} must be true or false, got {getattr(self, flag)!r}")
        if self.layers is not None:
            layers = self.layers
            if isinstance(layers, (int, str)):
                layers = (layers,)
            if not isinstance(layers, Sequence) or isinstance(layers, (bytes, bytearray)):
                raise ValueError(f"revive.layers must be a list of layer indices or parameter names, got {layers!r}")
            for item in layers:
                if isinstance(item, bool) or not isinstance(item, (int, str)):
                    raise ValueError(
                        f"revive.layers entries must be layer indices (int) or parameter names (str), got {item!r}"
                    )
            object.__setattr__(self, "layers", tuple(layers))

    @classmethod
    def from_dict(cls, data: Optional[Mapping[str, Any]]) -> "ReviveConfig":
        """Build from a mapping such as the ``revive:`` block of an hparams YAML (None → defaults)."""
        if data is None:
            return cls()
        if isinstance(data, cls):
            return data
        if not isinstance(data, Mapping):
            raise ValueError(f"the revive block must be a mapping of settings, got {type(data).__name__}: {data!r}")
        allowed = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(allowed))
        if unknown:
            raise ValueError(f"unknown revive setting(s) {unknown}; allowed keys are {allowed}")
        kwargs = dict(data)
        if isinstance(kwargs.get("layers"), list):
            kwargs["layers"] = tuple(kwargs["layers"])
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (YAML/JSON-safe)."""
        d = dataclasses.asdict(self)
        d["layers"] = list(self.layers) if self.layers is not None else None
        return d

    def selects(self, name: str, layer: Optional[int]) -> bool:
        """Whether the parameter ``name`` (in layer ``layer``, if known) is to be filtered."""
        if not self.enabled:
            return False
        if self.layers is None:
            return True
        return any(selector_matches(sel, name, layer) for sel in self.layers)

    def unmatched_layers(self, targets: Mapping[str, Optional[int]]) -> list[LayerSelector]:
        """Entries of ``layers`` that select none of ``targets`` (parameter name → its layer index or None)."""
        if self.layers is None:
            return []
        return [sel for sel in self.layers
                if not any(selector_matches(sel, name, layer) for name, layer in targets.items())]

    def check_layers(self, targets: Mapping[str, Optional[int]], editor: Optional[str] = None) -> None:
        """Refuse ``layers`` entries that select none of the weights the editor writes (``targets``: parameter
        name → layer index): such an entry would make REVIVE filter nothing there, silently."""
        missing = self.unmatched_layers(targets)
        if not missing:
            return
        who = editor or "the editor"
        if not targets:
            raise ValueError(f"revive.layers is {list(self.layers or ())}, but {who} writes no weight matrix; "
                             "remove revive.layers")
        indices = sorted({layer for layer in targets.values() if layer is not None})
        raise ValueError(
            f"revive.layers entries {missing} select none of the weights {who} writes, so REVIVE would filter "
            f"nothing there; it writes layers {indices}: {sorted(targets)}. Use those layer indices or parameter "
            "names in revive.layers, or remove revive.layers to filter every edited weight"
        )

    def replace(self, **changes: Any) -> "ReviveConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

