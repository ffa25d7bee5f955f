"""Evaluation throughput: CounterFact records per second, the harness's batched scorer vs EasyEdit's own.

EasyEdit evaluates inside ``edit`` record by record (``compute_edit_quality``: rewrite, rephrase and locality
prompts of one record per forward pass). The harness scores all records' prompts in padded batches
(``evaluate_facts``: efficacy, generalization, specificity and EasyEdit's rewrite/rephrase/locality). Both
read the same records on the same unedited SmolLM2.

    python benchmarks/eval_throughput.py [--records 50] [--json out.json]
"""
from __future__ import annotations

import contextlib
import io
import time

import torch

from common import counterfact_cases, machine, markdown_table, memit_editor, script_main


def run(records: int = 50) -> dict:
    from revive_plugin.adapters import compat
    from revive_plugin.adapters.compat import import_easyeditor
    from revive_plugin.eval.harness import evaluate_facts, locality_argmax

    editor, model, tok, hp = memit_editor()
    compute_edit_quality = import_easyeditor("easyeditor.evaluate").compute_edit_quality
    cases = counterfact_cases(records)
    requests = [c.to_request() for c in cases]
    prompts = sum(1 + len(c.rephrase_prompts) + len(c.neighborhood_prompts) for c in cases)
    # Warm both paths on one record (first-call allocations and lazy imports are not throughput).
    evaluate_facts(model, tok, cases[:1], locality_argmax(model, tok, cases[:1]))
    with compat.cuda_redirect(compat.redirect_target()), contextlib.redirect_stdout(io.StringIO()):
        compute_edit_quality(model, editor.model_name, hp, tok, requests[0], hp.device)

    with torch.inference_mode():
        began = time.perf_counter()
        pre = locality_argmax(model, tok, cases)  # the harness needs the pre-edit locality answers once per run
        locality_seconds = time.perf_counter() - began
        began = time.perf_counter()
        evaluate_facts(model, tok, cases, pre)
        harness_seconds = time.perf_counter() - began

    failures: list[str] = []
    began = time.perf_counter()
    with compat.cuda_redirect(compat.redirect_target()), contextlib.redirect_stdout(io.StringIO()):
        for case, request in zip(cases, requests):
            try:
                compute_edit_quality(model, editor.model_name, hp, tok, request, hp.device)
            except Exception as e:  # easyeditor's own evaluator fails on some records; count them, go on
                failures.append(f"case {case.case_id}: {type(e).__name__}: {e}")
    easyedit_seconds = time.perf_counter() - began
    return {"records": records, "prompts": prompts,
            "harness_records_per_s": records / harness_seconds,
            "easyedit_records_per_s": records / easyedit_seconds,
            "speedup": easyedit_seconds / harness_seconds,
            "harness_seconds": harness_seconds, "easyedit_seconds": easyedit_seconds,
            "pre_locality_seconds": locality_seconds, "easyedit_failures": failures, "machine": machine()}


def report(r: dict) -> str:
    rows = [["EasyEdit compute_edit_quality (per record)", r["easyedit_seconds"], r["easyedit_records_per_s"]],
            ["harness evaluate_facts (batched)", r["harness_seconds"], r["harness_records_per_s"]]]
    return (f"Evaluation throughput: {r['records']} CounterFact records ({r['prompts']} prompts) on SmolLM2\n"
            + markdown_table(["evaluator", "seconds", "records/s"], rows)
            + f"\nharness / EasyEdit records per second: {r['speedup']:.2f}x (target ≥ 5x); the harness's once-per-run "
              f"pre-edit locality pass took {r['pre_locality_seconds']:.1f} s more"
            + (f"\nEasyEdit's evaluator raised on {len(r['easyedit_failures'])} of the records (timed all the same): "
               + "; ".join(r["easyedit_failures"][:3]) if r.get("easyedit_failures") else ""))


def main() -> None:
    script_main(__doc__, run, report, {"records": int})


if __name__ == "__main__":
    main()
