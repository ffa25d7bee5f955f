"""Sequential editing runs: edits in batches, checkpoints with evaluation, resume after interruption.

A run is described by a YAML run config (``eval/configs/``) with command-line overrides; it writes one
``RUN_DIR`` holding the resolved config, ``metrics.jsonl`` (one row per checkpoint), ``summary.md``, PNG
plots and ``checkpoint/`` (edited weights, plugin and monitor state, RNG state, progress) from which
``revive eval --resume RUN_DIR`` continues to the same result as an uninterrupted run.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import os
import random
import re
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
import yaml
from filelock import FileLock, Timeout
from tqdm.auto import tqdm

from revive_plugin import yamlio
from revive_plugin.config import ReviveConfig
from revive_plugin.filter import ReviveFilter

#: Pre-edit measurements kept in the checkpoint's state so a resumed run compares with the same baseline.
BASELINE_KEYS = ("pre_locality", "glue_baseline", "ppl_baseline")
#: The checkpoint state key of a run that ended at its collapse (``stop_at_collapse``): the edits it ended at.
STOPPED_AT_COLLAPSE = "stopped_at_collapse"
#: The monitors' metrics of every edit call (``{"edits": edits after it, "<monitor>/…": value}``), one JSON line each,
#: beside ``metrics.jsonl`` (whose rows hold their means since the previous row); only runs with ``monitors``.
STEPS_FILE = "steps.jsonl"
PACKAGE_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = Path(__file__).resolve().parent / "configs"


@dataclass
class RunConfig:
    """One sequential-editing run (see ``eval/configs/*.yaml``)."""

    name: str
    hparams: str                                   # EasyEdit hparams YAML (path; relative paths: cwd, then the project)
    model: Optional[str] = None                    # overrides the hparams' model_name
    hparams_overrides: dict = field(default_factory=dict)
    transforms: list = field(default_factory=list)  # plugin names applied to each delta, in order ([] = none)
    batched_z: Any = None                          # MEMIT z optimisation: None = as the hparams say; true/false/{chunk: N}
    revive: dict = field(default_factory=dict)     # the revive block when "revive" is in transforms
    plugins: dict = field(default_factory=dict)    # plugin name -> its settings block, for the names in transforms/monitors
    monitors: list = field(default_factory=list)   # plugins that only observe (e.g. superposition): their step metrics go into each row
    dataset: str = "counterfact"                   # counterfact | zsre
    data: Optional[str] = None                     # data file; None: the shipped sample
    order: str = "file"                            # file: records in file order | seeded: a permutation by `seed`
    edits: int = 10
    batch_size: int = 1                            # requests per edit step
    eval_every: int = 10                           # checkpoint + evaluation every N edits (and at the end)
    eval_facts: Any = "all"                        # "all" edited facts, or an int: a fixed seeded sample of them
    glue: dict = field(default_factory=lambda: {"tasks": ["sst2", "mrpc", "cola", "rte"], "n_per_task": 50,
                                                 "few_shot": 0, "dir": None})
    monitor_tau: float = 0.1                       # k of the LS/SS monitors (independent of the filter)
    eval_last_batch: bool = True                   # also score the batch just edited (last_batch_* metrics)
    eval_all_at_end: bool = False                  # the last checkpoint evaluates every edited fact
    ppl: Optional[dict] = field(default_factory=lambda: {"data": None, "n": 200, "max_tokens": 128})
    collapse_ppl_ratio: float = 2.0                # a checkpoint is flagged collapsed at ppl >= ratio × pre-edit ppl
    stop_at_collapse: bool = False                 # end the run at its first checkpoint flagged collapsed (that
                                                   # checkpoint then scores every edited fact if eval_all_at_end)
    fluency_prompts: int = 10                      # generation prompts of edited facts for Fluency (0: off)
    fluency_tokens: int = 40                       # greedy tokens generated per prompt
    seed: int = 0
    output: str = "runs/{name}"
    device: Optional[str] = None                   # None: CPU without a GPU, else easyeditor's cuda:{device}
    easyedit_source: Optional[str] = None          # an EasyEdit GitHub checkout to edit with (None: $EASYEDIT_SOURCE,
                                                   # else the installed release); relative: cwd, then the project

    def __post_init__(self) -> None:
        if self.order not in ("file", "seeded"):
            raise ValueError(f"order must be 'file' or 'seeded' (a permutation of the records by seed), got {self.order!r}")
        if self.dataset not in ("counterfact", "zsre"):
            raise ValueError(f"dataset must be 'counterfact' or 'zsre', got {self.dataset!r}")
        for key in ("edits", "batch_size", "eval_every"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{key} must be a positive integer, got {value!r}")
        if self.eval_every % self.batch_size:
            # checkpoints come after whole batches: any other eval_every would silently skip its checkpoints
            fit = max(self.batch_size, self.eval_every // self.batch_size * self.batch_size)
            raise ValueError(f"eval_every ({self.eval_every}) must be a multiple of batch_size ({self.batch_size}): "
                             f"checkpoints come after whole batches; e.g. eval_every: {fit}")
        if not (self.eval_facts == "all" or (isinstance(self.eval_facts, int) and self.eval_facts > 0)):
            raise ValueError(f"eval_facts must be 'all' or a positive integer, got {self.eval_facts!r}")
        if self.ppl is not None:
            unknown = sorted(set(self.ppl) - {"data", "n", "max_tokens"})
            if not isinstance(self.ppl, dict) or unknown:
                raise ValueError(f"ppl must be null or a mapping with keys data, n, max_tokens; got {self.ppl!r}")
        if isinstance(self.collapse_ppl_ratio, bool) or not isinstance(self.collapse_ppl_ratio, (int, float)) \
                or self.collapse_ppl_ratio <= 1:
            raise ValueError(f"collapse_ppl_ratio must be a number > 1, got {self.collapse_ppl_ratio!r}")
        if not isinstance(self.stop_at_collapse, bool):
            raise ValueError(f"stop_at_collapse must be true or false, got {self.stop_at_collapse!r}")
        if self.stop_at_collapse and self.ppl is None:
            raise ValueError("stop_at_collapse needs the perplexity measure that flags a collapse: set ppl "
                             "(e.g. ppl: {n: 200}) or stop_at_collapse: false")
        if not isinstance(self.transforms, list) or not all(isinstance(n, str) for n in self.transforms):
            raise ValueError(f"transforms must be a list of plugin names, got {self.transforms!r}")
        if not isinstance(self.monitors, list) or not all(isinstance(n, str) for n in self.monitors):
            raise ValueError(f"monitors must be a list of plugin names (e.g. [superposition]), got {self.monitors!r}")
        self._check_plugin_blocks()
        if "revive" in self.transforms:
            ReviveConfig.from_dict(self.plugin_block("revive"))
        if self.easyedit_source is not None and (not isinstance(self.easyedit_source, str) or not self.easyedit_source):
            raise ValueError(f"easyedit_source must be the path of an EasyEdit checkout (the folder holding "
                             f"easyeditor/), or null for the installed release; got {self.easyedit_source!r}")
        if self.batched_z is not None:
            from revive_plugin.adapters.easyedit import batched_z_options

            batched_z_options(self.batched_z, source="run config")

    def _check_plugin_blocks(self) -> None:
        """``plugins:`` maps names of plugins in ``transforms`` or ``monitors`` to mappings (a block nothing would read
        is refused)."""
        if not isinstance(self.plugins, dict):
            raise ValueError(f"plugins must be a mapping of plugin name to its settings (e.g. plugins: {{half: "
                             f"{{scale: 0.5}}}}), got {self.plugins!r}")
        for name, block in self.plugins.items():
            if block is not None and not isinstance(block, dict):
                raise ValueError(f"plugins.{name} must be a mapping of settings, got {block!r}")
            if name not in self.transforms and name not in self.monitors:
                # A block for a plugin that does not run would change nothing while looking as if it did.
                raise ValueError(f"plugins.{name} is set but {name!r} is not in transforms {self.transforms}; add it "
                                 f"to transforms (a monitor, which changes no delta: to monitors) or remove the block "
                                 f"(--set plugins={{}} drops all blocks)")
        if self.plugins.get("revive") is not None and self.revive:
            raise ValueError("the revive block is given twice (revive: and plugins.revive:); keep one of them")

    def plugin_block(self, name: str) -> dict:
        """The settings block of plugin ``name`` (``revive:`` is the revive block, as ``plugins.revive``)."""
        block = self.plugins.get(name)
        if name == "revive" and block is None:
            block = self.revive
        return dict(block or {})

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: Sequence[str] = ()) -> "RunConfig":
        """Load a run config; ``overrides`` are ``key=value`` or ``a.b=value`` (values parsed as YAML)."""
        p = Path(path)
        if not p.exists() and (CONFIG_DIR / p).exists():
            p = CONFIG_DIR / p
        if not p.exists() and (CONFIG_DIR / f"{p}.yaml").exists():
            p = CONFIG_DIR / f"{p}.yaml"
        if not p.exists():
            raise FileNotFoundError(f"run config {path} not found (shipped: {sorted(x.stem for x in CONFIG_DIR.glob('*.yaml'))})")
        try:
            data = yamlio.load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"run config {p} is not valid YAML: {e}") from e
        if not isinstance(data, dict):
            raise ValueError(f"run config {p} must be a mapping of settings (name: ..., hparams: ...), "
                             f"got {type(data).__name__}")
        return cls.from_dict(apply_overrides(data, overrides), source=str(p))

    @classmethod
    def from_dict(cls, data: dict, source: str = "<config>") -> "RunConfig":
        allowed = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - allowed)
        if unknown:
            transforms = data.get("transforms") if isinstance(data.get("transforms"), list) else []
            plugin_keys = [k for k in unknown if k in transforms]
            hint = (f"; settings of the plugin(s) {plugin_keys} go under plugins: (e.g. plugins: {{{plugin_keys[0]}: "
                    f"{{...}}}}, or --set plugins.{plugin_keys[0]}.KEY=VALUE)") if plugin_keys else ""
            raise ValueError(f"{source}: unknown run setting(s) {unknown}; allowed: {sorted(allowed)}{hint}")
        try:
            return cls(**data)
        except TypeError as e:
            raise ValueError(f"{source}: {e}") from e

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        if not out["monitors"]:
            del out["monitors"]  # configs written before monitors existed stay as they were
        return out


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    """``a.b=value`` overrides into a nested dict (value parsed as YAML: numbers, lists, null…)."""
    data = json.loads(json.dumps(data))
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key=value (e.g. revive.tau=0.2)")
        key, raw = item.split("=", 1)
        target = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise ValueError(f"override {item!r}: {part!r} is not a mapping")
        target[parts[-1]] = yamlio.load(raw)
    return data


def _check_plugins(setting: str, names: Sequence[str], hook: str, does: str) -> None:
    """Every name in the run setting ``setting`` is a discovered plugin implementing ``hook`` (what it ``does``),
    else a ValueError naming them. Checked before anything is edited (and before a run directory is created):
    the host would only notice after the editor had run."""
    from revive_plugin.host import PLUGINS_ENV, describe_plugins, get_plugin_manager

    if not names:
        return
    plugins = {p["name"]: p for p in describe_plugins(get_plugin_manager())}
    missing = [n for n in names if n not in plugins]
    if missing:
        pinned = f" ({PLUGINS_ENV}={os.environ[PLUGINS_ENV]!r} limits which plugins load)" if PLUGINS_ENV in os.environ else ""
        raise ValueError(f"{setting} names plugin(s) {missing} that are not installed; discovered plugins: "
                         f"{sorted(plugins)}{pinned}. Install the plugin's package (`revive plugins` lists what is "
                         f"found in the entry-point group easyedit.plugins) or fix {setting}")
    lacking = [n for n in names if hook not in plugins[n]["hooks"]]
    if lacking:
        raise ValueError(f"{setting} names plugin(s) {lacking}, which {does} (no {hook}); plugins with one: "
                         f"{sorted(n for n, p in plugins.items() if hook in p['hooks'])}")


def check_transforms(transforms: Sequence[str]) -> None:
    """Every name in ``transforms`` is a discovered plugin with a delta transform (see ``_check_plugins``)."""
    _check_plugins("transforms", transforms, "easyedit_transform_delta", "implement no delta transform")


def use_easyedit_source(path: Optional[str]) -> None:
    """Edit with the EasyEdit checkout ``path`` (a run's ``easyedit_source``) in this process: sets
    ``$EASYEDIT_SOURCE`` before easyeditor is imported (an easyeditor imported from elsewhere is an error)."""
    from revive_plugin.adapters.compat import SOURCE_ENV, import_easyeditor

    if path is None:
        return
    root = Path(path).expanduser()
    if not root.is_absolute() and not root.exists():
        root = PACKAGE_ROOT / root
    before = os.environ.get(SOURCE_ENV)
    os.environ[SOURCE_ENV] = str(root.resolve())
    try:
        import_easyeditor("easyeditor")  # checks the folder and that no other easyeditor is loaded
    except ImportError:  # a refused choice leaves the process as it was
        if before is None:
            del os.environ[SOURCE_ENV]
        else:
            os.environ[SOURCE_ENV] = before
        raise


def check_monitors(monitors: Sequence[str]) -> None:
    """Every name in ``monitors`` is a discovered plugin that reports step metrics (see ``_check_plugins``)."""
    _check_plugins("monitors", monitors, "easyedit_edit_step_end", "report no step metrics")


def monitor_metrics(history: Sequence[Any], first_step: int, monitors: Sequence[str]) -> dict[str, float]:
    """The step metrics of the ``monitors`` (keys ``<monitor>/…``) in the host's records from ``first_step`` on."""
    prefixes = tuple(f"{m}/" for m in monitors)
    out: dict[str, float] = {}
    for record in history:
        if record.step >= first_step:
            out.update({k: float(v) for k, v in record.metrics.items() if k.startswith(prefixes)})
    return out


def window_means(steps: Sequence[dict], after: int, upto: int) -> dict[str, float]:
    """Each monitor metric's mean over the edit steps (``steps.jsonl`` rows: ``{"edits": n, metric: value…}``) with
    ``after < edits ≤ upto``: the steps since the previous row. A step without a metric does not count for it."""
    sums: dict[str, list[float]] = {}
    for step in steps:
        if after < step["edits"] <= upto:
            for k, v in step.items():
                if k != "edits":
                    sums.setdefault(k, []).append(v)
    return {k: sum(v) / len(v) for k, v in sums.items()}


def _resolve_file(path: str) -> Path:
    p = Path(path).expanduser()
    if p.exists():
        return p
    if (PACKAGE_ROOT / path).exists():
        return PACKAGE_ROOT / path
    raise FileNotFoundError(f"{path} not found (relative paths are tried from the cwd and from {PACKAGE_ROOT})")


def ordered_cases(config: RunConfig) -> list[Any]:
    """Every record of the run's data, in the order the run edits them (``order``: file or seeded)."""
    from .datasets import load_counterfact, load_zsre

    loader = load_counterfact if config.dataset == "counterfact" else load_zsre
    cases = loader(_resolve_file(config.data) if config.data else None, limit=None)
    if config.order == "seeded":
        random.Random(config.seed).shuffle(cases)
    return cases


# -- evaluation ----------------------------------------------------------------------------------
def _pairs_for(cases: Sequence[Any]) -> tuple[list[str], list[str], list[tuple[str, int, int]]]:
    """All (prompt, continuation) pairs of the facts' evaluation, and where each belongs."""
    prompts, conts, where = [], [], []
    for i, c in enumerate(cases):
        groups = [("rewrite", [c.prompt]), ("paraphrase", c.rephrase_prompts), ("neighborhood", c.neighborhood_prompts)]
        for group, ps in groups:
            for j, p in enumerate(ps):
                true = c.neighborhood_targets[j] if group == "neighborhood" else c.target_true
                for kind, target in (("new", c.target_new), ("true", true)):
                    prompts.append(p)
                    conts.append(target)
                    where.append((f"{group}_{kind}", i, j))
    return prompts, conts, where


def evaluate_facts(model: Any, tok: Any, cases: Sequence[Any], pre_locality: Optional[dict] = None) -> dict[str, float]:
    """CounterFact/zsRE metrics of the given edited facts (one batched scoring pass)."""
    from .metrics import counterfact_metrics, easyedit_metrics, zsre_metrics
    from .scoring import score_continuations

    prompts, conts, where = _pairs_for(cases)
    scores = score_continuations(model, tok, prompts, conts, progress="eval facts")
    table: dict[str, list[list[Any]]] = {}
    for (key, i, _), s in zip(where, scores):
        table.setdefault(key, [[] for _ in cases])[i].append(s)
    nll = {k: [[s.mean_nll for s in row] for row in v] for k, v in table.items()}
    def tokens(key: str, attr: str = "correct") -> list[list[Any]]:
        """Per case, the token-level ``attr`` of all its prompts in group ``key``, concatenated."""
        return [[t for s in row for t in getattr(s, attr)] for row in table[key]]

    out: dict[str, float] = {}
    if cases[0].dataset == "counterfact":
        out.update(counterfact_metrics(nll["rewrite_new"], nll["rewrite_true"], nll.get("paraphrase_new", []),
                                       nll.get("paraphrase_true", []), nll["neighborhood_new"], nll["neighborhood_true"]))
    else:
        out.update(zsre_metrics(tokens("rewrite_new"), tokens("paraphrase_new"), tokens("neighborhood_true")))
    rewrite = tokens("rewrite_new")
    rephrase = tokens("paraphrase_new" if "paraphrase_new" in table else "rewrite_new")
    post_loc = tokens("neighborhood_true", "argmax_ids")
    if pre_locality is not None:
        pre = [pre_locality[str(c.case_id)] for c in cases]
        out.update({f"easyedit_{k}": v for k, v in easyedit_metrics(rewrite, rephrase, pre, post_loc).items()})
    return out


def fact_sample(cases: Sequence[Any], n: Any, seed: int) -> list[Any]:
    """The seeded sample of ``n`` of ``cases`` that a run's checkpoints score (all of them for "all" or n ≥ len)."""
    if n == "all" or len(cases) <= n:
        return list(cases)
    return sorted(random.Random(seed).sample(list(cases), n), key=lambda c: c.case_id)


def locality_argmax(model: Any, tok: Any, cases: Sequence[Any]) -> dict[str, list[int]]:
    """The model's top-1 tokens on each case's neighborhood targets (EasyEdit locality reference)."""
    from .scoring import score_continuations

    prompts, conts, owners = [], [], []
    for c in cases:
        for j, p in enumerate(c.neighborhood_prompts):
            prompts.append(p)
            conts.append(c.neighborhood_targets[j])
            owners.append(str(c.case_id))
    out: dict[str, list[int]] = {}
    for owner, s in zip(owners, score_continuations(model, tok, prompts, conts, progress="pre-edit locality")):
        out.setdefault(owner, []).extend(s.argmax_ids)
    return out


#: Set by SIGTERM: the run stops before its next edit step even where the KeyboardInterrupt raised in the handler
#: was swallowed (delivered inside a C callback, e.g. matplotlib's, Python prints "Exception ignored" and goes on).
_TERM_REQUESTED = threading.Event()


def _raise_interrupt(signum: int, frame: Any) -> None:
    _TERM_REQUESTED.set()
    raise KeyboardInterrupt(f"signal {signum}")


def _stop_if_terminated() -> None:
    if _TERM_REQUESTED.is_set():
        raise KeyboardInterrupt("SIGTERM received earlier (its interrupt was swallowed where it arrived)")


def _sigterm_as_interrupt() -> Any:
    """Treat SIGTERM like Ctrl-C (roll back the unfinished step, save a checkpoint); returns the old handler.

    A sitting that ends, a scheduler or ``kill`` sends SIGTERM; only the main thread can install handlers.
    """
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _raise_interrupt)


# -- checkpoint files ----------------------------------------------------------------------------
#: A save writes CHECKPOINT_PARTIAL, renames CHECKPOINT to CHECKPOINT_OLD, renames the partial one to CHECKPOINT and
#: deletes CHECKPOINT_OLD: at every moment one complete checkpoint exists under one of the two names.
CHECKPOINT, CHECKPOINT_OLD, CHECKPOINT_PARTIAL = "checkpoint", "checkpoint.old", "checkpoint.partial"
#: What a resume reads from ``state.json`` (besides the BASELINE_KEYS).
STATE_KEYS = ("edits_done", "host_step", "python_random", "numpy_random", "context_templates")
#: The easyeditor modules whose sampled context templates a checkpoint keeps (and the run's editor's own module).
TEMPLATE_MODULES = ("easyeditor.models.memit.memit_main", "easyeditor.models.rome.rome_main")
#: State an editor carries between edits (AlphaEdit's accumulated keys), when it has any.
EDITOR_STATE = "editor.safetensors"


class CheckpointError(ValueError):
    """A run directory's config, results or checkpoint cannot be used as asked; nothing was changed.

    A ValueError, so ``revive eval`` reports it as ``revive: error: ...`` (exit 2) without a traceback.
    """


@dataclass
class Checkpoint:
    """A checkpoint read from disk and checked against the model, not yet applied to anything."""

    state: dict
    weights: dict[str, torch.Tensor]
    monitor: ReviveFilter
    plugin_state: dict[str, Any]  # entries of the host's per-model state, from the plugins' state files
    torch_rng: torch.Tensor
    editor_state: dict[str, torch.Tensor] = field(default_factory=dict)  # the editor's own (AlphaEdit's cache_c, LEMoE's experts)


def _damaged_fix(run_dir: Path) -> str:
    return (f"the checkpoint cannot be used. Restore {run_dir / CHECKPOINT} from a backup, or start the run again "
            f"from its settings: `revive eval {run_dir / 'config.yaml'} --output NEW_DIR` (or --output {run_dir} "
            "--overwrite, which deletes this run)")


def _mismatch_fix(run_dir: Path) -> str:
    return (f"the checkpoint was written for another model or other hparams (model_name, layers, "
            f"rewrite_module_tmp) than {run_dir / 'config.yaml'} names now; nothing was restored and the model's "
            "weights are untouched. Resume with the model and hparams the run was started with, or start a new run")


def _rename(src: Path, dst: Path) -> None:
    """One atomic rename (a function of its own so tests can cut a save off between its renames)."""
    os.replace(src, dst)


def _write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` by ``text`` with no moment where it is missing or half written."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _keep_rows_upto(path: Path, rows: Sequence[dict], done: int) -> None:
    """Rewrite the JSONL file ``path`` with the ``rows`` at or before ``done`` edits (those after a checkpoint are
    measured again when the run resumes from it)."""
    _write_atomic(path, "".join(json.dumps(r) + "\n" for r in rows if r["edits"] <= done))


def recover_checkpoint(run_dir: Path) -> Optional[str]:
    """Tidy up after a checkpoint save that was cut off (kill, power cut, error); returns what it did, or None.

    Cut off between its two renames, a save leaves only ``checkpoint.old``: the last complete checkpoint, put
    back. A ``checkpoint.old`` next to ``checkpoint`` is the one the newer checkpoint replaced; a
    ``checkpoint.partial`` is an unfinished save. Both are deleted.
    """
    ckpt, old, partial = (run_dir / n for n in (CHECKPOINT, CHECKPOINT_OLD, CHECKPOINT_PARTIAL))
    note = None
    if not ckpt.exists() and old.exists():
        _rename(old, ckpt)
        note = f"a checkpoint save was cut off; continuing from the checkpoint before it ({old.name} restored)"
    shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(partial, ignore_errors=True)
    return note


def _has_rows(metrics: Path) -> bool:
    return metrics.exists() and any(line.strip() for line in metrics.read_text(errors="replace").splitlines())


def read_rows(path: Path) -> list[dict]:
    """The rows of ``metrics.jsonl``; an unfinished last line (a kill while appending) is dropped.

    That row was appended before its checkpoint was saved, so the checkpoint a resume starts from predates it
    and the row is measured again.
    """
    if not path.exists():
        return []
    text = path.read_text(errors="replace")
    lines = text.splitlines()
    rows = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines) and not text.endswith("\n"):
                break
            raise CheckpointError(f"{path} is damaged (line {i} is not JSON: {e}); repair or delete that line, "
                                  "then resume (rows after the checkpoint are measured again)") from e
        if not isinstance(row, dict) or isinstance(row.get("edits"), bool) or not isinstance(row.get("edits"), int):
            raise CheckpointError(f"{path} is damaged (line {i} has no integer 'edits'); repair or delete that line, "
                                  "then resume")
        rows.append(row)
    return rows


def read_run_config(path: Path) -> dict:
    """The settings in a run directory's ``config.yaml``, checked to make a valid RunConfig."""
    fix = ("the run's settings cannot be read. Restore the file from a backup, or rewrite it with the settings the run "
           "was started with (the run config and any --set overrides), then resume")
    try:
        data = yamlio.load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is damaged (not valid YAML: {e}); {fix}") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is damaged (expected a mapping of run settings, got {type(data).__name__}); {fix}")
    try:
        RunConfig.from_dict(data, source=str(path))
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path} is damaged or invalid ({e}); {fix}") from e
    return data


def _state_problem(state: Any) -> Optional[str]:
    """What makes a parsed ``state.json`` unusable, or None."""
    if not isinstance(state, dict):
        return f"expected a JSON object, got {type(state).__name__}"
    missing = [k for k in STATE_KEYS if k not in state]
    if missing:
        return f"missing {missing}"
    for key in ("edits_done", "host_step"):
        value = state[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            return f"{key} must be a non-negative integer, got {value!r}"
    templates = state["context_templates"]
    if not isinstance(templates, dict) or not all(
            isinstance(m, str) and m.startswith("easyeditor.models.") for m in templates):
        return "context_templates must map easyeditor modules (easyeditor.models.…) to templates"
    if not isinstance(state.get("pre_locality", {}), dict):
        return "pre_locality must be an object"
    steps = state.get("monitor_steps", [])  # checkpoints from before steps.jsonl: a resume writes them into it
    if not isinstance(steps, list) or not all(
            isinstance(s, list) and len(s) == 2 and isinstance(s[0], int) and isinstance(s[1], dict) for s in steps):
        return "monitor_steps must be a list of [edits, {metric: value}] pairs"
    try:  # on throwaway generators: the process's own are set only once everything has been checked
        random.Random().setstate((3, tuple(state["python_random"]), None))
        keys, pos, has_gauss, cached = state["numpy_random"]
        np.random.RandomState().set_state(("MT19937", np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    except (TypeError, ValueError, OverflowError) as e:
        return f"unusable random-generator state ({e})"
    return None


def read_state(path: Path, fix: str) -> dict:
    """A checkpoint's ``state.json``, checked for everything a resume reads."""
    if not path.exists():
        raise CheckpointError(f"{path} is missing (the checkpoint is incomplete); {fix}")
    try:
        state = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is damaged (not valid JSON: {e}); {fix}") from e
    problem = _state_problem(state)
    if problem:
        raise CheckpointError(f"{path} is damaged ({problem}); {fix}")
    return state


def _read_tensors(path: Path, fix: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file; a missing, truncated or garbage file is a CheckpointError."""
    from safetensors import safe_open

    if not path.exists():
        raise CheckpointError(f"{path} is missing (the checkpoint is incomplete); {fix}")
    try:
        with safe_open(str(path), framework="pt") as fh:
            return {k: fh.get_tensor(k) for k in fh.keys()}, dict(fh.metadata() or {})
    except Exception as e:  # safetensors raises its own error types (header, truncation, I/O)
        raise CheckpointError(f"{path} is damaged (not a readable safetensors file: {e}); {fix}") from e


def _check_weights(path: Path, saved: dict[str, torch.Tensor], live: dict[str, torch.Tensor], fix: str,
                   mismatch: str) -> None:
    """Every edited weight of the model is in ``saved`` with its exact shape and dtype, and nothing else is.

    ``copy_`` would broadcast a (1, 64) tensor into a (32, 64) weight without a word: check before copying anything.
    """
    missing = [n for n in live if n not in saved]
    if missing:
        raise CheckpointError(f"{path} lacks tensor(s) {missing} of the model's edited weights: it is damaged or was "
                              f"written for other hparams; {fix}")
    extra = sorted(set(saved) - set(live))
    if extra:
        raise CheckpointError(f"{path} holds tensor(s) {extra}, which are not edited weights of this model; {mismatch}")
    for name, weight in live.items():
        tensor = saved[name]
        if tensor.shape != weight.shape or tensor.dtype != weight.dtype:
            raise CheckpointError(f"{path}: tensor {name!r} is {tuple(tensor.shape)} {tensor.dtype}, the model's weight "
                                  f"is {tuple(weight.shape)} {weight.dtype}; {mismatch}")
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise CheckpointError(f"{path}: tensor {name!r} has non-finite values (NaN/inf), which no edit step "
                                  f"writes: the file is damaged; {fix}")


def _read_filter(path: Path, shapes: dict[str, tuple[int, ...]], fix: str, mismatch: str) -> ReviveFilter:
    """A ReviveFilter saved by ``ReviveFilter.save``, each basis checked against its weight's (out, in) shape."""
    tensors, meta = _read_tensors(path, fix)
    if "revive_config" not in meta:
        raise CheckpointError(f"{path} is damaged (no revive_config metadata; not written by ReviveFilter.save); {fix}")
    try:
        filt = ReviveFilter(ReviveConfig.from_dict(json.loads(meta["revive_config"])))
        filt.load_state_dict(tensors)
    except (KeyError, IndexError, TypeError, ValueError) as e:  # JSONDecodeError is a ValueError
        raise CheckpointError(f"{path} is damaged ({e}); {fix}") from e
    for name in sorted({key.rsplit("::", 1)[0] for key in tensors}):
        basis = filt.reference(name)
        if name not in shapes:
            raise CheckpointError(f"{path} holds a basis for {name!r}, which is not an edited matrix of this model; "
                                  f"{mismatch}")
        got = (basis.u.shape[0], basis.v.shape[0])
        if basis.u.ndim != 2 or basis.v.ndim != 2 or got != shapes[name]:
            raise CheckpointError(f"{path}: the basis of {name!r} is for a {got} weight, the model's is {shapes[name]}; "
                                  f"{mismatch}")
    return filt


#: Plugins whose state file keeps the name it had before plugins saved through the state hooks (older
#: checkpoints hold it, in the same layout); every other plugin's is ``plugin-<name>.safetensors``.
LEGACY_STATE_FILES = {"revive": "revive.safetensors"}
_PLUGIN_NAME = re.compile(r"[A-Za-z0-9_.\-]+")
_PLUGIN_FILE = re.compile(r"plugin-(?P<name>[A-Za-z0-9_.\-]+)\.safetensors")


def plugin_state_file(name: str) -> str:
    """The file name of plugin ``name``'s state in a checkpoint."""
    if name in LEGACY_STATE_FILES:
        return LEGACY_STATE_FILES[name]
    if not _PLUGIN_NAME.fullmatch(name):
        raise ValueError(f"plugin name {name!r} cannot name a checkpoint file (letters, digits, '_', '.', '-' only)")
    return f"plugin-{name}.safetensors"


def _write_plugin_states(directory: Path, host: Any) -> list[str]:
    """Each plugin's ``easyedit_state_save`` result as ``directory/plugin_state_file(name)``; returns the names.

    Tensors are saved as tensors (copied to the CPU), strings as the file's metadata, next to the reserved
    ``easyedit.plugin`` key that names the plugin.
    """
    import types

    from safetensors.torch import save_file

    from revive_plugin.hookspecs import STATE_PLUGIN_KEY
    from revive_plugin.host import call_impl, hook_impls

    written = []
    for impl in hook_impls(host.pm, "easyedit_state_save"):
        name = impl.plugin_name
        try:
            saved = call_impl(impl.function, name=name, state=types.MappingProxyType(host.state))
        except Exception as e:
            raise RuntimeError(f"plugin {name!r} failed saving its state for the checkpoint: "
                               f"{type(e).__name__}: {e}") from e
        if saved is None:
            continue
        tensors: dict[str, torch.Tensor] = {}
        meta = {STATE_PLUGIN_KEY: name}
        for key, value in saved.items():
            if not isinstance(key, str) or key == STATE_PLUGIN_KEY:
                raise ValueError(f"plugin {name!r} returned the key {key!r} from easyedit_state_save; keys are strings "
                                 f"other than {STATE_PLUGIN_KEY!r}")
            if isinstance(value, torch.Tensor):
                tensors[key] = value.detach().to("cpu", copy=True).contiguous()
            elif isinstance(value, str):
                meta[key] = value
            else:
                raise TypeError(f"plugin {name!r} returned a {type(value).__name__} for {key!r} from "
                                "easyedit_state_save; values are tensors or strings")
        save_file(tensors, str(directory / plugin_state_file(name)), metadata=meta)
        written.append(name)
    return written


def _read_plugin_states(directory: Path, pm: Any, configs: dict, weights: dict[str, torch.Tensor], fix: str,
                        mismatch: str) -> dict[str, Any]:
    """Every plugin state file of a checkpoint, read and handed to its plugin's ``easyedit_state_load``.

    Returns the entries the plugins restored (for the host's per-model state); nothing is applied here. A file
    that is unreadable, names another plugin, belongs to a plugin that is not loaded, or that its plugin
    refuses is a CheckpointError naming it.
    """
    import types

    from revive_plugin.hookspecs import STATE_PLUGIN_KEY
    from revive_plugin.host import PLUGINS_ENV, call_impl, hook_impls

    files = {}
    for path in sorted(directory.iterdir()):
        found = _PLUGIN_FILE.fullmatch(path.name)
        if found:
            files[found["name"]] = path
    for name, legacy in LEGACY_STATE_FILES.items():
        if (directory / legacy).exists():
            files[name] = directory / legacy
    loaders = {impl.plugin_name: impl for impl in hook_impls(pm, "easyedit_state_load")}
    loaded = {name for name, plugin in pm.list_name_plugin() if plugin is not None}
    restored: dict[str, Any] = {}
    for name, path in sorted(files.items()):
        tensors, meta = _read_tensors(path, fix)
        owner = meta.pop(STATE_PLUGIN_KEY, None)
        if owner is None and name not in LEGACY_STATE_FILES:
            raise CheckpointError(f"{path} is damaged (no {STATE_PLUGIN_KEY!r} metadata naming its plugin); {fix}")
        if owner is not None and owner != name:
            raise CheckpointError(f"{path} holds the state of plugin {owner!r}, not of {name!r}: the file was renamed "
                                  f"or is damaged; {fix}")
        impl = loaders.get(name)
        if impl is None:
            why = ("is not loaded in this process" + (f" ({PLUGINS_ENV}={os.environ[PLUGINS_ENV]!r})"
                                                      if PLUGINS_ENV in os.environ else "")
                   if name not in loaded else "implements no easyedit_state_load")
            raise CheckpointError(f"{path} holds the state of plugin {name!r}, which {why}; resume with the plugins "
                                  "the run was started with (install the plugin, or fix EASYEDIT_PLUGINS)")
        scratch: dict[str, Any] = {}
        try:
            call_impl(impl.function, name=name, state=scratch, tensors={**meta, **tensors},
                      config=configs.get(name), weights=types.MappingProxyType(weights))
        except ValueError as e:
            raise CheckpointError(f"{path}: plugin {name!r} cannot restore its state from it: {e}. Either the file is "
                                  f"damaged ({fix}) or {mismatch}") from e
        except Exception as e:
            raise CheckpointError(f"{path}: plugin {name!r} failed restoring its state from it: "
                                  f"{type(e).__name__}: {e}; {fix}") from e
        restored.update(scratch)
    return restored


def _read_rng(path: Path, fix: str) -> torch.Tensor:
    tensors, _ = _read_tensors(path, fix)
    rng, expected = tensors.get("torch"), torch.get_rng_state()
    if rng is None or rng.dtype != expected.dtype or rng.shape != expected.shape:
        got = "no tensor 'torch'" if rng is None else f"'torch' is {tuple(rng.shape)} {rng.dtype}"
        raise CheckpointError(f"{path} is damaged ({got}; a torch RNG state is {tuple(expected.shape)} "
                              f"{expected.dtype}); {fix}")
    return rng


class RunInUseError(BlockingIOError):
    """Another process holds the run directory (``run_lock``): taking it without waiting would block."""


def run_lock_path(run_dir: Path) -> Path:
    """The lock file of ``run_dir``: beside it, so ``--overwrite`` can delete the directory while holding it."""
    return run_dir.parent / f".{run_dir.name}.revive.lock"


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Any:
    """Hold ``run_dir`` for this process: a second `revive eval` on it (another study that shares the run, a second
    terminal) is refused instead of writing the same checkpoint (lock file: ``run_lock_path``)."""
    run_dir = Path(run_dir)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(run_lock_path(run_dir)), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise RunInUseError(
            f"{run_dir} is in use by another `revive eval` (a study sharing this run, or another terminal); wait for "
            "it to finish or stop it (SIGTERM saves its checkpoint), then run this again") from None
    try:
        yield
    finally:
        lock.release()


def _refuse_existing_run(run_dir: Path) -> None:
    """A new run must not overwrite a run or results already in ``run_dir`` (``--overwrite`` deletes them)."""
    if (run_dir / CHECKPOINT).exists() or (run_dir / CHECKPOINT_OLD).exists():
        raise FileExistsError(f"{run_dir} already holds a run; continue it with `revive eval --resume {run_dir}`, "
                              "or pass --overwrite to delete it and start again")
    if _has_rows(run_dir / "metrics.jsonl"):
        raise FileExistsError(f"{run_dir} holds results (metrics.jsonl) but no checkpoint to continue from; choose "
                              "another --output, or pass --overwrite to delete them")


# -- the run -------------------------------------------------------------------------------------
class Run:
    """A sequential editing run in ``run_dir`` (create with ``Run.start``, continue with ``Run.resume``)."""

    def __init__(self, config: RunConfig, run_dir: Path):
        self.config = config
        self.run_dir = run_dir
        self.ckpt_dir = run_dir / CHECKPOINT
        self.initial: dict[str, torch.Tensor] = {}   # W₀ of the edited weights (protected-subspace monitors)
        self.ppl_texts: list[str] = []
        # What Run.start made (the directory, else its config.yaml): removed if the run stops before its first
        # checkpoint, so a failed start leaves nothing that looks like a run.
        self.created: list[Path] = []

    # setup
    @classmethod
    def start(cls, config: RunConfig, output: Optional[str] = None, overwrite: bool = False) -> "Run":
        """A new run in ``output`` (default: the config's); refuses a directory holding a run or results."""
        run_dir = Path(output or config.output.format(name=config.name))
        check_transforms(config.transforms)  # before anything is created
        check_monitors(config.monitors)
        with run_lock(run_dir):
            if overwrite:
                shutil.rmtree(run_dir, ignore_errors=True)
            else:
                _refuse_existing_run(run_dir)
            created = [] if run_dir.exists() else [run_dir]
            run_dir.mkdir(parents=True, exist_ok=True)
            _write_atomic(run_dir / "config.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False))
        run = cls(config, run_dir)
        run.created = created or [run_dir / "config.yaml"]
        return run

    @classmethod
    def resume(cls, run_dir: str | Path, edits: Optional[int] = None) -> "Run":
        """Continue the run in ``run_dir``; ``edits`` extends (or sets) its target number of edits.

        Extending is exact: edits are taken from the same ordered data, so ``--resume DIR --edits 2000`` after a
        1,000-edit run reaches the weights of an uninterrupted 2,000-edit run (its checkpoint rows at 1,000
        stay as they were measured). A directory without a checkpoint starts from the first edit only when it
        holds no results (metrics.jsonl); otherwise it is refused, since starting over would overwrite them.
        """
        run_dir = Path(run_dir)
        config_path = run_dir / "config.yaml"
        if not config_path.exists():
            what = "does not exist" if not run_dir.exists() else "has no config.yaml: not a run directory"
            raise FileNotFoundError(f"--resume {run_dir}: the directory {what} (start a run with `revive eval CONFIG "
                                    f"--output {run_dir}`)")
        with run_lock(run_dir):  # recovering or extending must not touch files a running process writes
            data = read_run_config(config_path)
            note = recover_checkpoint(run_dir)
            if note:
                print(f"[revive] {run_dir}: {note}")
            done = cls._edits_done(run_dir, config_path)
            if edits is not None and edits != data.get("edits"):
                if edits < done:
                    raise ValueError(f"--edits {edits} is below the {done} edits {run_dir} has already made; "
                                     "a run cannot be shortened (start a new one)")
                data["edits"] = edits
                config = RunConfig.from_dict(data, source=str(config_path))
                available = len(ordered_cases(config))
                if available < edits:
                    raise ValueError(f"--edits {edits}: the run's data has only {available} records")
                _write_atomic(config_path, yaml.safe_dump(config.to_dict(), sort_keys=False))
            return cls(RunConfig.from_dict(data, source=str(config_path)), run_dir)

    @staticmethod
    def _edits_done(run_dir: Path, config_path: Path) -> int:
        """Edits made by the run's checkpoint (0 without one); refuses a directory whose results it would overwrite."""
        if (run_dir / CHECKPOINT).exists():
            return read_state(run_dir / CHECKPOINT / "state.json", _damaged_fix(run_dir))["edits_done"]
        if _has_rows(run_dir / "metrics.jsonl"):
            raise CheckpointError(
                f"{run_dir} has results in metrics.jsonl but no {CHECKPOINT}/ to continue from; resuming would start "
                f"over and overwrite them. Keep them and start a new run with `revive eval {config_path} --output "
                f"NEW_DIR`, or start again in place with `--output {run_dir} --overwrite` (deletes them)")
        print(f"[revive] {run_dir} has no checkpoint (the run stopped before its first one): starting from the first edit")
        return 0

    def _load_hparams(self) -> Any:
        from revive_plugin.adapters.easyedit import PLUGIN_CONFIGS_ATTR
        from revive_plugin.adapters.editors import hparams_classes

        path = _resolve_file(self.config.hparams)
        alg = (yamlio.load(path.read_text()) or {}).get("alg_name")
        classes = hparams_classes()
        if alg not in classes:
            raise ValueError(f"{path}: alg_name {alg!r} is not one of {sorted(classes)}")
        hp = classes[alg].from_hparams(str(path))
        for key, value in self.config.hparams_overrides.items():
            if not hasattr(hp, key):
                raise ValueError(f"hparams_overrides: {alg} hparams have no setting {key!r}")
            setattr(hp, key, value)
        if self.config.model:
            hp.model_name = self.config.model
        from revive_plugin.adapters.easyedit import BATCHED_Z_BLOCK, attach_plugin_configs, batched_z_options

        configs = {}
        z = getattr(hp, PLUGIN_CONFIGS_ATTR, {}).get(BATCHED_Z_BLOCK)  # the hparams file's choice
        if self.config.batched_z is not None:
            z = batched_z_options(self.config.batched_z, source="run config")
        if z:
            configs[BATCHED_Z_BLOCK] = z
        check_transforms(self.config.transforms)
        check_monitors(self.config.monitors)
        for name in [*self.config.transforms, *self.config.monitors]:
            configs[name] = self.config.plugin_block(name)
        if self.config.transforms:
            configs["edit_plugins"] = {"order": list(self.config.transforms)}
        # The run config's blocks replace the hparams file's; attach validates them as if they were in that file.
        setattr(hp, PLUGIN_CONFIGS_ATTR, {})
        attach_plugin_configs(hp, **configs)
        return hp

    def _cases(self) -> list[Any]:
        cases = ordered_cases(self.config)
        if len(cases) < self.config.edits:
            raise ValueError(f"{self.config.dataset} data has {len(cases)} records; {self.config.edits} edits asked. "
                             "Pass a larger set with --data PATH (e.g. ../shared/data/counterfact/counterfact_mend.json.gz)")
        return list(cases[: self.config.edits])

    # checkpoint
    def _save(self, done: int, model: Any, hp: Any, host: Any, monitor: ReviveFilter, extra: dict) -> None:
        """Write a checkpoint so that a kill at any moment leaves a complete one (this or the previous).

        The files go to ``checkpoint.partial`` (``state.json``, which marks it complete, last); then the old
        checkpoint is renamed ``checkpoint.old``, the new one renamed into place and the old one deleted.
        ``recover_checkpoint`` puts ``checkpoint.old`` back if a kill falls between the renames.
        """
        partial = self.run_dir / CHECKPOINT_PARTIAL
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
        self._write_checkpoint(partial, done, model, hp, host, monitor, extra)
        old = self.run_dir / CHECKPOINT_OLD
        if self.ckpt_dir.exists():
            shutil.rmtree(old, ignore_errors=True)
            _rename(self.ckpt_dir, old)
        _rename(partial, self.ckpt_dir)
        shutil.rmtree(old, ignore_errors=True)

    @staticmethod
    def _write_checkpoint(directory: Path, done: int, model: Any, hp: Any, host: Any, monitor: ReviveFilter,
                          extra: dict) -> None:
        from safetensors.torch import save_file

        from revive_plugin.adapters.compat import import_easyeditor
        from revive_plugin.adapters.easyedit import editor_module_of, editor_state, target_weights

        weights = {t.name: t.tensor.detach().cpu().contiguous() for t in target_weights(model, hp)}
        save_file(weights, str(directory / "weights.safetensors"))
        monitor.save(directory / "monitor.safetensors")
        _write_plugin_states(directory, host)  # every plugin's state (REVIVE's bases, PRUNE's W₀, …)
        own = editor_state(hp.alg_name, model)  # AlphaEdit's accumulated keys, LEMoE's experts and anchors
        if own:
            save_file({k: v.contiguous() for k, v in own.items()}, str(directory / EDITOR_STATE))
        save_file({"torch": torch.get_rng_state()}, str(directory / "rng.safetensors"))
        # easyeditor's modules only (LEMoE's module is this package's and samples no templates)
        modules = dict.fromkeys(m for m in [*TEMPLATE_MODULES, editor_module_of(hp.alg_name).__name__]
                                if m.startswith("easyeditor.models."))
        templates = {module: getattr(import_easyeditor(module), "CONTEXT_TEMPLATES_CACHE", None) for module in modules}
        np_state = np.random.get_state()
        state = {"edits_done": done, "host_step": host.step, "python_random": list(random.getstate()[1]),
                 "numpy_random": [np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
                 "context_templates": templates, **extra}
        (directory / "state.json").write_text(json.dumps(state))

    def _read_checkpoint(self, targets: Sequence[Any], host: Any = None, hp: Any = None) -> Checkpoint:
        """Read every file of the checkpoint and check it against the model's edited weights (``targets``).

        Plugin state files go to the plugins of ``host`` (default: the discovered plugins) with their blocks
        in ``hp``. Nothing is applied here, so a damaged or mismatched checkpoint leaves the model as it was.
        """
        from revive_plugin.adapters.easyedit import PLUGIN_CONFIGS_ATTR
        from revive_plugin.host import get_plugin_manager

        fix, mismatch = _damaged_fix(self.run_dir), _mismatch_fix(self.run_dir)
        d = self.ckpt_dir
        state = read_state(d / "state.json", fix)
        weights, _ = _read_tensors(d / "weights.safetensors", fix)
        _check_weights(d / "weights.safetensors", weights, {t.name: t.tensor for t in targets}, fix, mismatch)
        shapes = {t.name: tuple(t.view().shape) for t in targets if t.view().ndim == 2}
        monitor = _read_filter(d / "monitor.safetensors", shapes, fix, mismatch)
        # A plugin's state appears with its first edit step: a checkpoint before it has none.
        matrices = {t.name: t.view(weights[t.name]).clone() for t in targets if t.view().ndim == 2}
        pm = host.pm if host is not None else get_plugin_manager()
        plugin_state = _read_plugin_states(d, pm, dict(getattr(hp, PLUGIN_CONFIGS_ATTR, None) or {}), matrices,
                                           fix, mismatch)
        own = _read_tensors(d / EDITOR_STATE, fix)[0] if (d / EDITOR_STATE).exists() else {}
        return Checkpoint(state=state, weights=weights, monitor=monitor, plugin_state=plugin_state,
                          torch_rng=_read_rng(d / "rng.safetensors", fix), editor_state=own)

    @staticmethod
    def _restore(ckpt: Checkpoint, model: Any, hp: Any, host: Any) -> tuple[int, ReviveFilter, dict]:
        """Apply a checked checkpoint: weights, plugin state, host step, RNG states, context templates."""
        from revive_plugin.adapters.compat import import_easyeditor
        from revive_plugin.adapters.easyedit import restore_editor_state, target_weights

        state = ckpt.state
        restore_editor_state(hp.alg_name, ckpt.editor_state, model=model, hparams=hp)  # LEMoE: re-inserts its experts
        with torch.no_grad():
            for t in target_weights(model, hp):
                t.tensor.copy_(ckpt.weights[t.name])
        host.state.update(ckpt.plugin_state)
        host.step = state["host_step"]
        torch.set_rng_state(ckpt.torch_rng)
        random.setstate((3, tuple(state["python_random"]), None))
        keys, pos, has_gauss, cached = state["numpy_random"]
        np.random.set_state(("MT19937", np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
        for module, templates in state["context_templates"].items():
            import_easyeditor(module).CONTEXT_TEMPLATES_CACHE = templates
        return state["edits_done"], ckpt.monitor, state

    def _load(self, model: Any, hp: Any, host: Any) -> tuple[int, ReviveFilter, dict]:
        """Restore the checkpoint into ``model`` and ``host`` after checking all of it; returns (edits, monitor, state)."""
        from revive_plugin.adapters.easyedit import target_weights

        return self._restore(self._read_checkpoint(target_weights(model, hp), host, hp), model, hp, host)

    def _has_checkpoint(self) -> bool:
        return self.ckpt_dir.exists() or (self.run_dir / CHECKPOINT_OLD).exists()

    def _discard_unfinished_start(self) -> None:
        """After a stop before the first checkpoint: remove what this run wrote, so nothing half-made remains.

        Without a checkpoint nothing can be resumed, and a metrics.jsonl left behind would make the directory
        look like a run with results (which ``start`` and ``resume`` refuse to overwrite).
        """
        written = [self.run_dir / n for n in ("metrics.jsonl", "resources.jsonl", CHECKPOINT_PARTIAL)]
        removed = []
        for path in [p for p in written + self.created if p.exists()]:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
            removed.append(str(path))
        if self.created:  # Run.start made this run: the command that made it makes it again
            shown = [str(self.run_dir)] if self.run_dir in self.created else removed
            how = f"removed {', '.join(shown)}; run the same command again"
        else:
            how = (f"removed {', '.join(removed) or 'nothing'}; `revive eval --resume {self.run_dir}` starts it again "
                   "from the first edit")
        print(f"[revive] the run stopped before its first checkpoint, so nothing could be resumed: {how}",
              file=sys.stderr)

    def _resume_from_checkpoint(self, model: Any, tok: Any, hp: Any, host: Any, cases: list,
                                metrics_path: Path) -> tuple[int, ReviveFilter, dict]:
        """Restore the checkpoint into the freshly loaded ``model``; drop the rows measured after it."""
        from revive_plugin.adapters.easyedit import target_weights

        ckpt = self._read_checkpoint(target_weights(model, hp), host, hp)
        self._complete_pre_locality(ckpt.state, model, tok, cases)
        rows = read_rows(metrics_path)
        first = next((r for r in rows if r["edits"] == 0), None)
        if first is not None and "facts_evaluated" not in first:
            # A run that predates pre-edit fact scores gets them now, from the still unedited model.
            print(f"[revive] {self.run_dir}: adding the pre-edit scores of the facts it edits to its first row")
            first.update(self._fact_scores(0, model, tok, cases, ckpt.state))
        done, monitor, state = self._restore(ckpt, model, hp, host)
        _keep_rows_upto(metrics_path, rows, done)
        steps_path = self.run_dir / STEPS_FILE
        if steps_path.exists():  # a run with monitors: its edit steps after the checkpoint are logged again
            _keep_rows_upto(steps_path, read_rows(steps_path), done)
        elif state.get("monitor_steps"):  # a checkpoint from before steps.jsonl kept the steps since its last row
            _keep_rows_upto(steps_path, [{"edits": e, **m} for e, m in state["monitor_steps"]], done)
        again = [r["edits"] for r in rows if r["edits"] > done]
        print(f"[revive] resuming {self.run_dir} at {done}/{self.config.edits} edits"
              + (f" (the rows at {again} edits, measured after the checkpoint, are measured again)" if again else ""))
        if self.ppl_texts and "ppl_baseline" not in state:
            print("[revive] this run's checkpoint has no pre-edit perplexity (it predates the measure): "
                  "perplexity is not reported for it")
        return done, monitor, state

    @staticmethod
    def _complete_pre_locality(state: dict, model: Any, tok: Any, cases: Sequence[Any]) -> None:
        """Add the unedited model's locality reference for cases the checkpoint lacks (a run extended with
        --edits); call it before the checkpoint's weights are restored, while the model is still unedited."""
        pre = state.get("pre_locality")
        if pre is None:
            return
        missing = [c for c in cases if str(c.case_id) not in pre]
        if missing:
            pre.update(locality_argmax(model, tok, missing))

    # evaluation at a checkpoint
    def _evaluate(self, done: int, model: Any, tok: Any, hp: Any, cases: list, probe: Any, monitor: ReviveFilter,
                  state: dict) -> dict[str, Any]:
        from revive_plugin.adapters.easyedit import target_weights

        cfg = self.config
        row: dict[str, Any] = {"edits": done}
        glue = state.get("glue_baseline") if done == 0 else None  # the pre-edit row reuses the baseline
        general: dict[str, Any] = {}
        if self.ppl_texts and "ppl_baseline" in state:  # first: a collapse makes this the run's last checkpoint
            from .perplexity import perplexity

            measured = state["ppl_baseline"] if done == 0 else perplexity(
                model, tok, self.ppl_texts, max_tokens=cfg.ppl.get("max_tokens", 128), progress="perplexity")
            general.update(measured)
            general["ppl_rel"] = general["ppl"] / state["ppl_baseline"]["ppl"]
            general["collapsed"] = general["ppl_rel"] >= cfg.collapse_ppl_ratio
        last = done == cfg.edits or (cfg.stop_at_collapse and general.get("collapsed", False))
        row.update(self._fact_scores(done, model, tok, cases, state, last=last))
        row.update(general)
        if probe is not None:
            glue = glue or probe.evaluate(model, tok)
            for task, metrics in glue.items():
                for k, v in metrics.items():
                    row[f"glue_{task}_{k}"] = v
                    base = state.get("glue_baseline", {}).get(task, {}).get(k)
                    if base:
                        row[f"glue_{task}_{k}_rel"] = v / base
        for t in target_weights(model, hp):
            if t.view().ndim != 2:
                continue
            for k, v in monitor.monitor(t.name, t.view(), self.initial.get(t.name)).items():
                row[f"spectral/{t.name}/{k}"] = v
        return row

    def _fact_scores(self, done: int, model: Any, tok: Any, cases: list, state: dict,
                     last: bool = False) -> dict[str, Any]:
        """Eff/Gen/Spe (and Fluency) of the edited facts at ``done`` edits, and of the batch just edited.

        At the run's ``last`` checkpoint with ``eval_all_at_end`` every edited fact is scored, else a seeded
        sample of ``eval_facts`` of them.

        At 0 edits these are the pre-edit scores of the facts the first checkpoint will score (the same seeded
        sample of its edits; so they do not depend on how far a run is later extended), and of the first batch
        as the "batch just edited". They are the point every efficacy line starts from: how often the unedited
        model already prefers the new object.
        """
        cfg = self.config
        edited = cases[:done] if done else cases[:min(cfg.eval_every, cfg.edits)]
        if not (done and last and cfg.eval_all_at_end):
            edited = fact_sample(edited, cfg.eval_facts, cfg.seed)
        row: dict[str, Any] = {"facts_evaluated": len(edited)}
        row.update(evaluate_facts(model, tok, edited, state.get("pre_locality")))
        if cfg.eval_last_batch:
            batch = cases[(done - 1) // cfg.batch_size * cfg.batch_size:done] if done else cases[:cfg.batch_size]
            scores = evaluate_facts(model, tok, batch, state.get("pre_locality"))
            row.update({f"last_batch_{k}": v for k, v in scores.items() if not k.startswith("easyedit_")})
        prompts = [c.generation_prompts[0] for c in edited if c.generation_prompts][: cfg.fluency_prompts]
        if prompts:
            from .generation import generate_texts
            from .metrics import n_gram_entropy

            texts = generate_texts(model, tok, prompts, max_new_tokens=cfg.fluency_tokens)
            row["fluency"] = n_gram_entropy(texts)
            row["fluency_prompts"] = len(prompts)
        return row

    def _record_resources(self, done: int, host: Any, clock: dict) -> None:
        """Append memory and time since the previous checkpoint of this session to ``resources.jsonl``."""
        from .resources import (cpu_model, live_tensors, matmul_gflops, release_free_heap, reset_window_peak, rss_mb,
                                window_peak_rss_mb)

        # window_peak: the highest RSS since the previous checkpoint (where the OS can reset it), so a
        # transient of one edit step is not carried into every later row; peak_rss_mb is the run's highest.
        release_free_heap()
        n_tensors, tensor_mb = live_tensors()
        rss = rss_mb()
        window = window_peak_rss_mb()  # read after rss: the high-water mark is never below it
        clock["peak"] = max(clock.get("peak", 0.0), window)
        row = {"edits": done, "rss_mb": round(rss, 1), "window_peak_rss_mb": round(window, 1),
               "peak_rss_mb": round(clock["peak"], 1), "window_peak_resettable": clock.get("resettable", False),
               "live_tensors": n_tensors, "live_tensor_mb": round(tensor_mb, 1),
               "edit_seconds": round(host.seconds["edit"] - clock["host"]["edit"], 3),
               "filter_seconds": round(host.seconds["transform"] - clock["host"]["transform"], 3),
               "eval_seconds": round(clock["eval"], 3),
               # the edits whose editor/filter seconds this row holds (a resumed process starts its own count)
               "edits_timed": done - clock.get("edits_at", 0),
               # CPU seconds of this process over wall seconds × torch threads since the previous row: near 1
               # when the run had its cores to itself, well below when something else shared the machine
               "threads": torch.get_num_threads(),
               "cpu_share": round((time.process_time() - clock["cpu"])
                                  / max(1e-9, (time.perf_counter() - clock["wall"]) * torch.get_num_threads()), 3)}
        # the machine's speed now, so rows timed in different sittings (other machines) can be compared
        row.update(cpu_model=cpu_model(), matmul_gflops=round(matmul_gflops(), 1))
        clock["cpu"], clock["wall"] = time.process_time(), time.perf_counter()
        clock["host"] = dict(host.seconds)
        clock["edits_at"] = done
        clock["resettable"] = reset_window_peak()
        with (self.run_dir / "resources.jsonl").open("a") as fh:
            fh.write(json.dumps(row) + "\n")

    def execute(self, stop_after: Optional[int] = None) -> Path:
        """Run (or continue) to ``config.edits``; ``stop_after`` ends early after that many edits (tests).

        Ctrl-C and SIGTERM save a checkpoint at the last completed edit step. A run that stops before its first
        checkpoint removes what it wrote (see ``_discard_unfinished_start``).
        """
        with run_lock(self.run_dir):
            note = recover_checkpoint(self.run_dir)  # a save cut off earlier in this process
            if note:
                print(f"[revive] {self.run_dir}: {note}")
            previous_term = _sigterm_as_interrupt()
            _TERM_REQUESTED.clear()
            try:
                return self._execute(stop_after)
            except BaseException:
                if not self._has_checkpoint():
                    self._discard_unfinished_start()
                raise
            finally:
                if previous_term is not None:
                    signal.signal(signal.SIGTERM, previous_term)
                _TERM_REQUESTED.clear()

    def _execute(self, stop_after: Optional[int]) -> Path:
        from revive_plugin.adapters.compat import import_easyeditor
        from revive_plugin.adapters.easyedit import enable_easyedit, host_for, target_weights
        from revive_plugin.adapters.editors import request_groups

        from .glue import GlueProbe
        from .report import write_report

        cfg = self.config
        use_easyedit_source(cfg.easyedit_source)
        enable_easyedit(device=cfg.device)
        logging.getLogger("easyeditor").setLevel(logging.WARNING)  # it logs every request at INFO
        hp = self._load_hparams()
        cases = self._cases()
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        BaseEditor = import_easyeditor("easyeditor.editors.editor").BaseEditor
        with contextlib.redirect_stdout(io.StringIO()):
            editor = BaseEditor.from_hparams(hp)
        model, tok = editor.model, editor.tok
        host = host_for(model)
        self.initial = {t.name: t.view().detach().clone() for t in target_weights(model, hp) if t.view().ndim == 2}
        if cfg.ppl is not None:
            from .perplexity import load_sentences

            self.ppl_texts = load_sentences(cfg.ppl.get("data"), cfg.ppl.get("n"))
        probe = None
        if cfg.glue and cfg.glue.get("tasks"):
            probe = GlueProbe(cfg.glue["tasks"], n_per_task=cfg.glue.get("n_per_task", 50), seed=cfg.seed,
                              few_shot=cfg.glue.get("few_shot", 0), data_dir=cfg.glue.get("dir"))
        metrics_path = self.run_dir / "metrics.jsonl"
        steps_path = self.run_dir / STEPS_FILE
        clock = {"host": dict(host.seconds), "eval": 0.0, "cpu": time.process_time(), "wall": time.perf_counter()}
        if self.ckpt_dir.exists():
            done, monitor, state = self._resume_from_checkpoint(model, tok, hp, host, cases, metrics_path)
            clock["edits_at"] = done
        else:
            done = 0
            began = time.perf_counter()
            steps_path.unlink(missing_ok=True)  # left by a start that stopped before its first checkpoint
            monitor = ReviveFilter(ReviveConfig(tau=cfg.monitor_tau))
            for t in target_weights(model, hp):
                if t.view().ndim == 2:
                    monitor.observe(t.name, t.view())
            state = {"pre_locality": locality_argmax(model, tok, cases)}
            if probe is not None:
                state["glue_baseline"] = probe.evaluate(model, tok)
            if self.ppl_texts:
                from .perplexity import perplexity

                state["ppl_baseline"] = perplexity(model, tok, self.ppl_texts,
                                                   max_tokens=cfg.ppl.get("max_tokens", 128), progress="perplexity")
            row = self._evaluate(0, model, tok, hp, cases, probe, monitor, state)
            metrics_path.write_text(json.dumps(row) + "\n")
            self._save(0, model, hp, host, monitor, {k: state[k] for k in BASELINE_KEYS if k in state})
            clock["eval"] = time.perf_counter() - began
            self._record_resources(0, host, clock)
        extra = {k: state[k] for k in (*BASELINE_KEYS, STOPPED_AT_COLLAPSE) if k in state}
        target = cfg.edits if stop_after is None else min(cfg.edits, stop_after)
        if extra.get(STOPPED_AT_COLLAPSE) is not None:
            target = done
            print(f"[revive] {self.run_dir} stopped at its collapse at {done} edits (stop_at_collapse); to edit on, "
                  f"set stop_at_collapse: false in {self.run_dir / 'config.yaml'} and resume")
        evaluated = {r["edits"] for r in read_rows(metrics_path)}
        bar = tqdm(total=cfg.edits, initial=done, desc=f"{cfg.name} edits", unit="edit")
        start, start_done = time.time(), done
        try:
            while True:
                # Evaluate before editing on: a run interrupted during a checkpoint's evaluation redoes it.
                if (done % cfg.eval_every == 0 or done == cfg.edits) and done not in evaluated:
                    began = time.perf_counter()
                    row = self._evaluate(done, model, tok, hp, cases, probe, monitor, state)
                    if cfg.monitors and steps_path.exists():  # the mean over the edit steps since the previous row
                        # steps.jsonl is exact across kills (a resume trims it to its checkpoint), so it is the record
                        row.update(window_means(read_rows(steps_path), max((e for e in evaluated if e < done),
                                                                           default=0), done))
                    with metrics_path.open("a") as fh:
                        fh.write(json.dumps(row) + "\n")
                    evaluated.add(done)
                    clock["eval"] = time.perf_counter() - began
                    if cfg.stop_at_collapse and row.get("collapsed") and done:
                        extra[STOPPED_AT_COLLAPSE] = target = done
                        print(f"[revive] {cfg.name} collapsed at {done} edits (ppl ×{row['ppl_rel']:.2f} ≥ "
                              f"{cfg.collapse_ppl_ratio:g}): the run stops here (stop_at_collapse)")
                    self._save(done, model, hp, host, monitor, extra)
                    self._record_resources(done, host, clock)
                    write_report(self.run_dir)
                if done >= target:
                    break
                batch = cases[done: min(done + cfg.batch_size, target)]
                requests = [c.to_request() for c in batch]
                for group in request_groups(hp.alg_name, requests):  # ROME-style editors: one per call
                    _stop_if_terminated()
                    first_step = host.step
                    with contextlib.redirect_stdout(io.StringIO()):
                        editor.apply_algo(model, tok, group, hp, copy=False, return_orig_weights=False,
                                          keep_original_weight=False)
                    done += len(group)  # each call is atomic: interrupted calls are rolled back
                    if cfg.monitors:
                        step_metrics = monitor_metrics(host.history, first_step, cfg.monitors)
                        with steps_path.open("a") as fh:
                            fh.write(json.dumps({"edits": done, **step_metrics}) + "\n")
                    bar.update(len(group))
                rate = (time.time() - start) / max(done - start_done, 1)
                bar.set_postfix_str(f"ETA {rate * (cfg.edits - done) / 60:.1f} min")
        except KeyboardInterrupt:
            self._save(done, model, hp, host, monitor, extra)
            print(f"\n[revive] interrupted at {done} edits; checkpoint saved. Continue with: "
                  f"revive eval --resume {self.run_dir}")
            raise
        finally:
            bar.close()
        if done >= cfg.edits or extra.get(STOPPED_AT_COLLAPSE) is not None:
            write_report(self.run_dir)
        return self.run_dir
