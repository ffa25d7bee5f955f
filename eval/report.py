"""Reports of runs: summary.md tables and PNG plots of one run, and side-by-side comparisons of several."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import yaml

# Columns of the summary tables, in order, when present.
HEADLINE = [
    "efficacy_score", "generalization_score", "specificity_score",
    "efficacy", "generalization", "specificity",
    "efficacy_magnitude", "generalization_magnitude", "specificity_magnitude",
    "easyedit_rewrite_acc", "easyedit_rephrase_acc", "easyedit_locality", "fluency",
]


def read_rows(run_dir: str | Path) -> list[dict[str, Any]]:
    """The checkpoints' metric rows of a run (``metrics.jsonl``)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a run directory?")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def spectral_means(row: dict[str, Any]) -> dict[str, float]:
    """Mean over edited layers of each spectral monitor (ls, ss, fro_norm, sigma_max)."""
    sums: dict[str, list[float]] = {}
    for key, value in row.items():
        if key.startswith("spectral/"):
            sums.setdefault(key.rsplit("/", 1)[1], []).append(value)
    return {f"{k}_mean": sum(v) / len(v) for k, v in sums.items() if k != "k"}


def _columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    present = set().union(*rows) if rows else set()
    glue = sorted(k for k in present if k.startswith("glue_") and not k.endswith("_rel")
                  and (k.endswith("_accuracy") or k.endswith("_mcc")))
    return [c for c in HEADLINE if c in present] + glue


def _table(header: list[str], body: list[list[Any]]) -> str:
    def fmt(v: Any) -> str:
        return f"{v:.4f}" if isinstance(v, float) else ("" if v is None else str(v))
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in body]
    return "\n".join(lines)


def _plot(series: dict[str, list[dict[str, Any]]], keys: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in keys if any(k in r for rows in series.values() for r in rows)]
    if not keys:
        return
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for label, rows in series.items():
            pts = [(r["edits"], r[key]) for r in rows if key in r]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=label)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("edits")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _with_spectral(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{**r, **spectral_means(r)} for r in rows]


def write_report(run_dir: str | Path) -> Path:
    """Write ``summary.md`` and the plots of one run; returns the summary path."""
    run_dir = Path(run_dir)
    rows = _with_spectral(read_rows(run_dir))
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    cols = _columns(rows)
    spec = ["ls_mean", "ss_mean", "fro_norm_mean", "sigma_max_mean"]
    lines = [f"# {config['name']}", "",
             f"hparams `{config['hparams']}`, transforms {config['transforms'] or 'none'}"
             f"{' ' + json.dumps(config['revive']) if 'revive' in config['transforms'] else ''}, "
             f"{config['dataset']} ({config['data'] or 'shipped sample'}), {config['edits']} edits in batches of "
             f"{config['batch_size']}, evaluation every {config['eval_every']}; facts evaluated: "
             f"{'all edited so far' if config['eval_facts'] == 'all' else 'a fixed seeded sample of ' + str(config['eval_facts'])}.",
             "", "## Editing and GLUE", "",
             _table(["edits"] + cols, [[r["edits"]] + [r.get(c) for c in cols] for r in rows]),
             "", "## Spectral monitors (mean over edited layers)", "",
             _table(["edits"] + spec, [[r["edits"]] + [r.get(c) for c in spec] for r in rows]), "",
             "Fluency: ROME's weighted bi/tri-gram entropy of greedy generations from the edited facts' first "
             f"generation prompts (up to {config.get('fluency_prompts', 0)}; MEND-format and zsRE data have none). "
             "Consistency (TF-IDF vs reference snippets) needs ROME's attribute_snippets/idf/tfidf_vocab, "
             "which are not available here: it is not reported.", ""]
    path = run_dir / "summary.md"
    path.write_text("\n".join(lines))
    series = {config["name"]: rows}
    _plot(series, [c for c in cols if not c.startswith("glue_")], run_dir / "editing.png", "editing metrics")
    _plot(series, [c for c in cols if c.startswith("glue_")], run_dir / "glue.png", "GLUE probes")
    _plot(series, spec, run_dir / "spectral.png", "spectral monitors")
    return path


def compare(run_dirs: Sequence[str | Path], output: str | Path) -> Path:
    """One table (final checkpoint of each run) and one set of plots for several runs."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    series: dict[str, list[dict[str, Any]]] = {}
    for d in run_dirs:
        name = yaml.safe_load((Path(d) / "config.yaml").read_text())["name"]
        label = name if name not in series else f"{name} ({d})"
        series[label] = _with_spectral(read_rows(d))
    all_rows = [r for rows in series.values() for r in rows]
    cols = _columns(all_rows)
    spec = ["ls_mean", "ss_mean", "fro_norm_mean", "sigma_max_mean"]
    body = [[label, rows[-1]["edits"]] + [rows[-1].get(c) for c in cols + spec] for label, rows in series.items()]
    text = "\n".join(["# Comparison (last checkpoint of each run)", "",
                      _table(["run", "edits"] + cols + spec, body), ""])
    (output / "compare.md").write_text(text)
    _plot(series, [c for c in cols if not c.startswith("glue_")], output / "editing.png", "editing metrics")
    _plot(series, [c for c in cols if c.startswith("glue_")], output / "glue.png", "GLUE probes")
    _plot(series, spec, output / "spectral.png", "spectral monitors")
    print(text)
    return output / "compare.md"
