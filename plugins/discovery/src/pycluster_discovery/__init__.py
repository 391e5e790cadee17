"""pycluster-discovery: a service registry that follows app roles, with health checks and DNS.

``from pycluster_discovery import Service, HttpCheck`` and pass
``Service("http", port=8080, health=HttpCheck("/healthz"))`` to ``App(...)``; look instances
up with ``platform.service("discovery").lookup("http")``. In a config file the section is
``discovery:``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pycluster.lazy import lazy_exports

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


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())



__all__ = ["Discovery", "HttpCheck", "KvServiceRegistry", "PyCheck", "Service",
           "ServiceChange", "ServiceInstance", "TcpCheck"]
