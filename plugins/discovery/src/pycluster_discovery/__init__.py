"""pycluster-discovery: a service registry that follows app roles, with health checks and DNS.

``from pycluster_discovery import Service, HttpCheck`` and pass
``Service("http", port=8080, health=HttpCheck("/healthz"))`` to ``App(...)``; look instances
up with ``platform.service("discovery").lookup("http")``. In a config file the section is
``discovery:``.
"""

from pycluster.kernel.discovery import ServiceChange, ServiceInstance

from .options import HttpCheck, PyCheck, Service, TcpCheck
from .registry import KvServiceRegistry
from .service import Discovery

__all__ = ["Discovery", "HttpCheck", "KvServiceRegistry", "PyCheck", "Service",
           "ServiceChange", "ServiceInstance", "TcpCheck"]
