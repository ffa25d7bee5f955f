"""ReviveFilter: per-parameter cached protected bases, the filter call, spectral monitors, checkpointing."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Union

import torch

from .config import ReviveConfig
from .spectral import (
    ProtectedBasis,
    project_out,
    project_out_factors,
    protected_basis,
    protected_drift,
    subspace_overlap,
    top_singular_vectors,
    vector_similarity,
)


class ReviveFilter:
    """Stateful REVIVE filter for one model.

    For each parameter it keeps only Uₖ, Vₖ (and the top-k σ) of the weight as first seen (W₀):
    the basis used with ``basis="original"`` and the reference of the drift monitors.
    """

    def __init__(self, config: Union[ReviveConfig, dict, None] = None):
        self.config = ReviveConfig.from_dict(config) if not isinstance(config, ReviveConfig) else config
        self._reference: dict[str, ProtectedBasis] = {}
        # basis="current": the last weight each basis was computed from, so the solve (revive.in_solve) and the
        # filter of the same step share one SVD of the same pre-step weight.
        self._current: dict[str, tuple[torch.Tensor, ProtectedBasis]] = {}

    # -- bases -----------------------------------------------------------------------------------
    def reference(self, name: str) -> Optional[ProtectedBasis]:
        """The cached W₀ basis of ``name``, or None if the parameter was never seen."""
        return self._reference.get(name)

    def observe(self, name: str, weight: torch.Tensor) -> ProtectedBasis:
        """Cache W₀'s basis for ``name`` at first sight (no-op afterwards); returns it."""
        basis = self._reference.get(name)
        if basis is None:
            basis = protected_basis(weight, self.config.tau, self.config.svd)
            self._reference[name] = basis
            if self.config.basis == "current":  # W₀ is also the first step's current weight: one SVD, not two
                self._current[name] = (weight.detach().clone(), basis)
        elif tuple(weight.shape) != (basis.u.shape[0], basis.v.shape[0]):
            raise ValueError(
                f"parameter {name!r} has shape {tuple(weight.shape)} but its cached basis was built for "
                f"{(basis.u.shape[0], basis.v.shape[0])}; call reset() if the model changed"
            )
        return basis

    def basis_for(self, name: str, weight: torch.Tensor) -> ProtectedBasis:
        """The basis that filters a delta of ``name`` now (cached W₀ or the current weight's)."""
        reference = self.observe(name, weight)
        if self.config.basis == "original":
            return reference
        last = self._current.get(name)
        if last is not None and torch.equal(last[0], weight.detach()):  # False also for another shape
            return last[1]
        basis = protected_basis(weight, self.config.tau, self.config.svd)
        self._current[name] = (weight.detach().clone(), basis)
        return basis

    def reconfigured(self, config: ReviveConfig) -> "ReviveFilter":
        """A filter with ``config`` that keeps this one's W₀ bases when τ (and so every k) is unchanged."""
        filt = ReviveFilter(config)
        if config.tau == self.config.tau:
            filt._reference = dict(self._reference)
        return filt

    def reset(self) -> None:
        """Forget every cached basis (the next weight seen becomes W₀)."""
        self._reference.clear()
        self._current.clear()

    # -- filtering -------------------------------------------------------------------------------
    def selects(self, name: str, layer: Optional[int] = None) -> bool:
        """Whether this filter acts on parameter ``name``."""
        return self.config.selects(name, layer)

    def filter(self, name: str, delta: torch.Tensor, weight: torch.Tensor, layer: Optional[int] = None) -> torch.Tensor:
        """Safe version of ``delta`` for parameter ``name`` whose weight before the update is ``weight``.

        Both out×in. Parameters outside ``config.layers`` (or a disabled filter) get ``delta`` back unchanged.
        """
        if delta.shape != weight.shape:
            raise ValueError(f"delta shape {tuple(delta.shape)} != weight shape {tuple(weight.shape)} for {name!r}")
        if not self.selects(name, layer):
            return delta
        if not torch.isfinite(delta).all():
            raise ValueError(f"delta for {name!r} has non-finite entries (NaN/inf)")
        return project_out(delta, self.basis_for(name, weight))

    def filter_factors(
        self, name: str, left: torch.Tensor, right: torch.Tensor, weight: torch.Tensor, layer: Optional[int] = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Safe factors of ΔW = left @ rightᵀ (O((m+n)·k·r), no dense delta is formed)."""
        if not self.selects(name, layer):
            return left, right
        return project_out_factors(left, right, self.basis_for(name, weight))

    # -- monitors --------------------------------------------------------------------------------
    def monitor(self, name: str, weight: torch.Tensor, initial: Optional[torch.Tensor] = None) -> dict[str, float]:
        """Drift of ``name``'s dominant subspace from W₀ to the current ``weight``.

        Returns ls (‖U₀ₖᵀUₜₖ‖²_F / k), ss (mean |u₀ᵢᵀuₜᵢ|, i ≤ k), fro_norm, sigma_max and k (of W₀); given
        ``initial`` (W₀ itself), also the protected-subspace measures of ``spectral.protected_drift``.
        The first call for a parameter makes ``weight`` its W₀.
        """
        reference = self.observe(name, weight)
        ut, s, _ = top_singular_vectors(weight, reference.k)
        u0 = reference.u.to(ut.device)
        return {
            "ls": subspace_overlap(u0, ut),
            "ss": vector_similarity(u0, ut),
            "fro_norm": float(torch.linalg.vector_norm(weight.detach().double())),
            "sigma_max": float(s[0]) if s.numel() else 0.0,
            "k": int(reference.k),
            **(protected_drift(reference, weight, initial) if initial is not None else {}),
        }

    # -- checkpointing ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors of the cached bases: ``{name}::u``, ``{name}::v``, ``{name}::s`` (k is their width)."""
        out: dict[str, torch.Tensor] = {}
        for name, b in self._reference.items():
            out[f"{name}::u"] = b.u.detach().cpu().contiguous()
            out[f"{name}::v"] = b.v.detach().cpu().contiguous()
            out[f"{name}::s"] = b.singular_values.detach().cpu().contiguous()
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore bases saved by ``state_dict`` (replaces the current cache)."""
        names = sorted({key.rsplit("::", 1)[0] for key in state})
        restored: dict[str, ProtectedBasis] = {}
        for name in names:
            try:
                u, v, s = state[f"{name}::u"], state[f"{name}::v"], state[f"{name}::s"]
            except KeyError as e:
                raise ValueError(f"filter state is missing {e.args[0]!r}; was it written by ReviveFilter.save?") from e
            if u.shape[1] != v.shape[1] or s.shape[0] != u.shape[1]:
                raise ValueError(f"filter state for {name!r} is inconsistent: u{tuple(u.shape)} v{tuple(v.shape)}")
            restored[name] = ProtectedBasis(u=u, v=v, k=int(u.shape[1]), tau=self.config.tau, singular_values=s)
        self._reference = restored

    def save(self, path: Union[str, Path]) -> None:
        """Write the cached bases and the config to a safetensors file."""
        from safetensors.torch import save_file

        save_file(self.state_dict(), str(path), metadata={"revive_config": json.dumps(self.config.to_dict())})

    @classmethod
    def load(cls, path: Union[str, Path]) -> "ReviveFilter":
        """A filter restored from ``save``'s file, with the config stored there."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            state = {key: fh.get_tensor(key) for key in fh.keys()}
        if "revive_config" not in meta:
            raise ValueError(f"{path} has no revive_config metadata; it was not written by ReviveFilter.save")
        filt = cls(ReviveConfig.from_dict(json.loads(meta["revive_config"])))
        filt.load_state_dict(state)
        return filt

    @property
    def cache_floats(self) -> int:
        """Floats held by all cached bases (k·(m+n+1) per parameter)."""
        return sum(b.num_floats for b in self._reference.values())
