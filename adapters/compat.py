"""Make PyPI easyeditor 0.0.1.dev0 importable and runnable here, without editing site-packages.

* its package ``__init__`` imports BLIP/torchvision code that breaks: harmless stand-ins are put in
  ``sys.modules`` first (multimodal editing is then unavailable, with a clear message);
* it hard-codes ``cuda:{device}``: ``cuda_redirect`` maps CUDA devices to the model's device;
* with transformers ≥ 4.54 decoder layers return a tensor where MEMIT's ``compute_z`` indexes a tuple:
  ``TupleViewTraceDict`` gives it a tuple view of traced layer outputs.
"""
from __future__ import annotations

import contextlib
import importlib
import sys
import threading
import types
from typing import Any, Iterator, Optional

import torch
from torch.overrides import TorchFunctionMode

_STUBBED = {
    "easyeditor.trainer.blip2_models": ["Blip2OPT", "MiniGPT4"],
    "easyeditor.dataset.processor.blip_processors": [
        "BlipImageEvalProcessor", "BlipImageTrainProcessor", "Blip2ImageTrainProcessor", "BlipCaptionProcessor",
    ],
}


def _unavailable(name: str) -> type:
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        raise ImportError(
            f"{name} (multimodal editing) is not available: revive-plugin stubs easyeditor's BLIP/torchvision "
            "modules, which do not import with this torch"
        )

    return type(name, (), {"__init__": __init__})


def install_stubs() -> None:
    """Put stand-ins for easyeditor's BLIP modules in ``sys.modules`` (idempotent)."""
    for module_name, names in _STUBBED.items():
        if module_name in sys.modules:
            continue
        stub = types.ModuleType(module_name)
        stub.__doc__ = "revive-plugin stand-in: multimodal editing is unavailable"
        stub.__all__ = []  # `from .blip2_models import *` imports nothing
        for n in names:
            setattr(stub, n, _unavailable(n))
        sys.modules[module_name] = stub


def import_easyeditor(module: str = "easyeditor") -> types.ModuleType:
    """Import an easyeditor module by full path (``easyeditor.models`` is shadowed at package level)."""
    install_stubs()
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith("easyeditor"):
            raise ModuleNotFoundError(
                f"{module} not found: install easyeditor with `pip install --no-deps --pre easyeditor==0.0.1.dev0` "
                "(scripts/install.sh does this with its working dependency set)"
            ) from e
        raise


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
