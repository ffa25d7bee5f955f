"""``revive demo``: a few sequential real MEMIT edits on SmolLM2-135M through EasyEdit, with and without REVIVE.

It uses EasyEdit exactly as a user would (``from_hparams`` → ``BaseEditor`` → ``edit``) after
``enable_easyedit()``; the only difference between the two runs is the ``revive:`` block of the hparams.
"""
from __future__ import annotations

import contextlib
import io
import logging
import time
from pathlib import Path
from typing import Optional

import torch
from tqdm.auto import tqdm

# CounterFact (ROME format) case ids 0, 13, 18, 51, 70, 84: (prompt, subject, new target, true target).
DEMO_CASES = [
    ("The mother tongue of Danielle Darrieux is", "Danielle Darrieux", "English", "French"),
    ("Ferrari F40, developed by", "Ferrari F40", "Microsoft", "Ferrari"),
    ("Porsche 911, created by", "Porsche 911", "Honda", "Porsche"),
    ("Prydz Bay is located in", "Prydz Bay", "Africa", "Antarctica"),
    ("The twin city of Beirut is", "Beirut", "Florence", "Istanbul"),
    ("Nathuram Godse, a citizen of", "Nathuram Godse", "Italy", "India"),
]

DEFAULT_HPARAMS = Path(__file__).resolve().parent.parent / "hparams" / "MEMIT" / "smollm2-135m.yaml"


def _probs(model, tok, cases) -> list[tuple[float, float]]:
    from revive_plugin.eval.scoring import score_continuations

    prompts = [c[0] for c in cases] * 2
    conts = [c[2] for c in cases] + [c[3] for c in cases]
    scores = score_continuations(model, tok, prompts, conts)
    n = len(cases)
    return [(scores[i].prob, scores[n + i].prob) for i in range(n)]


def run_demo(edits: int = 3, grad_steps: int = 15, tau: float = 0.1, hparams: Optional[str] = None) -> int:
    """Run ``edits`` sequential MEMIT edits twice (plain, +REVIVE) and print what changed."""
    from .compat import import_easyeditor
    from revive_plugin.spectral import protected_basis

    from .easyedit import PLUGIN_CONFIGS_ATTR, enable_easyedit

    if not 1 <= edits <= len(DEMO_CASES):
        raise ValueError(f"--edits must be between 1 and {len(DEMO_CASES)}, got {edits}")
    enable_easyedit()
    logging.getLogger("easyeditor").setLevel(logging.WARNING)
    BaseEditor = import_easyeditor("easyeditor.editors.editor").BaseEditor
    MEMITHyperParams = import_easyeditor("easyeditor.models.memit.memit_hparams").MEMITHyperParams
    cases = DEMO_CASES[:edits]
    results = {}
    for mode in ("MEMIT", "MEMIT+REVIVE"):
        hp = MEMITHyperParams.from_hparams(str(hparams or DEFAULT_HPARAMS))
        hp.v_num_grad_steps = grad_steps
        configs = dict(getattr(hp, PLUGIN_CONFIGS_ATTR, {}))
        if mode == "MEMIT":
            configs.pop("revive", None)
        else:
            configs["revive"] = {**(configs.get("revive") or {}), "tau": tau}
        setattr(hp, PLUGIN_CONFIGS_ATTR, configs)
        torch.manual_seed(0)
        editor = BaseEditor.from_hparams(hp)
        model, tok = editor.model, editor.tok
        names = [f"{hp.rewrite_module_tmp.format(layer)}.weight" for layer in hp.layers]
        w0 = {n: model.get_parameter(n).detach().clone() for n in names}
        before = _probs(model, tok, cases)
        start = time.time()
        print(f"\n== {mode}: {edits} sequential edits (v_num_grad_steps={grad_steps}) ==", flush=True)
        for prompt, subject, new, true in tqdm(cases, desc=mode, unit="edit"):
            # easyeditor prints every optimisation step; keep the demo's screen readable.
            with contextlib.redirect_stdout(io.StringIO()):
                editor.edit(prompts=[prompt], target_new=[new], ground_truth=[true], subject=[subject],
                            keep_original_weight=False, verbose=False)
        elapsed = time.time() - start
        after = _probs(model, tok, cases)
        layers = []
        for n in names:
            w = model.get_parameter(n).detach()
            delta = w - w0[n]
            basis = protected_basis(w0[n], tau)  # W₀'s dominant subspace, for both modes
            inside = float(torch.linalg.vector_norm(basis.u.T.to(delta.dtype) @ delta))
            layers.append((n, float(torch.linalg.vector_norm(w)), float(torch.linalg.vector_norm(delta)),
                           inside / max(float(torch.linalg.vector_norm(delta)), 1e-30), basis.k))
        results[mode] = (before, after, layers, elapsed)
        del editor, model

    print("\nP(target) = exp(mean token log-prob) of the continuation after the prompt\n")
    print(f"{'case':<44} {'mode':<13} {'P(new) pre':>10} {'P(new) post':>11} {'P(true) post':>12}")
    for i, (prompt, _, new, _) in enumerate(cases):
        for mode, (before, after, _, _) in results.items():
            label = f"{prompt[:30]}… -> {new}" if len(prompt) > 30 else f"{prompt} -> {new}"
            print(f"{label:<44} {mode:<13} {before[i][0]:>10.4f} {after[i][0]:>11.4f} {after[i][1]:>12.4f}")
    print(f"\nper edited layer: ΔW = W − W₀ after all edits; k = energy rank of W₀ at tau={tau}; "
          "'in top-k' = ‖UₖᵀΔW‖/‖ΔW‖, the share of the update inside W₀'s dominant left subspace")
    print(f"{'layer weight':<38} {'mode':<13} {'‖W‖_F':>9} {'‖ΔW‖_F':>9} {'in top-k':>9} {'k':>4}")
    for mode, (_, _, layers, _) in results.items():
        for n, norm, dnorm, share, k in layers:
            print(f"{n:<38} {mode:<13} {norm:>9.3f} {dnorm:>9.4f} {share:>9.4f} {k:>4}")
    for mode, (before, after, _, elapsed) in results.items():
        wins = sum(a[0] > a[1] for a in after)
        print(f"{mode}: {wins}/{len(cases)} edits with P(new) > P(true) after all edits; {elapsed:.0f} s of editing")
    return 0
