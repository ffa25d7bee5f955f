"""The ``revive`` command: plugins, prepare-model, edit-stats, demo, eval, calibrate, compare."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence


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


def cmd_prepare_model(args: argparse.Namespace) -> int:
    from .adapters.models import embedded_model_dir

    print(embedded_model_dir())
    return 0


def cmd_edit_stats(args: argparse.Namespace) -> int:
    import yaml

    from .adapters.models import load_model
    from .adapters.stats import load_corpus, second_moments, stats_path

    with open(args.hparams, encoding="utf-8") as fh:
        hp = yaml.safe_load(fh)
    for key in ("model_name", "layers", "rewrite_module_tmp"):
        if key not in hp:
            raise SystemExit(f"{args.hparams}: missing {key!r}; edit-stats needs model_name, layers, rewrite_module_tmp")
    corpus = load_corpus(args.corpus or hp.get("mom2_dataset") or "me-ppl")
    n = args.samples or int(hp.get("mom2_n_samples", 1000))
    dtype = hp.get("mom2_dtype", "float32")
    model, tok = load_model(args.model or hp["model_name"])
    names = [hp["rewrite_module_tmp"].format(layer) for layer in hp["layers"]]
    model_id = model.config._name_or_path.replace("/", "_")
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
    try:
        out = run.execute()
    except KeyboardInterrupt:
        return 130
    print(f"results: {out}/summary.md, {out}/metrics.jsonl, {out}/*.png")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    import shlex
    from pathlib import Path

    from .eval.calibrate import calibrate, parse_grid
    from .eval.harness import RunConfig

    overrides = list(args.set or [])
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
        study.parallel = args.parallel
    return run_study(study, only=args.only or ())


def cmd_compare(args: argparse.Namespace) -> int:
    from .eval.report import compare

    compare(args.runs, args.output)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="revive", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("plugins", help="list the plugins found in the entry-point group easyedit.plugins")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_plugins)

    p = sub.add_parser("prepare-model", help="convert the embedded SmolLM2-135M GGUF to safetensors (once)")
    p.set_defaults(func=cmd_prepare_model)

    p = sub.add_parser("edit-stats", help="MEMIT/ROME second-moment statistics from a local corpus, cached")
    p.add_argument("--hparams", required=True, help="EasyEdit hparams YAML (model_name, layers, rewrite_module_tmp)")
    p.add_argument("--corpus", help="corpus file or shipped name (default: the hparams' mom2_dataset, else me-ppl)")
    p.add_argument("--samples", type=int, help="number of texts (default: the hparams' mom2_n_samples)")
    p.add_argument("--model", help="override model_name")
    p.set_defaults(func=cmd_edit_stats)

    p = sub.add_parser("demo", help="sequential MEMIT edits on SmolLM2-135M, with and without REVIVE")
    p.add_argument("--edits", type=int, default=3, help="number of sequential edits (default 3)")
    p.add_argument("--grad-steps", type=int, default=15, help="MEMIT v_num_grad_steps (default 15, CPU profile)")
    p.add_argument("--tau", type=float, default=0.1, help="REVIVE tau (default 0.1)")
    p.add_argument("--hparams", help="MEMIT hparams YAML (default: the shipped SmolLM2 file)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("eval", help="sequential editing run with checkpoints, evaluation and resume")
    p.add_argument("config", nargs="?", help="run config YAML (path or name in eval/configs)")
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue an interrupted run from its checkpoint (with --edits N: extend it to N edits)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a setting (e.g. revive.tau=0.2; a plugin's block: plugins.NAME.KEY=VALUE)")
    p.add_argument("--edits", type=int, help="number of edits (with --resume: extend the run to this many)")
    p.add_argument("--batch-size", dest="batch_size", type=int, help="requests per edit step")
    p.add_argument("--eval-every", dest="eval_every", type=int, help="checkpoint and evaluate every N edits")
    p.add_argument("--data", help="dataset file (default: the shipped sample)")
    p.add_argument("--seed", type=int, help="seed of the record order, evaluation samples and editing RNGs")
    p.add_argument("--output", help="run directory (default: the config's output)")
    p.add_argument("--overwrite", action="store_true",
                   help="delete an existing run directory (its checkpoint and results) and start again")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("calibrate", help="edit one held-out batch per hparams grid point and measure it")
    p.add_argument("config", help="run config YAML (path or name in eval/configs): hparams, batched_z, dataset, seed")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=[V1,V2]",
                   help="hparams values to try (e.g. mom2_update_weight=[15000,1500]); several --grid make a product")
    p.add_argument("--records", type=int, default=100, help="held-out requests edited as one batch (default 100)")
    p.add_argument("--data", help="dataset file (held-out records come from it; the shipped sample is excluded)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a run-config setting")
    p.add_argument("--ppl-data", dest="ppl_data", help="perplexity sentences (default: the shipped 200 ME-PPL)")
    p.add_argument("--output", default="runs/calibration", help="where calibration.md/.jsonl go")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("study", help="run a study's runs side by side, resumably, and compare them")
    p.add_argument("study", help="study YAML (path or name in eval/studies, e.g. length)")
    p.add_argument("--only", nargs="+", metavar="RUN", help="run only these of the study's runs")
    p.add_argument("--parallel", type=int, help="runs at once (default: the study file's)")
    p.add_argument("--data-root", dest="data_root", help="replaces {data_root} in the runs' settings")
    p.add_argument("--output", help="the study's folder (default: the study file's output)")
    p.add_argument("--status", action="store_true", help="print each run's progress and exit")
    p.set_defaults(func=cmd_study)

    p = sub.add_parser("compare", help="several runs in one table and one set of plots")
    p.add_argument("runs", nargs="+", help="run directories")
    p.add_argument("--output", default="runs/compare", help="where compare.md and the plots go")
    p.set_defaults(func=cmd_compare)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"revive: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
