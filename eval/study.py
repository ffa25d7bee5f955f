"""Studies: several `revive eval` runs from one YAML file, run side by side, resumed across sittings, compared.

A study file (``eval/studies/*.yaml``) names its output folder, how many runs go at once, and its runs —
each a run config plus ``--set`` overrides — and groups of runs to compare::

    name: length
    output: docs/results/length
    parallel: 1                     # runs at once (a run's own parallel: overrides); cores // parallel threads each
    stages: [500, 1000, 2000]       # optional: take every run to 500 edits, then every run to 1000, …
    data_root: ../shared/data       # {data_root} in any override is replaced by this (or --data-root)
    runs:
      memit:        {config: smollm2-memit, set: [edits=2000, "data={data_root}/counterfact/counterfact.json.gz"]}
      memit-revive: {config: smollm2-memit-revive, set: [...]}
      rome:         {from: other-study}   # that study's run of the same name (its directory): run once, shared
    compare:
      memit: [memit, memit-revive]

``revive study FILE`` starts each run that has no directory yet, resumes each that has a checkpoint short of
its edits (``--resume``, with ``--edits`` when the study now asks more), skips finished ones, and writes each
comparison group whose runs all have results to ``OUTPUT/compare-<group>/``. With ``stages`` the runs advance
together: each run pauses at each stage (``revive eval --stop-after``) until every run has reached it, so
partial results stay comparable — useful where two runs at once are slower than one after the other (on a
2-core machine two single-threaded MEMIT runs each ran 3.4× slower than one run with both threads). A run may set its
own ``parallel`` (``{config: ..., set: [...], parallel: 2}``): it then starts only beside runs that allow as many at
once as will then run, with cores // its parallel threads — so FT's and ROME's small per-prompt steps can share the
cores two at a time (``python benchmarks/run_all.py --only parallel`` measures whether that pays) while MEMIT's
runs keep the machine to themselves. Every run is its own process
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
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import yaml

from revive_plugin import yamlio

from .harness import STOPPED_AT_COLLAPSE, read_rows
# Imported with the harness, not when the first comparison is written hours later: a long study then compares with
# the code it started with, even if the checkout changes under it.
from .report import compare


STUDY_DIR = Path(__file__).resolve().parent / "studies"


@dataclass
class StudyRun:
    """One run of a study: its name, run config and overrides, and its directory."""

    name: str
    config: str
    overrides: list[str]
    run_dir: Path
    parallel: int = 1    # the most runs, this one included, that may run while it runs

    @property
    def target_edits(self) -> Optional[int]:
        for item in self.overrides:
            if item.startswith("edits="):
                return int(item.split("=", 1)[1])
        return None

    def _checkpoint_state(self) -> dict:
        state = self.run_dir / "checkpoint" / "state.json"
        return json.loads(state.read_text()) if state.exists() else {}

    def progress(self) -> tuple[int, Optional[int]]:
        """(edits done at the last checkpoint, the run's target) from its directory; (0, None) before it starts."""
        config = self.run_dir / "config.yaml"
        done = self._checkpoint_state().get("edits_done", 0)
        target = yamlio.load(config.read_text()).get("edits") if config.exists() else None
        return done, target

    def stopped_at_collapse(self) -> Optional[int]:
        """The edits at which the run ended on its collapse (``stop_at_collapse``), else None."""
        return self._checkpoint_state().get(STOPPED_AT_COLLAPSE)

    def reached(self, edits: int) -> bool:
        """Whether the run has a checkpoint and an evaluated row at ``edits`` or beyond (or ended at its collapse)."""
        if self.stopped_at_collapse() is not None:
            return True
        rows = read_rows(self.run_dir / "metrics.jsonl")
        return self.progress()[0] >= edits and any(r["edits"] >= edits for r in rows)

    def finished(self) -> bool:
        _, target = self.progress()
        return target is not None and self.reached(self.target_edits or target)

    def state(self) -> str:
        """finished, in progress or not started (from its directory)."""
        stopped = self.stopped_at_collapse()
        if stopped is not None:
            return f"finished: collapsed at {stopped} edits (stop_at_collapse)"
        return "finished" if self.finished() else ("not started" if self.progress()[1] is None else "in progress")

    def status_line(self, width: int = 24) -> str:
        done, target = self.progress()
        return status_line(self.name, done, self.target_edits or target, self.state(), width)

    def environment(self) -> dict:
        """The environment its process gets in a study: cores // its ``parallel`` torch threads."""
        return run_environment(_threads(self.parallel))

    def launch(self, stop_after: Optional[int], env: dict, cwd: Optional[Path] = None, tag: str = "study",
               die_with_parent: bool = False) -> tuple[subprocess.Popen, Any]:
        """Start :meth:`command` as a process logging to ``RUN_DIR/eval.log``; (process, open log).

        ``die_with_parent`` (Linux): the run gets SIGTERM — and saves a checkpoint — if the process that started
        it dies, instead of running on unseen (a Ray worker killed under a sweep).
        """
        self.run_dir.mkdir(parents=True, exist_ok=True)
        log = (self.run_dir / "eval.log").open("a")
        cmd = self.command(stop_after=stop_after)
        log.write(f"\n[{tag}] {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n")
        log.flush()
        preexec = _term_with_parent(os.getpid()) if die_with_parent and sys.platform.startswith("linux") else None
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd or Path.cwd(),
                                preexec_fn=preexec), log

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


def _term_with_parent(parent: int) -> Callable[[], None]:
    """A preexec_fn: SIGTERM to the child when ``parent`` dies (prctl PR_SET_PDEATHSIG; libc loaded before the fork)."""
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl

    def arm() -> None:
        prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before the call
            os.kill(os.getpid(), signal.SIGTERM)
    return arm


def status_line(name: str, done: int, target: Optional[int], state: str, width: int = 24) -> str:
    """One line of a study's or sweep's status table."""
    return f"  {name:<{width}} {done:>6} / {target or '?'} edits  {state}"


def find_spec(path: str | Path, directory: Path, kind: str) -> Path:
    """A study or sweep file: ``path`` itself, or a file shipped in ``directory`` (by name, with or without .yaml)."""
    p = Path(path)
    for candidate in (p, directory / p, directory / f"{p}.yaml"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{kind} {path} not found (shipped: {sorted(x.stem for x in directory.glob('*.yaml'))})")


def read_spec(p: Path, allowed: Sequence[str], kind: str) -> dict:
    """The mapping in a study or sweep file, refusing settings not in ``allowed``."""
    try:
        data = yamlio.load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{kind} file {p} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{kind} file {p} must be a mapping of settings, got {type(data).__name__}")
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise ValueError(f"{p}: unknown {kind} setting(s) {unknown}; allowed: {', '.join(allowed)}")
    return data


def override_list(p: Path, key: str, value: Any, data_root: str) -> list[str]:
    """A list of KEY=VALUE overrides from a study or sweep file, with {data_root} replaced."""
    value = value or []
    if not isinstance(value, list):
        raise ValueError(f"{p}: {key} must be a list of KEY=VALUE overrides, got {value!r}")
    return [str(x).replace("{data_root}", data_root) for x in value]


@contextmanager
def stop_signals(handler: Callable[[int, Any], None]) -> Iterator[None]:
    """SIGTERM and SIGINT (Ctrl-C) call ``handler`` while inside; the previous handlers come back after."""
    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@dataclass
class Study:
    """A study file, resolved: output folder, runs, comparison groups."""

    name: str
    output: Path
    stages: list[int]
    runs: dict[str, StudyRun]
    compare: dict[str, list[str]]

    @classmethod
    def load(cls, path: str | Path, data_root: Optional[str] = None, output: Optional[str] = None,
             _loading: tuple[Path, ...] = ()) -> "Study":
        p = find_spec(path, STUDY_DIR, "study")
        if p.resolve() in _loading:
            chain = " -> ".join(str(x) for x in (*_loading, p.resolve()))
            raise ValueError(f"studies take runs from each other in a circle ({chain}); a run's 'from' must name a "
                             "study that does not take runs from this one")
        data = read_spec(p, ("name", "output", "parallel", "stages", "data_root", "common", "runs", "compare"), "study")
        root = data_root or data.get("data_root") or "../shared/data"
        common = override_list(p, "common", data.get("common"), root)
        stages = data.get("stages") or []
        if not isinstance(stages, list) or any(isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in stages) \
                or stages != sorted(set(stages)):
            raise ValueError(f"{p}: stages must be an increasing list of edit counts (e.g. [500, 1000]), got {stages!r}")
        runs_data = data.get("runs")
        if not isinstance(runs_data, dict) or not runs_data:
            raise ValueError(f"{p}: 'runs' must map run names to {{config: NAME, set: [KEY=VALUE, ...]}}")
        out = Path(output or data.get("output") or f"runs/{data.get('name', p.stem)}")
        parallel = _positive(p, "parallel", data.get("parallel", 1))
        runs = {}
        for name, spec in runs_data.items():
            if isinstance(spec, dict) and set(spec) == {"from"}:
                # Another study's run of the same name: the same directory, so it is run (or continued) once and
                # compared in both studies, never repeated.
                ref = str(spec["from"])
                beside = [c for c in (p.parent / ref, p.parent / f"{ref}.yaml") if c.is_file()]
                other = cls.load(beside[0] if beside else ref, data_root=data_root,
                                 _loading=(*_loading, p.resolve()))
                if name not in other.runs:
                    raise ValueError(f"{p}: run {name!r} is taken from study {spec['from']!r}, which has no run "
                                     f"{name!r}; its runs: {sorted(other.runs)}")
                runs[name] = other.runs[name]
                continue
            if not isinstance(spec, dict) or "config" not in spec or set(spec) - {"config", "set", "parallel"}:
                raise ValueError(f"{p}: run {name!r} must be {{config: NAME, set: [KEY=VALUE, ...]}} (optionally "
                                 f"with parallel: N) or {{from: STUDY}} (that study's run of the same name), got {spec!r}")
            overrides = [*common, *override_list(p, f"runs.{name}.set", spec.get("set"), root)]
            runs[name] = StudyRun(name, spec["config"], overrides, out / name,
                                  _positive(p, f"runs.{name}.parallel", spec.get("parallel", parallel)))
        groups = data.get("compare") or {}
        for group, members in groups.items():
            missing = [m for m in members if m not in runs]
            if missing:
                raise ValueError(f"{p}: compare group {group!r} names unknown run(s) {missing}; runs: {sorted(runs)}")
        return cls(data.get("name", p.stem), out, stages, runs, groups)

    def status(self) -> str:
        return "\n".join(r.status_line() for r in self.runs.values())

    def set_parallel(self, n: int) -> None:
        """Every run at ``n`` at once (``revive study --parallel N``: the runs' own settings are overridden)."""
        for r in self.runs.values():
            r.parallel = n

    def write_comparisons(self) -> list[Path]:
        """Compare each group whose runs all have metrics; returns the comparison files written."""
        written = []
        for group, members in self.compare.items():
            dirs = [self.runs[m].run_dir for m in members]
            if all((d / "metrics.jsonl").exists() for d in dirs):
                written.append(compare(dirs, self.output / f"compare-{group}"))
        return written


def _positive(p: Path, key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{p}: {key} must be a positive integer (runs at once), got {value!r}")
    return value


def _threads(parallel: int) -> int:
    return max(1, (os.cpu_count() or 1) // parallel)


def run_environment(threads: int, extra: Optional[dict] = None) -> dict:
    """The environment of a run's process: this process's, then ``extra``, ``threads`` torch threads, unbuffered output
    (so its log shows progress as it happens)."""
    return {**os.environ, **(extra or {}), "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}


def fits_beside(run: StudyRun, running: Sequence[StudyRun]) -> bool:
    """Whether ``run`` may start while ``running`` run: no more runs at once than any of them, ``run`` included,
    allows (its ``parallel``)."""
    n = len(running) + 1
    return all(n <= r.parallel for r in (run, *running))


def _tasks(study: Study, runs: Sequence[StudyRun]) -> list[tuple[StudyRun, Optional[int]]]:
    """(run, pause point) in order: every run to each stage in turn, then every run to its end.

    A run whose end falls within a stage (above the previous stage, at or below this one) finishes in that stage's
    round (the length study's 500-edit ROME runs finish before the 2,000-edit runs go on to 1,000), so shorter runs
    are not queued behind every stage of the longer ones.
    """
    tasks: list[tuple[StudyRun, Optional[int]]] = []
    previous = 0
    for stage in study.stages:
        for r in runs:
            target = r.target_edits or r.progress()[1] or stage + 1
            if stage < target:
                tasks.append((r, stage))
            elif previous < target:
                tasks.append((r, None))
        previous = stage
    return tasks + [(r, None) for r in runs]


def _reached(run: StudyRun, stage: Optional[int]) -> bool:
    return run.finished() if stage is None else run.reached(stage)


def run_study(study: Study, only: Sequence[str] = (), poll_seconds: float = 2.0) -> int:
    """Run (or continue) the study's unfinished runs, as many at a time as their ``parallel`` allows (each with
    cores // its parallel threads), in task order; 0 when all finished."""
    selected = [study.runs[n] for n in (only or study.runs)]
    pending = [(r, stage) for r, stage in _tasks(study, selected) if not _reached(r, stage)]
    print(f"[study] {study.name}: {sum(r.finished() for r in selected)} of {len(selected)} runs finished")
    print(study.status(), flush=True)
    running: dict[str, tuple[subprocess.Popen, Any, Optional[int]]] = {}
    failed: list[str] = []
    stopping = False

    def stop(signum: int, frame: Any) -> None:
        nonlocal stopping
        stopping = True
        for proc, _, _ in running.values():
            proc.send_signal(signal.SIGTERM)  # each run saves a checkpoint and exits

    with stop_signals(stop):
        while pending or running:
            while not stopping:
                # The next task whose run is idle; a run's later stage waits for its earlier one, and a task that
                # may not share the machine with what runs waits for it (no task overtakes it).
                ready = next((t for t in pending if t[0].name not in running and t[0].name not in failed), None)
                if ready is None or not fits_beside(ready[0], [study.runs[n] for n in running]):
                    break
                pending.remove(ready)
                r, stage = ready
                if _reached(r, stage):
                    continue
                proc, log = r.launch(stage, r.environment())
                print(f"[study] {r.name}: {' '.join(proc.args[2:])} (log {r.run_dir / 'eval.log'})", flush=True)
                running[r.name] = (proc, log, stage)
            if (stopping or not any(t[0].name not in failed for t in pending)) and not running:
                break
            time.sleep(poll_seconds if not stopping else 1.0)
            for name in list(running):
                proc, log, stage = running[name]
                if proc.poll() is None:
                    continue
                del running[name]
                ok = proc.returncode == 0 and _reached(study.runs[name], stage)
                where = "finished" if stage is None else f"reached {stage} edits"
                if not ok:  # the run's own log says how its process ended, beside what it printed
                    log.write(f"\n[study] {time.strftime('%Y-%m-%d %H:%M:%S')} the run stopped with exit status "
                              f"{proc.returncode} without having {where}\n")
                log.close()
                print(f"[study] {name}: {where if ok else f'stopped (exit {proc.returncode})'}", flush=True)
                if not ok and not stopping:
                    failed.append(name)
                study.write_comparisons()
    study.write_comparisons()
    print(study.status(), flush=True)
    if stopping:
        print(f"[study] stopped; continue with: revive study {study.name}")
        return 130
    if failed:
        print(f"[study] failed: {failed} (see their eval.log)")
        return 1
    return 0
