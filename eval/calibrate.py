"""Calibrate an editor's hparams on held-out records: one fresh batch edited and measured per grid point.

Published MEMIT/ROME land ~100% of a fresh batch; hparams carried to a new model must be checked for that
before any long comparison. For every point of a grid over hparams settings (``mom2_update_weight``,
``v_num_grad_steps``, ``v_lr``, ``layers``, …) this edits the same ``records`` held-out requests as one
batch into the unedited model, measures efficacy / generalization / specificity on exactly those records and
the perplexity of the shipped ME-PPL sentences, then restores the weights and the editor's own state (AlphaEdit's
accumulated keys, LEMoE's experts) for the next point.

Held-out records: the run's data with the shipped samples' case ids removed, in the run's seeded order
(``order: seeded`` permutes by ``seed``), taken from the end, so a study that edits from the front of the
same order does not meet them before its last ``records`` edits.

Target vectors do not depend on the solve's settings (λ = ``mom2_update_weight``, the covariance sample
count) nor on the plugin chain: with the batched z path, points that share the z settings reuse the first
point's vectors (kept in ``$REVIVE_CACHE/zs`` for later calibrations of the same batch), so a λ sweep costs
one z optimisation (also ``calibration.png``: each measure against the grid's first setting). Grid keys ``run.<setting>`` vary the run config (``run.transforms=[[], [revive]]``). Writes ``calibration.jsonl`` (one row per point, with the settings) and
``calibration.md``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import itertools
import json
import logging
import random
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from tqdm.auto import tqdm

from revive_plugin import yamlio

from .harness import Run, RunConfig, evaluate_facts, ordered_cases, use_easyedit_source
from .report import markdown_table

#: hparams that change MEMIT's target vectors (everything else only changes the solve).
Z_SETTINGS = ("v_num_grad_steps", "v_lr", "v_loss_layer", "v_weight_decay", "kl_factor", "clamp_norm_factor",
              "layers", "fact_token", "layer_module_tmp")


def parse_grid(items: Sequence[str]) -> dict[str, list[Any]]:
    """``key=[v1, v2]`` (or ``key=v``) items into an ordered grid (values parsed as YAML)."""
    grid: dict[str, list[Any]] = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"grid item {item!r} must look like key=[v1, v2] (e.g. mom2_update_weight=[15000, 1500])")
        key, raw = item.split("=", 1)
        values = yamlio.load(raw)
        grid[key.strip()] = values if isinstance(values, list) else [values]
        if not grid[key.strip()]:
            raise ValueError(f"grid item {item!r} has no values")
    return grid


def headline(config: RunConfig) -> list[str]:
    """The efficacy / generalization / specificity keys of the run's dataset (CounterFact: preference rates)."""
    names = ["efficacy", "generalization", "specificity"]
    return [f"{n}_score" for n in names] if config.dataset == "counterfact" else names


def heldout_cases(config: RunConfig, records: int) -> list[Any]:
    """The last ``records`` of the run's order, shipped-sample records excluded."""
    from .datasets import load_counterfact, load_zsre

    shipped = {c.case_id for c in (load_counterfact(None) if config.dataset == "counterfact" else load_zsre(None))}
    pool = [c for c in ordered_cases(config) if c.case_id not in shipped]
    if len(pool) < records:
        raise ValueError(f"{config.data or 'the shipped sample'} has {len(pool)} records outside the shipped sample; "
                         f"{records} held-out records asked. Pass a larger set with --data")
    return pool[-records:]


@contextlib.contextmanager
def _reuse_target_vectors(store: Optional[Path] = None) -> Any:
    """Within the block, batched z vectors are computed once per (requests, layer, z settings, model weights).

    With ``store`` they are also kept on disk (safetensors named by a hash of that key), so a later
    calibration of the same batch — another λ, or REVIVE's chain on the same solve — skips the optimisation.
    """
    from safetensors.torch import load_file

    from revive_plugin.adapters import batched_z
    from revive_plugin.adapters.models import save_cache_file

    original = batched_z.compute_zs
    memo: dict[str, list[torch.Tensor]] = {}

    def compute_zs(model: Any, tok: Any, requests: Any, hparams: Any, layer: int, templates: Any, **kw: Any) -> Any:
        fingerprint = [float(p.detach().double().sum()) for p in model.parameters()]
        key = json.dumps([[dict(r) for r in requests], layer, templates, fingerprint,
                          {k: getattr(hparams, k, None) for k in Z_SETTINGS}], sort_keys=True, default=str)
        if key not in memo:
            path = store / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.safetensors" if store else None
            if path is not None and path.exists():
                memo[key] = list(load_file(str(path))["zs"])
            else:
                memo[key] = original(model, tok, requests, hparams, layer, templates, **kw)
                if path is not None:
                    save_cache_file({"zs": torch.stack(memo[key]).contiguous()}, path)
        return memo[key]

    batched_z.compute_zs = compute_zs
    try:
        yield
    finally:
        batched_z.compute_zs = original


def calibrate(config: RunConfig, grid: dict[str, list[Any]], records: int, output: Path,
              ppl_sentences: Optional[str] = None, command: str = "") -> list[dict[str, Any]]:
    """Edit the held-out batch once per grid point; rows of settings and measures (also written to ``output``)."""
    from revive_plugin.adapters.compat import import_easyeditor
    from revive_plugin.adapters.easyedit import enable_easyedit, restore_editor_state
    from revive_plugin.adapters.editors import request_groups

    from .perplexity import load_sentences, perplexity

    output.mkdir(parents=True, exist_ok=True)
    use_easyedit_source(config.easyedit_source)
    enable_easyedit(device=config.device)
    logging.getLogger("easyeditor").setLevel(logging.WARNING)
    run_keys = {k for k in grid if k.startswith("run.")}
    hp = Run(config, output)._load_hparams()
    for key in grid:
        if key in run_keys:
            if key[4:] not in {f.name for f in dataclasses.fields(RunConfig)}:
                raise ValueError(f"grid: {key!r} is not a run setting (run.transforms, run.revive, …)")
        elif not hasattr(hp, key):
            raise ValueError(f"grid: {hp.alg_name} hparams have no setting {key!r}")
    cases = heldout_cases(config, records)
    texts = load_sentences(ppl_sentences)
    random.seed(config.seed)
    torch.manual_seed(config.seed)
    with contextlib.redirect_stdout(io.StringIO()):
        editor = import_easyeditor("easyeditor.editors.editor").BaseEditor.from_hparams(hp)
    model, tok = editor.model, editor.tok
    original = {k: v.detach().clone() for k, v in model.state_dict().items()}
    base = {"point": "unedited", **perplexity(model, tok, texts, progress="ppl"),
            **evaluate_facts(model, tok, cases)}
    rows = [base]
    defaults = {k: getattr(hp, k) for k in grid if k not in run_keys}
    jsonl = output / "calibration.jsonl"
    jsonl.write_text(json.dumps(base) + "\n")
    requests = [c.to_request() for c in cases]
    from revive_plugin.adapters.models import cache_dir as revive_cache

    with _reuse_target_vectors(revive_cache() / "zs"):
        for values in itertools.product(*grid.values()):
            settings = dict(zip(grid, values))
            point_config = dataclasses.replace(config, **{k[4:]: v for k, v in settings.items() if k in run_keys})
            hp = Run(point_config, output)._load_hparams()  # a fresh hparams object with this point's plugins
            for k, v in {**defaults, **settings}.items():
                if k not in run_keys:
                    setattr(hp, k, v)
            began = time.perf_counter()
            groups = request_groups(hp.alg_name, requests)  # ROME-style editors: one request per call
            for group in tqdm(groups, desc=f"edit {settings}", unit="call", disable=len(groups) == 1, leave=False):
                with contextlib.redirect_stdout(io.StringIO()):
                    editor.apply_algo(model, tok, group, hp, copy=False, return_orig_weights=False,
                                      keep_original_weight=False)
            row = {"point": settings, "edit_seconds": round(time.perf_counter() - began, 1),
                   **evaluate_facts(model, tok, cases), **perplexity(model, tok, texts, progress="ppl")}
            row["ppl_rel"] = row["ppl"] / base["ppl"]
            rows.append(row)
            with jsonl.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
            scores = " ".join(f"{k} {row[k]:.3f}" for k in headline(config))
            print(f"[calibrate] {settings}: {scores} ppl {row['ppl']:.2f}", flush=True)
            # AlphaEdit would solve the next point against this one's keys, LEMoE route to its expert
            restore_editor_state(hp.alg_name, {}, model=model, hparams=hp)
            with torch.no_grad():
                model.load_state_dict(original)
    write_table(rows, config, records, output, command)
    plot(rows, output / "calibration.png", f"Calibration of {config.name} on {records} held-out records")
    return rows


def write_table(rows: list[dict[str, Any]], config: RunConfig, records: int, output: Path, command: str) -> None:
    """``calibration.md``: one line per grid point."""
    cols = headline(config) + ["efficacy_magnitude", "ppl", "ppl_rel", "edit_seconds"]
    lines = [f"# Calibration: {config.name} ({config.hparams})", "",
             f"{records} held-out {config.dataset} records ({config.data}, order {config.order}, seed {config.seed}, "
             "shipped-sample records excluded), edited as one batch into the unedited model at each point; "
             "measures on exactly those records, perplexity on the shipped ME-PPL sentences.", ""]
    if command:
        lines += ["Command:", "", "```", command, "```", ""]
    body = [[r["point"] if isinstance(r["point"], str) else ", ".join(f"{k}={v}" for k, v in r["point"].items())]
            + [r.get(c) for c in cols] for r in rows]
    lines.append(markdown_table(["point"] + cols, body, floatfmt=".3f"))
    (output / "calibration.md").write_text("\n".join(lines) + "\n")


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> Optional[Path]:
    """``calibration.png``: each measure against the grid's first setting, one line per value of the others.

    The grid's first key is the x axis (log scale when its values span more than 10×); points that share the
    other keys' values form one line, labelled by them. Nothing is drawn for a grid with a single point.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [r for r in rows if isinstance(r["point"], dict)]
    if len(points) < 2:
        return None
    first = next(iter(points[0]["point"]))
    lines: dict[str, list[dict[str, Any]]] = {}
    for r in points:
        rest = {k: v for k, v in r["point"].items() if k != first}
        label = ", ".join(f"{k.removeprefix('run.')}={v}" for k, v in rest.items()) or "all"
        lines.setdefault(label, []).append(r)
    base = next((r for r in rows if r["point"] == "unedited"), None)
    measures = [k for k in ("efficacy_score", "generalization_score", "specificity_score", "efficacy",
                            "generalization", "specificity", "ppl_rel") if k in points[0]]
    xs = [r["point"][first] for r in points]
    log = all(isinstance(x, (int, float)) and x > 0 for x in xs) and max(xs) > 10 * min(xs)
    with plt.rc_context({"font.size": 11, "axes.titlesize": 12, "legend.fontsize": 10}):
        ncols = min(3, len(measures))
        nrows = -(-len(measures) // ncols)
        fig, axes = plt.subplots(nrows, ncols, squeeze=False, figsize=(5 * ncols, 3.6 * nrows + 0.6),
                                 layout="constrained")
        for ax, key in zip(axes.flat, measures):
            for i, (label, rs) in enumerate(lines.items()):
                rs = sorted(rs, key=lambda r: r["point"][first])
                ax.plot([r["point"][first] for r in rs], [r[key] for r in rs], marker="os^D"[i % 4],
                        label=label, linewidth=2)
            if base is not None and key in base:
                ax.axhline(base[key], color="0.4", linestyle=":", label="unedited")
            if log:
                ax.set_xscale("log")
            ax.set_title(key.replace("_score", "").replace("ppl_rel", "perplexity / unedited").replace("_", " "))
            ax.set_xlabel(first)
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(measures):]:
            ax.set_visible(False)
        handles, labels = axes.flat[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside lower center", ncols=min(4, len(labels)), frameon=False)
        fig.suptitle(title, fontsize=13)
        fig.savefig(path, dpi=100)
        plt.close(fig)
    return path


def report(output: Path) -> Path:
    """Rebuild ``calibration.png`` from a finished calibration's ``calibration.jsonl`` (the table stays as written)."""
    path = output / "calibration.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is {output} a calibration folder?")
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    made = plot(rows, output / "calibration.png", f"Calibration on one held-out batch ({output.name})")
    if made is None:
        raise ValueError(f"{path} has fewer than two grid points: nothing to plot")
    return made
