"""Figure 6: how long a 2,000-edit MEMIT run of the length study takes on this machine, read off its own records.

The study's runs record, at every checkpoint, the seconds spent in the editor, in the plugins and in evaluation
since the previous one (``RUN_DIR/resources.jsonl``). This figure sums them per run — no new measurement, so
it costs nothing and reports exactly what the committed runs took — and projects the time for ``target``
edits from the measured seconds per edit (over the edits a row says it timed: ``edits_timed``; a resumed
process counts its own) plus the evaluation seconds the schedule will add.

    python benchmarks/study_time.py [--runs docs/results/length/memit,docs/results/length/memit-revive]
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import yaml
from common import ROOT, markdown_table, script_main

RUNS = "docs/results/length/memit,docs/results/length/memit-revive"
TARGET_HOURS = 2.0
#: A row whose process used at least this share of its threads' wall time had the machine (nearly) to itself:
#: a z step of a batch of 100 keeps both threads busy, so a shared machine shows up as a lower share.
QUIET_SHARE = 0.75


def _rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def run(runs: str = RUNS, target: int = 2000) -> dict:
    """Per run: edits done, editor/filter/eval seconds, threads, and the projected time for ``target`` edits."""
    out = []
    for name in [r for r in runs.split(",") if r]:
        run_dir = ROOT / name
        rows = _rows(run_dir / "resources.jsonl")
        if not rows:
            out.append({"run": name, "missing": True})
            continue
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
        edits = max(r["edits"] for r in rows)
        timed = [r for r in rows if "edits_timed" in r]  # rows that say which edits their seconds cover
        edit_s = sum(r["edit_seconds"] for r in timed)
        filter_s = sum(r["filter_seconds"] for r in timed)
        covered = sum(r["edits_timed"] for r in timed)
        evals = [r["eval_seconds"] for r in rows]
        per_edit = edit_s / covered if covered else None
        # rows that say they had the machine to themselves (older rows do not say: not counted as quiet)
        quiet = [r for r in timed if r.get("cpu_share", 0.0) >= QUIET_SHARE and r["edits_timed"]]
        quiet_edits = sum(r["edits_timed"] for r in quiet)
        per_edit_quiet = sum(r["edit_seconds"] for r in quiet) / quiet_edits if quiet_edits else None
        checkpoints_left = max(0, target // config["eval_every"] - (len(rows) - 1))
        eval_mean = sum(evals[1:]) / len(evals[1:]) if len(evals) > 1 else None

        def projection(seconds_per_edit: Optional[float]) -> Optional[float]:
            if seconds_per_edit is None or eval_mean is None:
                return None
            return (seconds_per_edit * target + sum(evals) + eval_mean * checkpoints_left) / 3600

        out.append({"run": name, "edits": edits, "edits_timed": covered, "edit_seconds": edit_s, "filter_seconds": filter_s,
                    "seconds_per_edit": per_edit, "eval_seconds": evals, "projected_hours": projection(per_edit),
                    "quiet_edits_timed": quiet_edits, "quiet_seconds_per_edit": per_edit_quiet,
                    "quiet_projected_hours": projection(per_edit_quiet),
                    "rows": [{k: r.get(k) for k in ("edits", "edits_timed", "edit_seconds", "eval_seconds", "cpu_share",
                                                    "matmul_gflops", "cpu_model")}
                             for r in rows],
                    "batch_size": config["batch_size"], "eval_every": config["eval_every"]})
    return {"target": target, "runs": out}


def report(r: dict) -> str:
    body = []
    for x in r["runs"]:
        if x.get("missing"):
            body.append([x["run"], "not started", "", "", "", "", ""])
            continue
        body.append([x["run"], f"{x['edits']} ({x['edits_timed']} timed)", round(x["edit_seconds"]), round(x["filter_seconds"], 1),
                     round(x["seconds_per_edit"], 2) if x["seconds_per_edit"] else "",
                     ", ".join(f"{e:.0f}" for e in x["eval_seconds"]),
                     round(x["projected_hours"], 2) if x["projected_hours"] is not None else "(needs a post-edit checkpoint)"])
    lines = [f"Length-study MEMIT runs (batch 100, 15 z steps, batched z): time for {r['target']} edits",
             markdown_table(["run", "edits so far", "editor s", "plugins s", "s / edit", "eval s per checkpoint",
                             f"projected h for {r['target']}"], body)]
    per_row = [[x["run"], row["edits"], row.get("edits_timed", ""), row["edit_seconds"],
                round(row["edit_seconds"] / row["edits_timed"], 2) if row.get("edits_timed") else "",
                round(row["eval_seconds"]), row.get("cpu_share") if row.get("cpu_share") is not None else "(not recorded)",
                row.get("matmul_gflops") or "(not recorded)"]
               for x in r["runs"] if not x.get("missing") for row in x["rows"]]
    lines += ["", "Per checkpoint row (CPU share: the process's CPU seconds over wall seconds × threads since the "
              f"previous row; ≥ {QUIET_SHARE} means it had the machine to itself; GFLOP/s: the machine's float32 "
              "matrix-product speed measured at the checkpoint, which differs between sittings' machines):",
              markdown_table(["run", "edits", "edits timed", "editor s", "s / edit", "eval s", "CPU share", "GFLOP/s"],
                             per_row)]
    for key, what in (("projected_hours", "all timed rows"), ("quiet_projected_hours", "rows with the machine to itself")):
        done = [x for x in r["runs"] if x.get(key) is not None]
        if done:
            worst = max(x[key] for x in done)
            lines.append(f"slowest projected run from {what}: {worst:.2f} h for {r['target']} edits (target ≤ "
                         f"{TARGET_HOURS:.0f} h): {'met' if worst <= TARGET_HOURS else f'not met, by {worst - TARGET_HOURS:.2f} h'}")
        else:
            lines.append(f"no projection from {what} yet")
    return "\n".join(lines)


def main() -> None:
    script_main(__doc__, run, report, {"runs": str, "target": int})


if __name__ == "__main__":
    main()
