"""Spectral math of REVIVE: energy rank, protected singular subspace, safe update, drift monitors.

Everything here is plain torch on tensors; no editing framework is imported.
Weights and deltas are always oriented out×in (the adapter transposes GPT-2 ``Conv1D``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import SVD_METHODS

# Below this many entries the SVD runs in float64: cheap, and exact enough to test projector identities.
_FLOAT64_MAX_NUMEL = 1 << 20


@dataclass(frozen=True)
class ProtectedBasis:
    """Top-k left/right singular vectors of a weight (``u``: out×k, ``v``: in×k) and the mass that chose k."""

    u: torch.Tensor
    v: torch.Tensor
    k: int
    tau: float
    singular_values: torch.Tensor  # top-k σ, descending

    @property
    def num_floats(self) -> int:
        """Floats held by this basis: k·(m+n) (+k for σ)."""
        return self.u.numel() + self.v.numel() + self.singular_values.numel()


def _check_tau(tau: float) -> float:
    if isinstance(tau, bool) or not isinstance(tau, (int, float)):
        raise ValueError(f"tau must be a number in (0, 1], got {tau!r}")
    tau = float(tau)
    if not (0.0 < tau <= 1.0):
        raise ValueError(f"tau must be in (0, 1] (share of singular-value mass to protect), got {tau!r}")
    return tau


def energy_rank(singular_values: torch.Tensor, tau: float) -> int:
    """Smallest k with Σ_{i≤k} σ_i / Σ σ_i ≥ tau (σ, not σ²).

    ``singular_values`` is a 1-D tensor in descending order (as ``torch.linalg.svdvals`` returns).
    A zero weight has nothing to protect: k = 0.
    """
    tau = _check_tau(tau)
    s = torch.as_tensor(singular_values).detach().to(torch.float64).cpu()
    if s.ndim != 1:
        raise ValueError(f"singular_values must be 1-D, got shape {tuple(s.shape)}")
    if s.numel() == 0:
        return 0
    if not torch.isfinite(s).all() or (s < 0).any():
        raise ValueError("singular_values must be finite and non-negative")
    if (s[1:] > s[:-1]).any():
        raise ValueError("singular_values must be sorted in descending order (torch.linalg.svdvals order)")
    total = s.sum()
    if total <= 0:
        return 0
    share = torch.cumsum(s, 0) / total
    # A tiny tolerance so tau=1.0 is reached despite rounding in the cumulative sum.
    k = int(torch.searchsorted(share, torch.tensor(tau - 1e-12, dtype=torch.float64)).item()) + 1
    return min(k, s.numel())


def _compute_dtype(weight: torch.Tensor) -> torch.dtype:
    if weight.numel() <= _FLOAT64_MAX_NUMEL:
        return torch.float64
    return torch.float32


def _singular_values_from_gram(w: torch.Tensor) -> torch.Tensor:
    """All singular values of ``w``, descending, as √eig of the smaller Gram matrix in float64.

    k needs the whole spectrum's σ-mass; the Gram route (one matrix product and a symmetric eigensolve of
    min(m, n)²) is several times cheaper than LAPACK's SVD of a wide matrix, and float64 keeps the squared
    condition number harmless for a sum of σ.
    """
    a = w.double()
    gram = a @ a.T if a.shape[0] <= a.shape[1] else a.T @ a
    return torch.linalg.eigvalsh(gram).clamp(min=0).sqrt().flip(0)


def protected_basis(weight: torch.Tensor, tau: float = 0.1, method: str = "full") -> ProtectedBasis:
    """Top-k singular subspace of ``weight`` (out×in) with k = energy_rank(σ, tau).

    Computed in float32 at least (float64 for small matrices); only Uₖ, Vₖ are kept.

    ``method="randomized"``: σ from the Gram matrix's eigenvalues (k needs the whole spectrum's mass), then
    Uₖ, Vₖ from a seeded randomized range finder (``torch.svd_lowrank``, k + oversampling columns, 4 power iterations).
    Worth it where k ≪ min(m, n); when k is over a quarter of min(m, n) the full SVD is used instead.
    The projection stays exact for the basis it returns; how close that basis is to the exact one depends
    on the spectral gap at k (see tests/test_spectral.py for the accuracy check).
    """
    tau = _check_tau(tau)
    if method not in SVD_METHODS:
        raise ValueError(f"svd method must be one of {list(SVD_METHODS)}, got {method!r}")
    if weight.ndim != 2:
        raise ValueError(f"weight must be a 2-D matrix (out×in), got shape {tuple(weight.shape)}")
    if not torch.isfinite(weight).all():
        raise ValueError("weight has non-finite entries; cannot compute its singular subspace")
    w = weight.detach().to(_compute_dtype(weight))
    if method == "randomized":
        s_all = _singular_values_from_gram(w)
        k = energy_rank(s_all, tau)
        if 0 < k <= min(w.shape) // 4:
            q = min(min(w.shape), k + max(10, k // 5))
            # svd_lowrank draws from the global generator: seed a private one so runs stay reproducible.
            with torch.random.fork_rng(devices=[w.device] if w.device.type == "cuda" else []):
                torch.manual_seed(0)
                u, _, v = torch.svd_lowrank(w, q=q, niter=4)
            return ProtectedBasis(u=u[:, :k].contiguous(), v=v[:, :k].contiguous(), k=k, tau=tau,
                                  singular_values=s_all[:k].to(w.dtype).clone())
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    k = energy_rank(s, tau)
    return ProtectedBasis(
        u=u[:, :k].contiguous(), v=vh[:k, :].T.contiguous(), k=k, tau=tau, singular_values=s[:k].clone()
    )


def project_out(delta: torch.Tensor, basis: ProtectedBasis) -> torch.Tensor:
    """(I − UₖUₖᵀ) ΔW (I − VₖVₖᵀ), applied with the factors (no out×out or in×in projector is formed)."""
    if delta.ndim != 2 or delta.shape != (basis.u.shape[0], basis.v.shape[0]):
        raise ValueError(
            f"delta shape {tuple(delta.shape)} does not match the weight's out×in shape "
            f"{(basis.u.shape[0], basis.v.shape[0])}"
        )
    if basis.k == 0:
        return delta.clone()
    u, v = basis.u, basis.v
    d = delta.detach().to(device=u.device, dtype=torch.promote_types(u.dtype, torch.float32))
    u, v = u.to(d.dtype), v.to(d.dtype)
    left = d - u @ (u.T @ d)  # (I − UUᵀ)Δ
    safe = left - (left @ v) @ v.T  # …(I − VVᵀ)
    return safe.to(device=delta.device, dtype=delta.dtype)


def project_out_factors(
    left: torch.Tensor, right: torch.Tensor, basis: ProtectedBasis
) -> tuple[torch.Tensor, torch.Tensor]:
    """Safe update of a factored delta ΔW = left @ rightᵀ (left: out×r, right: in×r).

    Returns (left', right') with left' @ right'ᵀ = (I − UₖUₖᵀ) ΔW (I − VₖVₖᵀ), at cost O((m+n)·k·r).
    """
    if left.ndim != 2 or right.ndim != 2 or left.shape[1] != right.shape[1]:
        raise ValueError(f"factors must be out×r and in×r, got {tuple(left.shape)} and {tuple(right.shape)}")
    if left.shape[0] != basis.u.shape[0] or right.shape[0] != basis.v.shape[0]:
        raise ValueError(
            f"factor shapes {tuple(left.shape)}, {tuple(right.shape)} do not match the weight's out×in "
            f"shape {(basis.u.shape[0], basis.v.shape[0])}"
        )
    if basis.k == 0:
        return left.clone(), right.clone()
    dt = torch.promote_types(basis.u.dtype, torch.float32)
    u, v = basis.u.to(dt), basis.v.to(dt)
    a = left.detach().to(device=u.device, dtype=dt)
    b = right.detach().to(device=u.device, dtype=dt)
    a = a - u @ (u.T @ a)
    b = b - v @ (v.T @ b)
    return a.to(device=left.device, dtype=left.dtype), b.to(device=right.device, dtype=right.dtype)


def safe_update(delta: torch.Tensor, weight: torch.Tensor, tau: float = 0.1) -> torch.Tensor:
    """REVIVE's safe update: (I − UₖUₖᵀ) ΔW (I − VₖVₖᵀ) with W = UΣVᵀ of ``weight``.

    ``delta`` and ``weight`` are out×in; the result has delta's dtype and device.
    """
    if delta.shape != weight.shape:
        raise ValueError(f"delta shape {tuple(delta.shape)} != weight shape {tuple(weight.shape)}")
    if not torch.isfinite(delta).all():
        raise ValueError("delta has non-finite entries (NaN/inf); refusing to filter it")
    return project_out(delta, protected_basis(weight, tau))


def top_singular_vectors(weight: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Uₖ, σ, Vₖ) of ``weight`` for a given k: top-k singular vectors and all singular values."""
    w = weight.detach().to(_compute_dtype(weight))
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    return u[:, :k], s, vh[:k, :].T


def subspace_overlap(u0: torch.Tensor, ut: torch.Tensor) -> float:
    """LS: ‖U₀ᵀUₜ‖²_F / k — 1 when the two k-dim subspaces coincide, ~k/m for random ones."""
    k = u0.shape[1]
    if k == 0:
        return 1.0
    m = (u0.T.to(torch.float64) @ ut.to(device=u0.device, dtype=torch.float64))
    return float((m**2).sum() / k)


def vector_similarity(u0: torch.Tensor, ut: torch.Tensor) -> float:
    """SS: mean over i ≤ k of |u₀ᵢᵀuₜᵢ| for matched singular vectors (sign-invariant)."""
    k = u0.shape[1]
    if k == 0:
        return 1.0
    dots = (u0.to(torch.float64) * ut.to(device=u0.device, dtype=torch.float64)).sum(0).abs()
    return float(dots.mean())


def protected_drift(basis: ProtectedBasis, weight: torch.Tensor, initial: torch.Tensor) -> dict[str, float]:
    """How much of the accumulated edit W − W₀ lies in W₀'s protected subspace, and how large the rest grew.

    With Δ = W − W₀ and W₀'s top-k factors (Uₖ, Vₖ, σₖ):

    * ``delta_fro`` ‖Δ‖_F and ``delta_rel`` ‖Δ‖_F / ‖W₀‖_F;
    * ``protected_left`` ‖UₖᵀΔ‖_F / ‖Δ‖_F and ``protected_right`` ‖ΔVₖ‖_F / ‖Δ‖_F: 0 when every edit left the
      protected subspace alone (REVIVE's invariant), whatever the spectrum of W now looks like — unlike LS/SS,
      which match W's current top-k vectors by rank and drop once complement directions outgrow σₖ;
    * ``complement_sigma_max`` σ₁((I − UₖUₖᵀ) W (I − VₖVₖᵀ)) and ``complement_over_sigma_k``, its ratio to σₖ(W₀):
      above 1, a direction outside the protected subspace has become larger than the smallest protected one.
    """
    dtype = _compute_dtype(weight)
    w = weight.detach().to(dtype)
    w0 = initial.detach().to(device=w.device, dtype=dtype)
    u, v = basis.u.to(device=w.device, dtype=dtype), basis.v.to(device=w.device, dtype=dtype)
    delta = w - w0
    norm = float(torch.linalg.matrix_norm(delta))
    w0_norm = float(torch.linalg.matrix_norm(w0))
    left = float(torch.linalg.matrix_norm(u.T @ delta)) if basis.k else 0.0
    right = float(torch.linalg.matrix_norm(delta @ v)) if basis.k else 0.0
    complement = w - u @ (u.T @ w)
    complement = complement - (complement @ v) @ v.T
    c_max = float(torch.linalg.matrix_norm(complement, ord=2))
    sigma_k = float(basis.singular_values[-1]) if basis.k else 0.0
    return {
        "delta_fro": norm,
        "delta_rel": norm / w0_norm if w0_norm else 0.0,
        "protected_left": left / norm if norm else 0.0,
        "protected_right": right / norm if norm else 0.0,
        "complement_sigma_max": c_max,
        "complement_over_sigma_k": c_max / sigma_k if sigma_k else float("inf"),
    }
