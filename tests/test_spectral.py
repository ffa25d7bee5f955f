"""The math against a plain dense construction on random matrices with known spectra."""
import math

import pytest
import torch

from revive_plugin import ReviveConfig, ReviveFilter, energy_rank, protected_basis, safe_update
from revive_plugin.spectral import project_out_factors, subspace_overlap, vector_similarity


def matrix_with_spectrum(sigma, m, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, len(sigma), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, len(sigma), generator=g, dtype=torch.float64))
    return u @ torch.diag(torch.as_tensor(sigma, dtype=torch.float64)) @ v.T, u, v


def dense_reference(delta, weight, tau):
    """Full SVD with full_matrices=True, explicit projectors built from the complements."""
    u, s, vh = torch.linalg.svd(weight.double(), full_matrices=True)
    share = torch.cumsum(s, 0) / s.sum()
    k = int((share < tau - 1e-12).sum()) + 1
    pu = torch.eye(weight.shape[0], dtype=torch.float64) - u[:, :k] @ u[:, :k].T
    pv = torch.eye(weight.shape[1], dtype=torch.float64) - vh[:k].T @ vh[:k]
    return pu @ delta.double() @ pv, k


@pytest.mark.parametrize("sigma,tau,expected", [
    ([4, 3, 2, 1], 0.1, 1),      # 4/10 ≥ 0.1
    ([4, 3, 2, 1], 0.4, 1),      # exactly reaches τ at k=1
    ([4, 3, 2, 1], 0.41, 2),
    ([4, 3, 2, 1], 0.7, 2),      # 7/10
    ([4, 3, 2, 1], 1.0, 4),
    ([1, 1, 1, 1, 1, 1, 1, 1, 1, 1], 0.25, 3),
    ([0, 0, 0], 0.5, 0),         # zero weight: nothing to protect
])
def test_energy_rank_uses_sigma_mass(sigma, tau, expected):
    assert energy_rank(torch.tensor(sigma, dtype=torch.float64), tau) == expected


def test_energy_rank_is_sigma_not_sigma_squared():
    s = torch.tensor([3.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0])  # σ share of the first: 3/9; σ² share: 9/15
    assert energy_rank(s, 0.5) == 3  # σ: (3+1+1)/9 = 0.56
    # with σ² it would have been 1


@pytest.mark.parametrize("tau", [0, -0.1, 1.5, float("nan"), "0.1", True])
def test_energy_rank_rejects_bad_tau(tau):
    with pytest.raises(ValueError, match="tau"):
        energy_rank(torch.tensor([2.0, 1.0]), tau)


def test_energy_rank_rejects_unsorted_or_negative():
    with pytest.raises(ValueError, match="descending"):
        energy_rank(torch.tensor([1.0, 2.0]), 0.5)
    with pytest.raises(ValueError, match="non-negative"):
        energy_rank(torch.tensor([2.0, -1.0]), 0.5)


@pytest.mark.parametrize("m,n", [(24, 40), (40, 24), (32, 32)])
@pytest.mark.parametrize("tau", [0.05, 0.1, 0.3, 1.0])
def test_safe_update_matches_dense_projectors(m, n, tau):
    r = min(m, n)
    sigma = [10.0 * 0.8**i for i in range(r)]
    w, _, _ = matrix_with_spectrum(sigma, m, n, seed=m + n)
    delta = torch.randn(m, n, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ref, k = dense_reference(delta, w, tau)
    safe = safe_update(delta, w, tau)
    basis = protected_basis(w, tau)
    assert basis.k == k
    torch.testing.assert_close(safe, ref, atol=1e-10, rtol=1e-10)


def test_projection_properties_and_idempotence():
    m, n = 30, 50  # wide: the right null space is 20-dim and must be kept, not filtered
    w, u, v = matrix_with_spectrum([8, 6, 5, 3, 2, 1, 0.5], m, n)
    delta = torch.randn(m, n, dtype=torch.float64)
    b = protected_basis(w, 0.3)
    assert b.k == 1  # σ-mass share of the first: 8/25.5 = 0.31 ≥ 0.3
    safe = safe_update(delta, w, 0.3)
    assert torch.allclose(b.u.T @ safe, torch.zeros(b.k, n, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(safe @ b.v, torch.zeros(m, b.k, dtype=torch.float64), atol=1e-12)
    torch.testing.assert_close(safe_update(safe, w, 0.3), safe)  # idempotent
    # Directions outside the protected subspace pass untouched, including W's right null space.
    null_dir = torch.linalg.svd(w, full_matrices=True)[2][-1]  # a right-null vector of the wide W
    outside = torch.outer(u[:, -1], null_dir)
    torch.testing.assert_close(safe_update(outside, w, 0.3), outside)


def test_safe_update_keeps_dtype_and_device_and_checks_input():
    w = torch.randn(16, 8)
    d = torch.randn(16, 8, dtype=torch.bfloat16)
    out = safe_update(d, w)
    assert out.dtype == torch.bfloat16 and out.device == d.device and out.shape == d.shape
    with pytest.raises(ValueError, match="shape"):
        safe_update(torch.randn(8, 16), w)
    bad = torch.randn(16, 8)
    bad[0, 0] = math.nan
    with pytest.raises(ValueError, match="non-finite"):
        safe_update(bad, w)


def test_tau_one_removes_everything_in_the_row_and_column_space():
    w, _, _ = matrix_with_spectrum([3, 2, 1], 10, 10)
    delta = w.clone()  # lives entirely inside W's span
    assert torch.allclose(safe_update(delta, w, 1.0), torch.zeros_like(delta), atol=1e-12)


def test_factor_path_equals_dense_path():
    w, _, _ = matrix_with_spectrum([5, 4, 3, 2, 1], 20, 36)
    a, b = torch.randn(20, 3, dtype=torch.float64), torch.randn(36, 3, dtype=torch.float64)
    basis = protected_basis(w, 0.4)
    a2, b2 = project_out_factors(a, b, basis)
    torch.testing.assert_close(a2 @ b2.T, safe_update(a @ b.T, w, 0.4))


def test_filter_caches_original_basis_and_current_basis_moves():
    w0, _, _ = matrix_with_spectrum([9, 5, 3, 1], 12, 20, seed=3)
    w1, _, _ = matrix_with_spectrum([9, 5, 3, 1], 12, 20, seed=4)  # a different dominant subspace
    delta = torch.randn(12, 20, dtype=torch.float64)
    orig = ReviveFilter(ReviveConfig(tau=0.3))
    cur = ReviveFilter(ReviveConfig(tau=0.3, basis="current"))
    orig.filter("p", delta, w0)
    cur.filter("p", delta, w0)
    torch.testing.assert_close(orig.filter("p", delta, w1), safe_update(delta, w0, 0.3))
    torch.testing.assert_close(cur.filter("p", delta, w1), safe_update(delta, w1, 0.3))
    # Only Uₖ, Vₖ (and σₖ) are cached: k·(m+n+1) floats.
    k = orig.reference("p").k
    assert orig.cache_floats == k * (12 + 20 + 1)


def test_current_basis_is_computed_once_per_weight(monkeypatch):
    """basis="current": the solve and the filter of one step see the same pre-step weight and share one SVD;
    a changed weight (next step) gets a new basis."""
    import revive_plugin.filter as filter_module

    calls = []
    real = filter_module.protected_basis
    monkeypatch.setattr(filter_module, "protected_basis", lambda w, *a: calls.append(1) or real(w, *a))
    w0, _, _ = matrix_with_spectrum([9, 5, 3, 1], 12, 20, seed=3)
    delta = torch.randn(12, 20, dtype=torch.float64)
    cur = ReviveFilter(ReviveConfig(tau=0.3, basis="current"))
    reference = cur.observe("p", w0)  # W₀'s basis, which is also the first step's current basis
    assert cur.basis_for("p", w0.clone()) is reference and len(calls) == 1
    w1 = w0 + cur.filter("p", delta, w0)
    assert len(calls) == 1
    second = cur.basis_for("p", w1.clone())
    assert cur.basis_for("p", w1.clone()) is second and len(calls) == 2
    torch.testing.assert_close(cur.filter("p", delta, w1), safe_update(delta, w1, 0.3))
    assert len(calls) == 2 and cur.reference("p") is reference


def test_filter_layer_subset_and_disabled():
    w, _, _ = matrix_with_spectrum([5, 1], 6, 6)
    delta = torch.randn(6, 6, dtype=torch.float64)
    f = ReviveFilter({"tau": 0.5, "layers": [3, "model.layers.7.mlp"]})
    assert f.filter("model.layers.1.mlp.w", delta, w, layer=1) is delta
    assert not torch.equal(f.filter("model.layers.3.mlp.w", delta, w, layer=3), delta)
    assert not torch.equal(f.filter("model.layers.7.mlp.weight", delta, w, layer=7), delta)
    off = ReviveFilter({"enabled": False})
    assert off.filter("x", delta, w) is delta


def test_monitor_identity_and_drift():
    w0, u, v = matrix_with_spectrum([10, 8, 6, 1, 0.5], 16, 24, seed=5)
    f = ReviveFilter({"tau": 0.5})
    m0 = f.monitor("p", w0)
    assert m0["k"] == 2
    assert m0["ls"] == pytest.approx(1.0) and m0["ss"] == pytest.approx(1.0)
    assert m0["sigma_max"] == pytest.approx(10.0)
    assert m0["fro_norm"] == pytest.approx(math.sqrt(100 + 64 + 36 + 1 + 0.25))
    # Swap the top two singular directions' roles for u₂: rotate inside the span → LS stays 1, SS drops.
    w_rot = w0 + 5.0 * torch.outer(u[:, 1], v[:, 1])  # σ₂ becomes 13 > σ₁: vectors swap order
    m1 = f.monitor("p", w_rot)
    assert m1["ls"] == pytest.approx(1.0, abs=1e-9)
    assert m1["ss"] == pytest.approx(0.0, abs=1e-9)
    # A random weight shares almost nothing with W₀'s top subspace.
    m2 = f.monitor("p", torch.randn(16, 24, dtype=torch.float64))
    assert m2["ls"] < 0.9


def test_subspace_metrics_helpers():
    q, _ = torch.linalg.qr(torch.randn(10, 4, dtype=torch.float64))
    assert subspace_overlap(q[:, :2], q[:, 2:]) == pytest.approx(0.0, abs=1e-12)
    assert vector_similarity(q[:, :2], -q[:, :2]) == pytest.approx(1.0)


def test_filter_state_roundtrip_safetensors(tmp_path):
    w, _, _ = matrix_with_spectrum([5, 4, 1], 8, 10)
    f = ReviveFilter({"tau": 0.2, "basis": "original"})
    f.observe("a.weight", w)
    f.save(tmp_path / "state.safetensors")
    g = ReviveFilter.load(tmp_path / "state.safetensors")
    assert g.config == f.config
    d = torch.randn(8, 10, dtype=torch.float64)
    torch.testing.assert_close(g.filter("a.weight", d, torch.randn(8, 10, dtype=torch.float64)), f.filter("a.weight", d, w))


@pytest.mark.parametrize("data,match", [
    ({"tau": 0}, "tau"),
    ({"tau": 2}, "tau"),
    ({"basis": "latest"}, "basis.*original.*current"),
    ({"enabled": "yes"}, "enabled"),
    ({"layers": [1.5]}, "layers"),
    ({"tua": 0.1}, "unknown revive setting.*tua.*allowed"),
])
def test_config_rejects_bad_values(data, match):
    with pytest.raises(ValueError, match=match):
        ReviveConfig.from_dict(data)


def test_config_defaults_and_roundtrip():
    c = ReviveConfig.from_dict({"tau": 0.2, "layers": [4, 5]})
    assert c.basis == "original" and c.enabled and c.layers == (4, 5)
    assert ReviveConfig.from_dict(c.to_dict()) == c
    assert ReviveConfig.from_dict(None) == ReviveConfig()


def test_reconfigured_keeps_bases_only_for_same_tau():
    w, _, _ = matrix_with_spectrum([5, 4, 1], 8, 10)
    f = ReviveFilter({"tau": 0.2})
    f.observe("a", w)
    assert f.reconfigured(ReviveConfig(tau=0.2, basis="current")).reference("a") is f.reference("a")
    assert f.reconfigured(ReviveConfig(tau=0.5)).reference("a") is None


def decaying(m, n, seed=0):
    r = min(m, n)
    sigma = torch.arange(1, r + 1, dtype=torch.float64) ** -0.7 + 0.05
    return matrix_with_spectrum(sigma, m, n, seed=seed)[0]


@pytest.mark.parametrize("m,n,tau", [(300, 800, 0.1), (800, 300, 0.05), (576, 1536, 0.1)])
def test_randomized_basis_matches_the_exact_subspace(m, n, tau):
    w = decaying(m, n).float()
    exact = protected_basis(w, tau)
    fast = protected_basis(w, tau, method="randomized")
    assert fast.k == exact.k and 0 < exact.k <= min(m, n) // 4
    # Same k from the exact spectrum, and the subspaces agree (cosines of principal angles near 1).
    assert torch.allclose(fast.singular_values, exact.singular_values)
    cos_u = torch.linalg.svdvals(exact.u.double().T @ fast.u.double())
    cos_v = torch.linalg.svdvals(exact.v.double().T @ fast.v.double())
    assert float(cos_u.min()) > 0.99 and float(cos_v.min()) > 0.99
    captured = (fast.u.T @ w.double()).norm() ** 2 / (exact.u.T @ w.double()).norm() ** 2
    assert float(captured) > 0.999
    # Orthonormal factors: the filter with the randomized basis is still an exact projector for that basis.
    eye = torch.eye(fast.k, dtype=fast.u.dtype)
    assert torch.allclose(fast.u.T @ fast.u, eye, atol=1e-5) and torch.allclose(fast.v.T @ fast.v, eye, atol=1e-5)
    delta = torch.randn(m, 4) @ torch.randn(4, n)
    from revive_plugin.spectral import project_out

    safe_fast, safe_exact = project_out(delta, fast), project_out(delta, exact)
    assert float((fast.u.T.double() @ safe_fast.double()).abs().max()) < 1e-4 * float(delta.abs().max())
    assert float((safe_fast - safe_exact).norm() / safe_exact.norm()) < 0.05


def test_randomized_is_reproducible_and_leaves_the_global_rng_alone():
    w = decaying(200, 500).float()
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = protected_basis(w, 0.1, method="randomized")
    assert torch.equal(torch.get_rng_state(), before)
    b = protected_basis(w, 0.1, method="randomized")
    assert torch.equal(a.u, b.u) and torch.equal(a.v, b.v)


def test_randomized_falls_back_to_full_svd_when_k_is_large():
    w = decaying(60, 80).float()
    full, fast = protected_basis(w, 0.9), protected_basis(w, 0.9, method="randomized")
    assert fast.k > 60 // 4 and torch.equal(full.u, fast.u)
    with pytest.raises(ValueError, match=r"svd method must be one of \['full', 'randomized'\]"):
        protected_basis(w, 0.1, method="lanczos")
    with pytest.raises(ValueError, match=r"revive.svd must be one of"):
        ReviveConfig(svd="fast")
    f = ReviveFilter(ReviveConfig(tau=0.1, svd="randomized"))
    assert f.observe("w", decaying(200, 500).float()).k >= 1


# ----------------------------------------------------------------------------- protected_drift


def _drift_setup():
    """W₀ (12×9) with σ = 10, 8, 2, 1, 0.5…; τ = 0.7 protects k = 2 (18/23.5 ≥ 0.7 > 10/23.5)."""
    sigma = [10.0, 8.0, 2.0, 1.0, 0.5, 0.5, 0.5, 0.5, 0.5]
    w0, u, v = matrix_with_spectrum(sigma, 12, 9, seed=7)
    basis = protected_basis(w0, 0.7)
    assert basis.k == 2
    # Explicit dense projectors onto the complement of span(u₁, u₂) and span(v₁, v₂).
    pu = torch.eye(12, dtype=torch.float64) - u[:, :2] @ u[:, :2].T
    pv = torch.eye(9, dtype=torch.float64) - v[:, :2] @ v[:, :2].T
    return w0, u, v, basis, pu, pv


def test_protected_drift_of_a_delta_inside_the_complement_is_zero():
    from revive_plugin.spectral import protected_drift

    w0, _, _, basis, pu, pv = _drift_setup()
    delta = pu @ torch.randn(12, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) @ pv
    w = w0 + delta
    d = protected_drift(basis, w, w0)
    assert d["protected_left"] == pytest.approx(0.0, abs=1e-10)
    assert d["protected_right"] == pytest.approx(0.0, abs=1e-10)
    assert d["delta_fro"] == pytest.approx(float(torch.linalg.matrix_norm(delta)))
    assert d["delta_rel"] == pytest.approx(float(torch.linalg.matrix_norm(delta)) / math.sqrt(100 + 64 + 4 + 1 + 5 * 0.25))
    c_max = float(torch.linalg.svdvals(pu @ w @ pv)[0])
    assert d["complement_sigma_max"] == pytest.approx(c_max, rel=1e-10)
    assert d["complement_over_sigma_k"] == pytest.approx(c_max / 8.0, rel=1e-10)  # σ_k(W₀) = σ₂ = 8


def test_protected_drift_of_a_delta_along_the_top_direction_is_one():
    from revive_plugin.spectral import protected_drift

    w0, u, v, basis, pu, pv = _drift_setup()
    w = w0 + 3.0 * torch.outer(u[:, 0], v[:, 0])
    d = protected_drift(basis, w, w0)
    assert d["protected_left"] == pytest.approx(1.0, abs=1e-10)
    assert d["protected_right"] == pytest.approx(1.0, abs=1e-10)
    assert d["delta_fro"] == pytest.approx(3.0)
    # The complement of W is untouched: its largest singular value is W₀'s third, σ₃ = 2.
    assert d["complement_sigma_max"] == pytest.approx(float(torch.linalg.svdvals(pu @ w @ pv)[0]), rel=1e-10)
    assert d["complement_sigma_max"] == pytest.approx(2.0, rel=1e-10)
    assert d["complement_over_sigma_k"] == pytest.approx(2.0 / 8.0, rel=1e-10)


def test_protected_drift_of_a_mixed_delta_and_a_grown_complement():
    from revive_plugin.spectral import protected_drift

    w0, u, v, basis, pu, pv = _drift_setup()
    # 3·u₁v₁ᵀ (protected) + 4·u₃v₃ᵀ (complement): shares 3/5 on both sides; the complement's σ₁ becomes 2 + 4.
    w = w0 + 3.0 * torch.outer(u[:, 0], v[:, 0]) + 4.0 * torch.outer(u[:, 2], v[:, 2])
    d = protected_drift(basis, w, w0)
    assert d["protected_left"] == pytest.approx(0.6, abs=1e-10)
    assert d["protected_right"] == pytest.approx(0.6, abs=1e-10)
    assert d["complement_sigma_max"] == pytest.approx(float(torch.linalg.svdvals(pu @ w @ pv)[0]), rel=1e-10)
    assert d["complement_sigma_max"] == pytest.approx(6.0, rel=1e-10)
    assert d["complement_over_sigma_k"] == pytest.approx(6.0 / 8.0, rel=1e-10)
    # No edit at all: every share is 0, not NaN.
    still = protected_drift(basis, w0, w0)
    assert still["delta_fro"] == 0.0 and still["protected_left"] == 0.0 and still["protected_right"] == 0.0
