"""``revive demo``: a few sequential real MEMIT edits on SmolLM2-135M through EasyEdit, with and without REVIVE.

It uses EasyEdit exactly as a user would (``from_hparams`` → ``BaseEditor`` → ``edit``) after
``enable_easyedit()``; the only difference between the two runs is the ``revive:`` block of the hparams.
"""
from __future__ import annotations

import contextlib
import io
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

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

#: The settings easyeditor's MEMITHyperParams requires (its fields without a default).
MEMIT_REQUIRED = (
    "alg_name", "model_name", "device", "stats_dir", "layers", "layer_selection", "fact_token", "v_num_grad_steps",
    "v_lr", "v_loss_layer", "v_weight_decay", "clamp_norm_factor", "kl_factor", "mom2_adjustment",
    "mom2_update_weight", "rewrite_module_tmp", "layer_module_tmp", "mlp_module_tmp", "attn_module_tmp",
    "ln_f_module", "lm_head_module", "mom2_dataset", "mom2_n_samples", "mom2_dtype",
)


@dataclass(frozen=True)
class DemoSettings:
    """The demo's checked arguments: the hparams file, its settings and the z-optimisation steps to use."""

    edits: int
    grad_steps: int          # v_num_grad_steps of both runs (the file's unless --grad-steps overrides it)
    grad_steps_given: bool   # True when --grad-steps overrode the file's v_num_grad_steps
    tau: float
    hparams: Path
    settings: dict


def check_demo_args(edits: Any = 3, grad_steps: Any = None, tau: Any = 0.1,
                    hparams: Optional[str] = None) -> DemoSettings:
    """Every demo argument checked before anything is loaded: a ValueError (FileNotFoundError for a missing
    hparams file) naming the value and how to fix it. A bad value would otherwise surface only after the
    first MEMIT pass (the plain run comes before the REVIVE run)."""
    from revive_plugin.cli import HPARAMS_KEYS, read_hparams_yaml
    from revive_plugin.config import ReviveConfig

    n = len(DEMO_CASES)
    if isinstance(edits, bool) or not isinstance(edits, int) or not 1 <= edits <= n:
        raise ValueError(f"--edits {edits!r}: the demo has {n} prepared edits, so give a whole number from 1 to {n} "
                         "(default 3)")
    if grad_steps is not None and (isinstance(grad_steps, bool) or not isinstance(grad_steps, int) or grad_steps <= 0):
        raise ValueError(f"--grad-steps {grad_steps!r}: MEMIT's v_num_grad_steps must be a positive whole number "
                         "(e.g. 15 for a quicker, weaker CPU profile); leave it out to use the hparams file's")
    try:
        config = ReviveConfig(tau=tau)
    except ValueError as e:
        raise ValueError(f"--tau {tau!r}: {e}. tau is the share of W₀'s singular-value mass that REVIVE protects; "
                         "give e.g. --tau 0.1 (useful range 0.05-0.3)") from None
    path = Path(hparams).expanduser() if hparams else DEFAULT_HPARAMS
    if ".yaml" not in path.name:
        raise ValueError(f"--hparams {hparams}: easyeditor reads hparams from a .yaml file (it appends .yaml to "
                         f"other names); give a MEMIT hparams YAML such as {DEFAULT_HPARAMS}")
    settings = read_hparams_yaml(path, {"alg_name": "MEMIT", **HPARAMS_KEYS}, "revive demo")
    if settings["alg_name"] != "MEMIT":
        raise ValueError(f"{path} is a {settings['alg_name']!r} hparams YAML, but the demo runs MEMIT: give a file "
                         f"with alg_name: MEMIT, e.g. {DEFAULT_HPARAMS}")
    missing = [k for k in MEMIT_REQUIRED if k not in settings]
    if missing:
        raise ValueError(f"{path} is not a valid hparams YAML for MEMIT: missing {missing}. MEMIT needs every "
                         f"setting of easyeditor's MEMITHyperParams that has no default ({', '.join(MEMIT_REQUIRED)}); "
                         f"compare with {DEFAULT_HPARAMS}")
    steps = settings["v_num_grad_steps"]
    if grad_steps is None and (isinstance(steps, bool) or not isinstance(steps, int) or steps <= 0):
        raise ValueError(f"{path}: v_num_grad_steps is {steps!r}, not a positive whole number; fix the file or "
                         "give --grad-steps N")
    block = settings.get("revive")
    if block is not None and not isinstance(block, dict):
        raise ValueError(f"{path}: the revive block must be a mapping of settings (e.g. {{tau: 0.1}}), got {block!r}")
    try:
        ReviveConfig.from_dict({**(block or {}), "tau": config.tau})
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return DemoSettings(edits=edits, grad_steps=grad_steps if grad_steps is not None else steps,
                        grad_steps_given=grad_steps is not None, tau=config.tau, hparams=path, settings=settings)


def _probs(model, tok, cases) -> list[tuple[float, float]]:
    from revive_plugin.eval.scoring import score_continuations

    prompts = [c[0] for c in cases] * 2
    conts = [c[2] for c in cases] + [c[3] for c in cases]
    scores = score_continuations(model, tok, prompts, conts)
    n = len(cases)
    return [(scores[i].prob, scores[n + i].prob) for i in range(n)]


def run_demo(edits: int = 3, grad_steps: Optional[int] = None, tau: float = 0.1, hparams: Optional[str] = None) -> int:
    """Run ``edits`` sequential MEMIT edits twice (plain, +REVIVE) and print what changed.

    ``grad_steps``: MEMIT's ``v_num_grad_steps``; None keeps the hparams file's. Every argument is checked
    (``check_demo_args``) before the model loads. Target vectors are optimised on the batched z path
    (``batched_z``; exact: the same numbers as easyeditor's ``compute_z``, faster) unless the hparams file
    has a ``batched_z:`` block of its own.
    """
    demo = check_demo_args(edits=edits, grad_steps=grad_steps, tau=tau, hparams=hparams)
    edits, tau = demo.edits, demo.tau

    from .compat import import_easyeditor
    from revive_plugin.spectral import protected_basis

    from .easyedit import BATCHED_Z_BLOCK, PLUGIN_CONFIGS_ATTR, batched_z_options, enable_easyedit, sequential_edit_kwargs

    enable_easyedit()
    logging.getLogger("easyeditor").setLevel(logging.WARNING)
    BaseEditor = import_easyeditor("easyeditor.editors.editor").BaseEditor
    MEMITHyperParams = import_easyeditor("easyeditor.models.memit.memit_hparams").MEMITHyperParams
    cases = DEMO_CASES[:edits]
    results = {}
    for mode in ("MEMIT", "MEMIT+REVIVE"):
        hp = MEMITHyperParams.from_hparams(str(demo.hparams))
        hp.v_num_grad_steps = demo.grad_steps
        configs = dict(getattr(hp, PLUGIN_CONFIGS_ATTR, {}))
        if BATCHED_Z_BLOCK not in configs:  # the file's own batched_z block (even `false`) wins
            configs[BATCHED_Z_BLOCK] = batched_z_options(True)
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
        steps = f"v_num_grad_steps={demo.grad_steps}" + ("" if demo.grad_steps_given else " from the hparams file")
        z_path = "batched z" if configs.get(BATCHED_Z_BLOCK) else "easyeditor's compute_z"
        print(f"\n== {mode}: {edits} sequential edits ({steps}, {z_path}) ==", flush=True)
        for prompt, subject, new, true in tqdm(cases, desc=mode, unit="edit"):
            # easyeditor prints every optimisation step; keep the demo's screen readable.
            with contextlib.redirect_stdout(io.StringIO()):
                editor.edit(prompts=[prompt], target_new=[new], ground_truth=[true], subject=[subject],
                            verbose=False, **sequential_edit_kwargs(editor))
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
