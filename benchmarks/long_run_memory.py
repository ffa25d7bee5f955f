"""Memory over a long run: RSS at each checkpoint of a sequential-editing run of the harness on SmolLM2.

Runs ``revive eval`` (the Python API underneath) with REVIVE on, checkpoints every ``--every`` edits, and reads
the run's ``resources.jsonl``: resident and peak RSS at each checkpoint. Flat means the RSS after the first
post-edit checkpoint does not grow with the number of edits (no accumulating snapshots, graphs or caches).

RSS is read after returning freed heap pages to the OS (glibc ``malloc_trim``), and the torch tensors
Python can reach are counted, so a leak (tensors kept per edit) is told apart from allocator fragmentation.

The editor is FT on one layer (2 steps per batch of 100): cheap enough for 1,000 edits on a CPU in minutes,
and it goes through the same host, snapshots, REVIVE cache, checkpoints and evaluations as any other editor.

    python benchmarks/long_run_memory.py [--edits 1000] [--every 100] [--data PATH] [--json out.json]
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Optional

from common import ROOT, machine, markdown_table, script_main

SHARED_COUNTERFACT = ROOT.parent / "shared" / "data" / "counterfact" / "counterfact_mend.json.gz"


def slope(x: list[float], y: list[float]) -> float:
    """Least-squares slope of y against x (0.0 for fewer than two points)."""
    n = len(x)
    if n < 2:
        return 0.0
    mx, my = sum(x) / n, sum(y) / n
    var = sum((a - mx) ** 2 for a in x)
    return sum((a - mx) * (b - my) for a, b in zip(x, y)) / var if var else 0.0


def run(edits: int = 1000, every: int = 100, batch: int = 100, data: Optional[str] = None) -> dict:
    from revive_plugin.eval.datasets import load_counterfact
    from revive_plugin.eval.harness import Run, RunConfig

    if data is None and SHARED_COUNTERFACT.exists():
        data = str(SHARED_COUNTERFACT)
    available = len(load_counterfact(data, limit=None))
    if available < edits:
        print(f"only {available} CounterFact records available ({data or 'shipped sample'}): running {available} "
              "edits; pass --data for more")
        edits = available - available % batch
    out = Path(tempfile.mkdtemp(prefix="revive-memory-"))
    config = RunConfig(
        name="long-run-memory", hparams=str(ROOT / "hparams" / "FT" / "smollm2-135m.yaml"),
        hparams_overrides={"num_steps": 2, "batch_size": batch}, transforms=["revive"],
        revive={"tau": 0.1, "basis": "original"}, dataset="counterfact", data=data, edits=edits,
        batch_size=batch, eval_every=every, eval_facts=20,
        glue={"tasks": ["sst2", "rte"], "n_per_task": 10, "few_shot": 0, "dir": None},
        fluency_prompts=2, fluency_tokens=10, output=str(out / "{name}"))
    try:
        run_dir = Run.start(config).execute()
        rows = [json.loads(line) for line in (run_dir / "resources.jsonl").read_text().splitlines()]
    finally:
        shutil.rmtree(out, ignore_errors=True)
    after = rows[1:] if len(rows) > 2 else rows
    slopes = {k: slope([r["edits"] for r in after], [r[k] for r in after]) * 1000
              for k in ("rss_mb", "window_peak_rss_mb", "live_tensor_mb")}
    return {"rows": rows, "slope_mb_per_1000_edits": slopes,
            "slope_pct_of_first": {k: 100 * v / after[0][k] for k, v in slopes.items()},
            "setup": {"edits": edits, "every": every, "batch": batch, "data": data or "shipped sample",
                      "machine": machine()}}


def report(r: dict) -> str:
    s = r["setup"]
    rows = [[x["edits"], x["rss_mb"], x["window_peak_rss_mb"], x["peak_rss_mb"], x["live_tensors"],
             x["live_tensor_mb"], x["edit_seconds"], x["filter_seconds"], x["eval_seconds"]] for x in r["rows"]]
    g, p = r["slope_mb_per_1000_edits"], r["slope_pct_of_first"]
    return (f"Memory over a {s['edits']}-edit run (FT + REVIVE on SmolLM2, batches of {s['batch']}, "
            f"checkpoint every {s['every']})\n"
            + markdown_table(["edits", "RSS MiB", "peak RSS since last checkpoint MiB", "peak RSS so far MiB",
                              "live tensors", "live tensor MiB", "editor s", "filter s", "eval s"], rows)
            + f"\ntrend after the first post-edit checkpoint (least squares): RSS {g['rss_mb']:+.1f} MiB per 1000 edits "
              f"({p['rss_mb']:+.2f}% of its first value), peak since last checkpoint {g['window_peak_rss_mb']:+.1f} MiB "
              f"per 1000 edits ({p['window_peak_rss_mb']:+.2f}%), live tensors {g['live_tensor_mb']:+.1f} MiB per 1000 "
              f"edits ({p['live_tensor_mb']:+.2f}%) (target: flat)")


def main() -> None:
    script_main(__doc__, run, report, {"edits": int, "every": int, "batch": int, "data": str})


if __name__ == "__main__":
    main()
