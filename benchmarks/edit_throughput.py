"""Edit throughput: sequential MEMIT edits per hour on SmolLM2, easyeditor's compute_z vs the batched z path.

Both runs start from the same pre-edit weights, edit the same CounterFact requests in the same batches with
the same hparams and context templates, and are then scored on those facts (efficacy, generalization,
specificity) by the harness's evaluator. Only ``compute_z`` differs.

    python benchmarks/edit_throughput.py [--requests 20] [--batch 10] [--z-steps 25] [--json out.json]
"""
from __future__ import annotations

import contextlib
import time
from typing import Any, Iterator

from common import apply_edits, counterfact_cases, edited_weights, machine, markdown_table, memit_editor, restore, script_main


@contextlib.contextmanager
def timing(owner: Any, name: str, total: list[float]) -> Iterator[None]:
    """Add the time spent in ``owner.name`` calls to ``total[0]`` while the block runs."""
    fn = getattr(owner, name)

    def timed(*args: Any, **kwargs: Any) -> Any:
        began = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            total[0] += time.perf_counter() - began

    setattr(owner, name, timed)
    try:
        yield
    finally:
        setattr(owner, name, fn)


def run(requests: int = 20, batch: int = 10, z_steps: int | None = None, chunk: int = 16) -> dict:
    from revive_plugin.adapters import batched_z
    from revive_plugin.adapters.compat import import_easyeditor
    from revive_plugin.eval.harness import evaluate_facts

    editor, model, tok, hp = memit_editor(z_steps)
    cases = counterfact_cases(requests)
    w0 = edited_weights(model, hp)
    memit_main = import_easyeditor("easyeditor.models.memit.memit_main")
    results = {}
    for mode, configs in (("easyeditor", {}), ("batched", {"batched_z": {"chunk": chunk}})):
        restore(model, w0)
        z_seconds = [0.0]
        owner, name = (memit_main, "compute_z") if mode == "easyeditor" else (batched_z, "compute_zs")
        started = time.perf_counter()
        with timing(owner, name, z_seconds):
            for i in range(0, requests, batch):
                apply_edits(editor, hp, [c.to_request() for c in cases[i:i + batch]], configs)
        seconds = time.perf_counter() - started
        facts = evaluate_facts(model, tok, cases)
        results[mode] = {"seconds": seconds, "z_seconds": z_seconds[0], "edits_per_hour": requests / seconds * 3600,
                         "efficacy": facts["efficacy_score"], "generalization": facts["generalization_score"],
                         "specificity": facts["specificity_score"]}
    restore(model, w0)
    results["speedup"] = results["batched"]["edits_per_hour"] / results["easyeditor"]["edits_per_hour"]
    results["z_speedup"] = results["easyeditor"]["z_seconds"] / results["batched"]["z_seconds"]
    results["setup"] = {"requests": requests, "batch": batch, "z_steps": int(hp.v_num_grad_steps), "chunk": chunk,
                        "machine": machine()}
    return results


def report(r: dict) -> str:
    rows = [[mode, r[mode]["seconds"], r[mode]["z_seconds"], r[mode]["edits_per_hour"], r[mode]["efficacy"],
             r[mode]["generalization"], r[mode]["specificity"]] for mode in ("easyeditor", "batched")]
    s = r["setup"]
    return (f"Edit throughput: {s['requests']} CounterFact requests in batches of {s['batch']}, "
            f"{s['z_steps']} z steps, chunk {s['chunk']}\n"
            + markdown_table(["compute_z", "seconds", "of which z optimisation", "edits/hour", "efficacy",
                              "generalization", "specificity"], rows)
            + f"\nbatched / easyeditor edits per hour: {r['speedup']:.2f}x (target ≥ 5x); "
              f"z optimisation alone: {r['z_speedup']:.2f}x")


def main() -> None:
    script_main(__doc__, run, report, {"requests": int, "batch": int, "z_steps": int, "chunk": int})


if __name__ == "__main__":
    main()
