"""Modules imported on first use, so that streaming readers stay free of pyarrow.

The edge agent reads Zeek logs record by record (:mod:`flows.readers.stream`) and
never builds a table; importing pyarrow there would cost it about 100 MB of memory
for nothing. The reader modules therefore name pyarrow through a :class:`LazyModule`:
the name is bound at import time, the module is imported the first time an
attribute is looked up on it, which happens only where an Arrow array or table is
made. Nothing is put in ``sys.modules`` before that.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any


class LazyModule:
    """A stand-in for module ``name`` that imports it on first attribute access."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._module: ModuleType | None = None

    def __getattr__(self, attr: str) -> Any:
        module = self._module
        if module is None:
            module = self._module = importlib.import_module(self._name)
        return getattr(module, attr)

    def __repr__(self) -> str:
        state = "imported" if self._module is not None else "not imported yet"
        return f"<lazy module {self._name!r} ({state})>"
