"""ROME edit time on SmolLM2: easyeditor's compute_v vs the batched z path (``batched_z: true`` for ROME).

Both runs start from the same pre-edit weights and make the same sequential ROME edits (one request per call,
the shipped calibrated hparams) with the same context templates; only ``compute_v``'s optimisation differs.
The written updates are compared (they should agree to float rounding: the objective is the same) and the
edited facts scored by the harness's evaluator.

    python benchmarks/rome_throughput.py [--requests 2]
"""
from __future__ import annotations

import contextlib
import io
import logging
import time

from common import ROOT, counterfact_cases, edited_weights, machine, markdown_table, restore, script_main

ROME_HPARAMS = ROOT / "hparams" / "ROME" / "smollm2-135m.yaml"


def run(requests: int = 2) -> dict:
    from revive_plugin.adapters.compat import import_easyeditor
    from revive_plugin.adapters.easyedit import PLUGIN_CONFIGS_ATTR, enable_easyedit
    from revive_plugin.eval.harness import evaluate_facts

    from edit_throughput import timing

    enable_easyedit()
    logging.getLogger("easyeditor").setLevel(logging.WARNING)
    hp = import_easyeditor("easyeditor.models.rome.rome_hparams").ROMEHyperParams.from_hparams(str(ROME_HPARAMS))
    with contextlib.redirect_stdout(io.StringIO()):
        editor = import_easyeditor("easyeditor.editors.editor").BaseEditor.from_hparams(hp)
    model, tok = editor.model, editor.tok
    cases = counterfact_cases(requests)
    w0 = edited_weights(model, hp)
    rome_main = import_easyeditor("easyeditor.models.rome.rome_main")
    results, written = {}, {}
    for mode, configs in (("easyeditor", {}), ("batched", {"batched_z": {"chunk": 16, "early_exit": True}})):
        restore(model, w0)
        setattr(hp, PLUGIN_CONFIGS_ATTR, configs)
        v_seconds = [0.0]
        started = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            for case in cases:
                # the batched path replaces compute_v inside the step: time whatever compute_v the step calls
                with timing(rome_main, "compute_v", v_seconds) if mode == "easyeditor" else contextlib.nullcontext():
                    editor.apply_algo(model, tok, [case.to_request()], hp, copy=False, return_orig_weights=False,
                                      keep_original_weight=False)
        seconds = time.perf_counter() - started
        written[mode] = {n: model.get_parameter(n).detach() - w for n, w in w0.items()}
        facts = evaluate_facts(model, tok, cases)
        results[mode] = {"seconds": seconds, "seconds_per_edit": seconds / requests,
                         "efficacy": facts["efficacy_score"], "generalization": facts["generalization_score"],
                         "specificity": facts["specificity_score"]}
        if mode == "easyeditor":
            results[mode]["v_seconds"] = v_seconds[0]
    restore(model, w0)
    results["speedup"] = results["easyeditor"]["seconds"] / results["batched"]["seconds"]
    results["max_relative_difference"] = max(
        float((written["batched"][n] - written["easyeditor"][n]).norm() / written["easyeditor"][n].norm())
        for n in w0)
    results["setup"] = {"requests": requests, "z_steps": int(hp.v_num_grad_steps), "machine": machine()}
    return results


def report(r: dict) -> str:
    rows = [[mode, r[mode]["seconds"], r[mode]["seconds_per_edit"], r[mode]["efficacy"], r[mode]["generalization"],
             r[mode]["specificity"]] for mode in ("easyeditor", "batched")]
    s = r["setup"]
    return (f"ROME: {s['requests']} sequential CounterFact edits on SmolLM2, {s['z_steps']} v steps "
            f"(easyeditor's compute_v took {r['easyeditor']['v_seconds']:.1f} s of its {r['easyeditor']['seconds']:.1f} s)\n"
            + markdown_table(["compute_v", "seconds", "s / edit", "efficacy", "generalization", "specificity"], rows)
            + f"\nbatched / easyeditor: {r['speedup']:.2f}x faster; the written updates differ by "
              f"{r['max_relative_difference']:.1e} (relative Frobenius norm)")


def main() -> None:
    script_main(__doc__, run, report, {"requests": int})


if __name__ == "__main__":
    main()
