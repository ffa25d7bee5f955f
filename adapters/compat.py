"""Make easyeditor importable and runnable here, without editing its files: the PyPI release 0.0.1.dev0 or a
source tree of EasyEdit's GitHub repository (``$EASYEDIT_SOURCE``).

* which easyeditor: ``$EASYEDIT_SOURCE`` names a checkout (the folder holding ``easyeditor/``), put first on
  ``sys.path``; unset, Python's own search finds it (the installed release, or a tree on ``PYTHONPATH``);
* its package ``__init__`` imports multimodal (BLIP, LLaVA, Qwen-VL) and API code whose packages are missing
  or break here: harmless stand-ins are put in ``sys.modules`` for exactly those modules (using one raises
  an ImportError naming what is missing);
* it hard-codes ``cuda:{device}``: ``cuda_redirect`` maps CUDA devices to the model's device;
* with transformers ≥ 4.54 decoder layers return a tensor where MEMIT's ``compute_z`` indexes a tuple:
  ``TupleViewTraceDict`` gives it a tuple view of traced layer outputs;
* ``temporarily`` is how the adapter swaps one of easyeditor's module attributes (``compute_z``,
  ``compute_ks``, a statistics cache) or an hparams setting for one edit step.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import sys
import threading
import traceback
import types
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from torch.overrides import TorchFunctionMode

#: A checkout of EasyEdit's GitHub tree to use instead of the installed release (the folder holding easyeditor/).
SOURCE_ENV = "EASYEDIT_SOURCE"

#: Modules stubbed up front: the release's BLIP code imports but breaks with this torch.
_STUBBED = {
    "easyeditor.trainer.blip2_models": "BLIP-2 models (multimodal editing)",
    "easyeditor.dataset.processor.blip_processors": "BLIP image processors (multimodal editing)",
}
#: Third-party packages that only easyeditor's multimodal, API and unstructured-evaluation modules import.
#: When one is missing, the module importing it gets a stand-in instead of failing the whole package.
OPTIONAL_PACKAGES = frozenset({
    "timm", "iopath", "fairscale", "cv2", "torchvision", "av", "decord", "qwen_vl_utils", "zhipuai", "openai",
    "rouge", "lavis", "open_clip",
})
#: Stand-ins put in place: easyeditor module → why (what is missing).
STAND_INS: dict[str, str] = {}


class StandIn:
    """Base of the classes a stand-in module hands out: using one says what is missing."""

    _what = "this easyeditor feature"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise ImportError(f"{type(self).__name__} is not available here: {self._what}")


def _stand_in_module(module_name: str, why: str) -> types.ModuleType:
    stub = types.ModuleType(module_name)
    stub.__doc__ = f"revive-plugin stand-in: {why}"
    stub.__all__ = []  # `from .x import *` imports nothing
    stub.__path__ = []  # a package too, so `from .x.y import z` reaches here and not the real file
    stub.__revive_stand_in__ = why

    def __getattr__(name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        cls = type(name, (StandIn,), {"_what": f"{module_name} is a stand-in ({why})", "__module__": module_name})
        setattr(stub, name, cls)
        return cls

    stub.__getattr__ = __getattr__  # type: ignore[attr-defined]
    return stub


def install_stubs() -> None:
    """Put the up-front stand-ins in ``sys.modules`` (idempotent)."""
    for module_name, what in _STUBBED.items():
        if module_name not in sys.modules:
            why = f"{what} does not import with this torch"
            sys.modules[module_name] = _stand_in_module(module_name, why)
            STAND_INS[module_name] = why


def is_stand_in(obj: Any) -> Optional[str]:
    """Why ``obj`` (a module, or a name taken from one) is a stand-in, or None if it is real easyeditor code."""
    if isinstance(obj, types.ModuleType):
        return getattr(obj, "__revive_stand_in__", None)
    target = getattr(obj, "__self__", None) or obj  # bound methods of stand-in classes
    target = target if isinstance(target, type) else type(target)
    if issubclass(target, StandIn):
        return STAND_INS.get(target.__module__, "a stand-in")
    return None


def source_tree() -> Optional[Path]:
    """The checkout ``$EASYEDIT_SOURCE`` names (validated), or None when it is unset."""
    raw = os.environ.get(SOURCE_ENV)
    if not raw:
        return None
    root = Path(raw).expanduser().resolve()
    if (root / "easyeditor" / "__init__.py").is_file():
        return root
    hint = ""
    if (root / "__init__.py").is_file() and root.name == "easyeditor":
        hint = f" (it is the package itself: set {SOURCE_ENV}={root.parent})"
    raise ModuleNotFoundError(
        f"{SOURCE_ENV}={raw}: no easyeditor/__init__.py under it{hint}. Point it at an EasyEdit checkout, e.g. "
        f"unpack ../shared/vendor/EasyEdit-*.tar.gz and use the folder holding easyeditor/ and hparams/ "
        f"(`EASYEDIT_TREE=1 bash scripts/install.sh` does this into .venv/src/), or unset it for the PyPI release")


def _use_source_tree() -> None:
    root = source_tree()
    if root is None:
        return
    loaded = sys.modules.get("easyeditor")
    if loaded is not None:
        where = Path(getattr(loaded, "__file__", "") or "").resolve()
        if root not in where.parents:
            raise ImportError(
                f"easyeditor was already imported from {where.parent} before {SOURCE_ENV}={root} took effect; "
                f"set {SOURCE_ENV} before the process imports easyeditor (e.g. in the shell)")
        return
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))


def _importer_of(error: BaseException) -> Optional[str]:
    """The easyeditor module whose import statement raised ``error`` (its deepest easyeditor frame)."""
    for frame in reversed(traceback.extract_tb(error.__traceback__)):
        filename = frame.filename
        path = Path(filename)
        if "easyeditor" not in path.parts:
            continue
        parts = path.with_suffix("").parts
        parts = parts[len(parts) - 1 - parts[::-1].index("easyeditor"):]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        return ".".join(parts)
    return None


def _import_with_stand_ins(module: str) -> types.ModuleType:
    for _ in range(64):  # each pass stands in for one more module; the tree needs about ten
        try:
            return importlib.import_module(module)
        except ModuleNotFoundError as e:
            missing = (e.name or "").split(".")[0]
            importer = _importer_of(e) if missing in OPTIONAL_PACKAGES else None
            if importer is None or importer in sys.modules:
                raise
            why = f"it needs the package {missing!r}, which is not installed (multimodal / API features only)"
            # Start the package over: modules imported during the failed pass may hold half-initialised
            # ones (easyeditor's imports are circular), e.g. an editor module without ALG_DICT.
            for name in [m for m in sys.modules if m.split(".")[0] == "easyeditor" and m not in STAND_INS]:
                del sys.modules[name]
            sys.modules[importer] = _stand_in_module(importer, why)
            STAND_INS[importer] = why
    raise ImportError(f"{module}: too many modules with missing optional packages ({sorted(STAND_INS)})")


def import_easyeditor(module: str = "easyeditor") -> types.ModuleType:
    """Import an easyeditor module by full path (``easyeditor.models`` is shadowed at package level), from
    ``$EASYEDIT_SOURCE`` when it is set."""
    install_stubs()
    _use_source_tree()
    try:
        return _import_with_stand_ins(module)
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith("easyeditor"):
            raise ModuleNotFoundError(
                f"{module} not found: install easyeditor with `pip install --no-deps --pre easyeditor==0.0.1.dev0` "
                f"(scripts/install.sh does this with its working dependency set), or set {SOURCE_ENV} to a checkout "
                "of EasyEdit's GitHub tree"
            ) from e
        raise


def easyeditor_origin() -> dict[str, str]:
    """Which easyeditor this process uses: ``{"kind": "release"|"source tree", "path": ..., "version": ...}``."""
    pkg = import_easyeditor("easyeditor")
    path = Path(pkg.__file__).resolve().parent
    try:
        import importlib.metadata as md

        dist = md.distribution("easyeditor")
        installed = Path(str(dist.locate_file("easyeditor"))).resolve()
    except Exception:  # noqa: BLE001 - no installed distribution
        dist, installed = None, None
    if dist is not None and installed == path:
        return {"kind": "release", "path": str(path), "version": dist.version}
    version = path.parent.name if path.parent.name.lower().startswith("easyedit") else "unknown commit"
    return {"kind": "source tree", "path": str(path), "version": version}


# -- device redirect --------------------------------------------------------------------------------
def _is_cuda(x: Any) -> bool:
    if isinstance(x, str):
        return x == "cuda" or x.startswith("cuda:")
    return isinstance(x, torch.device) and x.type == "cuda"


class _CudaRedirect(TorchFunctionMode):
    """Rewrites CUDA device arguments of every torch call to ``target``."""

    def __init__(self, target: torch.device):
        super().__init__()
        self.target = target

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: A002 - torch's signature
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0].to(self.target)
        args = tuple(self.target if _is_cuda(a) else a for a in args)
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            kwargs = {**kwargs, "device": self.target}
        return func(*args, **kwargs)


_local = threading.local()


def redirect_target(requested: Optional[str] = None) -> Optional[torch.device]:
    """Where ``cuda:N`` goes: ``requested`` if given, else CPU when CUDA is unavailable, else nowhere."""
    if requested is not None:
        dev = torch.device(requested)
        return None if dev.type == "cuda" else dev
    return None if torch.cuda.is_available() else torch.device("cpu")


@contextlib.contextmanager
def temporarily(obj: Any, name: str, value: Any) -> Iterator[None]:
    """``obj.name = value`` inside the block, the old value back afterwards, also on failure; nothing for a None
    ``value``. easyeditor's functions look these attributes up at every call, so the swap takes effect at once."""
    if value is None:
        yield
        return
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


@contextlib.contextmanager
def cuda_redirect(target: Optional[torch.device]) -> Iterator[None]:
    """Inside, easyeditor's ``.to("cuda:0")``, ``device="cuda:0"`` etc. land on ``target`` (re-entrant)."""
    if target is None or getattr(_local, "depth", 0) > 0:
        _local.depth = getattr(_local, "depth", 0) + 1
        try:
            yield
        finally:
            _local.depth -= 1
        return
    _local.depth = 1
    try:
        with _CudaRedirect(target):
            yield
    finally:
        _local.depth = 0


# -- tuple view of traced decoder-layer outputs -------------------------------------------------------
class _TupleView:
    """A traced layer whose ``output`` is seen as a tuple, as in transformers < 4.54."""

    def __init__(self, trace: Any):
        self._trace = trace

    @property
    def output(self) -> Any:
        out = self._trace.output
        return (out,) if isinstance(out, torch.Tensor) else out

    def __getattr__(self, name: str) -> Any:
        return getattr(self._trace, name)


def tuple_view_nethook(nethook: types.ModuleType) -> types.ModuleType:
    """A copy of easyeditor's ``nethook`` module whose ``TraceDict`` edits/returns tuple views."""
    base = nethook.TraceDict

    class TupleViewTraceDict(base):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, edit_output: Any = None, **kwargs: Any):
            if edit_output is not None:
                user_edit = edit_output

                def edit_output(out: Any, layer: str) -> Any:
                    if isinstance(out, torch.Tensor):
                        return user_edit((out,), layer)[0]
                    return user_edit(out, layer)

            super().__init__(*args, edit_output=edit_output, **kwargs)

        def __getitem__(self, key: str) -> Any:
            return _TupleView(super().__getitem__(key))

    return _nethook_copy(nethook, TraceDict=TupleViewTraceDict, __revive_tuple_view__=True)


def _nethook_copy(nethook: types.ModuleType, **replaced: Any) -> types.ModuleType:
    """A module with ``nethook``'s public names, some ``replaced`` (patched into one easyeditor module only)."""
    proxy = types.ModuleType(nethook.__name__)
    proxy.__dict__.update({k: v for k, v in vars(nethook).items() if not k.startswith("__")})
    proxy.__dict__.update(replaced)
    return proxy


# -- representation passes that stop at the layer they read --------------------------------------------
def stopping_nethook(nethook: types.ModuleType) -> types.ModuleType:
    """A copy of easyeditor's ``nethook`` whose ``Trace`` stops the forward pass after the traced module.

    easyeditor's own ``stop=True`` option: the module's input/output are retained, then the rest of the
    network is skipped (it cannot change them). Used for MEMIT's key and representation passes.
    """
    base = nethook.Trace

    class StoppingTrace(base):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, stop: bool = True, **kwargs: Any):
            super().__init__(*args, stop=stop, **kwargs)

    return _nethook_copy(nethook, Trace=StoppingTrace)
