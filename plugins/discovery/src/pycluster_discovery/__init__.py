"""pycluster-discovery: a service registry that follows app roles, with health checks and DNS.

``from pycluster_discovery import Service, HttpCheck`` and pass
``Service("http", port=8080, health=HttpCheck("/healthz"))`` to ``App(...)``; look instances
up with ``platform.service("discovery").lookup("http")``. In a config file the section is
``discovery:``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pycluster.kernel.discovery import ServiceChange, ServiceInstance

    from .options import HttpCheck, PyCheck, Service, TcpCheck
    from .registry import KvServiceRegistry
    from .service import Discovery

# The public names are imported on first use (PEP 562): the command line imports this
# package for its command declarations only.
_EXPORTS: dict[str, str] = {
    "Discovery": ".service",
    "HttpCheck": ".options",
    "KvServiceRegistry": ".registry",
    "PyCheck": ".options",
    "Service": ".options",
    "ServiceChange": "pycluster.kernel.discovery",
    "ServiceInstance": "pycluster.kernel.discovery",
    "TcpCheck": ".options",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is not None:
        value = getattr(importlib.import_module(module, __name__), name)
    else:
        try:  # a submodule not imported yet
            value = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = ["Discovery", "HttpCheck", "KvServiceRegistry", "PyCheck", "Service",
           "ServiceChange", "ServiceInstance", "TcpCheck"]
