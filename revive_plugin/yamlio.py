"""YAML reading in which ``5e-4`` is a number, as in EasyEdit's hparams and YAML 1.2 (PyYAML reads it as a string)."""
from __future__ import annotations

import re
from typing import IO, Any, Union

import yaml


class Loader(yaml.SafeLoader):
    """PyYAML's safe loader plus YAML 1.2's exponent floats without a dot (``5e-4``, ``1E3``, ``-2e+1``).

    EasyEdit converts such strings in the top level of its hparams (``construct_float_from_scientific_notation``);
    reading them as numbers everywhere (run configs, ``--set``, ``--grid``, nested blocks) keeps one meaning.
    """


Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load(stream: Union[str, bytes, IO[Any]]) -> Any:
    """``yaml.safe_load`` with exponent floats read as numbers."""
    return yaml.load(stream, Loader=Loader)  # noqa: S506 - Loader is a SafeLoader subclass
