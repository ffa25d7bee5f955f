"""Tests of EasyEdit's GitHub tree: they run in their own pytest session with ``$EASYEDIT_SOURCE`` set (``make
test`` runs them after the main suite); in a session on the PyPI release they are skipped, saying so."""
import os

import pytest

from revive_plugin.adapters.compat import SOURCE_ENV


def pytest_collection_modifyitems(config, items):
    if os.environ.get(SOURCE_ENV):
        return
    skip = pytest.mark.skip(reason=f"EasyEdit tree tests: run `{SOURCE_ENV}=<checkout> pytest tests/tree` "
                                   "(make test does, from ../shared/vendor)")
    here = os.path.dirname(__file__)
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(skip)
