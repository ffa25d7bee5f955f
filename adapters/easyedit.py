"""EasyEdit integration: ``enable_easyedit()`` routes every weight an EasyEdit editor writes through the plugins.

After ``enable_easyedit()``, a user's unchanged code

    hparams = MEMITHyperParams.from_hparams("hparams/MEMIT/smollm2-135m.yaml")   # with a `revive:` block
    editor = BaseEditor.from_hparams(hparams)
    editor.edit(prompts=..., target_new=..., subject=..., keep_original_weight=False)  # sequential_edit=True in the tree

applies REVIVE to each edit step. How: each ALG_DICT entry (the editors' apply functions) is wrapped so that
the plugin host snapshots the target weights, runs the editor, takes ΔW = W_after − W_before per parameter,
passes it through the plugin chain and writes W_before + ΔW_filtered. The plugin blocks of the hparams YAML
(``revive:``, ``edit_plugins:``) are popped before EasyEdit's dataclasses see them.

It also makes easyeditor 0.0.1.dev0 work here (see ``compat``): BLIP stand-ins, CUDA→CPU redirect, tuple
views for ``compute_z``, local models (the embedded SmolLM2 by name or any local directory) and MEMIT/ROME
statistics from a local corpus (``stats``) fed through easyeditor's own caches.
"""
from __future__ import annotations

import contextlib
import copy as copy_module
import dataclasses
import difflib
import functools
import hashlib
import inspect
import os
import tempfile
import time
import warnings
import weakref
from typing import Any, Callable, Collection, Iterator, Mapping, Optional

import torch
import yaml

from revive_plugin import yamlio
from revive_plugin.host import (
    PLUGINS_ENV,
    PluginHost,
    StepRecord,
    TargetWeight,
    get_plugin_manager,
    hook_impls,
    installed_plugins,
    pinned_plugins,
    validate_configs,
)

from . import compat
from .editors import OWN_EDITORS, hparams_classes, own_editor, passes_through
from .keys import request_keys
from .layers import choose_layers, with_candidates
from .models import load_model

#: Attribute of an EasyEdit hparams object holding the popped plugin blocks.
PLUGIN_CONFIGS_ATTR = "plugin_configs"
#: YAML block holding host settings: ``edit_plugins: {order: [rect, revive]}``.
HOST_BLOCK = "edit_plugins"
#: YAML block switching MEMIT's z optimisation to the batched path: ``batched_z: true`` or ``{chunk: 16}``.
BATCHED_Z_BLOCK = "batched_z"
#: Editors whose ``compute_z`` is MEMIT's (EasyEdit's tree at 14cea82: alphaedit/compute_z.py differs from
#: memit/compute_z.py only in names), and ROME, whose ``compute_v`` optimises the same objective with δ on the
#: MLP's output: the ``batched_z:`` block applies to them.
BATCHED_Z_EDITORS = ("MEMIT", "AlphaEdit", "ROME")
#: Editors whose key lookups assume right padding: the tree's BaseEditor list, plus PMET (its lookups index right-padded
#: batches too; left-padded, they read padding: NaN updates on the tiny LLaMA).
RIGHT_PADDED = ("ROME", "MEMIT", "EMMET", "EAMET", "R-ROME", "AlphaEdit", "CORE", "SPHERE", "PMET")
#: Model names easyeditor's own loader handles (seq2seq, API and remote-code models).
EASYEDIT_LOADED = ("t5", "gpt-3.5", "chatglm", "internlm", "baichuan")


class _Integration:
    """What enable_easyedit patched, so disable_easyedit can put it back exactly."""

    def __init__(self) -> None:
        self.enabled = False
        self.device: Optional[torch.device] = None
        self.pm = None
        self.pm_given = False  # enable_easyedit(pm=...) rather than the discovered plugins
        self.order: Optional[list[str]] = None
        self.restores: list[Callable[[], None]] = []
        self.hosts: "weakref.WeakKeyDictionary[torch.nn.Module, PluginHost]" = weakref.WeakKeyDictionary()
        self.stats_filled: dict[tuple, tuple] = {}
        self.primed: set[str] = set()  # easyeditor modules whose context templates we sampled
        self.projectors: set[tuple] = set()  # (module, model, layers, threshold) whose P / cache_c we set
        self.primed_projectors: set[str] = set()  # modules whose P / cache_c are ours
        self.pending_keys: dict[str, torch.Tensor] = {}  # cache_c from a checkpoint, set when P is
        # revive.in_solve: per statistics key, (statistics, Vₖ, inverse, constrained) of the last step; with a
        # fixed basis (W₀'s) the next step reuses it instead of another ‖C‖₂ and solve
        self.constrained: dict[tuple, tuple] = {}


_STATE = _Integration()


def _resolve(path: str) -> Any:
    module, _, attr = path.partition(":")
    return getattr(compat.import_easyeditor(module), attr)


def _patch(obj: Any, name: str, value: Any) -> None:
    had = name in vars(obj)
    old = vars(obj).get(name)
    setattr(obj, name, value)
    _STATE.restores.append(lambda: setattr(obj, name, old) if had else delattr(obj, name))


# -- hparams: pop plugin blocks -----------------------------------------------------------------------
#: Blocks of the host and the adapter (not plugins): the transform order and MEMIT's batched z path.
HOST_BLOCKS = (HOST_BLOCK, BATCHED_Z_BLOCK)


def _plugin_manager() -> Any:
    return _STATE.pm or get_plugin_manager()


def _loaded(pm: Any) -> list[str]:
    return sorted(name for name, plugin in pm.list_name_plugin() if plugin is not None)


def plugin_block_names() -> set[str]:
    """Top-level YAML keys that are popped before EasyEdit sees the file: the blocks of every installed or
    loaded plugin and the host's own blocks."""
    return set(_loaded(_plugin_manager())) | set(installed_plugins()) | set(HOST_BLOCKS)


def rewrite_templates(settings: Any) -> list[str]:
    """The module templates an editor writes: ``rewrite_module_tmps`` (PMET) or ``rewrite_module_tmp``."""
    get = settings.get if isinstance(settings, Mapping) else lambda k: getattr(settings, k, None)
    many, one = get("rewrite_module_tmps"), get("rewrite_module_tmp")
    if isinstance(many, (list, tuple)) and many and all(isinstance(t, str) and t for t in many):
        return list(many)
    return [one] if isinstance(one, str) and one else []


def written_matrices(settings: Mapping[str, Any], blocks: Optional[Mapping[str, Any]] = None) -> Optional[list[str]]:
    """Names of the weights an editor with these hparams writes (rewrite templates × ``layers``, as
    ``target_weights`` selects them; with plugin ``blocks``, also the layers their plugins may choose), or None
    when the hparams do not say."""
    templates, layers = rewrite_templates(settings), settings.get("layers")
    if blocks:
        layers = with_candidates(_plugin_manager(), blocks, settings.get("alg_name"), layers)
    if not templates or not isinstance(layers, (list, tuple)) or not layers:
        return None
    try:
        return [f"{t.format(layer)}.weight" for t in templates for layer in layers]
    except (IndexError, KeyError, ValueError):
        return None


def _inactive_reason(pm: Any) -> str:
    pinned = pinned_plugins()
    if pm is _STATE.pm and _STATE.pm_given:
        return "not registered in the plugin manager passed to enable_easyedit(pm=...)"
    if pinned is not None:
        return f"excluded by {PLUGINS_ENV}={','.join(pinned)!r}; add them there (or unset it) to use them"
    return "not loaded"


def _check_order(
    host: Any, pm: Any, loaded: Collection[str], installed: Collection[str], source: str
) -> Optional[dict]:
    """Validated ``edit_plugins:`` block; names of installed plugins that are not loaded are dropped (they
    were warned about with their blocks)."""
    if host is None:
        return None
    if not isinstance(host, Mapping) or set(host) - {"order"}:
        raise ValueError(f"{source}: {HOST_BLOCK} accepts only `order: [plugin, ...]`, got {host!r}")
    order = host.get("order", [])
    if not isinstance(order, list) or not all(isinstance(x, str) for x in order):
        raise ValueError(f"{source}: {HOST_BLOCK}.order must be a list of plugin names, got {order!r}")
    transforms = [i.plugin_name for i in hook_impls(pm, "easyedit_transform_delta")]
    unknown = [n for n in order if n not in installed and n not in loaded]
    not_transforms = [n for n in order if n in loaded and n not in transforms]
    if unknown or not_transforms:
        raise ValueError(
            f"{source}: {HOST_BLOCK}.order names {unknown + not_transforms}, which "
            f"{'are not installed' if unknown else 'implement no easyedit_transform_delta'}; plugins with a "
            f"transform: {sorted(transforms)}; installed plugins: {sorted(installed)}"
        )
    return {**host, "order": [n for n in order if n in loaded]}


def split_plugin_blocks(
    config: Mapping[str, Any],
    source: str = "<hparams>",
    fields: Optional[Collection[str]] = None,
    editor: Optional[str] = None,
    targets: Optional[list[str]] = None,
) -> tuple[dict, dict]:
    """(EasyEdit settings, plugin blocks) of an hparams mapping, the blocks validated.

    * blocks of loaded plugins are checked by each plugin's ``easyedit_validate_config`` (with ``editor``
      and ``targets``, by default ``alg_name`` and ``written_matrices`` of ``config``);
    * blocks of installed plugins that are not loaded (``$EASYEDIT_PLUGINS``) are removed with a warning
      that they have no effect;
    * with ``fields`` (the settings the hparams class accepts), any other key is an error naming it, the
      settings and the plugins.
    """
    pm = _plugin_manager()
    loaded, installed = _loaded(pm), installed_plugins()
    editor = editor if editor is not None else config.get("alg_name")
    if targets is None:
        try:
            targets = written_matrices(config, {k: v for k, v in config.items() if k in loaded})
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from e
    rest = {k: v for k, v in config.items() if k not in loaded and k not in installed and k not in HOST_BLOCKS}
    blocks = {k: v for k, v in config.items() if k in loaded or k in HOST_BLOCKS}
    inactive = sorted(k for k in config if k in installed and k not in loaded and k not in HOST_BLOCKS)
    if fields is not None:
        unknown = sorted(k for k in rest if k not in fields)
        if unknown:
            hints = {k: difflib.get_close_matches(k, [*fields, *installed], n=1) for k in unknown}
            hint = "; ".join(f"{k!r}: did you mean {m[0]!r}?" for k, m in hints.items() if m)
            what = f"neither settings of {editor or 'the editor'}'s hparams nor" if fields else "not"
            raise ValueError(
                f"{source}: unknown top-level key(s) {unknown}: {what} blocks of a discovered plugin (discovered "
                f"plugins: {sorted(installed)}; loaded: {loaded}). {hint + '. ' if hint else ''}Fix the key, "
                "install the plugin, or remove the block"
            )
    if inactive:
        warnings.warn(
            f"{source}: the block(s) {inactive} have no effect: their plugin(s) are installed but "
            f"{_inactive_reason(pm)}",
            UserWarning,
            stacklevel=3,
        )
    if HOST_BLOCK in blocks:
        blocks[HOST_BLOCK] = _check_order(blocks[HOST_BLOCK], pm, loaded, installed, source)
    if BATCHED_Z_BLOCK in blocks:
        blocks[BATCHED_Z_BLOCK] = batched_z_options(blocks[BATCHED_Z_BLOCK], source)
        if blocks[BATCHED_Z_BLOCK] and editor is not None and editor not in BATCHED_Z_EDITORS:
            raise ValueError(f"{source}: {BATCHED_Z_BLOCK} applies to {list(BATCHED_Z_EDITORS)} (MEMIT's compute_z, "
                             f"ROME's compute_v), not to {editor}; remove the block")
        if blocks[BATCHED_Z_BLOCK] and editor == "ROME" and compat.source_tree() is not None:
            raise ValueError(f"{source}: {BATCHED_Z_BLOCK} for ROME reproduces the PyPI release's compute_v, and "
                             "EasyEdit's tree changed it (target tokens, device placement); remove the block "
                             "to run the tree's own compute_v")
    try:
        blocks = validate_configs(pm, blocks, editor=editor, targets=targets)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from e
    return rest, blocks


def batched_z_options(value: Any, source: str = "<hparams>") -> Optional[dict]:
    """Validated ``batched_z:`` block: None (off) or ``{"chunk": int, "early_exit": bool}``."""
    if value is None or value is False:
        return None
    if value is True:
        value = {}
    if isinstance(value, Mapping) and set(value) <= {"chunk", "early_exit"}:
        chunk, early_exit = value.get("chunk", 16), value.get("early_exit", True)
        if isinstance(chunk, int) and not isinstance(chunk, bool) and chunk >= 1 and isinstance(early_exit, bool):
            return {"chunk": chunk, "early_exit": early_exit}
    raise ValueError(f"{source}: {BATCHED_Z_BLOCK} must be true, false or {{chunk: N, early_exit: true|false}} with "
                     f"N ≥ 1 requests per forward pass, got {value!r}")


def attach_plugin_configs(hparams: Any, **blocks: Any) -> Any:
    """Attach plugin blocks to an hparams object built in Python (e.g. ``revive={"tau": 0.2}``), validated
    as if they were in its YAML file."""
    current = dict(getattr(hparams, PLUGIN_CONFIGS_ATTR, {}) or {})
    settings = {"rewrite_module_tmp": getattr(hparams, "rewrite_module_tmp", None),
                "rewrite_module_tmps": getattr(hparams, "rewrite_module_tmps", None),
                "layers": getattr(hparams, "layers", None), "alg_name": getattr(hparams, "alg_name", None)}
    try:
        targets = written_matrices(settings, {**current, **blocks})
    except ValueError as e:
        raise ValueError(f"{type(hparams).__name__}: {e}") from e
    _, checked = split_plugin_blocks(blocks, source=type(hparams).__name__, fields=(),
                                     editor=getattr(hparams, "alg_name", None), targets=targets)
    current.update(checked)
    setattr(hparams, PLUGIN_CONFIGS_ATTR, current)
    return hparams


def hparams_fields(cls: type) -> Optional[set[str]]:
    """The settings an EasyEdit hparams class accepts (its dataclass fields), or None if it is no dataclass."""
    return {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else None


def _wrap_from_hparams(cls: type) -> None:
    original = cls.__dict__["from_hparams"].__func__

    def from_hparams(klass: type, hparams_name_or_path: str) -> Any:
        path = hparams_name_or_path if ".yaml" in hparams_name_or_path else hparams_name_or_path + ".yaml"
        with open(path, encoding="utf-8") as fh:
            config = yamlio.load(fh)
        if not isinstance(config, dict):
            return original(klass, hparams_name_or_path)
        rest, blocks = split_plugin_blocks(config, source=path, fields=hparams_fields(klass))
        if len(rest) == len(config):
            return original(klass, hparams_name_or_path)
        fd, tmp = tempfile.mkstemp(suffix=".yaml")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                yaml.safe_dump(rest, fh)
            hparams = original(klass, tmp)
        finally:
            os.unlink(tmp)
        if blocks:
            setattr(hparams, PLUGIN_CONFIGS_ATTR, blocks)
        return hparams

    _patch(cls, "from_hparams", classmethod(from_hparams))


# -- editors: the snapshot-diff step -------------------------------------------------------------------
def step_layers(hparams: Any) -> Any:
    """The layers an edit step with ``hparams`` may write: ``hparams.layers`` and every layer a plugin whose block
    is present may choose for it (``easyedit_layer_candidates``; see ``adapters/layers.py``)."""
    configs = getattr(hparams, PLUGIN_CONFIGS_ATTR, None) or {}
    layers = getattr(hparams, "layers", None)
    return with_candidates(_plugin_manager(), configs, getattr(hparams, "alg_name", None), layers) if configs else layers


def target_weights(model: torch.nn.Module, hparams: Any) -> list[TargetWeight]:
    """The live parameters an editor may write: those under its rewrite templates for ``step_layers(hparams)``
    (its ``layers`` and the candidate layers of layer-choosing plugins), else every parameter. GPT-2 ``Conv1D``
    weights are marked transposed (stored in×out)."""
    templates = rewrite_templates(hparams)
    layers = step_layers(hparams)
    owners = {}
    for mod_name, module in model.named_modules():
        for p_name, _ in module.named_parameters(recurse=False):
            owners[f"{mod_name}.{p_name}" if mod_name else p_name] = module
    selected = []
    for name, param in model.named_parameters():
        if templates and layers:
            if not any(f"{t.format(layer)}." in name for t in templates for layer in layers):
                continue
        module = owners.get(name)
        transposed = type(module).__name__ == "Conv1D" and name.endswith(".weight")
        selected.append(TargetWeight(name=name, tensor=param, transposed=transposed))
    return selected


def host_for(model: torch.nn.Module) -> PluginHost:
    """The plugin host (and so the plugins' state, e.g. REVIVE's W₀ bases) of one model."""
    host = _STATE.hosts.get(model)
    if host is None:
        host = PluginHost(_STATE.pm or get_plugin_manager(), order=_STATE.order)
        _STATE.hosts[model] = host
    return host


def step_records(model: torch.nn.Module) -> list[StepRecord]:
    """Records of the edit steps run on ``model`` (changed/filtered parameters, plugin metrics)."""
    host = _STATE.hosts.get(model)
    return list(host.history) if host is not None else []


def editor_module(apply_fn: Callable[..., Any]) -> Any:
    """The easyeditor module an apply function (or a bound ``apply_to_model``) lives in."""
    fn = getattr(apply_fn, "__revive_wrapped__", apply_fn)
    owner = getattr(fn, "__self__", None)
    name = type(owner).__module__ if owner is not None and not isinstance(owner, type) else fn.__module__
    return compat.import_easyeditor(name)


def _prime_context_templates(main: Any, model: Any, tok: Any, hparams: Any, seed: int = 0) -> None:
    """MEMIT-style editors sample their context templates once per process: sample them under a fixed seed."""
    sample = getattr(main, "get_context_templates", None)
    if not hasattr(main, "CONTEXT_TEMPLATES_CACHE") or main.CONTEXT_TEMPLATES_CACHE is not None or sample is None:
        return
    params = list(inspect.signature(sample).parameters)
    if params[:2] != ["model", "tok"] or params[2:] not in ([], ["length_params"]):
        return  # e.g. CORE's per-request templates: nothing cached per process
    _STATE.primed.add(main.__name__)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if params[2:]:
            sample(model, tok, hparams.context_template_length_params)
        else:
            sample(model, tok)


def _statistics_cache(main: Any) -> Optional[tuple[Any, str, bool]]:
    """(module, attribute, holds inverses) of the dict an editor reads its covariance statistics from:
    ``COV_CACHE`` of MEMIT-style editors (keyed (model, layer), covariances) or ``compute_u.inv_mom2_cache``
    of ROME-style ones (inverses). The editors look the dict up by its module-level name at every read."""
    if isinstance(getattr(main, "COV_CACHE", None), dict):
        return main, "COV_CACHE", False
    package = main.__name__.rpartition(".")[0]
    try:
        compute_u = compat.import_easyeditor(f"{package}.compute_u")
    except ImportError:
        return None
    cache = getattr(compute_u, "inv_mom2_cache", None)
    return (compute_u, "inv_mom2_cache", True) if isinstance(cache, dict) else None


def _feed_statistics(main: Any, model: Any, tok: Any, hparams: Any) -> bool:
    """Fill an editor's covariance cache from a local corpus (``mom2_dataset`` names one); True if it was fed."""
    from .stats import is_local_corpus, load_corpus, second_moments, statistics_model_id

    dataset = getattr(hparams, "mom2_dataset", None)
    target = _statistics_cache(main)
    if target is None or not dataset or not is_local_corpus(str(dataset)):
        return False
    owner, attr, inverse = target
    cache = getattr(owner, attr)
    if inverse and not getattr(hparams, "mom2_adjustment", False):
        return False
    model_name = statistics_model_id(model)
    names = [t.format(layer) for t in rewrite_templates(hparams) for layer in hparams.layers]
    spec = (str(dataset), int(hparams.mom2_n_samples), str(hparams.mom2_dtype))
    if all(_STATE.stats_filled.get((main.__name__, model_name, n)) == spec for n in names):
        return True
    corpus = load_corpus(str(dataset))
    moments = second_moments(model, tok, names, corpus, n_samples=int(hparams.mom2_n_samples),
                             dtype=str(hparams.mom2_dtype), model_id=model_name)
    device = next(model.parameters()).device
    for n in names:
        cache[(model_name, n)] = (torch.inverse(moments[n].to(device)).float() if inverse
                                  else moments[n].float().cpu())
        _STATE.stats_filled[(main.__name__, model_name, n)] = spec
    return True


def _prepare_null_space(main: Any, model: Any, tok: Any, hparams: Any) -> Optional[str]:
    """AlphaEdit-style editors: their null-space projector P from the fed statistics, through their own
    ``get_project``, and their accumulated-keys matrix ``cache_c`` started at zero (once per model until
    disable_easyedit()). Returns a file holding P (safetensors) for ``P_loc``: the editor then neither
    recomputes P on every call (it does while P_loc is missing, sizing it from the model's name and saving a
    pickle in the working directory) nor unpickles a file; None for other editors."""
    if not all(hasattr(main, a) for a in ("get_project", "P_loaded", "cache_c_new")):
        return None
    from .models import cache_dir, save_cache_file

    key = (main.__name__, model.config._name_or_path, tuple(hparams.layers), float(hparams.nullspace_threshold),
           str(hparams.mom2_dataset), int(hparams.mom2_n_samples))
    path = cache_dir() / "null-space" / f"{hashlib.sha256(repr(key).encode()).hexdigest()[:16]}.safetensors"
    if key not in _STATE.projectors or not (main.P_loaded and main.cache_c_new) or not path.exists():
        projectors = torch.stack([main.get_project(model, tok, layer, hparams).cpu() for layer in hparams.layers])
        save_cache_file({"P": projectors.contiguous()}, path)
        main.P, main.P_loaded = projectors, True
        restored = _STATE.pending_keys.pop(main.__name__, None)
        if restored is not None and restored.shape != projectors.shape:
            raise ValueError(f"{main.__name__}: the checkpoint's accumulated keys (cache_c) have shape "
                             f"{tuple(restored.shape)}, this model and hparams need {tuple(projectors.shape)}")
        main.cache_c = restored.clone() if restored is not None else torch.zeros_like(projectors)
        main.cache_c_new = True
        _STATE.projectors.add(key)
        _STATE.primed_projectors.add(main.__name__)
    return str(path)


def editor_module_of(alg: str) -> Any:
    """The easyeditor module of the editor ``alg`` (its ALG_DICT apply function's module)."""
    return editor_module(compat.import_easyeditor("easyeditor.util.alg_dict").ALG_DICT[alg])


def editor_state(alg: str, model: Optional[torch.nn.Module] = None) -> dict[str, torch.Tensor]:
    """What an editor itself carries from one edit to the next, for checkpoints: the accumulated keys
    ``cache_c`` (K_p K_pᵀ) of AlphaEdit-style editors once they have started; LEMoE's experts and anchors
    in ``model`` (``lemoe.*``, adapters/lemoe.py); empty for the others."""
    if alg == "LEMoE":
        from .lemoe import lemoe_state

        return lemoe_state(model) if model is not None else {}
    main = editor_module_of(alg)
    if main.__name__ in _STATE.primed_projectors and getattr(main, "cache_c_new", False):
        return {"cache_c": main.cache_c.detach().cpu().clone()}
    return {}


def restore_editor_state(alg: str, state: Mapping[str, torch.Tensor], model: Optional[torch.nn.Module] = None,
                         hparams: Any = None) -> None:
    """Give an editor back what ``editor_state`` saved. AlphaEdit's ``cache_c`` takes effect at its next edit
    (it is set when its projector is, and its shape is checked then); LEMoE's experts go into ``model`` at once,
    on the FFN ``hparams`` names, so a model evaluated before the next edit runs with them. An empty state puts
    the editor back at its unedited start: no accumulated keys, no LEMoE adaptor."""
    if alg == "LEMoE":
        from .lemoe import restore_lemoe_state

        if model is None or hparams is None:
            if state:
                raise ValueError("LEMoE's experts are restored into a model: pass model= and hparams=")
            return
        restore_lemoe_state(model, hparams, state)
        return
    unknown = set(state) - {"cache_c"}
    if unknown:
        raise ValueError(f"{alg}: unknown editor state {sorted(unknown)} (known: cache_c)")
    main = editor_module_of(alg)
    if not state:  # what editor_state returns before the first edit
        _STATE.pending_keys.pop(main.__name__, None)
        if main.__name__ in _STATE.primed_projectors and getattr(main, "cache_c_new", False):
            main.cache_c = torch.zeros_like(main.cache_c)
        return
    if "cache_c" in state:
        if not hasattr(main, "cache_c_new"):
            raise ValueError(f"{alg} keeps no accumulated keys (cache_c): this checkpoint is of another editor")
        _STATE.pending_keys[main.__name__] = state["cache_c"]
        _STATE.projectors = {k for k in _STATE.projectors if k[0] != main.__name__}  # P is set again, with it


def _revive_variants(alg: str, main: Any, configs: Mapping[str, Any], fed: bool) -> tuple[bool, bool]:
    """(in_loop, in_solve): where this step runs REVIVE besides after the editor; each is refused, before
    anything is computed, for an editor it cannot enter."""
    from revive_plugin.config import ReviveConfig

    block = configs.get("revive")
    config = ReviveConfig.from_dict(block) if block is not None else None
    if config is None or not config.enabled:
        return False, False
    if config.in_loop and not callable(getattr(main, "compute_ks", None)):
        raise ValueError(f"revive.in_loop: {alg} has no MEMIT-style layer loop (no compute_ks in {main.__name__}); "
                         "set in_loop: false (REVIVE then filters the step's ΔW after the editor)")
    if config.in_solve:
        if _statistics_cache(main) is None or hasattr(main, "get_project"):
            raise ValueError(f"revive.in_solve: {alg}'s solve is not regularised by covariance statistics "
                             "(MEMIT, PMET, EMMET, ROME … are), so REVIVE's projector cannot enter it; set "
                             "in_solve: false (REVIVE then filters the step's ΔW after the editor)")
        if not fed:
            raise ValueError("revive.in_solve needs the covariance statistics this package computes from a local "
                             f"corpus, and {alg}'s hparams do not ask for them: set mom2_adjustment: true and "
                             "mom2_dataset: me-ppl (or a text/JSON corpus path), or set in_solve: false")
    return config.in_loop, config.in_solve


#: Penalty on the protected input directions, relative to ‖C‖₂, in the covariance a solve reads (revive.in_solve).
IN_SOLVE_PENALTY = 1e6


def constrained_statistics(stats: torch.Tensor, v: torch.Tensor, inverse: bool) -> torch.Tensor:
    """The covariance statistics of a layer with REVIVE's input-side constraint ΔW·Vₖ = 0 built in.

    ``stats`` is C (d×d) or, for ROME-style editors (``inverse``), C⁻¹; ``v`` (d×k) spans the protected input
    directions. An inverse becomes the exact limit of (C + μVVᵀ)⁻¹ for μ → ∞ (Woodbury):
    C⁻¹ − C⁻¹V (VᵀC⁻¹V)⁻¹ VᵀC⁻¹, whose range is orthogonal to V, so ROME's key vector C⁻¹k and its rank-one
    update avoid Vₖ while still writing the edited key exactly. A covariance becomes C + μVVᵀ with
    μ = IN_SOLVE_PENALTY·‖C‖₂ in float64 (MEMIT-style solves read it as ``cov.double()``): the penalty method
    for min ‖ΔK − R‖² + λ tr(ΔCΔᵀ) subject to ΔV = 0, whose solution R Kᵀ P (P(λC + KKᵀ)P)⁺ P (P = I − VVᵀ) it
    approaches as μ grows; what it leaves in Vₖ is removed exactly by the filter after the editor.
    """
    c = stats.double()
    v = v.to(device=c.device, dtype=torch.float64)
    if inverse:
        cv = c @ v
        out = c - cv @ torch.linalg.solve(v.T @ cv, cv.T)
        return ((out + out.T) / 2).to(stats.dtype)
    mu = IN_SOLVE_PENALTY * float(torch.linalg.matrix_norm(c, ord=2))
    return c + mu * (v @ v.T)


class _ReadLog(dict):
    """A statistics cache that records which entries an editor read."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.read: set = set()

    def __getitem__(self, key: Any) -> Any:
        self.read.add(key)
        return super().__getitem__(key)


@contextlib.contextmanager
def _revive_in_solve(alg: str, main: Any, model: Any, host: PluginHost,
                     targets: list[TargetWeight]) -> Iterator[None]:
    """REVIVE's key-side projector inside the editor's solve (``revive: {in_solve: true}``).

    For the step, the statistics cache the editor reads holds, for every weight REVIVE filters, the
    ``constrained_statistics`` of that layer with the Vₖ REVIVE filters it with (W₀'s, or the current
    weight's with ``basis: current``); the fed statistics are back in place afterwards. A filtered layer whose
    statistics the editor did not read is an error (the step is then rolled back): the constraint would
    silently not have been applied.
    """
    from revive_plugin.host import layer_index
    from revive_plugin.plugins.revive import NAME

    from .stats import statistics_model_id

    owner, attr, inverse = _statistics_cache(main)  # type: ignore[misc]  # checked by _revive_variants
    original = getattr(owner, attr)
    filt = host.state.get(NAME)
    model_name = statistics_model_id(model)
    constrained = _ReadLog(original)
    watched = {}
    for t in targets:
        weight = t.view()
        if filt is None or weight.ndim != 2 or not filt.selects(t.name, layer_index(t.name)):
            continue
        key = (model_name, t.name.rpartition(".")[0])
        if key in original:
            stats, v = original[key], filt.basis_for(t.name, weight).v
            last = _STATE.constrained.get(key)
            if last is None or last[0] is not stats or last[1] is not v or last[2] != inverse:
                last = _STATE.constrained[key] = (stats, v, inverse, constrained_statistics(stats, v, inverse))
            constrained[key] = last[3]
            watched[key] = t.name
    with compat.temporarily(owner, attr, constrained):
        yield
    unread = sorted(name for key, name in watched.items() if key not in constrained.read)
    if unread:
        raise ValueError(f"revive.in_solve: {alg} did not read the covariance statistics of {unread} in this "
                         "step, so REVIVE's projector did not enter its solve there; set in_solve: false")


@contextlib.contextmanager
def _revive_in_loop(alg: str, main: Any, host: PluginHost, targets: list[TargetWeight]) -> Iterator[None]:
    """REVIVE inside a MEMIT-style editor's layer loop (``revive: {in_loop: true}``).

    Such an editor writes layer after layer within one step, computing each layer's keys (``compute_ks``, once
    per layer) on the model with the earlier layers' updates in place. Before each ``compute_ks`` call, every
    target weight's update so far in this step is replaced by its REVIVE-filtered version, so each layer is
    solved against what REVIVE will keep of the earlier ones. The editor's returned deltas are then filtered
    after the step as usual (the projection is idempotent: the earlier layers' final deltas are the same).
    """
    from revive_plugin.host import layer_index
    from revive_plugin.plugins.revive import NAME

    start = {t.name: t.view().detach().clone() for t in targets if t.view().ndim == 2}
    original = main.compute_ks

    def compute_ks(*args: Any, **kwargs: Any) -> Any:
        filt = host.state.get(NAME)
        with torch.no_grad():
            for t in targets:
                if t.name not in start or filt is None:
                    continue
                w0 = start[t.name]
                delta = t.view() - w0
                if torch.any(delta):
                    t.view().copy_(w0 + filt.filter(t.name, delta, w0, layer=layer_index(t.name)))
        return original(*args, **kwargs)

    with compat.temporarily(main, "compute_ks", compute_ks):
        yield


def _wrap_apply(alg: str, apply_fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(apply_fn)
    def apply(model: Any, tok: Any, requests: Any, hparams: Any, *args: Any, **kwargs: Any) -> Any:
        configs = dict(getattr(hparams, PLUGIN_CONFIGS_ATTR, {}) or {})
        with compat.cuda_redirect(_STATE.device):
            if passes_through(alg):
                if configs:
                    warnings.warn(
                        f"{alg} does not write model weights, so the plugin blocks {sorted(configs)} have no "
                        "effect on it; use a weight-editing method (ROME, MEMIT, FT, …) to apply REVIVE",
                        stacklevel=2,
                    )
                # no step to filter, but its run is editor time all the same (a run's edit_seconds)
                started = time.perf_counter()
                try:
                    return apply_fn(model, tok, requests, hparams, *args, **kwargs)
                finally:
                    host_for(model).seconds["edit"] += time.perf_counter() - started
            # Plugin blocks checked against the weights this editor writes, before anything is computed.
            matrices = [t.name for t in target_weights(model, hparams) if t.tensor.ndim == 2]
            configs = host_for(model).validate(alg, configs, matrices)
            if kwargs.get("copy"):
                # Edit a copy ourselves so the diff is taken on the model that is returned.
                model = copy_module.deepcopy(model)
                kwargs["copy"] = False
            main = editor_module(apply_fn)
            _prime_context_templates(main, model, tok, hparams)
            # statistics of every layer the step may write
            with compat.temporarily(hparams, "layers", step_layers(hparams)):
                fed = _feed_statistics(main, model, tok, hparams)
            projector = _prepare_null_space(main, model, tok, hparams) if fed else None
            host = host_for(model)
            order = (configs.get(HOST_BLOCK) or {}).get("order")
            # context.keys: computed only if a plugin asks (prompts and subjects read now, before the editor runs).
            keys = request_keys(model, tok, requests) if _has_prompts(requests) else None

            targets = target_weights(model, hparams)
            in_loop, in_solve = _revive_variants(alg, main, configs, fed)

            def run() -> Any:
                with contextlib.ExitStack() as stack:
                    stack.enter_context(_batched_z(alg, main, requests, configs.get(BATCHED_Z_BLOCK)))
                    if in_loop:
                        stack.enter_context(_revive_in_loop(alg, main, host, targets))
                    if in_solve:
                        stack.enter_context(_revive_in_solve(alg, main, model, host, targets))
                    return apply_fn(model, tok, requests, hparams, *args, **kwargs)

            def bare(reqs: Any) -> Any:  # the editor alone, for easyedit_select_layers' trials
                with _batched_z(alg, main, reqs, configs.get(BATCHED_Z_BLOCK)):
                    return apply_fn(model, tok, reqs, hparams, *args, **kwargs)

            keys_before = main.cache_c.clone() if projector else None
            try:
                with compat.temporarily(hparams, "P_loc", projector):
                    chosen = choose_layers(host, _plugin_manager(), alg, hparams, configs, targets, requests, keys,
                                           bare, main=main, projector=projector)
                    with compat.temporarily(hparams, "layers", chosen):  # this step only, restored also on failure
                        result, _ = host.run_step(alg, targets, run, configs=configs, order=order, keys=keys)
            except BaseException:
                if keys_before is not None:  # a rolled-back step leaves AlphaEdit's accumulated keys as they were
                    main.cache_c = keys_before
                raise
            return result

    apply.__revive_wrapped__ = apply_fn  # type: ignore[attr-defined]
    return apply


def _has_prompts(requests: Any) -> bool:
    """Whether ``requests`` is a list of requests with a text prompt each (what ``context.keys`` is computed from)."""
    return isinstance(requests, (list, tuple)) and bool(requests) and all(
        isinstance(r, Mapping) and isinstance(r.get("prompt"), str) for r in requests)


def memit_request(request: Mapping[str, Any]) -> dict:
    """A request as easyeditor's ``execute_memit`` normalises it (space before the target, ``{}`` for the subject)."""
    r = dict(request)
    if r["target_new"][0] != " ":
        r["target_new"] = " " + r["target_new"]
    if "{}" not in r["prompt"]:
        r["prompt"] = r["prompt"].replace(r["subject"], "{}")
    return r


def _z_key(request: Mapping[str, Any]) -> tuple[str, str, str]:
    return request["prompt"], request["subject"], request["target_new"]


def _batched_z(alg: str, main: Any, requests: Any, options: Optional[dict]) -> contextlib.AbstractContextManager:
    """The ``batched_z:`` block's context for one step of ``alg``: ROME's compute_v or MEMIT's compute_z on the
    batched path, or nothing when the block is off."""
    if not options:
        return contextlib.nullcontext()
    if alg == "ROME":
        return batched_compute_v(**options, main=main)
    return batched_compute_z(requests, **options, main=main)


@contextlib.contextmanager
def batched_compute_z(requests: Any, chunk: int = 16, early_exit: bool = True, main: Any = None) -> Iterator[None]:
    """Within the block, MEMIT's ``compute_z`` (or that of ``main``, the module of an editor in
    BATCHED_Z_EDITORS) returns v* optimised for all ``requests`` at once.

    The vectors are computed on the first ``compute_z`` call (context templates, layer and model as easyeditor
    passes them); a request not among them falls back to easyeditor's own ``compute_z``. With ``early_exit``
    MEMIT's key and representation passes (``repr_tools``) stop after the layer they read, through
    easyeditor's own ``Trace(stop=True)``: the same numbers without running the layers above.
    """
    from .batched_z import compute_zs

    main = main or compat.import_easyeditor("easyeditor.models.memit.memit_main")
    original = main.compute_z
    normalised = [memit_request(r) for r in requests]
    computed: dict[tuple[str, str, str], torch.Tensor] = {}

    def compute_z(model: Any, tok: Any, request: Any, hparams: Any, layer: int, templates: Any) -> torch.Tensor:
        if not computed:
            zs = compute_zs(model, tok, normalised, hparams, layer, templates, chunk=chunk)
            computed.update({_z_key(r): z for r, z in zip(normalised, zs)})
        z = computed.get(_z_key(request))
        return original(model, tok, request, hparams, layer, templates) if z is None else z

    repr_tools = compat.import_easyeditor("easyeditor.models.rome.repr_tools")
    stopping = compat.stopping_nethook(repr_tools.nethook) if early_exit else None
    with compat.temporarily(main, "compute_z", compute_z), compat.temporarily(repr_tools, "nethook", stopping):
        yield


@contextlib.contextmanager
def batched_compute_v(chunk: int = 16, early_exit: bool = True, main: Any = None) -> Iterator[None]:
    """Within the block, ROME's ``compute_v`` optimises its target on the batched z path (``compute_zs`` with δ
    on the MLP's output, as ``compute_v`` adds it) and then solves for the right vector exactly as easyeditor
    does. The same objective, optimiser, stopping rule and clamp; the savings are the batched path's: prompt
    prefixes and the layers below the edited one run once, logits only at the target tokens. (ROME edits one
    request per call, so ``chunk`` and ``early_exit`` change nothing here.)
    """
    from .batched_z import compute_zs

    main = main or compat.import_easyeditor("easyeditor.models.rome.rome_main")
    v_module = compat.import_easyeditor(main.__name__.rpartition(".")[0] + ".compute_v")  # its package's compute_v.py

    def compute_v(model: Any, tok: Any, request: Any, hparams: Any, layer: int, left_vector: torch.Tensor,
                  context_templates: Any) -> torch.Tensor:
        target = compute_zs(model, tok, [request], hparams, layer, [context_templates], progress=False,
                            delta_module=hparams.mlp_module_tmp)[0]
        cur_input, cur_output = v_module.get_module_input_output_at_word(
            model, tok, layer, context_template=request["prompt"], word=request["subject"],
            module_template=hparams.rewrite_module_tmp, fact_token_strategy=hparams.fact_token)
        return (target - cur_output) / torch.dot(cur_input, left_vector)

    with compat.temporarily(main, "compute_v", compute_v):
        yield


def sequential_edit_kwargs(editor: Any) -> dict:
    """Keyword arguments that make ``BaseEditor.edit`` keep each edit for the next one (sequential editing):
    ``sequential_edit=True`` in EasyEdit's tree, ``keep_original_weight=False`` in the PyPI release."""
    params = inspect.signature(type(editor).edit).parameters
    return {"sequential_edit": True} if "sequential_edit" in params else {"keep_original_weight": False}


def _wrap_editor_class(base_editor: type) -> None:
    original_init = base_editor.__init__

    @functools.wraps(original_init)
    def __init__(self: Any, hparams: Any, *args: Any, **kwargs: Any) -> None:
        name = hparams.model_name
        with compat.cuda_redirect(_STATE.device):
            if not isinstance(name, str) or any(s in name.lower() for s in EASYEDIT_LOADED):
                original_init(self, hparams, *args, **kwargs)
                return
            # easyeditor picks loader classes by substrings of the name (no Qwen, the slow LLaMA tokenizer
            # for LLaMA 3, no local directories): causal LMs are loaded with the Auto classes instead.
            padding = "right" if hparams.alg_name in RIGHT_PADDED else "left"
            model, tok = load_model(name, padding_side=padding)
            hparams.model_name = (model, tok)
            try:
                original_init(self, hparams, *args, **kwargs)
            finally:
                hparams.model_name = name
            self.model_name = name

    _patch(base_editor, "__init__", __init__)
    for method in ("edit", "batch_edit", "edit_dataset", "edit_requests"):
        fn = base_editor.__dict__.get(method)
        if fn is None:
            continue

        def make(fn: Callable[..., Any]) -> Callable[..., Any]:
            @functools.wraps(fn)
            def wrapped(self: Any, *args: Any, **kwargs: Any) -> Any:
                with compat.cuda_redirect(_STATE.device):
                    return fn(self, *args, **kwargs)
            return wrapped

        _patch(base_editor, method, make(fn))


def enable_easyedit(device: Optional[str] = None, order: Optional[list[str]] = None, pm: Any = None) -> None:
    """Switch the plugins on for EasyEdit in this process (idempotent); also adds this package's own editors
    (``editors.OWN_EDITORS``: LEMoE) to ALG_DICT.

    :param device: where easyeditor's hard-coded ``cuda:N`` goes; default: CPU when CUDA is unavailable,
        else CUDA stays CUDA.
    :param order: default transform order (an hparams ``edit_plugins.order`` overrides it per step).
    :param pm: a pluggy PluginManager to use instead of the discovered plugins.
    """
    if _STATE.enabled:
        disable_easyedit()
    compat.install_stubs()
    _STATE.device = compat.redirect_target(device)
    _STATE.pm = pm or get_plugin_manager()
    _STATE.pm_given = pm is not None
    _STATE.order = list(order) if order else None
    alg_dict_mod = compat.import_easyeditor("easyeditor.util.alg_dict")
    for alg, fn in list(alg_dict_mod.ALG_DICT.items()):
        wrapped = _wrap_apply(alg, getattr(fn, "__revive_wrapped__", fn))
        alg_dict_mod.ALG_DICT[alg] = wrapped
        _STATE.restores.append(functools.partial(alg_dict_mod.ALG_DICT.__setitem__, alg, fn))
    for alg in OWN_EDITORS:  # this package's editors (LEMoE), unless easyeditor has one of that name
        if alg not in alg_dict_mod.ALG_DICT:
            alg_dict_mod.ALG_DICT[alg] = _wrap_apply(alg, own_editor(alg)[0])
            _STATE.restores.append(functools.partial(alg_dict_mod.ALG_DICT.pop, alg, None))
    for cls in hparams_classes().values():
        _wrap_from_hparams(cls)
    _wrap_editor_class(_resolve("easyeditor.editors.editor:BaseEditor"))
    compute_z = compat.import_easyeditor("easyeditor.models.memit.compute_z")
    _patch(compute_z, "nethook", compat.tuple_view_nethook(compute_z.nethook))
    _STATE.enabled = True


def disable_easyedit() -> None:
    """Undo ``enable_easyedit`` (easyeditor back to exactly its own functions)."""
    while _STATE.restores:
        _STATE.restores.pop()()
    _STATE.enabled = False
    _STATE.hosts = weakref.WeakKeyDictionary()
    _STATE.stats_filled.clear()
    _STATE.constrained.clear()
    # Templates sampled from one model must not leak into the next session's model.
    for module in _STATE.primed:
        compat.import_easyeditor(module).CONTEXT_TEMPLATES_CACHE = None
    _STATE.primed.clear()
    for module in _STATE.primed_projectors:  # AlphaEdit's P and accumulated keys belong to the last model
        main = compat.import_easyeditor(module)
        main.P_loaded, main.cache_c_new = False, False
    _STATE.primed_projectors.clear()
    _STATE.projectors.clear()
    _STATE.pending_keys.clear()
