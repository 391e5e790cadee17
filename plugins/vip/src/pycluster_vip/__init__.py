"""pycluster-vip: a virtual IP that follows the active instance of an app.

``from pycluster_vip import VIP`` and pass ``VIP("10.0.1.100/24", "eth0")`` to ``App(...)``;
in a config file the section is ``vip:``.
"""

from .manager import VipError, VipManager, VipStatus
from .options import VIP

__all__ = ["VIP", "VipError", "VipManager", "VipStatus"]
