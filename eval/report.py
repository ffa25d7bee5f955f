"""Reports of runs: summary.md tables and grid PNG figures of one run, and side-by-side comparisons of several.

Every figure is a grid of at most 3 panels per row (5 × 3.6 inches each at 100 dpi, so ≤ 1500 px wide and
readable at 100 % zoom), x = number of edits from the pre-edit point 0, one line per run, and each run's
collapse point (``collapsed``: ppl ≥ ratio × pre-edit ppl) as a dashed vertical line in the run's colour on
every panel, its spectral early warning (``eval.collapse``) as a dotted one. Rows of older runs lack
perplexity, last-batch and protected-subspace keys: their panels and columns are left out, not failed.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Optional, Sequence

from revive_plugin import yamlio

from .collapse import (DEFAULT_DELTA_REL, DEFAULT_SIGMA_MAX_RATIO, collapse_measured, collapse_point,
                       early_warning, layer_values, lead_time, sigma_max_growth)

Row = dict[str, Any]

# Columns of the summary tables, in order, when present.
HEADLINE = [
    "efficacy_score", "generalization_score", "specificity_score",
    "efficacy", "generalization", "specificity",
    "efficacy_magnitude", "generalization_magnitude", "specificity_magnitude",
    "easyedit_rewrite_acc", "easyedit_rephrase_acc", "easyedit_locality",
    "last_batch_efficacy_score", "last_batch_generalization_score", "last_batch_specificity_score",
    "last_batch_efficacy", "last_batch_generalization", "last_batch_specificity", "fluency",
]
GENERAL = ["ppl", "ppl_rel", "collapsed"]
SPECTRAL = ["ls_mean", "ss_mean", "fro_norm_mean", "sigma_max_mean", "sigma_max_growth_max"]
PROTECTED = ["protected_left_mean", "protected_right_mean", "delta_rel_mean", "delta_rel_max", "delta_fro_mean",
             "complement_sigma_max_mean", "complement_over_sigma_k_mean"]
#: The superposition monitor's means over edited layers (``monitors: [superposition]``), beside the collapse flag.
SUPERPOSITION = ["superposition/interference", "superposition/leakage", "superposition/mean_cos",
                 "superposition/kurtosis", "superposition/tail_mass"]
#: Rates and shares in [0, 1]: their panels keep the whole 0–1 axis, so a gap of 3 points looks like 3 points.
UNIT_RANGE = {k for k in HEADLINE if not k.endswith("_magnitude") and k != "fluency"} | {
    "ls_mean", "ss_mean", "protected_left_mean", "protected_right_mean"}
_GLUE_KEY = re.compile(r"^glue_(.+)_(accuracy|f1|mcc)$")
_GLUE_METRIC_NAMES = {"accuracy": "accuracy", "f1": "F1", "mcc": "MCC"}

# A panel: its title in words and the row keys it plots, first present one per run (CounterFact rows have
# efficacy_score where zsRE rows have efficacy: both runs then share the "Efficacy" panel).
Panel = tuple[str, tuple[str, ...]]
EDITING_PANELS: list[list[Panel]] = [
    [("Efficacy", ("efficacy_score", "efficacy")),
     ("Generalization", ("generalization_score", "generalization")),
     ("Specificity", ("specificity_score", "specificity"))],
    [("Efficacy of the last batch", ("last_batch_efficacy_score", "last_batch_efficacy")),
     ("Generalization of the last batch", ("last_batch_generalization_score", "last_batch_generalization")),
     ("Specificity of the last batch", ("last_batch_specificity_score", "last_batch_specificity"))],
    [("Efficacy magnitude", ("efficacy_magnitude",)),
     ("Generalization magnitude", ("generalization_magnitude",)),
     ("Specificity magnitude", ("specificity_magnitude",))],
    [("Fluency (n-gram entropy)", ("fluency",))],
]
#: The one-figure answer (headline.png): do edits still land, and is the model still alive?
HEADLINE_PANELS: list[list[Panel]] = [
    [("Efficacy of the batch just edited", ("last_batch_efficacy_score", "last_batch_efficacy")),
     ("Efficacy of edited facts (sample; all at the end)", ("efficacy_score", "efficacy")),
     ("Perplexity / pre-edit perplexity", ("ppl_rel",))],
]
SPECTRAL_PANELS: list[list[Panel]] = [
    [("Subspace overlap LS (mean)", ("ls_mean",)),
     ("Singular-vector similarity SS (mean)", ("ss_mean",)),
     ("Largest singular value σ_max (mean)", ("sigma_max_mean",))],
    [("Frobenius norm ‖W‖_F (mean)", ("fro_norm_mean",)),
     ("Edit size ‖W − W₀‖_F / ‖W₀‖_F (mean)", ("delta_rel_mean",)),
     ("Complement σ_max / σ_k(W₀) (mean)", ("complement_over_sigma_k_mean",))],
    [("Edit share in protected left space (mean)", ("protected_left_mean",)),
     ("Edit share in protected right space (mean)", ("protected_right_mean",)),
     ("σ_max / pre-edit σ_max (max over layers)", ("sigma_max_growth_max",))],
    # only runs with the superposition monitor have these (mean over the edit steps since the previous row)
    [("Interference on earlier edits (mean)", ("superposition/interference",)),
     ("Kurtosis of edited keys' cosines (mean)", ("superposition/kurtosis",)),
     ("Tail mass of edited keys' cosines (mean)", ("superposition/tail_mass",))],
]
#: The superposition monitor at every edit step (superposition.png, from ``steps.jsonl``; x = edits after the step).
STEP_PANELS: list[list[Panel]] = [
    [("Interference on earlier edits", ("superposition/interference",)),
     ("Leakage: change at earlier keys / at own keys", ("superposition/leakage",)),
     ("Mean cosine of edited keys", ("superposition/mean_cos",))],
    [("Kurtosis of edited keys' cosines", ("superposition/kurtosis",)),
     ("Tail mass of edited keys' cosines", ("superposition/tail_mass",))],
]


def read_rows(run_dir: str | Path) -> list[Row]:
    """The checkpoints' metric rows of a run (``metrics.jsonl``)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a run directory?")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_steps(run_dir: str | Path) -> list[Row]:
    """The monitors' metrics of every edit step (``steps.jsonl``; empty for a run without monitors)."""
    from .harness import STEPS_FILE, read_rows as read_jsonl

    return read_jsonl(Path(run_dir) / STEPS_FILE)


def spectral_means(row: Row) -> dict[str, float]:
    """Mean over edited layers of each spectral monitor (``{metric}_mean``; k, a count, is left out)."""
    sums: dict[str, list[float]] = {}
    for key, value in row.items():
        if key.startswith("spectral/") and isinstance(value, (int, float)) and not isinstance(value, bool):
            sums.setdefault(key.rsplit("/", 1)[1], []).append(float(value))
    return {f"{k}_mean": sum(v) / len(v) for k, v in sums.items() if k != "k"}


def _with_spectral(rows: list[Row]) -> list[Row]:
    """Rows with the layer means and the two per-layer maxima the early-warning rules look at."""
    out = []
    for row, growth in zip(rows, sigma_max_growth(rows)):
        extra: Row = spectral_means(row)
        if growth is not None:
            extra["sigma_max_growth_max"] = growth
        deltas = layer_values(row, "delta_rel")
        if deltas:
            extra["delta_rel_max"] = max(deltas.values())
        out.append({**row, **extra})
    return out


def _glue_keys(rows: Sequence[Row]) -> list[str]:
    """glue_{task}_{accuracy|f1|mcc} keys present, tasks in first-seen order, metrics in that order."""
    tasks: dict[str, set[str]] = {}
    for row in rows:
        for key in row:
            m = _GLUE_KEY.match(key)
            if m:
                tasks.setdefault(m.group(1), set()).add(m.group(2))
    return [f"glue_{t}_{m}" for t, ms in tasks.items() for m in _GLUE_METRIC_NAMES if m in ms]


def _present(keys: Sequence[str], rows: Sequence[Row]) -> list[str]:
    have = set().union(*rows) if rows else set()
    return [k for k in keys if k in have]


def markdown_table(header: Sequence[str], body: Sequence[Sequence[Any]], floatfmt: str = ".4f") -> str:
    """A Markdown table (every results file and figure of the project writes its tables with it): floats in
    ``floatfmt``, booleans as yes/no, None as an empty cell."""
    def fmt(v: Any) -> str:
        if isinstance(v, bool):
            return "yes" if v else "no"
        return format(v, floatfmt) if isinstance(v, float) else ("" if v is None else str(v))
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in body]
    return "\n".join(lines)


def _ratio(config: dict) -> float:
    return float(config.get("collapse_ppl_ratio") or 2.0)  # the harness default; older configs lack the key


def _rule_text(ratio: float) -> dict[str, str]:
    return {
        "collapse": f"ppl ≥ {ratio:g} × pre-edit ppl on the ME-PPL sentences",
        "warning": f"any edited layer's σ_max ≥ {DEFAULT_SIGMA_MAX_RATIO:g} × its pre-edit σ_max, or its "
                   f"‖W − W₀‖_F / ‖W₀‖_F ≥ {DEFAULT_DELTA_REL:g}",
    }


def _collapse_text(rows: Sequence[Row]) -> str:
    point = collapse_point(rows)
    if point is not None:
        return f"{point} edits"
    if not collapse_measured(rows):
        return "not measured (no perplexity)"
    return f"none in {max(int(r['edits']) for r in rows)} edits"


def _warning_text(rows: Sequence[Row]) -> str:
    w = early_warning(rows)
    return f"{w.edits} edits: {w.describe()}" if w else "none"


def _sections(first: str, labels: list[Any], rows: list[Row], where: str = "") -> list[str]:
    """The four tables (editing, general ability, spectral, protected subspace) over ``rows``; ``where`` is
    appended to each table's title (e.g. " — at 1000 edits")."""
    out = []
    editing = _present(HEADLINE, rows)
    general = _present(GENERAL, rows) + _glue_keys(rows)
    for title, cols in (("Editing", editing), ("General ability: perplexity and GLUE probes", general),
                        ("Spectral monitors (mean over edited layers; σ_max growth: max over layers)",
                         _present(SPECTRAL, rows))):
        out += [f"## {title}{where}", "", markdown_table([first] + cols, [[lab] + [r.get(c) for c in cols]
                                                          for lab, r in zip(labels, rows)]), ""]
    protected = _present(PROTECTED, rows)
    out += ["## Protected-subspace monitors (mean over edited layers; delta_rel_max: max over layers)" + where, ""]
    if protected:
        out += [markdown_table([first] + protected,
                               [[lab] + [r.get(c) for c in protected] for lab, r in zip(labels, rows)]),
                "", "protected_left/right: share of the accumulated edit W − W₀ inside W₀'s protected top-k "
                "left/right singular subspace (0 under REVIVE); complement_over_sigma_k: the largest singular "
                "value outside that subspace over σ_k(W₀) (above 1, an unprotected direction outgrew the "
                "smallest protected one).", ""]
    else:
        out += ["Not recorded by this run (its harness predates these monitors).", ""]
    superposition = _present(SUPERPOSITION, rows)
    if superposition:
        cols = superposition + _present(["ppl_rel", "collapsed"], rows)
        out += ["## Knowledge superposition (mean over edited layers and over the edit steps since the previous row)" + where,
                "", markdown_table([first] + [c.removeprefix("superposition/") for c in cols],
                           [[lab] + [r.get(c) for c in cols] for lab, r in zip(labels, rows)]), "",
                "interference: RMS output change of a step at the keys of earlier edits over the change their own "
                "edits made; leakage: the same over the step's change at its own keys (|P| of Hu et al. for a "
                "rank-one edit); mean_cos, kurtosis (Pearson, 3 for a normal distribution), tail_mass (share beyond "
                "tail_sigma standard deviations): the pairwise cosines of the edited keys "
                "(revive_plugin/plugins/superposition.py).", ""]
    return out


def write_report(run_dir: str | Path) -> Path:
    """Write ``summary.md`` and the figures (editing.png, glue.png, spectral.png; superposition.png with that
    monitor) of one run; returns the summary."""
    run_dir = Path(run_dir)
    rows = _with_spectral(read_rows(run_dir))
    config = yamlio.load((run_dir / "config.yaml").read_text())
    rules = _rule_text(_ratio(config))
    eval_facts = config.get("eval_facts", "all")
    lines = [f"# {config['name']}", "",
             f"hparams `{config['hparams']}`, transforms {config['transforms'] or 'none'}"
             f"{' ' + json.dumps(config.get('revive')) if 'revive' in (config['transforms'] or []) else ''}, "
             f"{config['dataset']} ({config.get('data') or 'shipped sample'}), {config['edits']} edits in batches of "
             f"{config['batch_size']}, evaluation every {config['eval_every']}; facts evaluated: "
             f"{'all edited so far' if eval_facts == 'all' else 'a fixed seeded sample of ' + str(eval_facts)}.",
             "", "## Collapse and early warning", "",
             f"- Collapse point: {_collapse_text(rows)} (rule: first checkpoint with {rules['collapse']}).",
             f"- Early warning: {_warning_text(rows)} (rule: {rules['warning']}).",
             f"- Lead time: {lead_time(rows).description}.", ""]
    lines += _sections("edits", [r["edits"] for r in rows], rows)
    lines += ["Fluency: ROME's weighted bi/tri-gram entropy of greedy generations from the edited facts' first "
              f"generation prompts (up to {config.get('fluency_prompts', 0)}; MEND-format and zsRE data have none). "
              "Consistency (TF-IDF vs reference snippets) needs ROME's attribute_snippets/idf/tfidf_vocab, "
              "which are not available here: it is not reported.", ""]
    path = run_dir / "summary.md"
    path.write_text("\n".join(lines))
    _figures({config["name"]: rows}, {config["name"]: _ratio(config)}, run_dir, {config["name"]: read_steps(run_dir)})
    return path


def compare(run_dirs: Sequence[str | Path], output: str | Path) -> Path:
    """Collapse/warning/lead time per run, the tables at each run's last checkpoint — first at the last checkpoint
    every run reached when the runs stop at different points (a 2,000-edit reference beside 1,000-edit runs is
    compared at 1,000) — and one set of figures."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    series: dict[str, list[Row]] = {}
    ratios: dict[str, float] = {}
    steps: dict[str, list[Row]] = {}
    for d in run_dirs:
        config = yamlio.load((Path(d) / "config.yaml").read_text())
        label = config["name"] if config["name"] not in series else f"{config['name']} ({d})"
        series[label], ratios[label] = _with_spectral(read_rows(d)), _ratio(config)
        steps[label] = read_steps(d)
    labels = list(series)
    finals = [series[lab][-1] for lab in labels]
    warn = [[lab, final["edits"], _collapse_text(series[lab]), _warning_text(series[lab]),
             lead_time(series[lab]).description] for lab, final in zip(labels, finals)]
    lines = ["# Comparison", "",
             "## Collapse and early warning", "",
             markdown_table(["run", "edits", "collapse point", "early warning", "lead time"], warn), "",
             "Collapse: first checkpoint with " + "; ".join(sorted({_rule_text(r)['collapse'] for r in ratios.values()}))
             + f". Early warning: {_rule_text(2.0)['warning']}.", ""]
    ends = [final["edits"] for final in finals]
    shared = set.intersection(*({r["edits"] for r in series[lab]} for lab in labels)) - {0}
    if len(set(ends)) > 1 and shared:  # every shared checkpoint is ≤ the shortest run's last, so < the longest's
        n = max(shared)
        lines += [f"The runs stop at different points ({', '.join(f'{lab}: {e}' for lab, e in zip(labels, ends))} "
                  f"edits): the tables compare them first at {n} edits, the last checkpoint every run reached, then "
                  "at each run's last checkpoint.", ""]
        lines += _sections("run", labels, [next(r for r in series[lab] if r["edits"] == n) for lab in labels],
                           where=f" — at {n} edits")
        lines += _sections("run (edits)", [f"{lab} ({e})" for lab, e in zip(labels, ends)], finals,
                           where=" — last checkpoint of each run")
    else:
        lines += _sections("run", labels, finals, where=f" — at {ends[0]} edits" if len(set(ends)) == 1 else
                           " — last checkpoint of each run")
    text = "\n".join(lines)
    (output / "compare.md").write_text(text)
    _figures(series, ratios, output, steps)
    print(text)
    return output / "compare.md"


# ----------------------------------------------------------------------------------------------- figures


def _general_panels(rows: Sequence[Row]) -> list[list[Panel]]:
    grid: list[list[Panel]] = [[("Perplexity (ME-PPL)", ("ppl",)), ("Perplexity / pre-edit perplexity", ("ppl_rel",))]]
    by_task: dict[str, list[Panel]] = {}
    for key in _glue_keys(rows):
        task, metric = _GLUE_KEY.match(key).groups()
        by_task.setdefault(task, []).append((f"GLUE {task.upper()} {_GLUE_METRIC_NAMES[metric]}", (key,)))
    return grid + list(by_task.values())  # one row per task: accuracy, F1, MCC


def _figures(series: dict[str, list[Row]], ratios: dict[str, float], out_dir: Path,
             steps: Optional[dict[str, list[Row]]] = None) -> None:
    all_rows = [r for rows in series.values() for r in rows]
    # Horizontal reference lines: the rules' thresholds, where a panel shows the quantity they test.
    refs = {"ppl_rel": sorted(set(ratios.values())), "sigma_max_growth_max": [DEFAULT_SIGMA_MAX_RATIO]}
    rule = "collapse point (ppl ≥ " + " or ".join(f"{r:g}" for r in refs["ppl_rel"]) + " × pre-edit)"
    _grid(series, HEADLINE_PANELS, refs, rule, out_dir / "headline.png", "Do edits land, and does the model survive?")
    _grid(series, EDITING_PANELS, refs, rule, out_dir / "editing.png", "Editing metrics")
    _grid(series, _general_panels(all_rows), refs, rule, out_dir / "glue.png",
          "General ability: perplexity and GLUE probes")
    _grid(series, SPECTRAL_PANELS, refs, rule, out_dir / "spectral.png", "Spectral monitors of the edited layers")
    steps = {label: rows for label, rows in (steps or {}).items() if rows}
    if steps:  # per edit step, so no markers; the collapse points are those of the runs' checkpoint rows
        _grid(steps, STEP_PANELS, refs, rule, out_dir / "superposition.png",
              "Knowledge-superposition monitor at every edit step (mean over edited layers)",
              checkpoints=series, markers=False)


def _finite(value: Any) -> float:
    # NaN breaks the line instead of dropping the point silently; inf (e.g. σ_k = 0) would wreck the y range.
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return float("nan")
    return float(value)


def _points(rows: Sequence[Row], keys: tuple[str, ...]) -> Optional[tuple[str, list[int], list[float]]]:
    """(key used, edits, values) of the first of ``keys`` present in the run's rows, else None."""
    for key in keys:
        pts = [(int(r["edits"]), _finite(r[key])) for r in rows if key in r]
        if pts:
            pts.sort()
            return key, [p[0] for p in pts], [p[1] for p in pts]
    return None


def _grid(series: dict[str, list[Row]], layout: list[list[Panel]], refs: dict[str, list[float]],
          collapse_rule: str, path: Path, title: str,
          checkpoints: Optional[dict[str, list[Row]]] = None, markers: bool = True) -> None:
    """One figure of ``layout``'s panels, one line per run of ``series``; the collapse and warning marks and the
    legend's notes come from ``checkpoints`` (the runs' checkpoint rows; default: ``series`` itself)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    grid = [[p for p in row if any(_points(rows, p[1]) for rows in series.values())] for row in layout]
    grid = [row for row in grid if row]
    if not grid:
        return
    ncols = max(len(row) for row in grid)  # ≤ 3 by construction of the layouts
    checkpoints = checkpoints or series
    colours = {label: f"C{i % 10}" for i, label in enumerate(checkpoints)}  # a run's colour is the same in every figure
    # Runs often coincide (e.g. the pre-edit point, or a filter that changes nothing yet): earlier runs get
    # bigger markers and thicker lines, so a later run drawn on top still leaves them visible.
    styles = {label: {"marker": "osD^vP"[i % 6] if markers else None, "markersize": max(3.0, 8.0 - 1.5 * i),
                      "linewidth": max(1.2, 3.0 - 0.6 * i)} for i, label in enumerate(checkpoints)}
    marks = {label: (collapse_point(checkpoints[label]), early_warning(checkpoints[label])) for label in series}
    legend_rows = math.ceil((len(series) + 2) / 2)
    with plt.rc_context({"font.size": 11, "axes.titlesize": 12, "axes.labelsize": 11, "xtick.labelsize": 10,
                         "ytick.labelsize": 10, "legend.fontsize": 10}):
        fig, axes = plt.subplots(len(grid), ncols, squeeze=False, layout="constrained",
                                 figsize=(5 * ncols, 3.6 * len(grid) + 0.3 * legend_rows + 0.5))
        thresholds = False  # whether any panel drew a rule's threshold line (then the legend explains it)
        for r, row in enumerate(grid):
            for c in range(ncols):
                ax = axes[r][c]
                if c >= len(row):
                    ax.set_visible(False)
                    continue
                panel_title, keys = row[c]
                used = []
                for label, rows in series.items():
                    pts = _points(rows, keys)
                    if pts is None:
                        continue
                    used.append(pts[0])
                    ax.plot(pts[1], pts[2], color=colours[label], **styles[label])
                    collapse, warning = marks[label]
                    if collapse is not None:
                        ax.axvline(collapse, color=colours[label], linestyle="--", linewidth=1.5)
                    if warning is not None:
                        ax.axvline(warning.edits, color=colours[label], linestyle=":", linewidth=1.5)
                for y in refs.get(keys[0], []):
                    ax.axhline(y, color="0.4", linestyle="-.", linewidth=1)
                    thresholds = True
                ax.set_title(panel_title)
                ax.set_xlabel("number of edits")
                ax.set_ylabel(" / ".join(dict.fromkeys(used)))
                ax.set_xlim(left=0)
                if keys[0] in UNIT_RANGE:
                    ax.set_ylim(-0.02, 1.02)
                ax.xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 2.5, 5, 10]))
                ax.grid(alpha=0.3)
        handles = [Line2D([], [], color=colours[label], **styles[label],
                          label=f"{label}: {_legend_note(checkpoints[label])}") for label in series]
        if any(m[0] is not None for m in marks.values()):
            handles.append(Line2D([], [], color="0.3", linestyle="--", label=collapse_rule))
        if any(m[1] is not None for m in marks.values()):
            handles.append(Line2D([], [], color="0.3", linestyle=":", label="spectral early warning"))
        if thresholds:
            handles.append(Line2D([], [], color="0.4", linestyle="-.", label="rule threshold"))
        fig.legend(handles=handles, loc="outside lower center", ncols=2, frameon=False)
        fig.suptitle(title, fontsize=14)
        fig.savefig(path, dpi=100)
        plt.close(fig)


def _legend_note(rows: Sequence[Row]) -> str:
    point, warning = collapse_point(rows), early_warning(rows)
    text = f"collapse at {point} edits" if point is not None else (
        "no collapse" if collapse_measured(rows) else "collapse not measured")
    return text + (f", warning at {warning.edits}" if warning else "")
