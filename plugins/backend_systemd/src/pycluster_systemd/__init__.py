"""pycluster-systemd: run a systemd unit while the app is active on this node.

``from pycluster_systemd import Systemd`` and pass ``Systemd("convex-backend")`` to
``App(...)``; in a config file the section is ``systemd:``.
"""

from .backend import SystemdBackend, SystemdUnitError
from .options import Systemd

__all__ = ["Systemd", "SystemdBackend", "SystemdUnitError"]
