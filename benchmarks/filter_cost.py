"""Filter cost: REVIVE's factor path vs dense projectors, and the basis cache size, on weight-shaped matrices.

Random weights with a realistic decaying spectrum (σᵢ ∝ i^-0.7 plus a small floor) of SmolLM2 (576×1536),
GPT2-XL (1600×6400) and LLaMA3-8B (4096×14336) MLP down-projection shapes; rank-r deltas, r ∈ {1, 100}.
Prints one table of times measured in this run and their ratios, and checks both paths agree.

    python benchmarks/filter_cost.py [--device cuda] [--shapes 576x1536,1600x6400] [--json out.json]
"""
from __future__ import annotations

import time

import torch

from common import script_main
from revive_plugin.spectral import project_out, protected_basis


def spectral_matrix(m: int, n: int, device: str, seed: int = 0) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(seed)
    r = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(m, r, generator=g))
    v, _ = torch.linalg.qr(torch.randn(n, r, generator=g))
    s = torch.arange(1, r + 1, dtype=torch.float32) ** -0.7 + 0.05
    return ((u * s) @ v.T).to(device)


def timed(fn, device: str, repeat: int = 3) -> tuple[float, object]:
    out = fn()  # warm-up
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeat):
        out = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeat, out


def dense_projectors(delta: torch.Tensor, basis) -> torch.Tensor:
    """The baseline: materialise I − UₖUₖᵀ (m×m) and I − VₖVₖᵀ (n×n), then multiply."""
    u, v = basis.u.to(delta.dtype), basis.v.to(delta.dtype)
    pu = torch.eye(u.shape[0], device=delta.device, dtype=delta.dtype) - u @ u.T
    pv = torch.eye(v.shape[0], device=delta.device, dtype=delta.dtype) - v @ v.T
    return pu @ delta @ pv


def run(shapes: str = "576x1536,1600x6400,4096x14336", tau: float = 0.1, device: str | None = None) -> list[dict]:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    for shape in shapes.split(","):
        m, n = (int(x) for x in shape.split("x"))
        w = spectral_matrix(m, n, device)
        svd_s, basis = timed(lambda: protected_basis(w, tau), device, repeat=1)
        rsvd_s, fast = timed(lambda: protected_basis(w, tau, method="randomized"), device, repeat=1)
        # Accuracy: how much of W's energy in its exact top-k subspace the randomized subspace captures
        # (1 = all; the individual directions near k are ill-defined without a spectral gap).
        captured = float((fast.u.double().T @ w.double()).norm() ** 2 / (basis.u.double().T @ w.double()).norm() ** 2)
        overlap = float((basis.u.double().T @ fast.u.double()).norm() ** 2 / max(basis.k, 1))
        cache_bytes = sum(t.numel() * t.element_size() for t in (basis.u, basis.v, basis.singular_values))
        for r in (1, 100):
            g = torch.Generator(device="cpu").manual_seed(r)
            delta = (torch.randn(m, r, generator=g) @ torch.randn(r, n, generator=g)).to(device) * 1e-3
            f_s, safe = timed(lambda: project_out(delta, basis), device)
            d_s, dense = timed(lambda: dense_projectors(delta, basis), device)
            leak = float((basis.u.to(safe.dtype).T @ safe).abs().max() / safe.abs().max())
            diff = float((safe - dense).abs().max() / dense.abs().max())
            rows.append({"shape": shape, "k": basis.k, "r": r, "svd_s": svd_s, "randomized_svd_s": rsvd_s,
                         "randomized_same_k": fast.k == basis.k, "randomized_captured": captured,
                         "randomized_overlap": overlap, "factor_s": f_s, "dense_s": d_s, "dense_over_factor": d_s / f_s,
                         "cache_floats": basis.num_floats, "cache_bytes": cache_bytes,
                         "uv_floats": basis.k * (m + n), "relative_leak": leak, "relative_diff": diff,
                         "device": device})
    return rows


def report(rows: list[dict]) -> str:
    from common import markdown_table, script_main

    table = [[r["shape"], r["k"], r["r"], r["svd_s"], r["randomized_svd_s"], r["randomized_same_k"],
              r["randomized_captured"], r["randomized_overlap"], r["factor_s"],
              r["dense_s"], r["dense_over_factor"], r["cache_bytes"] / 2**20, r["cache_floats"], r["uv_floats"],
              r["relative_leak"], r["relative_diff"]] for r in rows]
    head = ["shape", "k", "r", "SVD s", "randomized SVD s", "same k", "energy captured", "subspace overlap",
            "factor s", "dense s",
            "dense/factor", "cache MiB", "cache floats", "k(m+n)", "leak into Uₖ (relative)", "factor vs dense (relative)"]
    return (f"Filter cost vs dense projectors ({rows[0]['device']}): the cache holds Uₖ, Vₖ and σₖ = k(m+n) + k floats\n"
            + markdown_table(head, table))


def main() -> None:
    script_main(__doc__, run, report, {"shapes": str, "tau": float, "device": str})


if __name__ == "__main__":
    main()
