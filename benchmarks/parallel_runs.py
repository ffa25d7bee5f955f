"""Figure 8: two study runs at once (one thread each) against one after the other (all threads each).

A study's ``parallel`` decides whether its runs share the machine. For MEMIT (batches of 100 prompts: large matrix
products) two single-threaded runs at once were each 3.4× slower than one run with both threads, a loss. FT and
ROME edit one prompt (or one fact's few prompts) per optimiser step: small matrix products that a second thread
speeds up little, so two runs at once may get through more edits per hour. This figure measures it for pairs of
shipped run configs, each run a real ``revive eval`` process on the embedded SmolLM2, started as a study starts it
(``StudyRun.launch``, cores // parallel threads) with its evaluations cut to a minimum (the timing is the editor's, read from the
run's own ``resources.jsonl``):

* one after the other: each run alone with ``cores`` threads;
* at once: both started together with ``cores // 2`` threads each.

The gain is Σ_runs (seconds per edit alone) / (seconds per edit at once): how many times more editing the pair
gets through at once than one after the other in the same time (> 1: share the machine). The pair's wall times
(process start, model load and the small evaluations included) are reported beside it.

    python benchmarks/parallel_runs.py [--pairs smollm2-ft:smollm2-ft-revive,smollm2-rome-prune:smollm2-ft]
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from common import ROOT, markdown_table, script_main

PAIRS = "smollm2-ft:smollm2-ft-revive,smollm2-rome-prune:smollm2-ft"
#: (edits, requests per step) per run, so each run edits for about a minute (FT ~9 s an edit, ROME ~24 s, one
#: request per call as in the study)
EDITS = {"ft": (8, 8), "rome": (3, 1)}
#: the least evaluation a run allows: no GLUE, perplexity or fluency, one fact scored
MINIMAL_EVAL = ["glue.tasks=[]", "ppl=null", "fluency_prompts=0", "eval_facts=1", "eval_last_batch=false"]


def _run(config: str, out: Path, parallel: int) -> Any:
    """A study run of ``config`` into ``out`` with the least evaluation, sharing the machine with ``parallel`` − 1."""
    from revive_plugin.eval.study import StudyRun

    n, batch = next((x for key, x in EDITS.items() if f"-{key}" in config), (4, 1))
    return StudyRun(out.name, config, [f"edits={n}", f"batch_size={batch}", f"eval_every={n}", *MINIMAL_EVAL], out,
                    parallel)


def _timed(runs: list[Any]) -> tuple[float, list[dict]]:
    """Start ``runs`` together as the study does (its command, cores // parallel threads each); (wall seconds until
    all ended, each run's last resources.jsonl row)."""
    began = time.perf_counter()
    started = [(r, *r.launch(None, r.environment(), cwd=ROOT, tag="bench")) for r in runs]
    for r, proc, log in started:
        code = proc.wait()
        log.close()
        if code != 0:
            raise RuntimeError(f"revive eval {r.config} failed (exit {code}); log: {r.run_dir / 'eval.log'}")
    wall = time.perf_counter() - began
    return wall, [json.loads((r.run_dir / "resources.jsonl").read_text().splitlines()[-1]) for r in runs]


def run(pairs: str = PAIRS) -> dict:
    cores = os.cpu_count() or 1
    results = []
    with tempfile.TemporaryDirectory(prefix="revive-parallel-") as tmp:
        for pair in [p for p in pairs.split(",") if p]:
            a, b = pair.split(":")
            base = Path(tmp) / pair.replace(":", "+")
            base.mkdir()
            alone = [_timed([_run(c, base / f"alone-{i}", 1)]) for i, c in enumerate((a, b))]
            together_wall, together = _timed([_run(a, base / "at-once-0", 2), _run(b, base / "at-once-1", 2)])
            runs = []
            for c, (wall, (row,)), shared in zip((a, b), alone, together):
                runs.append({"config": c, "edits": row["edits_timed"],
                             "alone_s_per_edit": row["edit_seconds"] / row["edits_timed"],
                             "at_once_s_per_edit": shared["edit_seconds"] / shared["edits_timed"],
                             "alone_threads": row["threads"], "at_once_threads": shared["threads"],
                             "alone_wall": wall})
            gain = sum(r["alone_s_per_edit"] / r["at_once_s_per_edit"] for r in runs)
            results.append({"pair": pair, "runs": runs, "gain": gain,
                            "wall_one_after_other": sum(r["alone_wall"] for r in runs),
                            "wall_at_once": together_wall})
    return {"cores": cores, "pairs": results}


def report(r: dict) -> str:
    rows = []
    for p in r["pairs"]:
        for x in p["runs"]:
            rows.append([p["pair"], x["config"], x["edits"], f"{x['alone_s_per_edit']:.2f} ({x['alone_threads']} threads)",
                         f"{x['at_once_s_per_edit']:.2f} ({x['at_once_threads']} thread{'s' if x['at_once_threads'] > 1 else ''})"])
    lines = [f"Two runs at once vs one after the other ({r['cores']} cores): seconds of editing per edit",
             markdown_table(["pair", "run", "edits", "s / edit alone", "s / edit at once"], rows)]
    for p in r["pairs"]:
        lines.append(f"{p['pair']}: at once gets through {p['gain']:.2f}x the edits of one after the other "
                     f"(wall, load and minimal evaluation included: {p['wall_at_once']:.0f} s at once against "
                     f"{p['wall_one_after_other']:.0f} s one after the other)")
    return "\n".join(lines)


def main() -> None:
    script_main(__doc__, run, report, {"pairs": str})


if __name__ == "__main__":
    main()
