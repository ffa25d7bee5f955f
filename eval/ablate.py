"""Where a run's damage lives: post-hoc variants of its accumulated edit, each scored by perplexity and edit success.

A sequential run's checkpoint holds the edited weights W_t; the unedited model holds W₀. ``revive ablate RUN_DIR``
rebuilds the model with variants of the accumulated edit Δ = W_t − W₀ of each edited weight and measures, for each,
the perplexity of the run's own sentences (its ``ppl_rel`` against the unedited model) and efficacy / generalization
/ specificity on a seeded sample of the run's edited facts:

    as-run          W_t as the checkpoint holds it (must reproduce the run's last perplexity: a check)
    unedited        W₀
    revert:L        layer L back to W₀, the other edited layers as run ("revert:each" = every edited layer in turn)
    only:L          only layer L edited ("only:each" likewise)
    scale:S         W₀ + S·Δ
    revive:T        W₀ + (I − UₖUₖᵀ) Δ (I − VₖVₖᵀ), Uₖ, Vₖ of W₀ at τ = T (REVIVE applied once, to the whole edit)
    prune:A         PRUNE once on Δ (its official form: revive_plugin/plugins/prune.py), α = A ("e" or a number)
    drop-top:R      Δ without its R largest singular directions

A variant says what the run's damage is made of (which layer, how large, which directions); it is not the run the
variant's setting would have produced (an editor edits against the model it sees). Rows go to ``ablation.jsonl``
(one per variant; run again and the missing ones are added) and a table to ``ablation.md``.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

__all__ = ["DEFAULT_VARIANTS", "ablate", "expand_variants", "variant_delta"]

DEFAULT_VARIANTS = ("as-run", "unedited", "revert:each", "only:each", "scale:0.5", "revive:0.2", "revive:0.4",
                    "prune:e", "drop-top:1", "drop-top:8")
_LAYER = re.compile(r"\.(\d+)\.")


def layer_of(name: str) -> int:
    """The layer index in a parameter name (``model.layers.8.mlp.down_proj.weight`` → 8)."""
    found = _LAYER.search(name)
    if not found:
        raise ValueError(f"no layer index in parameter name {name!r}")
    return int(found.group(1))


def expand_variants(variants: Iterable[str], layers: Sequence[int]) -> list[str]:
    """The variants with ``revert:each``/``only:each`` expanded to the edited ``layers``; each one checked."""
    out: list[str] = []
    for v in variants:
        kind, _, arg = v.partition(":")
        if kind in ("revert", "only") and arg == "each":
            out += [f"{kind}:{layer}" for layer in layers]
            continue
        _parse(v, layers)  # refuse a bad variant before anything runs
        out.append(v)
    return out


def _parse(variant: str, layers: Sequence[int]) -> tuple[str, Any]:
    kinds = "as-run, unedited, revert:L, only:L, scale:S, revive:T, prune:A, drop-top:R"
    kind, sep, arg = variant.partition(":")
    try:
        if kind in ("as-run", "unedited") and not sep:
            return kind, None
        if kind in ("revert", "only"):
            layer = int(arg)
            if layer not in layers:
                raise ValueError(f"variant {variant!r}: layer {layer} is not an edited layer ({list(layers)})")
            return kind, layer
        if kind == "scale":
            return kind, float(arg)
        if kind == "revive":
            tau = float(arg)
            if not 0 < tau <= 1:
                raise ValueError(f"variant {variant!r}: τ must be in (0, 1]")
            return kind, tau
        if kind == "prune":
            alpha = math.e if arg == "e" else float(arg)
            if not alpha > 1:
                raise ValueError(f"variant {variant!r}: α must be e or a number > 1")
            return kind, alpha
        if kind == "drop-top":
            rank = int(arg)
            if rank < 1:
                raise ValueError(f"variant {variant!r}: R must be a positive integer")
            return kind, rank
    except ValueError as e:
        if "variant" in str(e):
            raise
        raise ValueError(f"variant {variant!r}: {arg!r} is not a number (variants: {kinds})") from None
    raise ValueError(f"unknown variant {variant!r}; variants: {kinds}")


def variant_delta(variant: str, name: str, delta: torch.Tensor, w0: torch.Tensor, layers: Sequence[int]) -> torch.Tensor:
    """The accumulated edit of parameter ``name`` under ``variant`` (float64)."""
    from revive_plugin.plugins.prune import prune_matrix
    from revive_plugin.spectral import project_out, protected_basis

    kind, arg = _parse(variant, layers)
    d = delta.double()
    if kind == "as-run":
        return d
    if kind == "unedited":
        return torch.zeros_like(d)
    if kind == "revert":
        return torch.zeros_like(d) if layer_of(name) == arg else d
    if kind == "only":
        return d if layer_of(name) == arg else torch.zeros_like(d)
    if kind == "scale":
        return arg * d
    if kind == "revive":
        return project_out(d, protected_basis(w0, arg)).double()
    if kind == "prune":
        return prune_matrix(d, float(torch.linalg.matrix_norm(w0.double(), ord=2)), arg)[0]
    u, s, vh = torch.linalg.svd(d, full_matrices=False)  # drop-top
    return d - (u[:, :arg] * s[:arg]) @ vh[:arg]


def _spectrum(delta: torch.Tensor, s0: torch.Tensor) -> dict[str, float]:
    """Size of an edit against W₀'s singular values ``s0``."""
    s = torch.linalg.svdvals(delta.double())
    return {"delta_rel": float(s.norm() / s0.norm()), "delta_sigma_max_over_w0": float(s[0] / s0[0])}


def ablate(run_dir: str | Path, variants: Sequence[str] = DEFAULT_VARIANTS, facts: Any = 100,
           output: Optional[str | Path] = None, device: Optional[str] = None) -> Path:
    """Score ``variants`` of the last checkpoint of ``run_dir``; returns the output folder (``RUN_DIR/ablation``)."""
    from revive_plugin.adapters.easyedit import disable_easyedit, enable_easyedit
    from revive_plugin.adapters.models import load_model

    from .harness import (CHECKPOINT, Run, RunConfig, evaluate_facts, fact_sample, ordered_cases, read_rows,
                          read_run_config, read_state)
    from .perplexity import load_sentences, perplexity

    run_dir = Path(run_dir)
    ckpt = run_dir / CHECKPOINT
    if not (ckpt / "weights.safetensors").exists():
        raise FileNotFoundError(f"{run_dir} has no {CHECKPOINT}/weights.safetensors: ablate needs a run's checkpoint "
                                "(a run directory of `revive eval`)")
    config = RunConfig.from_dict(read_run_config(run_dir / "config.yaml"), source=str(run_dir / "config.yaml"))
    state = read_state(ckpt / "state.json", f"rerun the run's last checkpoint with `revive eval --resume {run_dir}`")
    done = state["edits_done"]
    if done == 0:
        raise ValueError(f"{run_dir}'s checkpoint is before its first edit: nothing to ablate")
    saved = load_file(str(ckpt / "weights.safetensors"))
    layers = sorted({layer_of(n) for n in saved})
    todo = expand_variants(variants, layers)
    out = Path(output) if output else run_dir / "ablation"
    out.mkdir(parents=True, exist_ok=True)
    rows_path = out / "ablation.jsonl"
    rows = {r["variant"]: r for r in read_rows(rows_path)} if rows_path.exists() else {}
    if rows and any(r.get("edits") != done for r in rows.values()):
        raise ValueError(f"{rows_path} scores another checkpoint than {run_dir}'s ({done} edits); remove it or pass "
                         "--output NEW_DIR")
    enable_easyedit(device=config.device)  # its hparams classes read the plugin blocks (revive:, batched_z:, …)
    try:
        hp = Run(config, run_dir)._load_hparams()
    finally:
        disable_easyedit()
    model, tok = load_model(hp.model_name, device=device or config.device)
    params = dict(model.named_parameters())
    missing = [n for n in saved if n not in params]
    if missing:
        raise ValueError(f"{run_dir}'s checkpoint has weights {missing} the model {hp.model_name} lacks")
    w0 = {n: params[n].detach().clone() for n in saved}
    deltas = {n: saved[n].double() - w0[n].double() for n in saved}
    w0_sigma = {n: torch.linalg.svdvals(w.double()) for n, w in w0.items()}
    cases = fact_sample(ordered_cases(config)[:done], facts, config.seed)
    ppl = config.ppl or {}
    texts = load_sentences(ppl.get("data"), ppl.get("n", 200))
    base = state.get("ppl_baseline", {}).get("ppl")
    last_row = next((r for r in reversed(read_rows(run_dir / "metrics.jsonl")) if r.get("edits") == done), {})
    for variant in tqdm([v for v in todo if v not in rows], desc=f"ablate {run_dir.name}", unit="variant"):
        row: dict[str, Any] = {"variant": variant, "edits": done, "facts_evaluated": len(cases)}
        with torch.no_grad():
            for n, d in deltas.items():
                dv = variant_delta(variant, n, d, w0[n], layers)
                params[n].copy_((w0[n].double() + dv).to(params[n].dtype))
                for k, v in _spectrum(dv, w0_sigma[n]).items():
                    row[f"{k}/{layer_of(n)}"] = v
        row.update(perplexity(model, tok, texts, max_tokens=ppl.get("max_tokens", 128)))
        if base:
            row["ppl_rel"] = row["ppl"] / base
        row.update({k: v for k, v in evaluate_facts(model, tok, cases, state.get("pre_locality")).items()
                    if not k.startswith("easyedit_")})
        rows[variant] = row
        with rows_path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
    _write_table(out / "ablation.md", run_dir, done, [rows[v] for v in todo if v in rows], base, last_row, cases)
    return out


def _write_table(path: Path, run_dir: Path, done: int, rows: list[dict], base: Optional[float], last_row: dict,
                 cases: Sequence[Any]) -> None:
    def f(row: dict, key: str, fmt: str = "{:.3f}") -> str:
        return fmt.format(row[key]) if isinstance(row.get(key), (int, float)) else "–"

    layers = sorted({int(k.rsplit("/", 1)[1]) for r in rows for k in r if k.startswith("delta_rel/")})
    ppl = (f"Perplexity of the run's {last_row.get('ppl_tokens', '')} sentence tokens relative to the unedited "
           f"model's ({base:.2f})" if base else "Perplexity of the run's sentences")
    lines = [f"# What {run_dir.name}'s accumulated edit is made of ({done} edits)", "",
             f"Post-hoc variants of Δ = W − W₀ of each edited layer (`revive ablate {run_dir}`; the variants are "
             f"described in `eval/ablate.py`). {ppl}; efficacy / generalization / specificity on a seeded sample of "
             f"{len(cases)} of its edited facts."
             + (f" The run's own last checkpoint: perplexity ×{last_row['ppl_rel']:.3f}." if "ppl_rel" in last_row
                else ""), "",
             "| variant | ppl ×unedited | eff / gen / spe | ‖Δ‖_F / ‖W₀‖_F, layers " + ", ".join(map(str, layers))
             + " | σ_max(Δ) / σ_max(W₀), same layers |", "|---|---|---|---|---|"]
    for r in rows:
        rel = " / ".join(f(r, f"delta_rel/{layer}", "{:.2f}") for layer in layers)
        top = " / ".join(f(r, f"delta_sigma_max_over_w0/{layer}", "{:.2f}") for layer in layers)
        scores = " / ".join(f(r, f"{k}_score", "{:.2f}") for k in ("efficacy", "generalization", "specificity"))
        lines.append(f"| {r['variant']} | {f(r, 'ppl_rel')} | {scores} | {rel} | {top} |")
    path.write_text("\n".join(lines) + "\n")
