"""Plugin host: discovers plugins, runs one edit step as snapshot → editor → delta chain → write-back.

Framework-free: an adapter hands it the live weight tensors an editor may write and a callable that runs
the editor; everything EasyEdit-specific lives in ``revive_plugin.adapters``.
"""
from __future__ import annotations

import importlib
import inspect
import os
import re
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence, TypeVar

import pluggy
import torch

from . import hookspecs
from .hookspecs import ENTRY_POINT_GROUP, PROJECT_NAME, EditContext

#: Built-in plugins: registered like third-party ones, under these names, unless already found through
#: the entry-point group (the installed package declares the same modules there).
DEFAULT_PLUGINS: dict[str, str] = {"revive": "revive_plugin.plugins.revive"}

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


def get_plugin_manager(pinned: Optional[Sequence[str]] = None) -> pluggy.PluginManager:
    """A plugin manager with the hookspecs, the entry-point plugins and the built-in plugins.

    ``pinned`` (or ``$EASYEDIT_PLUGINS``) restricts loading to the named plugins, for reproducible runs.
    """
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
            raise ValueError(
                f"{PLUGINS_ENV} names plugin(s) {missing} that were not found in the entry-point group "
                f"{ENTRY_POINT_GROUP!r}; installed: {[n for n, _ in pm.list_name_plugin()]}"
            )
    return pm


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


@dataclass
class StepRecord:
    """What one edit step did: changed parameters, whether a transform changed a delta, merged metrics."""

    step: int
    editor: str
    changed: list[str] = field(default_factory=list)
    transformed: list[str] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    edit_seconds: float = 0.0        # the editor's own run
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

    # -- the delta chain -------------------------------------------------------------------------
    def transform_chain(self, order: Optional[Sequence[str]] = None) -> list[tuple[str, Callable[..., Any]]]:
        """(plugin name, hook function) of ``easyedit_transform_delta`` in the order they run."""
        impls = list(reversed(self.pm.hook.easyedit_transform_delta.get_hookimpls()))  # pluggy call order
        order = list(order if order is not None else self.order)
        unknown = [n for n in order if not any(i.plugin_name == n for i in impls)]
        if unknown:
            raise ValueError(
                f"plugin order names {unknown}, which implement no easyedit_transform_delta; "
                f"available: {[i.plugin_name for i in impls]}"
            )
        ranked = sorted(impls, key=lambda i: order.index(i.plugin_name) if i.plugin_name in order else len(order))
        return [(i.plugin_name, i.function) for i in ranked]

    @staticmethod
    def _call(fn: Callable[..., Any], **kwargs: Any) -> Any:
        params = inspect.signature(fn).parameters
        return fn(**{k: v for k, v in kwargs.items() if k in params})

    def transform(
        self, name: str, delta: torch.Tensor, weight: torch.Tensor, context: EditContext,
        order: Optional[Sequence[str]] = None,
        chain: Optional[Sequence[tuple[str, Callable[..., Any]]]] = None,
    ) -> tuple[torch.Tensor, bool]:
        """Run the chain (``chain``, else the one ``order`` gives) on one delta; returns (final delta, whether
        any plugin changed it)."""
        changed = False
        for plugin, fn in (chain if chain is not None else self.transform_chain(order)):
            try:
                out = self._call(fn, name=name, delta=delta, weight=weight, context=context)
            except Exception as e:
                raise EditRejected(f"plugin {plugin!r} failed on {name}: {type(e).__name__}: {e}") from e
            if out is None:
                continue
            if not isinstance(out, torch.Tensor) or out.shape != delta.shape:
                got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise EditRejected(
                    f"plugin {plugin!r} returned a delta of shape {got} for {name}; expected {tuple(delta.shape)}"
                )
            if not torch.isfinite(out).all():
                raise EditRejected(f"plugin {plugin!r} returned a non-finite delta (NaN/inf) for {name}")
            if out is not delta:
                changed = True
            delta = out
        return delta, changed

    # -- one edit step ---------------------------------------------------------------------------
    def run_step(
        self,
        editor: str,
        targets: Sequence[TargetWeight],
        run: Callable[[], T],
        configs: Optional[Mapping[str, Any]] = None,
        order: Optional[Sequence[str]] = None,
    ) -> tuple[T, StepRecord]:
        """Snapshot ``targets``, call ``run()`` (the editor), pass each changed 2-D weight's delta through the
        chain and write W_before + ΔW_final. Anything that goes wrong restores every target exactly."""
        configs = dict(configs or {})
        ctx = EditContext(editor=editor, step=self.step, configs=configs, state=self.state)
        before = {t.name: t.tensor.detach().clone() for t in targets}
        record = StepRecord(step=self.step, editor=editor)

        def restore() -> None:
            with torch.no_grad():
                for t in targets:
                    t.tensor.data.copy_(before[t.name])

        views = {t.name: t.view(before[t.name]) for t in targets}
        self.pm.hook.easyedit_edit_step_start(context=ctx, weights=views)
        started = time.perf_counter()
        try:
            result = run()
        except BaseException:
            restore()
            raise
        record.edit_seconds = time.perf_counter() - started
        started = time.perf_counter()
        try:
            finals: dict[str, torch.Tensor] = {}
            chain = None  # resolved once per step, at the first delta that needs it
            with torch.no_grad():
                for t in targets:
                    w0 = views[t.name]
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
                                       configs=configs, state=self.state)
                    if chain is None:
                        chain = self.transform_chain(order)
                    final, changed = self.transform(t.name, delta, w0, pctx, chain=chain)
                    finals[t.name] = final
                    if changed:
                        record.transformed.append(t.name)
                        t.view(t.tensor.data).copy_(w0 + final.to(dtype=w0.dtype, device=w0.device))
                after = {t.name: t.view(t.tensor.detach()) for t in targets}
            for metrics in self.pm.hook.easyedit_edit_step_end(context=ctx, deltas=finals, weights=after):
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
        self.seconds["edit"] += record.edit_seconds
        self.seconds["transform"] += record.transform_seconds
        self.step += 1
        self.history.append(record)
        return result, record
