"""Plugin host: discovers plugins, runs one edit step as snapshot → editor → delta chain → write-back.

Framework-free: an adapter hands it the live weight tensors an editor may write and a callable that runs
the editor; everything EasyEdit-specific lives in ``revive_plugin.adapters``.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import os
import re
import time
import types
import warnings
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, TypeVar

import pluggy
import torch

from . import hookspecs
from .hookspecs import ENTRY_POINT_GROUP, PROJECT_NAME, EditContext

#: Built-in plugins: registered like third-party ones, under these names, unless already found through
#: the entry-point group (the installed package declares the same modules there).
DEFAULT_PLUGINS: dict[str, str] = {
    "revive": "revive_plugin.plugins.revive",
    "rect": "revive_plugin.plugins.rect",    # baselines: pure ΔW transforms that stack with REVIVE
    "prune": "revive_plugin.plugins.prune",
    "superposition": "revive_plugin.plugins.superposition",  # monitor: logs metrics, never changes a delta
    "wilke": "revive_plugin.plugins.wilke",  # chooses the layer each ROME-style step writes (easyedit_select_layers)
}

#: Comma-separated plugin names: only these load (empty: none). Unset: every discovered plugin loads.
PLUGINS_ENV = "EASYEDIT_PLUGINS"
#: Step records a host keeps (the most recent ones).
HISTORY_LIMIT = 1000

_LAYER_RE = re.compile(r"\.(\d+)\.")

T = TypeVar("T")


class EditRejected(RuntimeError):
    """An edit step was refused; the model's weights were restored to what they were before the step."""


def layer_index(name: str) -> Optional[int]:
    """Layer index in a parameter name (``model.layers.12.mlp.down_proj.weight`` → 12), else None."""
    found = _LAYER_RE.findall(f".{name}.")
    return int(found[-1]) if found else None


def pinned_plugins() -> Optional[list[str]]:
    """Plugin names pinned by ``$EASYEDIT_PLUGINS`` (None when the variable is unset)."""
    raw = os.environ.get(PLUGINS_ENV)
    if raw is None:
        return None
    return [p.strip() for p in raw.split(",") if p.strip()]


def installed_plugins() -> dict[str, str]:
    """Every plugin this process can load, whatever ``$EASYEDIT_PLUGINS`` says: name → source
    ("entry point of <distribution> <version>" or "built-in")."""
    found: dict[str, str] = {}
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = getattr(ep, "dist", None)
        found.setdefault(ep.name, f"entry point of {dist.name} {dist.version}" if dist else "entry point")
    for name in DEFAULT_PLUGINS:
        found.setdefault(name, "built-in")
    return dict(sorted(found.items()))


def get_plugin_manager(pinned: Optional[Sequence[str]] = None) -> pluggy.PluginManager:
    """A plugin manager with the hookspecs, the entry-point plugins and the built-in plugins.

    ``pinned`` (or ``$EASYEDIT_PLUGINS``) restricts loading to the named plugins, for reproducible runs.
    """
    from_env = pinned is None
    if pinned is None:
        pinned = pinned_plugins()
    pm = pluggy.PluginManager(PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    if pinned is None:
        pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
    else:
        for name in pinned:
            pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP, name=name)
    for name, module_path in DEFAULT_PLUGINS.items():
        if pm.has_plugin(name) or (pinned is not None and name not in pinned):
            continue
        module = importlib.import_module(module_path)
        if not pm.is_registered(module):
            pm.register(module, name=name)
    if pinned is not None:
        missing = [n for n in pinned if not pm.has_plugin(n)]
        if missing:
            where = f"{PLUGINS_ENV}={os.environ.get(PLUGINS_ENV, '')!r}" if from_env else f"pinned={list(pinned)}"
            raise ValueError(
                f"{where} names plugin(s) {missing} that are not installed; installed plugins: "
                f"{sorted(installed_plugins())} (entry-point group {ENTRY_POINT_GROUP!r} and built-ins). "
                f"Correct the name, install the plugin's package, or unset {PLUGINS_ENV} to load every plugin"
            )
    return pm


def hook_impls(pm: pluggy.PluginManager, hook: str) -> list[Any]:
    """The implementations of ``hook`` in pluggy's call order (one plugin at a time; no wrappers)."""
    impls = list(reversed(getattr(pm.hook, hook).get_hookimpls()))
    for impl in impls:
        if impl.hookwrapper or getattr(impl, "wrapper", False):
            raise TypeError(
                f"plugin {impl.plugin_name!r} implements {hook} as a hook wrapper; the host calls this hook one "
                "plugin at a time and supports plain implementations only (drop hookwrapper/wrapper=True)"
            )
    return impls


def call_impl(fn: Callable[..., Any], **kwargs: Any) -> Any:
    """Call a hook implementation with the subset of ``kwargs`` it accepts."""
    params = inspect.signature(fn).parameters
    return fn(**{k: v for k, v in kwargs.items() if k in params})


def validate_configs(
    pm: pluggy.PluginManager,
    configs: Mapping[str, Any],
    editor: Optional[str] = None,
    targets: Optional[Iterable[str]] = None,
) -> dict[str, Any]:
    """Each loaded plugin's block of ``configs`` checked by that plugin's ``easyedit_validate_config``.

    Returns ``configs`` with each block replaced by what its plugin returned (None: kept as written). Keys
    that are not loaded plugins (host settings such as ``edit_plugins``) are passed through unchecked.
    Raises ``ValueError`` naming the block and the plugin's message.
    """
    out = dict(configs)
    targets = sorted(targets) if targets is not None else None
    by_plugin = {impl.plugin_name: impl for impl in hook_impls(pm, "easyedit_validate_config")}
    for name, block in configs.items():
        impl = by_plugin.get(name)
        if impl is None:
            continue
        try:
            result = call_impl(impl.function, name=name, config=block, editor=editor, targets=targets)
        except ValueError as e:
            raise ValueError(f"`{name}:` block: {e}") from e
        except Exception as e:
            raise ValueError(
                f"`{name}:` block {block!r}: plugin {name!r} failed validating it: {type(e).__name__}: {e}"
            ) from e
        if result is not None:
            out[name] = result
    return out


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors hold the same values (NaN equal to NaN)."""
    with torch.no_grad():
        return torch.equal(a, b) or bool(((a == b) | (a.isnan() & b.isnan())).all())


def describe_plugins(pm: pluggy.PluginManager) -> list[dict[str, Any]]:
    """Name, module, hooks and source (distribution or built-in) of every registered plugin."""
    dists = {id(plugin): dist for plugin, dist in pm.list_plugin_distinfo()}
    out = []
    for name, plugin in pm.list_name_plugin():
        if plugin is None:
            continue
        hooks = sorted(h.name for h in pm.get_hookcallers(plugin) or [])
        dist = dists.get(id(plugin))
        out.append(
            {
                "name": name,
                "module": getattr(plugin, "__name__", type(plugin).__name__),
                "hooks": hooks,
                "source": f"entry point of {dist.project_name} {dist.version}" if dist else "built-in",
            }
        )
    return sorted(out, key=lambda d: d["name"])


@dataclass
class TargetWeight:
    """A live weight an editor may write. ``transposed``: stored in×out (GPT-2 Conv1D); hooks see out×in."""

    name: str
    tensor: torch.Tensor
    transposed: bool = False

    def view(self, t: Optional[torch.Tensor] = None) -> torch.Tensor:
        t = self.tensor if t is None else t
        return t.T if self.transposed else t


#: What a driver hands ``PluginHost.run_step(keys=...)``: called with the names of the step's 2-D targets and
#: the W_before of every target by parameter name (the host's snapshot, in the tensors' stored layout; read it,
#: never write into it), it returns the keys of the step's requests per 2-D name, ``n × d_in``, evaluated with
#: those parameter values (see "Keys of a step" in ``revive_plugin.hookspecs``).
KeyProvider = Callable[[Sequence[str], Mapping[str, torch.Tensor]], Mapping[str, torch.Tensor]]


class StepKeys:
    """``context.keys`` of one edit step: the provider's keys, computed on the first call, for every name at once."""

    def __init__(self, provider: KeyProvider, names: Sequence[str], before: Mapping[str, torch.Tensor]):
        self._provider = provider
        self.names = list(names)
        self._before: Optional[Mapping[str, torch.Tensor]] = before
        self._keys: Optional[dict[str, torch.Tensor]] = None

    def __call__(self, name: str) -> torch.Tensor:
        if name not in self.names:
            raise KeyError(f"no keys for {name!r}: keys exist for the 2-D weights of this edit step, {self.names}")
        if self._keys is None:
            if self._before is None:
                raise RuntimeError("context.keys was called after its edit step ended; call it within the step's hooks")
            with torch.no_grad():
                got = self._provider(self.names, types.MappingProxyType(dict(self._before)))
            missing = [n for n in self.names if n not in got]
            if missing:
                raise RuntimeError(f"the driver's key provider returned no keys for {missing}")
            self._keys = {n: got[n].detach() for n in self.names}
        return self._keys[name].clone()

    def close(self) -> None:
        """Drop the snapshot and the provider (the step ended); keys already computed stay readable."""
        self._before, self._provider = None, None


@dataclass
class StepRecord:
    """What one edit step did: changed parameters, whether a transform changed a delta, merged metrics."""

    step: int
    editor: str
    changed: list[str] = field(default_factory=list)
    transformed: list[str] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    edit_seconds: float = 0.0        # the editor's own run (and its trials for easyedit_select_layers)
    transform_seconds: float = 0.0   # the delta chain and write-back (the plugins' cost)


class PluginHost:
    """Runs edit steps through the plugins for one model (keeps the plugins' per-model state)."""

    def __init__(
        self,
        pm: Optional[pluggy.PluginManager] = None,
        order: Optional[Sequence[str]] = None,
    ):
        self.pm = pm if pm is not None else get_plugin_manager()
        self.order = list(order) if order else []
        self.state: dict[str, Any] = {}
        self.step = 0
        # The latest records only: a 20,000-edit run must not grow memory with its history.
        self.history: deque[StepRecord] = deque(maxlen=HISTORY_LIMIT)
        self.seconds = {"edit": 0.0, "transform": 0.0}  # totals over this host's steps
        self._selecting = 0.0  # select_layers' seconds not yet in a step record

    # -- the delta chain -------------------------------------------------------------------------
    def transform_chain(self, order: Optional[Sequence[str]] = None) -> list[tuple[str, Callable[..., Any]]]:
        """(plugin name, hook function) of ``easyedit_transform_delta`` in the order they run."""
        impls = hook_impls(self.pm, "easyedit_transform_delta")  # pluggy call order
        order = list(order if order is not None else self.order)
        unknown = [n for n in order if not any(i.plugin_name == n for i in impls)]
        if unknown:
            raise ValueError(
                f"plugin order names {unknown}, which implement no easyedit_transform_delta; "
                f"available: {[i.plugin_name for i in impls]}"
            )
        ranked = sorted(impls, key=lambda i: order.index(i.plugin_name) if i.plugin_name in order else len(order))
        return [(i.plugin_name, i.function) for i in ranked]

    _call = staticmethod(call_impl)

    def validate(
        self, editor: str, configs: Optional[Mapping[str, Any]], targets: Optional[Iterable[str]] = None
    ) -> dict[str, Any]:
        """The step's plugin blocks checked by their plugins (``validate_configs``); a refused block raises
        ``EditRejected`` (nothing was edited)."""
        try:
            return validate_configs(self.pm, dict(configs or {}), editor=editor, targets=targets)
        except ValueError as e:
            raise EditRejected(
                f"edit step {self.step} of {editor} refused before the editor ran (weights untouched): {e}"
            ) from e

    def transform(
        self, name: str, delta: torch.Tensor, weight: torch.Tensor, context: EditContext,
        order: Optional[Sequence[str]] = None,
        chain: Optional[Sequence[tuple[str, Callable[..., Any]]]] = None,
    ) -> tuple[torch.Tensor, bool]:
        """Run the chain (``chain``, else the one ``order`` gives) on one delta; returns (final delta, whether
        any plugin returned one).

        Each plugin gets its own copies of ``delta`` and ``weight``: what it writes into them does not reach
        the result, ``weight`` or the next plugin (a write into ``weight`` is warned about).
        """
        changed = False
        for plugin, fn in (chain if chain is not None else self.transform_chain(order)):
            mine_delta, mine_weight = delta.clone(), weight.clone()
            try:
                out = self._call(fn, name=name, delta=mine_delta, weight=mine_weight, context=context)
            except Exception as e:
                raise EditRejected(f"plugin {plugin!r} failed on {name}: {type(e).__name__}: {e}") from e
            wrote_weight = bool(mine_weight._version) or not _same(mine_weight, weight)
            if wrote_weight or (out is None and mine_delta._version):
                arg = "weight" if wrote_weight else "delta"
                warnings.warn(
                    f"plugin {plugin!r} wrote into the {arg!r} argument of easyedit_transform_delta for {name}; "
                    "arguments are the plugin's own copies, so the write has no effect on the edit. Return the "
                    "new delta instead (see revive_plugin.hookspecs)",
                    RuntimeWarning,
                    stacklevel=2,
                )
            if out is None or (out is mine_delta and not mine_delta._version):
                continue  # unchanged (its own copy handed back untouched: the editor's write stays bit-exact)
            if not isinstance(out, torch.Tensor) or out.shape != delta.shape:
                got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise EditRejected(
                    f"plugin {plugin!r} returned a delta of shape {got} for {name}; expected {tuple(delta.shape)}"
                )
            if not torch.isfinite(out).all():
                raise EditRejected(f"plugin {plugin!r} returned a non-finite delta (NaN/inf) for {name}")
            changed = True
            delta = out
        return delta, changed

    def _step_hook(self, hook: str, guard: Callable[[], list[str]], **kwargs: Any) -> list[Any]:
        """Call ``hook`` one plugin at a time; an exception, or a write into the read-only weights that
        ``guard`` finds, raises ``EditRejected`` naming the plugin."""
        results = []
        for impl in hook_impls(self.pm, hook):
            try:
                results.append(self._call(impl.function, **kwargs))
            except Exception as e:
                raise EditRejected(
                    f"plugin {impl.plugin_name!r} failed in {hook} at edit step {self.step} of "
                    f"{kwargs['context'].editor}: {type(e).__name__}: {e}"
                ) from e
            written = guard()
            if written:
                raise EditRejected(
                    f"plugin {impl.plugin_name!r} wrote into the read-only {written} in {hook} at edit step "
                    f"{self.step}; the step was refused and the weights restored. Copy a tensor (t.clone()) "
                    "before changing it; only easyedit_transform_delta changes an edit, by returning a delta"
                )
        return results

    # -- the layers of a step ---------------------------------------------------------------------
    def select_layers(
        self,
        editor: str,
        targets: Sequence[TargetWeight],
        layers: Sequence[int],
        configs: Optional[Mapping[str, Any]] = None,
        requests: Optional[Sequence[Mapping[str, Any]]] = None,
        keys: Optional[KeyProvider] = None,
        trial: Optional[Callable[[Sequence[int]], Mapping[str, torch.Tensor]]] = None,
    ) -> Optional[list[int]]:
        """The layers the next edit step writes, as the first ``easyedit_select_layers`` implementation (of a
        plugin whose block is in ``configs``) that returns a list chose them (sorted, without repeats), or None
        when none did (the editor's own layers).

        ``targets`` are the weights the step may write (every candidate layer's), ``layers`` the candidate
        layers; ``configs`` the step's plugin blocks, already validated. Called before ``run_step``, with the
        weights at W_before: a weight that differs after a plugin's call (a trial not undone), a plugin that
        raises or returns anything but a non-empty subset of ``layers`` refuse the step (``EditRejected``) with
        every target restored to what it was. Its time counts as editor time (``seconds["edit"]`` and the next
        step's ``edit_seconds``): its trials are editor runs.
        """
        configs = dict(configs or {})
        impls = [i for i in hook_impls(self.pm, "easyedit_select_layers") if i.plugin_name in configs]
        if not impls:  # a plugin without its block does nothing: no snapshot either
            return None
        started = time.perf_counter()
        candidates = sorted({int(layer) for layer in layers})
        before = {t.name: t.tensor.detach().clone() for t in targets}
        matrices = [t.name for t in targets if t.tensor.ndim == 2]
        step_keys = StepKeys(keys, matrices, before) if keys is not None else None
        ctx = EditContext(editor=editor, step=self.step, configs=configs, state=self.state, keys=step_keys)
        live = types.MappingProxyType({t.name: t.view(t.tensor.detach()) for t in targets if t.tensor.ndim == 2})
        try:
            for impl in impls:
                plugin = impl.plugin_name
                try:
                    out = self._call(impl.function, editor=editor, requests=requests, layers=list(candidates),
                                     context=ctx, weights=live, trial=trial)
                except Exception as e:
                    raise EditRejected(f"plugin {plugin!r} failed in easyedit_select_layers at edit step {self.step} of "
                                       f"{editor} (weights untouched): {type(e).__name__}: {e}") from e
                moved = [t.name for t in targets if not _same(t.tensor, before[t.name])]
                if moved:
                    raise EditRejected(f"the weights {moved} changed during plugin {plugin!r}'s easyedit_select_layers "
                                       f"at edit step {self.step} of {editor} (a trial that was not undone?); they "
                                       "were restored and the step refused")
                if out is None:
                    continue
                if isinstance(out, (str, bytes)) or not isinstance(out, Sequence) or not out or any(
                        isinstance(x, bool) or not isinstance(x, int) for x in out):
                    raise EditRejected(f"plugin {plugin!r} returned {out!r} from easyedit_select_layers; expected a "
                                       f"non-empty list of layer indices among the candidates {candidates}")
                outside = sorted(set(out) - set(candidates))
                if outside:
                    raise EditRejected(f"plugin {plugin!r} chose layers {outside} for edit step {self.step} of {editor}, "
                                       f"which are not candidates {candidates}: the step cannot write them")
                return sorted(set(out))
            return None
        except BaseException:
            with torch.no_grad():
                for t in targets:
                    t.tensor.data.copy_(before[t.name])
            raise
        finally:
            if step_keys is not None:
                step_keys.close()
            elapsed = time.perf_counter() - started
            self.seconds["edit"] += elapsed
            self._selecting += elapsed

    # -- one edit step ---------------------------------------------------------------------------
    def run_step(
        self,
        editor: str,
        targets: Sequence[TargetWeight],
        run: Callable[[], T],
        configs: Optional[Mapping[str, Any]] = None,
        order: Optional[Sequence[str]] = None,
        keys: Optional[KeyProvider] = None,
    ) -> tuple[T, StepRecord]:
        """Snapshot ``targets``, call ``run()`` (the editor), pass each changed 2-D weight's delta through the
        chain and write W_before + ΔW_final. Anything that goes wrong restores every target exactly.

        The plugin blocks in ``configs`` are validated first (``easyedit_validate_config``, with the names of
        the 2-D targets), so a refused block stops the step before the editor runs. ``keys``, when the driver
        knows the step's requests, becomes ``context.keys`` (called lazily with the 2-D targets' W_before).
        """
        matrices = [t.name for t in targets if t.tensor.ndim == 2]
        configs = self.validate(editor, configs, matrices)
        # The host's own snapshot: never handed to a plugin, so a restore always puts back W_before.
        before = {t.name: t.tensor.detach().clone() for t in targets}
        step_keys = StepKeys(keys, matrices, before) if keys is not None else None
        try:
            return self._run_step(editor, targets, run, configs, order, before, step_keys)
        finally:
            if step_keys is not None:
                step_keys.close()  # a context kept past its step does not keep the snapshot alive

    def _run_step(self, editor: str, targets: Sequence[TargetWeight], run: Callable[[], T], configs: dict[str, Any],
                  order: Optional[Sequence[str]], before: dict[str, torch.Tensor],
                  step_keys: Optional[StepKeys]) -> tuple[T, StepRecord]:
        ctx = EditContext(editor=editor, step=self.step, configs=configs, state=self.state, keys=step_keys)
        record = StepRecord(step=self.step, editor=editor)

        def restore() -> None:
            with torch.no_grad():
                for t in targets:
                    t.tensor.data.copy_(before[t.name])

        def versions() -> dict[str, int]:
            return {t.name: t.tensor._version for t in targets}

        live = types.MappingProxyType({t.name: t.view(t.tensor.detach()) for t in targets})
        seen = versions()

        def written_at_start() -> list[str]:  # the editor has not run: each weight must equal the snapshot
            now = versions()
            return [t.name for t in targets if now[t.name] != seen[t.name] or not _same(t.tensor, before[t.name])]

        try:
            self._step_hook("easyedit_edit_step_start", written_at_start, context=ctx, weights=live)
        except BaseException:
            restore()
            raise
        started = time.perf_counter()
        try:
            result = run()
        except BaseException:
            restore()
            raise
        ran = time.perf_counter() - started
        # select_layers' trials are editor runs: in this step's edit_seconds; select_layers already added them to
        # seconds["edit"] when it ran (so a refused step's trials still count there), hence only ``ran`` below
        record.edit_seconds, self._selecting = ran + self._selecting, 0.0
        started = time.perf_counter()
        try:
            finals: dict[str, torch.Tensor] = {}
            chain = None  # resolved once per step, at the first delta that needs it
            with torch.no_grad():
                for t in targets:
                    w0 = t.view(before[t.name])
                    delta = t.view(t.tensor.detach()) - w0
                    if not torch.any(delta):
                        continue
                    record.changed.append(t.name)
                    if not torch.isfinite(delta).all():
                        raise EditRejected(f"editor {editor} wrote a non-finite update (NaN/inf) into {t.name}")
                    if delta.ndim != 2:
                        finals[t.name] = delta  # biases/norms pass through: REVIVE protects matrices
                        continue
                    pctx = EditContext(editor=editor, step=self.step, layer=layer_index(t.name),
                                       configs=configs, state=self.state, keys=step_keys)
                    if chain is None:
                        chain = self.transform_chain(order)
                    final, changed = self.transform(t.name, delta, w0, pctx, chain=chain)
                    finals[t.name] = final
                    if changed:
                        record.transformed.append(t.name)
                        t.view(t.tensor.data).copy_(w0 + final.to(dtype=w0.dtype, device=w0.device))
            seen_end = versions()
            seen_deltas = {n: d._version for n, d in finals.items()}

            def written_at_end() -> list[str]:
                now = versions()
                return [n for n in now if now[n] != seen_end[n]] + [
                    f"deltas[{n!r}]" for n, d in finals.items() if d._version != seen_deltas[n]]

            ends = self._step_hook("easyedit_edit_step_end", written_at_end, context=ctx,
                                   deltas=types.MappingProxyType(finals), weights=live)
            for metrics in ends:
                if metrics:
                    record.metrics.update(metrics)
        except BaseException as e:
            restore()
            if isinstance(e, EditRejected):
                raise
            if isinstance(e, Exception):
                raise EditRejected(f"edit step {self.step} of {editor} failed after the editor ran: {e}") from e
            raise
        record.transform_seconds = time.perf_counter() - started
        self.seconds["edit"] += ran
        self.seconds["transform"] += record.transform_seconds
        self.step += 1
        self.history.append(record)
        return result, record
