"""Shared setup of the SmolLM2 benchmarks: the editor, the CounterFact requests, weight restore, machine facts."""
from __future__ import annotations

import argparse
import contextlib
import inspect
import io
import json
import logging
import os
import platform
from pathlib import Path
from typing import Any, Callable, Optional

import torch

ROOT = Path(__file__).resolve().parent.parent
MEMIT_HPARAMS = ROOT / "hparams" / "MEMIT" / "smollm2-135m.yaml"


def machine() -> str:
    """One line naming the machine the figures were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} with {torch.get_num_threads()} threads, "
            f"{gpu}")


def memit_editor(z_steps: Optional[int] = None, hparams: Path = MEMIT_HPARAMS) -> tuple[Any, Any, Any, Any]:
    """(editor, model, tok, hparams) for MEMIT on the embedded SmolLM2, plugins enabled, no plugin blocks."""
    from revive_plugin.adapters.compat import import_easyeditor
    from revive_plugin.adapters.easyedit import PLUGIN_CONFIGS_ATTR, enable_easyedit

    enable_easyedit()
    logging.getLogger("easyeditor").setLevel(logging.WARNING)
    MEMITHyperParams = import_easyeditor("easyeditor.models.memit.memit_hparams").MEMITHyperParams
    hp = MEMITHyperParams.from_hparams(str(hparams))
    if z_steps is not None:
        hp.v_num_grad_steps = z_steps
    setattr(hp, PLUGIN_CONFIGS_ATTR, {})
    BaseEditor = import_easyeditor("easyeditor.editors.editor").BaseEditor
    with contextlib.redirect_stdout(io.StringIO()):
        editor = BaseEditor.from_hparams(hp)
    return editor, editor.model, editor.tok, hp


def counterfact_cases(n: int, data: Optional[str] = None) -> list[Any]:
    """The first ``n`` CounterFact cases (the shipped sample unless ``data`` names a file)."""
    from revive_plugin.eval.datasets import load_counterfact

    cases = load_counterfact(data, limit=None)
    if len(cases) < n:
        raise SystemExit(f"the CounterFact data has {len(cases)} records, {n} asked: pass --data "
                         "../shared/data/counterfact/counterfact_mend.json.gz")
    return list(cases[:n])


def edited_weights(model: Any, hp: Any) -> dict[str, torch.Tensor]:
    """Copies of the weights the editor writes (to put the model back between timed runs)."""
    from revive_plugin.adapters.easyedit import target_weights

    return {t.name: t.tensor.detach().clone() for t in target_weights(model, hp)}


def restore(model: Any, saved: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, w in saved.items():
            model.get_parameter(name).copy_(w)


def apply_edits(editor: Any, hp: Any, requests: list[dict], configs: dict) -> Any:
    """One easyeditor edit step of ``requests`` with the plugin blocks ``configs``; returns the host's record."""
    from revive_plugin.adapters.easyedit import PLUGIN_CONFIGS_ATTR, step_records

    setattr(hp, PLUGIN_CONFIGS_ATTR, configs)
    with contextlib.redirect_stdout(io.StringIO()):
        editor.apply_algo(editor.model, editor.tok, requests, hp, copy=False, return_orig_weights=False,
                          keep_original_weight=False)
    return step_records(editor.model)[-1]


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    """The project's Markdown table (revive_plugin.eval.report), floats to 4 significant digits."""
    from revive_plugin.eval.report import markdown_table as table

    return table(header, rows, floatfmt=".4g")


def script_main(doc: str, run: Callable[..., Any], report: Callable[[Any], str], types: dict[str, type]) -> None:
    """Command line of a figure script: ``--option`` per ``types`` entry (default: ``run``'s), plus ``--json``.

    Runs ``run(**options)``, prints ``report(result)`` and writes the result to ``--json`` when given.
    """
    defaults = inspect.signature(run).parameters
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    for name, kind in types.items():
        parser.add_argument("--" + name.replace("_", "-"), type=kind, default=defaults[name].default)
    parser.add_argument("--json", help="also write the measured result to this file")
    args = vars(parser.parse_args())
    path = args.pop("json")
    result = run(**args)
    print(report(result))
    if path:
        with open(path, "w") as fh:
            json.dump(result, fh, indent=1)
