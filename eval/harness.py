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
import random
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
import yaml
from tqdm.auto import tqdm

from revive_plugin.config import ReviveConfig
from revive_plugin.filter import ReviveFilter

#: Pre-edit measurements kept in the checkpoint's state so a resumed run compares with the same baseline.
BASELINE_KEYS = ("pre_locality", "glue_baseline", "ppl_baseline")
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
    fluency_prompts: int = 10                      # generation prompts of edited facts for Fluency (0: off)
    fluency_tokens: int = 40                       # greedy tokens generated per prompt
    seed: int = 0
    output: str = "runs/{name}"
    device: Optional[str] = None                   # None: CPU without a GPU, else easyeditor's cuda:{device}

    def __post_init__(self) -> None:
        if self.order not in ("file", "seeded"):
            raise ValueError(f"order must be 'file' or 'seeded' (a permutation of the records by seed), got {self.order!r}")
        if self.dataset not in ("counterfact", "zsre"):
            raise ValueError(f"dataset must be 'counterfact' or 'zsre', got {self.dataset!r}")
        for key in ("edits", "batch_size", "eval_every"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{key} must be a positive integer, got {value!r}")
        if not (self.eval_facts == "all" or (isinstance(self.eval_facts, int) and self.eval_facts > 0)):
            raise ValueError(f"eval_facts must be 'all' or a positive integer, got {self.eval_facts!r}")
        if self.ppl is not None:
            unknown = sorted(set(self.ppl) - {"data", "n", "max_tokens"})
            if not isinstance(self.ppl, dict) or unknown:
                raise ValueError(f"ppl must be null or a mapping with keys data, n, max_tokens; got {self.ppl!r}")
        if isinstance(self.collapse_ppl_ratio, bool) or not isinstance(self.collapse_ppl_ratio, (int, float)) \
                or self.collapse_ppl_ratio <= 1:
            raise ValueError(f"collapse_ppl_ratio must be a number > 1, got {self.collapse_ppl_ratio!r}")
        if not isinstance(self.transforms, list):
            raise ValueError(f"transforms must be a list of plugin names, got {self.transforms!r}")
        if "revive" in self.transforms:
            ReviveConfig.from_dict(self.revive)
        if self.batched_z is not None:
            from revive_plugin.adapters.easyedit import batched_z_options

            batched_z_options(self.batched_z, source="run config")

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
        data = yaml.safe_load(p.read_text()) or {}
        return cls.from_dict(apply_overrides(data, overrides), source=str(p))

    @classmethod
    def from_dict(cls, data: dict, source: str = "<config>") -> "RunConfig":
        allowed = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise ValueError(f"{source}: unknown run setting(s) {unknown}; allowed: {sorted(allowed)}")
        try:
            return cls(**data)
        except TypeError as e:
            raise ValueError(f"{source}: {e}") from e

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


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
        target[parts[-1]] = yaml.safe_load(raw)
    return data


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


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _sigterm_as_interrupt() -> Any:
    """Treat SIGTERM like Ctrl-C (roll back the unfinished step, save a checkpoint); returns the old handler.

    A sitting that ends, a scheduler or ``kill`` sends SIGTERM; only the main thread can install handlers.
    """
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _raise_interrupt)


# -- the run -------------------------------------------------------------------------------------
class Run:
    """A sequential editing run in ``run_dir`` (create with ``Run.start``, continue with ``Run.resume``)."""

    def __init__(self, config: RunConfig, run_dir: Path):
        self.config = config
        self.run_dir = run_dir
        self.ckpt_dir = run_dir / "checkpoint"
        self.initial: dict[str, torch.Tensor] = {}   # W₀ of the edited weights (protected-subspace monitors)
        self.ppl_texts: list[str] = []

    # setup
    @classmethod
    def start(cls, config: RunConfig, output: Optional[str] = None, overwrite: bool = False) -> "Run":
        run_dir = Path(output or config.output.format(name=config.name))
        if (run_dir / "checkpoint").exists() and not overwrite:
            raise FileExistsError(f"{run_dir} already holds a run; continue it with `revive eval --resume {run_dir}` "
                                  "or pass --overwrite")
        if run_dir.exists() and overwrite:
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
        return cls(config, run_dir)

    @classmethod
    def resume(cls, run_dir: str | Path, edits: Optional[int] = None) -> "Run":
        """Continue the run in ``run_dir``; ``edits`` extends (or sets) its target number of edits.

        Extending is exact: edits are taken from the same ordered data, so ``--resume DIR --edits 2000`` after a
        1,000-edit run reaches the weights of an uninterrupted 2,000-edit run (its checkpoint rows at 1,000
        stay as they were measured).
        """
        run_dir = Path(run_dir)
        if not (run_dir / "config.yaml").exists():
            raise FileNotFoundError(f"{run_dir} has no config.yaml: not a run directory")
        data = yaml.safe_load((run_dir / "config.yaml").read_text())
        if edits is not None and edits != data.get("edits"):
            state = run_dir / "checkpoint" / "state.json"
            done = json.loads(state.read_text())["edits_done"] if state.exists() else 0
            if edits < done:
                raise ValueError(f"--edits {edits} is below the {done} edits {run_dir} has already made; "
                                 "a run cannot be shortened (start a new one)")
            data["edits"] = edits
            config = RunConfig.from_dict(data, source=str(run_dir))
            if len(ordered_cases(config)) < edits:
                raise ValueError(f"--edits {edits}: the run's data has only {len(ordered_cases(config))} records")
            (run_dir / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
        config = RunConfig.from_dict(data, source=str(run_dir))
        return cls(config, run_dir)

    def _load_hparams(self) -> Any:
        from revive_plugin.adapters.compat import import_easyeditor
        from revive_plugin.adapters.easyedit import HPARAMS_MODULES, PLUGIN_CONFIGS_ATTR

        path = _resolve_file(self.config.hparams)
        alg = (yaml.safe_load(path.read_text()) or {}).get("alg_name")
        if alg not in HPARAMS_MODULES:
            raise ValueError(f"{path}: alg_name {alg!r} is not one of {sorted(HPARAMS_MODULES)}")
        module, _, cls_name = HPARAMS_MODULES[alg].partition(":")
        hp = getattr(import_easyeditor(module), cls_name).from_hparams(str(path))
        for key, value in self.config.hparams_overrides.items():
            if not hasattr(hp, key):
                raise ValueError(f"hparams_overrides: {alg} hparams have no setting {key!r}")
            setattr(hp, key, value)
        if self.config.model:
            hp.model_name = self.config.model
        from revive_plugin.adapters.easyedit import BATCHED_Z_BLOCK, batched_z_options

        configs = {}
        z = getattr(hp, PLUGIN_CONFIGS_ATTR, {}).get(BATCHED_Z_BLOCK)  # the hparams file's choice
        if self.config.batched_z is not None:
            z = batched_z_options(self.config.batched_z, source="run config")
        if z:
            configs[BATCHED_Z_BLOCK] = z
        for name in self.config.transforms:
            configs[name] = dict(self.config.revive) if name == "revive" else {}
        if self.config.transforms:
            configs["edit_plugins"] = {"order": list(self.config.transforms)}
        setattr(hp, PLUGIN_CONFIGS_ATTR, configs)
        return hp

    def _cases(self) -> list[Any]:
        cases = ordered_cases(self.config)
        if len(cases) < self.config.edits:
            raise ValueError(f"{self.config.dataset} data has {len(cases)} records; {self.config.edits} edits asked. "
                             "Pass a larger set with --data PATH (e.g. ../shared/data/counterfact/counterfact_mend.json.gz)")
        return list(cases[: self.config.edits])

    # checkpoint
    def _save(self, done: int, model: Any, hp: Any, host: Any, monitor: ReviveFilter, extra: dict) -> None:
        from safetensors.torch import save_file

        from revive_plugin.adapters.compat import import_easyeditor
        from revive_plugin.adapters.easyedit import target_weights

        tmp = self.run_dir / "checkpoint.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        weights = {t.name: t.tensor.detach().cpu().contiguous() for t in target_weights(model, hp)}
        save_file(weights, str(tmp / "weights.safetensors"))
        monitor.save(tmp / "monitor.safetensors")
        if isinstance(host.state.get("revive"), ReviveFilter):
            host.state["revive"].save(tmp / "revive.safetensors")
        save_file({"torch": torch.get_rng_state()}, str(tmp / "rng.safetensors"))
        templates = {}
        for module in ("easyeditor.models.memit.memit_main", "easyeditor.models.rome.rome_main"):
            templates[module] = import_easyeditor(module).CONTEXT_TEMPLATES_CACHE
        np_state = np.random.get_state()
        state = {"edits_done": done, "host_step": host.step, "python_random": list(random.getstate()[1]),
                 "numpy_random": [np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
                 "context_templates": templates, **extra}
        (tmp / "state.json").write_text(json.dumps(state))
        shutil.rmtree(self.ckpt_dir, ignore_errors=True)
        tmp.rename(self.ckpt_dir)  # a checkpoint is either complete or absent

    def _load(self, model: Any, hp: Any, host: Any) -> tuple[int, ReviveFilter, dict]:
        from safetensors.torch import load_file

        from revive_plugin.adapters.compat import import_easyeditor
        from revive_plugin.adapters.easyedit import target_weights

        state = json.loads((self.ckpt_dir / "state.json").read_text())
        weights = load_file(str(self.ckpt_dir / "weights.safetensors"))
        with torch.no_grad():
            for t in target_weights(model, hp):
                t.tensor.copy_(weights[t.name])
        monitor = ReviveFilter.load(self.ckpt_dir / "monitor.safetensors")
        if (self.ckpt_dir / "revive.safetensors").exists():
            host.state["revive"] = ReviveFilter.load(self.ckpt_dir / "revive.safetensors")
        host.step = state["host_step"]
        torch.set_rng_state(load_file(str(self.ckpt_dir / "rng.safetensors"))["torch"])
        random.setstate((3, tuple(state["python_random"]), None))
        keys, pos, has_gauss, cached = state["numpy_random"]
        np.random.set_state(("MT19937", np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
        for module, templates in state["context_templates"].items():
            import_easyeditor(module).CONTEXT_TEMPLATES_CACHE = templates
        return state["edits_done"], monitor, state

    # evaluation at a checkpoint
    def _evaluate(self, done: int, model: Any, tok: Any, hp: Any, cases: list, probe: Any, monitor: ReviveFilter,
                  state: dict) -> dict[str, Any]:
        from revive_plugin.adapters.easyedit import target_weights

        cfg = self.config
        row: dict[str, Any] = {"edits": done}
        glue = state.get("glue_baseline") if done == 0 else None  # the pre-edit row reuses the baseline
        if done:
            edited = cases[:done]
            final = done == cfg.edits and cfg.eval_all_at_end
            if cfg.eval_facts != "all" and len(edited) > cfg.eval_facts and not final:
                rng = random.Random(cfg.seed)
                edited = sorted(rng.sample(edited, cfg.eval_facts), key=lambda c: c.case_id)
            row["facts_evaluated"] = len(edited)
            row.update(evaluate_facts(model, tok, edited, state.get("pre_locality")))
            if cfg.eval_last_batch:
                last = cases[(done - 1) // cfg.batch_size * cfg.batch_size:done]
                scores = evaluate_facts(model, tok, last, state.get("pre_locality"))
                row.update({f"last_batch_{k}": v for k, v in scores.items() if not k.startswith("easyedit_")})
            prompts = [c.generation_prompts[0] for c in edited if c.generation_prompts][: cfg.fluency_prompts]
            if prompts:
                from .generation import generate_texts
                from .metrics import n_gram_entropy

                texts = generate_texts(model, tok, prompts, max_new_tokens=cfg.fluency_tokens)
                row["fluency"] = n_gram_entropy(texts)
                row["fluency_prompts"] = len(prompts)
        if self.ppl_texts and "ppl_baseline" in state:
            from .perplexity import perplexity

            measured = state["ppl_baseline"] if done == 0 else perplexity(
                model, tok, self.ppl_texts, max_tokens=cfg.ppl.get("max_tokens", 128), progress="perplexity")
            row.update(measured)
            row["ppl_rel"] = row["ppl"] / state["ppl_baseline"]["ppl"]
            row["collapsed"] = row["ppl_rel"] >= cfg.collapse_ppl_ratio
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

    def _record_resources(self, done: int, host: Any, clock: dict) -> None:
        """Append memory and time since the previous checkpoint of this session to ``resources.jsonl``."""
        from .resources import live_tensors, release_free_heap, reset_window_peak, rss_mb, window_peak_rss_mb

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
               "eval_seconds": round(clock["eval"], 3)}
        clock["host"] = dict(host.seconds)
        clock["resettable"] = reset_window_peak()
        with (self.run_dir / "resources.jsonl").open("a") as fh:
            fh.write(json.dumps(row) + "\n")

    def execute(self, stop_after: Optional[int] = None) -> Path:
        """Run (or continue) to ``config.edits``; ``stop_after`` ends early after that many edits (tests)."""
        from revive_plugin.adapters.compat import import_easyeditor
        from revive_plugin.adapters.easyedit import enable_easyedit, host_for, target_weights

        from .glue import GlueProbe
        from .report import write_report

        cfg = self.config
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
        clock = {"host": dict(host.seconds), "eval": 0.0}
        if self.ckpt_dir.exists():
            done, monitor, state = self._load(model, hp, host)
            rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()] \
                if metrics_path.exists() else []
            rows = [r for r in rows if r["edits"] <= done]  # drop rows written after the checkpoint
            metrics_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
            print(f"[revive] resuming {self.run_dir} at {done}/{cfg.edits} edits")
            if self.ppl_texts and "ppl_baseline" not in state:
                print("[revive] this run's checkpoint has no pre-edit perplexity (it predates the measure): "
                      "perplexity is not reported for it")
        else:
            done = 0
            began = time.perf_counter()
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
        extra = {k: state[k] for k in BASELINE_KEYS if k in state}
        target = cfg.edits if stop_after is None else min(cfg.edits, stop_after)
        evaluated = {json.loads(line)["edits"] for line in metrics_path.read_text().splitlines() if line.strip()}
        bar = tqdm(total=cfg.edits, initial=done, desc=f"{cfg.name} edits", unit="edit")
        start, start_done = time.time(), done
        previous_term = _sigterm_as_interrupt()
        try:
            while True:
                # Evaluate before editing on: a run interrupted during a checkpoint's evaluation redoes it.
                if (done % cfg.eval_every == 0 or done == cfg.edits) and done not in evaluated:
                    began = time.perf_counter()
                    row = self._evaluate(done, model, tok, hp, cases, probe, monitor, state)
                    with metrics_path.open("a") as fh:
                        fh.write(json.dumps(row) + "\n")
                    evaluated.add(done)
                    clock["eval"] = time.perf_counter() - began
                    self._save(done, model, hp, host, monitor, extra)
                    self._record_resources(done, host, clock)
                    write_report(self.run_dir)
                if done >= target:
                    break
                batch = cases[done: min(done + cfg.batch_size, target)]
                requests = [c.to_request() for c in batch]
                # ROME edits one request per call; the others take the batch at once.
                groups = [[r] for r in requests] if hp.alg_name == "ROME" else [requests]
                for group in groups:
                    with contextlib.redirect_stdout(io.StringIO()):
                        editor.apply_algo(model, tok, group, hp, copy=False, return_orig_weights=False,
                                          keep_original_weight=False)
                    done += len(group)  # each call is atomic: interrupted calls are rolled back
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
            if previous_term is not None:
                signal.signal(signal.SIGTERM, previous_term)
        if done >= cfg.edits:
            write_report(self.run_dir)
        return self.run_dir
