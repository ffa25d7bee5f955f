"""revive-plugin: REVIVE's spectral filter for sequential knowledge editing, as an EasyEdit plugin.

The math (``energy_rank``, ``safe_update``, ``ReviveConfig``, ``ReviveFilter``) imports no editing
framework; ``revive_plugin.adapters`` is the only code that knows EasyEdit.
"""
from .config import ReviveConfig
from .filter import ReviveFilter
from .hookspecs import EditContext, hookimpl, hookspec
from .host import EditRejected, PluginHost, get_plugin_manager
from .spectral import energy_rank, project_out, project_out_factors, protected_basis, safe_update

__all__ = [
    "EditContext",
    "EditRejected",
    "PluginHost",
    "ReviveConfig",
    "ReviveFilter",
    "energy_rank",
    "get_plugin_manager",
    "hookimpl",
    "hookspec",
    "project_out",
    "project_out_factors",
    "protected_basis",
    "safe_update",
]
__version__ = "0.1.0"
