"""Imported at start-up when scripts/device-check.sh puts this folder on PYTHONPATH.

Hides the packages named in ``$REVIVE_HIDE_MODULES`` (comma-separated) by putting ``None`` in ``sys.modules``:
importing one raises ModuleNotFoundError and ``importlib.util.find_spec`` answers None, as if it were not
installed. The GPU machine's image has multimodal packages (timm, torchvision, cv2) that the project's own
environment lacks; easyeditor's multimodal modules would import them instead of getting the stand-ins
``adapters/compat.py`` gives them, i.e. run code that is never run here. Then the interpreter's own
``sitecustomize`` (the next one on sys.path), if there is one, runs as it would have.
"""
import importlib.util
import os
import sys

for _name in (os.environ.get("REVIVE_HIDE_MODULES") or "").split(","):
    _name = _name.strip()
    if _name and _name not in sys.modules:
        sys.modules[_name] = None  # type: ignore[assignment]

_here = os.path.dirname(os.path.abspath(__file__))
for _entry in list(sys.path):
    _candidate = os.path.join(_entry or os.getcwd(), "sitecustomize.py")
    if os.path.abspath(os.path.dirname(_candidate)) == _here or not os.path.isfile(_candidate):
        continue
    _spec = importlib.util.spec_from_file_location("_next_sitecustomize", _candidate)
    if _spec is not None and _spec.loader is not None:
        _spec.loader.exec_module(importlib.util.module_from_spec(_spec))
    break
