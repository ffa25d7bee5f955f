"""Catalogue of easyeditor's editors (ALG_DICT): what each writes, so whether the plugins can filter it, and why
one cannot run here.

The plugin host filters ΔW = W_after − W_before of the pre-existing weights an editor writes. Editors that add
modules (adapters, codebooks, side memories) or write nothing leave those weights alone: they are passed through
unchanged, with a warning when the hparams carry plugin blocks. The kinds below were read from the code of the
PyPI release 0.0.1.dev0 and of EasyEdit's tree at commit 14cea82; ``TESTED`` are the editors whose edits the
test suite runs through the host on a tiny LLaMA (tests/tree for the tree, tests/test_easyedit.py for the release).
``OWN_EDITORS`` are editors this package implements in easyeditor's form (LEMoE, adapters/lemoe.py); they are
catalogued with easyeditor's and ``enable_easyedit()`` adds them to its ALG_DICT.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Optional

from . import compat

#: The editor's update is a weight write of existing parameters: the plugin chain filters it.
WRITES_WEIGHTS = "writes weights"
#: The editor adds parameters (LoRA adapters, codebooks, side memories): the pre-edit weights are untouched.
ADDS_MODULES = "adds modules"
#: The editor changes no parameter (in-context, retrieval, remote API).
NO_WEIGHTS = "writes no weights"

#: name → (kind, what it does).
KINDS: dict[str, tuple[str, str]] = {
    "ROME": (WRITES_WEIGHTS, "rank-one update of one MLP projection"),
    "R-ROME": (WRITES_WEIGHTS, "ROME with the key-averaging fix (rank-one update)"),
    "MEMIT": (WRITES_WEIGHTS, "least-squares update spread over several MLP projections"),
    "MEMIT-FE": (WRITES_WEIGHTS, "MEMIT variant (FE)"),
    "PMET": (WRITES_WEIGHTS, "MEMIT-style update of the projections in rewrite_module_tmps"),
    "EMMET": (WRITES_WEIGHTS, "equality-constrained batched ROME/MEMIT update"),
    "EAMET": (WRITES_WEIGHTS, "MEMIT-style update with aligned key embeddings"),
    "AlphaEdit": (WRITES_WEIGHTS, "MEMIT solve projected onto the null space of preserved keys"),
    "SPHERE": (WRITES_WEIGHTS, "AlphaEdit-style projected update"),
    "CORE": (WRITES_WEIGHTS, "MEMIT-style update with consistency regularisation"),
    "FT": (WRITES_WEIGHTS, "gradient steps on the chosen layers' weights"),
    "DINM": (WRITES_WEIGHTS, "fine-tunes the toxic layer's weights (detoxification)"),
    "KN": (WRITES_WEIGHTS, "rewrites knowledge-neuron rows of MLP weights"),
    "MEND": (WRITES_WEIGHTS, "a trained hypernetwork's gradient-based weight deltas"),
    "ULTRAEDIT": (WRITES_WEIGHTS, "adds closed-form parameter shifts to linear weights"),
    "SimIE": (WRITES_WEIGHTS, "wraps the update of its base_method (itself an ALG_DICT editor)"),
    "LoRA": (ADDS_MODULES, "trains a peft LoRA adapter"),
    "QLoRA": (ADDS_MODULES, "trains a 4-bit peft LoRA adapter"),
    "DPO": (ADDS_MODULES, "trains a peft LoRA adapter with a DPO loss"),
    "MELO": (ADDS_MODULES, "trains LoRA blocks selected by a vector database"),
    "GRACE": (ADDS_MODULES, "wraps a layer with a key-value codebook"),
    "WISE": (ADDS_MODULES, "adds a side memory to one MLP projection"),
    "DEFER": (ADDS_MODULES, "wraps a layer with a deferral adaptor"),
    "LEMoE": (ADDS_MODULES, "adds one expert per batch to a mixture-of-experts adaptor on one FFN (this package)"),
    "IKE": (NO_WEIGHTS, "in-context demonstrations"),
    "SERAC": (NO_WEIGHTS, "retrieval memory, scope classifier and counterfactual model"),
    "FT-Api": (NO_WEIGHTS, "fine-tuning through the OpenAI API"),
    "DeepEdit-Api": (NO_WEIGHTS, "decoding-time editing through the ZhipuAI API"),
}
#: Editors that cannot run on this machine whatever the install: why.
CANNOT_RUN: dict[str, str] = {
    "MEND": "needs a trained MEND hypernetwork archive (hparams `archive`), downloaded from a hub",
    "SERAC": "needs trained SERAC classifier/counterfactual archives, downloaded from a hub",
    "FT-Api": "calls the OpenAI fine-tuning API (no network here)",
    "DeepEdit-Api": "calls the ZhipuAI API (no network here)",
    "QLoRA": "needs bitsandbytes 4-bit kernels (CUDA)",
}
#: Editors whose edits the test suite runs through the plugin host, with the REVIVE invariant checked (LEMoE, which
#: the host passes through: its routing, frozen experts and checkpoint/resume, tests/test_lemoe.py).
TESTED = {"source tree": ("MEMIT", "ROME", "FT", "AlphaEdit", "EMMET", "R-ROME", "PMET"),
          "release": ("MEMIT", "ROME", "FT", "LEMoE")}
#: Editors this package implements itself (not in easyeditor): name → (module, apply function, hparams class).
#: ``enable_easyedit()`` adds them to ALG_DICT; ``hparams_classes`` always lists them, ``catalogue(own=True)`` too.
OWN_EDITORS: dict[str, tuple[str, str, str]] = {
    "LEMoE": ("revive_plugin.adapters.lemoe", "apply_lemoe_to_model", "LEMoEHyperParams"),
}


def own_editor(alg: str) -> Optional[tuple[Callable[..., Any], type]]:
    """(apply function, hparams class) of an editor of OWN_EDITORS, else None."""
    if alg not in OWN_EDITORS:
        return None
    module, apply, hparams = OWN_EDITORS[alg]
    mod = importlib.import_module(module)
    return getattr(mod, apply), getattr(mod, hparams)


#: Editors that take one request per call (rank-one updates): harnesses feed them a batch request by request.
ONE_REQUEST_PER_CALL = ("ROME", "R-ROME")


def request_groups(alg: str, requests: list) -> list[list]:
    """The calls one edit step of ``requests`` takes: each request alone for ONE_REQUEST_PER_CALL, else all at once."""
    return [[r] for r in requests] if alg in ONE_REQUEST_PER_CALL else [list(requests)]


def passes_through(alg: str) -> bool:
    """True for editors whose edits the plugins cannot see (they write no pre-existing weight)."""
    return KINDS.get(alg, (WRITES_WEIGHTS, ""))[0] != WRITES_WEIGHTS


@dataclass(frozen=True)
class EditorInfo:
    """One ALG_DICT entry as ``revive editors`` reports it."""

    name: str
    kind: str
    does: str
    plugins: str  # what the plugin chain does with its edits
    runs_here: str  # "yes", "tested", or why not
    hparams_class: Optional[str]


def _package(obj: Any) -> Optional[str]:
    """``easyeditor.models.<pkg>`` of an apply function, bound method or class."""
    owner = getattr(obj, "__self__", None)
    module = getattr(obj, "__module__", None) or getattr(type(owner), "__module__", None)
    if owner is not None and not isinstance(owner, type):
        module = type(owner).__module__
    parts = (module or "").split(".")
    return ".".join(parts[:3]) if parts[:2] == ["easyeditor", "models"] and len(parts) >= 3 else None


def hparams_classes() -> dict[str, type]:
    """ALG_DICT name → its hyperparameter class (the one in the same ``easyeditor.models.<pkg>``), and this
    package's own editors (OWN_EDITORS) → theirs."""
    alg_dict = compat.import_easyeditor("easyeditor.util.alg_dict")
    classes = [v for v in vars(alg_dict).values()
               if isinstance(v, type) and "from_hparams" in vars(v) and _package(v) is not None]
    found = {}
    for name, fn in alg_dict.ALG_DICT.items():
        fn = getattr(fn, "__revive_wrapped__", fn)
        pkg = _package(fn)
        matches = [c for c in classes if _package(c) == pkg]
        if len(matches) == 1:
            found[name] = matches[0]
    for name in OWN_EDITORS:
        found.setdefault(name, own_editor(name)[1])
    return found


def _alg_dict_entries(own: bool) -> dict[str, Any]:
    """ALG_DICT's entries; with ``own``, then this package's editors that are not in it (before enable_easyedit)."""
    entries = dict(compat.import_easyeditor("easyeditor.util.alg_dict").ALG_DICT)
    for name in OWN_EDITORS if own else ():
        entries.setdefault(name, own_editor(name)[0])
    return entries


def catalogue(own: bool = False) -> list[EditorInfo]:
    """Every ALG_DICT entry of the easyeditor in use, in its order (this package's editors among them once
    enable_easyedit() has added them); ``own`` adds those not there yet."""
    tested = TESTED.get(compat.easyeditor_origin()["kind"], ())
    classes = hparams_classes()
    rows = []
    for name, fn in _alg_dict_entries(own).items():
        kind, does = KINDS.get(name, (WRITES_WEIGHTS, "not catalogued: treated as writing weights"))
        plugins = {WRITES_WEIGHTS: "filtered", ADDS_MODULES: "passed through (new parameters: nothing to filter)",
                   NO_WEIGHTS: "passed through (nothing to filter)"}[kind]
        missing = compat.is_stand_in(getattr(fn, "__revive_wrapped__", fn))
        if missing:
            runs = f"no: {missing}"
        elif name in CANNOT_RUN:
            runs = f"no: {CANNOT_RUN[name]}"
        else:
            runs = "tested" if name in tested else "not tested here"
        cls = classes.get(name)
        rows.append(EditorInfo(name, kind, does, plugins, runs, f"{cls.__module__}.{cls.__name__}" if cls else None))
    return rows
