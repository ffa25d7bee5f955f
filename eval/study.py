"""Studies: several `revive eval` runs from one YAML file, run side by side, resumed across sittings, compared.

A study file (``eval/studies/*.yaml``) names its output folder, how many runs go at once, and its runs —
each a run config plus ``--set`` overrides — and groups of runs to compare::

    name: length
    output: docs/results/length
    parallel: 1                     # runs at once; each gets cores // parallel torch threads
    stages: [500, 1000, 2000]       # optional: take every run to 500 edits, then every run to 1000, …
    data_root: ../shared/data       # {data_root} in any override is replaced by this (or --data-root)
    runs:
      memit:        {config: smollm2-memit, set: [edits=2000, "data={data_root}/counterfact/counterfact.json.gz"]}
      memit-revive: {config: smollm2-memit-revive, set: [...]}
    compare:
      memit: [memit, memit-revive]

``revive study FILE`` starts each run that has no directory yet, resumes each that has a checkpoint short of
its edits (``--resume``, with ``--edits`` when the study now asks more), skips finished ones, and writes each
comparison group whose runs all have results to ``OUTPUT/compare-<group>/``. With ``stages`` the runs advance
together: each run pauses at each stage (``revive eval --stop-after``) until every run has reached it, so
partial results stay comparable — useful where two runs at once are slower than one after the other (on a
2-core machine two single-threaded runs each ran 3.4× slower than one run with both threads). Every run is its own process
(its log in ``RUN_DIR/eval.log``); SIGTERM or Ctrl-C to the study is passed on to the runs, which roll back
their unfinished edit step and save a checkpoint, so the next ``revive study FILE`` picks up where this one
stopped.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

from .harness import read_rows


STUDY_DIR = Path(__file__).resolve().parent / "studies"


@dataclass
class StudyRun:
    """One run of a study: its name, run config and overrides, and its directory."""

    name: str
    config: str
    overrides: list[str]
    run_dir: Path

    @property
    def target_edits(self) -> Optional[int]:
        for item in self.overrides:
            if item.startswith("edits="):
                return int(item.split("=", 1)[1])
        return None

    def progress(self) -> tuple[int, Optional[int]]:
        """(edits done at the last checkpoint, the run's target) from its directory; (0, None) before it starts."""
        state, config = self.run_dir / "checkpoint" / "state.json", self.run_dir / "config.yaml"
        done = json.loads(state.read_text())["edits_done"] if state.exists() else 0
        target = yaml.safe_load(config.read_text()).get("edits") if config.exists() else None
        return done, target

    def reached(self, edits: int) -> bool:
        """Whether the run has a checkpoint and an evaluated row at ``edits`` or beyond."""
        rows = read_rows(self.run_dir / "metrics.jsonl")
        return self.progress()[0] >= edits and any(r["edits"] >= edits for r in rows)

    def finished(self) -> bool:
        _, target = self.progress()
        return target is not None and self.reached(self.target_edits or target)

    def command(self, stop_after: Optional[int] = None) -> list[str]:
        """The `revive eval` command that starts or continues this run (pausing after ``stop_after`` edits)."""
        pause = ["--stop-after", str(stop_after)] if stop_after else []
        base = [sys.executable, "-m", "revive_plugin.cli", "eval"]
        if (self.run_dir / "checkpoint").exists() or (self.run_dir / "checkpoint.old").exists():
            cmd = base + ["--resume", str(self.run_dir)]
            if self.target_edits:
                cmd += ["--edits", str(self.target_edits)]
            return cmd + pause
        # No --overwrite: `revive eval` refuses a directory that holds results, and the study says so.
        cmd = base + [self.config, "--output", str(self.run_dir), "--set", f"name={self.name}"]
        for item in self.overrides:
            cmd += ["--set", item]
        return cmd + pause


@dataclass
class Study:
    """A study file, resolved: output folder, runs, comparison groups."""

    name: str
    output: Path
    parallel: int
    stages: list[int]
    runs: dict[str, StudyRun]
    compare: dict[str, list[str]]

    @classmethod
    def load(cls, path: str | Path, data_root: Optional[str] = None, output: Optional[str] = None) -> "Study":
        p = Path(path)
        for candidate in (p, STUDY_DIR / p, STUDY_DIR / f"{p}.yaml"):
            if candidate.exists():
                p = candidate
                break
        else:
            raise FileNotFoundError(f"study {path} not found (shipped: {sorted(x.stem for x in STUDY_DIR.glob('*.yaml'))})")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"study file {p} is not valid YAML: {e}") from e
        allowed = ("name", "output", "parallel", "stages", "data_root", "common", "runs", "compare")
        unknown = sorted(set(data) - set(allowed))
        if unknown:
            raise ValueError(f"{p}: unknown study setting(s) {unknown}; allowed: {', '.join(allowed)}")
        common = data.get("common") or []
        if not isinstance(common, list):
            raise ValueError(f"{p}: common must be a list of KEY=VALUE overrides given to every run, got {common!r}")
        stages = data.get("stages") or []
        if not isinstance(stages, list) or any(isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in stages) \
                or stages != sorted(set(stages)):
            raise ValueError(f"{p}: stages must be an increasing list of edit counts (e.g. [500, 1000]), got {stages!r}")
        runs_data = data.get("runs")
        if not isinstance(runs_data, dict) or not runs_data:
            raise ValueError(f"{p}: 'runs' must map run names to {{config: NAME, set: [KEY=VALUE, ...]}}")
        root = data_root or data.get("data_root") or "../shared/data"
        out = Path(output or data.get("output") or f"runs/{data.get('name', p.stem)}")
        parallel = data.get("parallel", 1)
        if isinstance(parallel, bool) or not isinstance(parallel, int) or parallel < 1:
            raise ValueError(f"{p}: parallel must be a positive integer, got {parallel!r}")
        runs = {}
        for name, spec in runs_data.items():
            if not isinstance(spec, dict) or "config" not in spec or set(spec) - {"config", "set"}:
                raise ValueError(f"{p}: run {name!r} must be {{config: NAME, set: [KEY=VALUE, ...]}}, got {spec!r}")
            overrides = [str(x).replace("{data_root}", root) for x in [*common, *(spec.get("set") or [])]]
            runs[name] = StudyRun(name, spec["config"], overrides, out / name)
        groups = data.get("compare") or {}
        for group, members in groups.items():
            missing = [m for m in members if m not in runs]
            if missing:
                raise ValueError(f"{p}: compare group {group!r} names unknown run(s) {missing}; runs: {sorted(runs)}")
        return cls(data.get("name", p.stem), out, parallel, stages, runs, groups)

    def status(self) -> str:
        lines = []
        for r in self.runs.values():
            done, target = r.progress()
            state = "finished" if r.finished() else ("not started" if target is None else "in progress")
            lines.append(f"  {r.name:<24} {done:>6} / {r.target_edits or target or '?'} edits  {state}")
        return "\n".join(lines)

    def write_comparisons(self) -> list[Path]:
        """Compare each group whose runs all have metrics; returns the comparison files written."""
        from .report import compare

        written = []
        for group, members in self.compare.items():
            dirs = [self.runs[m].run_dir for m in members]
            if all((d / "metrics.jsonl").exists() for d in dirs):
                written.append(compare(dirs, self.output / f"compare-{group}"))
        return written


def _threads(parallel: int) -> int:
    return max(1, (os.cpu_count() or 1) // parallel)


def _tasks(study: Study, runs: Sequence[StudyRun]) -> list[tuple[StudyRun, Optional[int]]]:
    """(run, pause point) in order: every run to each stage in turn, then every run to its end."""
    tasks: list[tuple[StudyRun, Optional[int]]] = []
    for stage in study.stages:
        tasks += [(r, stage) for r in runs if stage < (r.target_edits or r.progress()[1] or stage + 1)]
    return tasks + [(r, None) for r in runs]


def _reached(run: StudyRun, stage: Optional[int]) -> bool:
    return run.finished() if stage is None else run.reached(stage)


def run_study(study: Study, only: Sequence[str] = (), poll_seconds: float = 2.0) -> int:
    """Run (or continue) the study's unfinished runs, ``study.parallel`` at a time; 0 when all finished."""
    selected = [study.runs[n] for n in (only or study.runs)]
    pending = [(r, stage) for r, stage in _tasks(study, selected) if not _reached(r, stage)]
    print(f"[study] {study.name}: {sum(r.finished() for r in selected)} of {len(selected)} runs finished")
    print(study.status(), flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(_threads(study.parallel)), "PYTHONUNBUFFERED": "1"}
    running: dict[str, tuple[subprocess.Popen, Any, Optional[int]]] = {}
    failed: list[str] = []
    stopping = False

    def stop(signum: int, frame: Any) -> None:
        nonlocal stopping
        stopping = True
        for proc, _, _ in running.values():
            proc.send_signal(signal.SIGTERM)  # each run saves a checkpoint and exits

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while pending or running:
            while not stopping and len(running) < study.parallel:
                # The next task whose run is idle; a run's later stage waits for its earlier one.
                ready = next((t for t in pending if t[0].name not in running and t[0].name not in failed), None)
                if ready is None:
                    break
                pending.remove(ready)
                r, stage = ready
                if _reached(r, stage):
                    continue
                r.run_dir.mkdir(parents=True, exist_ok=True)
                log = (r.run_dir / "eval.log").open("a")
                cmd = r.command(stop_after=stage)
                log.write(f"\n[study] {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n")
                log.flush()
                print(f"[study] {r.name}: {' '.join(cmd[2:])} (log {r.run_dir / 'eval.log'})", flush=True)
                running[r.name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                                    cwd=Path.cwd()), log, stage)
            if (stopping or not any(t[0].name not in failed for t in pending)) and not running:
                break
            time.sleep(poll_seconds if not stopping else 1.0)
            for name in list(running):
                proc, log, stage = running[name]
                if proc.poll() is None:
                    continue
                log.close()
                del running[name]
                ok = proc.returncode == 0 and _reached(study.runs[name], stage)
                where = "finished" if stage is None else f"reached {stage} edits"
                print(f"[study] {name}: {where if ok else f'stopped (exit {proc.returncode})'}", flush=True)
                if not ok and not stopping:
                    failed.append(name)
                study.write_comparisons()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    study.write_comparisons()
    print(study.status(), flush=True)
    if stopping:
        print(f"[study] stopped; continue with: revive study {study.name}")
        return 130
    if failed:
        print(f"[study] failed: {failed} (see their eval.log)")
        return 1
    return 0
