"""Public names imported on first use (PEP 562), for ``pycluster`` and its plugin packages:
the command line imports those packages for their command declarations only, and
``import pycluster.<submodule>`` should not load the whole toolkit.

Example (a package's ``__init__.py``)::

    _EXPORTS = {"Ring": ".options", "ring_of": ".plugin"}
    __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(package: str, exports: dict[str, str], namespace: dict[str, Any]
                 ) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The module ``__getattr__`` and ``__dir__`` of ``package``: a name of ``exports``
    (name → relative module) is imported from its module on first use, any other name as a
    submodule not imported yet; either is then cached in ``namespace`` (the package's
    ``globals()``)."""

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is not None:
            value = getattr(importlib.import_module(module, package), name)
        else:
            try:  # a submodule not imported yet (``pycluster.kernel`` after ``import pycluster``)
                value = importlib.import_module(f"{package}.{name}")
            except ModuleNotFoundError as exc:
                if exc.name != f"{package}.{name}":
                    raise
                raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted([*namespace, *exports])

    return __getattr__, __dir__
