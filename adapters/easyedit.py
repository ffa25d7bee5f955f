"""EasyEdit integration: ``enable_easyedit()`` routes every weight an EasyEdit editor writes through the plugins.

After ``enable_easyedit()``, a user's unchanged code

    hparams = MEMITHyperParams.from_hparams("hparams/MEMIT/smollm2-135m.yaml")   # with a `revive:` block
    editor = BaseEditor.from_hparams(hparams)
    editor.edit(prompts=..., target_new=..., subject=..., keep_original_weight=False)

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
import functools
import os
import tempfile
import warnings
import weakref
from typing import Any, Callable, Iterator, Mapping, Optional

import torch
import yaml

from revive_plugin.config import ReviveConfig
from revive_plugin.host import PluginHost, StepRecord, TargetWeight, get_plugin_manager

from . import compat
from .models import load_model

#: Attribute of an EasyEdit hparams object holding the popped plugin blocks.
PLUGIN_CONFIGS_ATTR = "plugin_configs"
#: YAML block holding host settings: ``edit_plugins: {order: [rect, revive]}``.
HOST_BLOCK = "edit_plugins"
#: YAML block switching MEMIT's z optimisation to the batched path: ``batched_z: true`` or ``{chunk: 16}``.
BATCHED_Z_BLOCK = "batched_z"
#: Editors whose edits are not weight writes: plugins have nothing to filter.
NON_WEIGHT_EDITORS = ("IKE", "SERAC", "FT-Api")
#: Model names easyeditor's own loader handles (seq2seq, API and remote-code models).
EASYEDIT_LOADED = ("t5", "gpt-3.5", "chatglm", "internlm", "baichuan")
#: Hparams classes whose from_hparams reads YAML.
HPARAMS_MODULES = {
    "ROME": "easyeditor.models.rome.rome_hparams:ROMEHyperParams",
    "MEMIT": "easyeditor.models.memit.memit_hparams:MEMITHyperParams",
    "FT": "easyeditor.models.ft.ft_hparams:FTHyperParams",
    "KN": "easyeditor.models.kn.kn_hparams:KNHyperParams",
    "MEND": "easyeditor.models.mend.mend_hparams:MENDHyperParams",
    "SERAC": "easyeditor.models.serac.serac_hparams:SERACHparams",
    "IKE": "easyeditor.models.ike.ike_hparams:IKEHyperParams",
    "LoRA": "easyeditor.models.lora.lora_hparams:LoRAHyperParams",
}


class _Integration:
    """What enable_easyedit patched, so disable_easyedit can put it back exactly."""

    def __init__(self) -> None:
        self.enabled = False
        self.device: Optional[torch.device] = None
        self.pm = None
        self.order: Optional[list[str]] = None
        self.restores: list[Callable[[], None]] = []
        self.hosts: "weakref.WeakKeyDictionary[torch.nn.Module, PluginHost]" = weakref.WeakKeyDictionary()
        self.stats_filled: dict[tuple, tuple] = {}
        self.primed: set[str] = set()  # easyeditor modules whose context templates we sampled


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
def plugin_block_names() -> set[str]:
    """Top-level YAML keys that belong to plugins (popped before EasyEdit sees the file)."""
    pm = _STATE.pm or get_plugin_manager()
    return {name for name, _ in pm.list_name_plugin()} | {"revive", HOST_BLOCK, BATCHED_Z_BLOCK}


def split_plugin_blocks(config: dict, source: str = "<hparams>") -> tuple[dict, dict]:
    """(EasyEdit settings, plugin blocks) of an hparams mapping; validates the ``revive:`` block."""
    names = plugin_block_names()
    blocks = {k: config[k] for k in config if k in names}
    rest = {k: v for k, v in config.items() if k not in names}
    if "revive" in blocks:
        try:
            ReviveConfig.from_dict(blocks["revive"] if blocks["revive"] is not None else {})
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from e
        if blocks["revive"] is None:
            blocks["revive"] = {}
    host = blocks.get(HOST_BLOCK)
    if host is not None:
        if not isinstance(host, Mapping) or set(host) - {"order"}:
            raise ValueError(f"{source}: {HOST_BLOCK} accepts only `order: [plugin, ...]`, got {host!r}")
        order = host.get("order", [])
        if not isinstance(order, list) or not all(isinstance(x, str) for x in order):
            raise ValueError(f"{source}: {HOST_BLOCK}.order must be a list of plugin names, got {order!r}")
    if BATCHED_Z_BLOCK in blocks:
        blocks[BATCHED_Z_BLOCK] = batched_z_options(blocks[BATCHED_Z_BLOCK], source)
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
    """Attach plugin blocks to an hparams object built in Python (e.g. ``revive={"tau": 0.2}``)."""
    current = dict(getattr(hparams, PLUGIN_CONFIGS_ATTR, {}) or {})
    _, checked = split_plugin_blocks(blocks, source=type(hparams).__name__)
    current.update(checked)
    setattr(hparams, PLUGIN_CONFIGS_ATTR, current)
    return hparams


def _wrap_from_hparams(cls: type) -> None:
    original = cls.__dict__["from_hparams"].__func__

    def from_hparams(klass: type, hparams_name_or_path: str) -> Any:
        path = hparams_name_or_path if ".yaml" in hparams_name_or_path else hparams_name_or_path + ".yaml"
        with open(path, encoding="utf-8") as fh:
            config = yaml.safe_load(fh)
        if not isinstance(config, dict):
            return original(klass, hparams_name_or_path)
        rest, blocks = split_plugin_blocks(config, source=path)
        if not blocks:
            return original(klass, hparams_name_or_path)
        fd, tmp = tempfile.mkstemp(suffix=".yaml")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                yaml.safe_dump(rest, fh)
            hparams = original(klass, tmp)
        finally:
            os.unlink(tmp)
        setattr(hparams, PLUGIN_CONFIGS_ATTR, blocks)
        return hparams

    _patch(cls, "from_hparams", classmethod(from_hparams))


# -- editors: the snapshot-diff step -------------------------------------------------------------------
def target_weights(model: torch.nn.Module, hparams: Any) -> list[TargetWeight]:
    """The live parameters an editor may write: those under ``rewrite_module_tmp`` for ``hparams.layers``,
    else every parameter. GPT-2 ``Conv1D`` weights are marked transposed (stored in×out)."""
    tmpl = getattr(hparams, "rewrite_module_tmp", None)
    layers = getattr(hparams, "layers", None)
    owners = {}
    for mod_name, module in model.named_modules():
        for p_name, _ in module.named_parameters(recurse=False):
            owners[f"{mod_name}.{p_name}" if mod_name else p_name] = module
    selected = []
    for name, param in model.named_parameters():
        if tmpl and layers:
            if not any(f"{tmpl.format(layer)}." in f"{name}" for layer in layers):
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


def _prime_context_templates(alg: str, model: Any, tok: Any, hparams: Any, seed: int = 0) -> None:
    """MEMIT/ROME sample their context templates once per process: sample them under a fixed seed."""
    if alg not in ("MEMIT", "ROME"):
        return
    module = {"MEMIT": "easyeditor.models.memit.memit_main", "ROME": "easyeditor.models.rome.rome_main"}[alg]
    mod = compat.import_easyeditor(module)
    if mod.CONTEXT_TEMPLATES_CACHE is not None:
        return
    _STATE.primed.add(module)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if alg == "MEMIT":
            mod.get_context_templates(model, tok)
        else:
            mod.get_context_templates(model, tok, hparams.context_template_length_params)


def _feed_statistics(alg: str, model: Any, tok: Any, hparams: Any) -> None:
    """Fill easyeditor's covariance caches from a local corpus (MEMIT: COV_CACHE, ROME: inv_mom2_cache)."""
    from .stats import is_local_corpus, load_corpus, second_moments

    dataset = getattr(hparams, "mom2_dataset", None)
    if alg not in ("MEMIT", "ROME") or not dataset or not is_local_corpus(str(dataset)):
        return
    if alg == "ROME" and not getattr(hparams, "mom2_adjustment", False):
        return
    model_name = model.config._name_or_path.replace("/", "_")
    names = [hparams.rewrite_module_tmp.format(layer) for layer in hparams.layers]
    spec = (str(dataset), int(hparams.mom2_n_samples), str(hparams.mom2_dtype))
    if all(_STATE.stats_filled.get((alg, model_name, n)) == spec for n in names):
        return
    corpus = load_corpus(str(dataset))
    moments = second_moments(model, tok, names, corpus, n_samples=int(hparams.mom2_n_samples),
                             dtype=str(hparams.mom2_dtype), model_id=model_name)
    if alg == "MEMIT":
        cache = compat.import_easyeditor("easyeditor.models.memit.memit_main").COV_CACHE
        for n in names:
            cache[(model_name, n)] = moments[n].float().cpu()
    else:
        cache = compat.import_easyeditor("easyeditor.models.rome.compute_u").inv_mom2_cache
        device = next(model.parameters()).device
        for n in names:
            cache[(model_name, n)] = torch.inverse(moments[n].to(device)).float()
    for n in names:
        _STATE.stats_filled[(alg, model_name, n)] = spec


def _wrap_apply(alg: str, apply_fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(apply_fn)
    def apply(model: Any, tok: Any, requests: Any, hparams: Any, *args: Any, **kwargs: Any) -> Any:
        configs = dict(getattr(hparams, PLUGIN_CONFIGS_ATTR, {}) or {})
        with compat.cuda_redirect(_STATE.device):
            if alg in NON_WEIGHT_EDITORS:
                if configs:
                    warnings.warn(
                        f"{alg} does not write model weights, so the plugin blocks {sorted(configs)} have no "
                        "effect on it; use a weight-editing method (ROME, MEMIT, FT, …) to apply REVIVE",
                        stacklevel=2,
                    )
                return apply_fn(model, tok, requests, hparams, *args, **kwargs)
            if kwargs.get("copy"):
                # Edit a copy ourselves so the diff is taken on the model that is returned.
                model = copy_module.deepcopy(model)
                kwargs["copy"] = False
            _prime_context_templates(alg, model, tok, hparams)
            _feed_statistics(alg, model, tok, hparams)
            host = host_for(model)
            order = (configs.get(HOST_BLOCK) or {}).get("order")

            def run() -> Any:
                z_options = configs.get(BATCHED_Z_BLOCK)
                if alg != "MEMIT" or not z_options:
                    return apply_fn(model, tok, requests, hparams, *args, **kwargs)
                with batched_compute_z(requests, **z_options):
                    return apply_fn(model, tok, requests, hparams, *args, **kwargs)

            result, _ = host.run_step(alg, target_weights(model, hparams), run, configs=configs, order=order)
            return result

    apply.__revive_wrapped__ = apply_fn  # type: ignore[attr-defined]
    return apply


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


@contextlib.contextmanager
def batched_compute_z(requests: Any, chunk: int = 16, early_exit: bool = True) -> Iterator[None]:
    """Within the block, MEMIT's ``compute_z`` returns v* optimised for all ``requests`` at once.

    The vectors are computed on the first ``compute_z`` call (context templates, layer and model as easyeditor
    passes them); a request not among them falls back to easyeditor's own ``compute_z``. With ``early_exit``
    MEMIT's key and representation passes (``repr_tools``) stop after the layer they read, through
    easyeditor's own ``Trace(stop=True)``: the same numbers without running the layers above.
    """
    from .batched_z import compute_zs

    main = compat.import_easyeditor("easyeditor.models.memit.memit_main")
    original = main.compute_z
    normalised = [memit_request(r) for r in requests]
    computed: dict[tuple[str, str, str], torch.Tensor] = {}

    def compute_z(model: Any, tok: Any, request: Any, hparams: Any, layer: int, templates: Any) -> torch.Tensor:
        if not computed:
            zs = compute_zs(model, tok, normalised, hparams, layer, templates, chunk=chunk)
            computed.update({_z_key(r): z for r, z in zip(normalised, zs)})
        z = computed.get(_z_key(request))
        return original(model, tok, request, hparams, layer, templates) if z is None else z

    main.compute_z = compute_z
    repr_tools = compat.import_easyeditor("easyeditor.models.rome.repr_tools")
    nethook = repr_tools.nethook
    if early_exit:
        repr_tools.nethook = compat.stopping_nethook(nethook)
    try:
        yield
    finally:
        main.compute_z = original
        repr_tools.nethook = nethook


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
            padding = "right" if hparams.alg_name in ("ROME", "MEMIT") else "left"
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
    """Switch the plugins on for EasyEdit in this process (idempotent).

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
    _STATE.order = list(order) if order else None
    alg_dict_mod = compat.import_easyeditor("easyeditor.util.alg_dict")
    for alg, fn in list(alg_dict_mod.ALG_DICT.items()):
        wrapped = _wrap_apply(alg, getattr(fn, "__revive_wrapped__", fn))
        alg_dict_mod.ALG_DICT[alg] = wrapped
        _STATE.restores.append(functools.partial(alg_dict_mod.ALG_DICT.__setitem__, alg, fn))
    for spec in HPARAMS_MODULES.values():
        try:
            cls = _resolve(spec)
        except (ImportError, AttributeError):
            continue
        if "from_hparams" in vars(cls):
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
    # Templates sampled from one model must not leak into the next session's model.
    for module in _STATE.primed:
        compat.import_easyeditor(module).CONTEXT_TEMPLATES_CACHE = None
    _STATE.primed.clear()
