"""pycluster: highly available Python services on NATS JetStream.

The public API re-exported here is documented in docs/ (getting started, concepts, hooks).
"""

from __future__ import annotations

__version__ = "0.1.0"

from .apibus import ForKey, ToAny, ToLeader, ToNode
from .app import App
from .audit import AuditEntry, AuditFilter
from .backend import HealthCheck
from .breaker import BreakerPolicy
from .builtin.process import Process
from .context import Context
from .errors import (
    CallTimeoutError,
    CircuitOpenError,
    ConfigError,
    DuplicateNodeError,
    EmbeddedServerConflictError,
    InvalidNameError,
    KeyExistsError,
    LockLostError,
    LockTimeoutError,
    NatsUnavailableError,
    NodeFailedError,
    NodeReplacedError,
    NoInstanceError,
    NoLiveNodesError,
    NoSuchAppError,
    NotLeaderError,
    PayloadTooLargeError,
    PluginError,
    PyclusterError,
    ReadNotConfirmedError,
    RemoteError,
    RevisionMismatchError,
    UnauthorizedError,
    UnclaimedOptionError,
)
from .events import Event
from .health import CheckResult, CheckStatus
from .middleware import AuthMiddleware, Middleware, Request, SignedAuth
from .options import AvoidLabel, Election, OnLabel, OnNodes, Replicas, Singleton, Spread
from .platform import Platform
from .plugins import hookimpl
from .registry import FailurePolicy, Stage, StageOrder
from .rpc import RetryPolicy
from .types import Role

__all__ = [
    "App",
    "AuditEntry",
    "AuditFilter",
    "AuthMiddleware",
    "AvoidLabel",
    "BreakerPolicy",
    "CallTimeoutError",
    "CheckResult",
    "CheckStatus",
    "CircuitOpenError",
    "ConfigError",
    "Context",
    "DuplicateNodeError",
    "Election",
    "EmbeddedServerConflictError",
    "Event",
    "FailurePolicy",
    "ForKey",
    "HealthCheck",
    "InvalidNameError",
    "KeyExistsError",
    "LockLostError",
    "LockTimeoutError",
    "Middleware",
    "NatsUnavailableError",
    "NoInstanceError",
    "NoLiveNodesError",
    "NoSuchAppError",
    "NodeFailedError",
    "NodeReplacedError",
    "NotLeaderError",
    "OnLabel",
    "OnNodes",
    "PayloadTooLargeError",
    "Platform",
    "PluginError",
    "Process",
    "PyclusterError",
    "ReadNotConfirmedError",
    "RemoteError",
    "Replicas",
    "Request",
    "RetryPolicy",
    "RevisionMismatchError",
    "Role",
    "SignedAuth",
    "Singleton",
    "Spread",
    "Stage",
    "StageOrder",
    "ToAny",
    "ToLeader",
    "ToNode",
    "UnauthorizedError",
    "UnclaimedOptionError",
    "__version__",
    "hookimpl",
]
