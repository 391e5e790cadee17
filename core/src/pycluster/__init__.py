"""pycluster: highly available Python services on NATS JetStream.

The public API re-exported here is documented in docs/ (getting started, concepts, hooks).
"""

from __future__ import annotations

__version__ = "0.1.0"

from .app import App
from .builtin.process import Process
from .context import Context
from .errors import (
    ConfigError,
    DuplicateNodeError,
    InvalidNameError,
    KeyExistsError,
    LockLostError,
    LockTimeoutError,
    NatsUnavailableError,
    NotLeaderError,
    PayloadTooLargeError,
    PluginError,
    PyclusterError,
    RevisionMismatchError,
    UnclaimedOptionError,
)
from .options import AvoidLabel, Election, OnLabel, OnNodes, Replicas, Singleton, Spread
from .platform import Platform
from .plugins import hookimpl
from .registry import Stage, StageOrder
from .types import Role

__all__ = [
    "App",
    "AvoidLabel",
    "ConfigError",
    "Context",
    "DuplicateNodeError",
    "Election",
    "InvalidNameError",
    "KeyExistsError",
    "LockLostError",
    "LockTimeoutError",
    "NatsUnavailableError",
    "NotLeaderError",
    "OnLabel",
    "OnNodes",
    "PayloadTooLargeError",
    "Platform",
    "PluginError",
    "Process",
    "PyclusterError",
    "Replicas",
    "RevisionMismatchError",
    "Role",
    "Singleton",
    "Spread",
    "Stage",
    "StageOrder",
    "UnclaimedOptionError",
    "__version__",
    "hookimpl",
]
