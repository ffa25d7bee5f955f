"""Filter overhead: one MEMIT edit step on SmolLM2 (batch 100) against the time REVIVE adds to it.

The MEMIT step runs once for real through the plugin host without REVIVE (its wall time is the baseline). Its
output weights are then replayed through the host — the editor replaced by a copy of what MEMIT wrote — with
no plugin, with REVIVE on the cached W₀ basis (first step: SVD included; later steps: cache hit) and with the
current-W basis. What REVIVE adds is the replay's wall time minus the plain replay's (median of repeats),
so the figure is the plugin's own cost on the real deltas, snapshot and write-back included.

    python benchmarks/edit_overhead.py [--requests 100] [--z-steps 3] [--repeat 3] [--json out.json]

Fewer z steps make the MEMIT step shorter, so the overhead ratio is an upper bound of the full setting's.
"""
from __future__ import annotations

import statistics
import time

import torch

from common import apply_edits, counterfact_cases, edited_weights, machine, markdown_table, memit_editor, restore, script_main


def run(requests: int = 100, z_steps: int | None = 3, repeat: int = 3, tau: float = 0.1, chunk: int = 16) -> dict:
    from revive_plugin.adapters.easyedit import target_weights
    from revive_plugin.host import PluginHost

    editor, model, tok, hp = memit_editor(z_steps)
    cases = counterfact_cases(requests)
    w0 = edited_weights(model, hp)
    started = time.perf_counter()
    record = apply_edits(editor, hp, [c.to_request() for c in cases], {"batched_z": {"chunk": chunk}})
    step_seconds = time.perf_counter() - started
    after = edited_weights(model, hp)
    targets = target_weights(model, hp)

    def replay() -> None:
        restore(model, after)

    def timed_step(host: PluginHost, configs: dict) -> float:
        restore(model, w0)
        began = time.perf_counter()
        host.run_step("MEMIT", targets, replay, configs=configs, order=list(configs.get("edit_plugins", {}).get("order", [])))
        return time.perf_counter() - began

    def revive(basis: str) -> dict:
        return {"revive": {"tau": tau, "basis": basis}, "edit_plugins": {"order": ["revive"]}}

    plain = statistics.median(timed_step(PluginHost(), {}) for _ in range(repeat))
    cold, warm = [], []
    for _ in range(repeat):
        host = PluginHost()
        cold.append(timed_step(host, revive("original")))   # first step: W₀'s SVD per layer
        warm.append(timed_step(host, revive("original")))   # later steps: the cached basis
    current = statistics.median(timed_step(PluginHost(), revive("current")) for _ in range(repeat))
    restore(model, w0)
    added = {"original, first step (SVD)": statistics.median(cold) - plain,
             "original, cached": statistics.median(warm) - plain,
             "current (SVD every step)": current - plain}
    return {"step_seconds": step_seconds, "editor_seconds": record.edit_seconds, "plain_replay_seconds": plain,
            "added_seconds": added, "overhead": {k: v / step_seconds for k, v in added.items()},
            "setup": {"requests": requests, "z_steps": int(hp.v_num_grad_steps), "layers": list(hp.layers),
                      "tau": tau, "repeat": repeat, "threads": torch.get_num_threads(), "machine": machine()}}


def report(r: dict) -> str:
    s = r["setup"]
    rows = [[basis, r["added_seconds"][basis], 100 * r["overhead"][basis]] for basis in r["added_seconds"]]
    return (f"Filter overhead: MEMIT step of {s['requests']} CounterFact requests on SmolLM2 layers {s['layers']} "
            f"({s['z_steps']} z steps, batched z): {r['step_seconds']:.1f} s\n"
            + markdown_table(["REVIVE basis", "seconds added", "% of the MEMIT step"], rows)
            + f"\ncached-basis overhead {100 * r['overhead']['original, cached']:.3f}% (target ≤ 2%)")


def main() -> None:
    script_main(__doc__, run, report, {"requests": int, "z_steps": int, "repeat": int, "tau": float})


if __name__ == "__main__":
    main()
