"""Sweeps: a grid over a run config's settings, every point its own `revive eval` run, scheduled by Ray.

A sweep file (``eval/sweeps/*.yaml``) names a base run config, overrides every point gets, and a grid; each
combination of the grid's values (their product, the last key varying fastest) is one run::

    name: tau
    output: runs/sweeps/tau         # the runs go to OUTPUT/<point>/, the comparison to OUTPUT/compare/
    config: smollm2-memit-revive    # base run config: a shipped name or a YAML path
    data_root: ../shared/data       # {data_root} in any override is replaced by this (or --data-root)
    set: [edits=1000, "data={data_root}/counterfact/counterfact.json.gz"]   # every point, before its own
    grid:                           # KEY: [VALUE, ...] -- any `revive eval --set` key; values are YAML
      revive.tau: [0.02, 0.05, 0.1, 0.2]
      revive.basis: [original, current]
    resources: {num_cpus: 1, num_gpus: 0}   # what each run asks of Ray (default 1 CPU, no GPU)

A point's directory is named from its settings, ``tau-0.02_basis-original`` (the last part of each key —
the whole key where two share it — and the value; lists joined by ``+``, ``[]`` as ``none``, anything but
letters, digits, ``.``, ``_``, ``+`` and ``-`` as ``-``), so the same grid always finds the same directories.

``revive sweep FILE`` starts a Ray instance on this machine (RAY_ADDRESS, or --address, connects to a cluster
instead) and runs each unfinished point as a Ray task holding its resources; the task runs the point's `revive
eval` command in a process of its own (its log in ``RUN_DIR/eval.log``), exactly as `revive study` does (the
commands are :class:`~revive_plugin.eval.study.StudyRun`'s): a point without a directory starts, a point with
a checkpoint short of its edits resumes (``--resume``), a finished point is skipped. SIGTERM or Ctrl-C to the
sweep cancels the tasks, each of which passes SIGTERM on to its run, which rolls back its unfinished edit
step and saves a checkpoint; the next ``revive sweep FILE`` continues from there. When every point has
finished, ``revive compare`` over them is written to ``OUTPUT/compare/``.

On a cluster the tasks read and write the run directories on the nodes: the sweep's output folder, the data,
the hparams and the run configs must be at the same paths on every node (a shared filesystem; relative paths
resolve against the directory ``revive sweep`` was called from where a node has it), and revive-plugin must be
installed on every node.
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import os
import re
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import yaml

from .study import StudyRun, find_spec, override_list, read_spec, run_environment, status_line, stop_signals

SWEEP_DIR = Path(__file__).resolve().parent / "sweeps"
#: Environment variables the sweep hands to every run (a Ray worker does not inherit the shell of `revive sweep`).
FORWARDED_ENV = ("REVIVE_", "EASYEDIT_", "HF_", "TRANSFORMERS_")
RESOURCES = {"num_cpus": 1, "num_gpus": 0}


def require_ray() -> Any:
    try:
        import ray
    except ImportError as e:
        raise ImportError("revive sweep runs on Ray, which is not installed: pip install 'revive-plugin[sweep]' "
                          "(scripts/install.sh installs it)") from e
    return ray


# -- the sweep file --------------------------------------------------------------------------------
def yaml_value(value: Any) -> str:
    """``value`` as the YAML text of a ``--set KEY=VALUE`` (read back by the harness as the same value)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 30)
    return text[:-4].strip() if text.endswith("\n...\n") else text.strip()


def value_label(value: Any) -> str:
    if isinstance(value, list):
        return "+".join(value_label(v) for v in value) or "none"
    if isinstance(value, dict):
        return "+".join(f"{k}-{value_label(v)}" for k, v in value.items()) or "none"
    return yaml_value(value)


def safe_name(text: str, limit: int = 80) -> str:
    """A filesystem-safe directory name for ``text`` (stable: the same text, the same name)."""
    name = re.sub(r"-{2,}", "-", re.sub(r"[^A-Za-z0-9._+-]", "-", text)).strip("-.") or "point"
    if len(name) > limit:
        name = f"{name[:limit - 9]}-{hashlib.sha1(text.encode()).hexdigest()[:8]}"
    return name


def point_names(keys: list[str], points: list[tuple[Any, ...]]) -> list[str]:
    """The directory name of each point: ``short-value`` per key joined by ``_``, unique."""
    short = [k.split(".")[-1] for k in keys]
    short = [s if short.count(s) == 1 else k for s, k in zip(short, keys)]
    names = ["_".join(safe_name(f"{s}-{value_label(v)}") for s, v in zip(short, values)) for values in points]
    twins = {n for n in names if names.count(n) > 1}  # e.g. a/b and a-b: told apart by their exact settings
    return [f"{n}-{hashlib.sha1(repr(list(zip(keys, values))).encode()).hexdigest()[:8]}" if n in twins else n
            for n, values in zip(names, points)]


@dataclass
class Sweep:
    """A sweep file, resolved: output folder, base config, one StudyRun per grid point, resources per run."""

    name: str
    output: Path
    config: str
    points: dict[str, StudyRun]
    settings: dict[str, dict[str, Any]]   # point name -> its grid values
    resources: dict[str, float]
    source: str = ""                      # the file as given (`revive sweep SOURCE` continues it)

    @classmethod
    def load(cls, path: str | Path, data_root: Optional[str] = None, output: Optional[str] = None,
             check: bool = True) -> "Sweep":
        """Read a sweep file (a path, or the name of one in eval/sweeps); with ``check`` every point's run config
        is built once, so a misspelt key or a bad value is refused before anything runs."""
        p = find_spec(path, SWEEP_DIR, "sweep")
        data = read_spec(p, ("name", "output", "config", "data_root", "set", "grid", "resources"), "sweep")
        if not isinstance(data.get("config"), str) or not data["config"]:
            raise ValueError(f"{p}: config must name the base run config (a shipped name or a YAML path)")
        root = data_root or data.get("data_root") or "../shared/data"
        common = override_list(p, "set", data.get("set"), root)
        grid = data.get("grid")
        if not isinstance(grid, dict) or not grid or any(not isinstance(v, list) or not v for v in grid.values()):
            raise ValueError(f"{p}: grid must map settings to non-empty lists of values, e.g. grid: {{revive.tau: "
                             f"[0.05, 0.1], transforms: [[], [revive]]}}; got {grid!r}")
        if "name" in grid:
            raise ValueError(f"{p}: name cannot be a grid key (each point's run is named after its directory)")
        resources = {**RESOURCES, **(data.get("resources") or {})}
        unknown = sorted(set(resources) - set(RESOURCES))
        bad = [k for k, v in resources.items() if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0]
        if unknown or bad or resources["num_cpus"] <= 0:
            raise ValueError(f"{p}: resources takes num_cpus (> 0) and num_gpus (>= 0) per run; got "
                             f"{data.get('resources')!r}")
        name = data.get("name", p.stem)
        out = Path(output or data.get("output") or f"runs/sweeps/{name}")
        keys = [str(k) for k in grid]
        values = list(itertools.product(*grid.values()))
        points, settings = {}, {}
        for label, combo in zip(point_names(keys, values), values):
            own = [f"{k}={yaml_value(v)}".replace("{data_root}", root) for k, v in zip(keys, combo)]
            points[label] = StudyRun(label, data["config"], [*common, *own], out / label)
            settings[label] = dict(zip(keys, combo))
        sweep = cls(name, out, data["config"], points, settings, resources, str(path))
        if check:
            sweep.check()
        return sweep

    def check(self) -> None:
        from .harness import RunConfig

        for run in self.points.values():
            try:
                RunConfig.from_yaml(run.config, [f"name={run.name}", *run.overrides])
            except ValueError as e:
                raise ValueError(f"sweep {self.name}, point {run.name} ({' '.join(run.overrides)}): {e}") from e

    def status(self, reports: Optional[list[dict]] = None) -> str:
        """Each point's edits and state: from ``reports`` (:func:`point_status`), else from the directories here."""
        width = max(24, *(len(n) for n in self.points))
        if reports is None:
            return "\n".join(r.status_line(width) for r in self.points.values())
        return "\n".join(status_line(s["name"], s["edits_done"], s["target"], s["state"], width) for s in reports)


# -- Ray tasks (run on the nodes; everything that touches a run directory happens here) -----------------
def _base(workdir: str) -> Path:
    return Path(workdir) if Path(workdir).is_dir() else Path.cwd()


def _located(run: StudyRun, workdir: str) -> StudyRun:
    return run if run.run_dir.is_absolute() else dataclasses.replace(run, run_dir=_base(workdir) / run.run_dir)


def _report(run: StudyRun, outcome: Optional[str] = None, returncode: Optional[int] = None) -> dict:
    done, target = run.progress()
    return {"name": run.name, "outcome": outcome, "returncode": returncode, "edits_done": done,
            "target": run.target_edits or target, "finished": run.finished(), "state": run.state(),
            "run_dir": str(run.run_dir)}


def point_status(runs: list[StudyRun], workdir: str) -> list[dict]:
    """Where each point stands (a Ray task: the run directories are read where the runs are)."""
    return [_report(_located(r, workdir)) for r in runs]


def run_point(run: StudyRun, workdir: str, stop_after: Optional[int], threads: int, env: dict) -> dict:
    """Start, resume or skip one point's run (a Ray task); ``ray.cancel`` stops it with a checkpoint."""
    run = _located(run, workdir)
    proc = log = None
    try:
        if run.finished() or (stop_after is not None and run.reached(stop_after)):
            return _report(run, "skipped")
        proc, log = run.launch(stop_after, run_environment(threads, env), cwd=_base(workdir), tag="sweep",
                               die_with_parent=True)
        while proc.poll() is None:
            time.sleep(0.5)
    except KeyboardInterrupt:  # ray.cancel: the sweep is stopping
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # the run rolls back its unfinished step and saves a checkpoint
            proc.wait()
        return _report(run, "stopped", proc.returncode if proc is not None else None)
    finally:
        if log is not None:
            log.close()
    reached = run.finished() or (stop_after is not None and run.reached(stop_after))
    if proc.returncode != 0 or not reached:
        return _report(run, "failed", proc.returncode)
    return _report(run, "finished" if run.finished() else "paused", 0)


def compare_points(run_dirs: list[str], output: str, workdir: str) -> tuple[str, str]:
    """`revive compare` over ``run_dirs`` into ``output`` (a Ray task); (compare.md's path, its text)."""
    from .report import compare

    base = _base(workdir)
    located = [p if Path(p).is_absolute() else base / p for p in run_dirs]
    out = compare(located, Path(output) if Path(output).is_absolute() else base / output)
    return str(out), out.read_text()


# -- the driver -----------------------------------------------------------------------------------
def _describe(result: dict, stop_after: Optional[int]) -> str:
    outcome, done, target = result["outcome"], result["edits_done"], result["target"] or "?"
    log = Path(result["run_dir"]) / "eval.log"
    return {"finished": f"finished ({done} edits)",
            "skipped": "already finished" if result["finished"] else f"already at {stop_after} edits",
            "paused": f"paused at {done} of {target} edits",
            "stopped": f"stopped at {done} of {target} edits (checkpoint kept)",
            "not started": "not started",
            }.get(outcome, f"failed (exit {result['returncode']}; see {log})")


def _edits_here(sweep: Sweep) -> Optional[str]:
    """Edits done over the grid from the run directories, where this machine sees them (else None)."""
    try:
        done = target = 0
        for r in sweep.points.values():
            d, t = r.progress()
            done, target = done + d, target + (r.target_edits or t or 0)
        return f"{done}/{target} edits" if target else None
    except (OSError, ValueError, KeyError):
        return None  # a checkpoint being swapped; the next poll reads it


def run_sweep(sweep: Sweep, stop_after: Optional[int] = None, address: Optional[str] = None,
              local_cpus: Optional[int] = None, poll_seconds: float = 1.0, progress: bool = True) -> int:
    """Run (or continue) every unfinished point of ``sweep`` on Ray and compare the finished ones.

    ``stop_after`` pauses every run at that many edits. Ray: the instance this process is already connected
    to; else ``address`` or $RAY_ADDRESS (a cluster); else a new local instance with ``local_cpus`` CPUs (all
    by default), shut down at the end. 0 when every point finished (or reached ``stop_after``), 130 when
    stopped by SIGTERM/Ctrl-C, 1 when a run failed.
    """
    from tqdm.auto import tqdm

    if stop_after is not None and stop_after < 1:
        raise ValueError(f"--stop-after must be a positive number of edits, got {stop_after}")
    ray = require_ray()
    started = not ray.is_initialized()
    if started:
        address = address or os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(address="local", num_cpus=local_cpus, include_dashboard=False, log_to_driver=False)
    where = f"cluster {address}" if started and address else "local Ray" if started else "connected Ray"
    workdir = str(Path.cwd())
    env = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV)}
    res = sweep.resources
    threads = max(1, int(res["num_cpus"]))
    runs = list(sweep.points.values())
    try:
        status = ray.get(ray.remote(num_cpus=0)(point_status).remote(runs, workdir))
        done_before = sum(s["finished"] for s in status)
        print(f"[sweep] {sweep.name}: {len(runs)} points, {sum(s['finished'] for s in status)} finished "
              f"({where}; each run {res['num_cpus']:g} CPU, {res['num_gpus']:g} GPU; runs in {sweep.output})",
              flush=True)
        print(sweep.status(status), flush=True)
        task = ray.remote(run_point).options(
            # No retries: a point whose worker died is reported failed; the next call resumes it.
            num_cpus=res["num_cpus"], num_gpus=res["num_gpus"], max_retries=0)
        # Every unfinished point; a point already at stop_after comes back "skipped" at once.
        pending = {task.remote(r, workdir, stop_after, threads, env): r.name
                   for r, s in zip(runs, status) if not s["finished"]}
        results: dict[str, dict] = {}
        stopping = cancelled = False

        def stop(signum: int, frame: Any) -> None:
            nonlocal stopping
            stopping = True

        bar = tqdm(total=len(runs), initial=done_before, unit="run", desc=f"sweep {sweep.name}",
                   disable=not progress, dynamic_ncols=True)
        with stop_signals(stop):
            while pending:
                if stopping and not cancelled:
                    bar.write("[sweep] stopping: each run saves a checkpoint")
                    for ref in pending:
                        ray.cancel(ref)  # the task passes SIGTERM on to its run and waits for it
                    cancelled = True
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=poll_seconds)
                for ref in ready:
                    name = pending.pop(ref)
                    try:
                        result = ray.get(ref)
                    except ray.exceptions.TaskCancelledError:
                        result = {**_report(sweep.points[name]), "outcome": "not started"}
                    except ray.exceptions.RayError as e:
                        result = {**_report(sweep.points[name]), "outcome": "failed", "returncode": None}
                        bar.write(f"[sweep] {name}: {type(e).__name__}: {str(e).splitlines()[0]}")
                    results[name] = result
                    bar.write(f"[sweep] {name}: {_describe(result, stop_after)}")
                    if result["outcome"] in ("finished", "paused", "skipped"):
                        bar.update(1)
                edits = _edits_here(sweep)
                if edits:
                    bar.set_postfix_str(edits, refresh=True)
        bar.close()
        if stopping:
            print(f"[sweep] stopped; continue with: revive sweep {sweep.source or sweep.name}")
            return 130
        failed = [n for n, r in results.items() if r["outcome"] == "failed"]
        final = ray.get(ray.remote(num_cpus=0)(point_status).remote(runs, workdir))
        finished = [s for s in final if s["finished"]]
        if finished and stop_after is None:
            path, text = ray.get(ray.remote(compare_points).remote(
                [s["run_dir"] for s in finished], str(sweep.output / "compare"), workdir))
            print(text)
            print(f"[sweep] compare ({len(finished)} of {len(runs)} points): {path}")
        if failed:
            print(f"[sweep] failed: {failed} (see their eval.log)")
            return 1
        return 0
    finally:
        if started:
            ray.shutdown()
