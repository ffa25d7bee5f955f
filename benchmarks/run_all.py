"""`make bench`: run the performance figures, print them, and write docs/benchmarks.md from their results.

Each figure's measured result goes to ``docs/benchmarks/<figure>.json``; ``docs/benchmarks.md`` is rebuilt
from all the result files present, so figures can be re-measured one at a time (``--only``).

    python benchmarks/run_all.py [--only overhead,filter,eval,memory,edits,study,rome,parallel] [--quick]
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from datetime import date
from pathlib import Path

import edit_overhead
import edit_throughput
import eval_throughput
import filter_cost
import long_run_memory
import parallel_runs
import rome_throughput
import study_time
from common import ROOT, machine

OUT = ROOT / "docs" / "benchmarks"
DOC = ROOT / "docs" / "benchmarks.md"

#: name: (title, module, --quick arguments); full size is each script's own defaults.
FIGURES = {
    "overhead": ("1. Filter overhead on a MEMIT edit step", edit_overhead, {"requests": 10, "z_steps": 2, "repeat": 1}),
    "filter": ("2. Filter cost vs dense projectors, and the basis cache", filter_cost, {"shapes": "576x1536,1600x6400"}),
    "eval": ("3. Evaluation throughput", eval_throughput, {"records": 10}),
    "memory": ("4. Memory over a long run", long_run_memory, {"edits": 40, "every": 20, "batch": 20}),
    "edits": ("5. Edit throughput: batched z optimisation", edit_throughput, {"requests": 4, "batch": 4, "z_steps": 4}),
    "study": ("6. Time of a 2,000-edit MEMIT run of the length study", study_time, {}),
    "rome": ("7. ROME edit time: batched z path for compute_v", rome_throughput, {"requests": 1}),
    "parallel": ("8. Two study runs at once: FT and ROME", parallel_runs, {"pairs": "smollm2-ft:smollm2-ft-revive"}),
}


def _spaced(text: str) -> str:
    """A report with blank lines around its tables, so Markdown renders them."""
    out: list[str] = []
    for line in text.splitlines():
        if out and out[-1] and (line.startswith("|") != out[-1].startswith("|")):
            out.append("")
        out.append(line)
    return "\n".join(out)


def write_doc() -> None:
    parts = ["# Benchmarks", "",
             "Measured by `make bench` (`python benchmarks/run_all.py`); each section is rebuilt from "
             "`docs/benchmarks/<figure>.json`, written by the run that measured it. Targets are those of the "
             "performance issue; where one is not met the section says so and why.", ""]
    for name, (title, module, _) in FIGURES.items():
        path = OUT / f"{name}.json"
        if not path.exists():
            parts += [f"## {title}", "", "_not measured yet: `python benchmarks/run_all.py --only " + name + "`_", ""]
            continue
        saved = json.loads(path.read_text())
        try:
            body = _spaced(module.report(saved["result"]))
        except (KeyError, TypeError) as e:  # a result file from an older version of the script
            parts += [f"## {title}", "", f"_`{path.name}` is from an older version of the script ({e!r}): "
                      f"re-measure with `python benchmarks/run_all.py --only {name}`_", ""]
            continue
        parts += [f"## {title}", "",
                  f"Command: `{saved['command']}` — measured {saved['date']} in {saved['seconds']:.0f} s on "
                  f"{saved['machine']}.", "", body, ""]
        notes = OUT / f"{name}.md"
        if notes.exists():
            parts += [notes.read_text().strip(), ""]
    DOC.write_text("\n".join(parts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(FIGURES), help=f"comma-separated subset of {list(FIGURES)}")
    parser.add_argument("--quick", action="store_true", help="small sizes (minutes, for a smoke run)")
    args = parser.parse_args()
    names = [n for n in args.only.split(",") if n]
    unknown = [n for n in names if n not in FIGURES]
    if unknown:
        raise SystemExit(f"unknown figure(s) {unknown}; choose from {list(FIGURES)}")
    OUT.mkdir(parents=True, exist_ok=True)
    for name in names:
        title, module, quick = FIGURES[name]
        print(f"\n== {title}", flush=True)
        began = time.perf_counter()
        result = module.run(**(quick if args.quick else {}))
        seconds = time.perf_counter() - began
        print(module.report(result), flush=True)
        if args.quick:
            continue  # smoke sizes are not the documented figures
        record = {"command": "python " + " ".join(shlex.quote(a) for a in ["benchmarks/run_all.py", "--only", name]),
                  "date": date.today().isoformat(), "seconds": seconds, "machine": machine(), "result": result}
        (OUT / f"{name}.json").write_text(json.dumps(record, indent=1))
        write_doc()
    if not args.quick:
        print(f"\nwrote {DOC.relative_to(ROOT)}")


if __name__ == "__main__":
    sys.exit(main())
