"""pycluster: highly available Python services on NATS JetStream.

The public API re-exported here is documented in docs/ (getting started, concepts, hooks).
"""

from __future__ import annotations

__version__ = "0.1.0"

from .backend import HealthCheck
from .builtin.api.breaker import BreakerPolicy
from .builtin.api.bus import ForKey, ToAny, ToLeader, ToNode
from .builtin.audit.query import AuditEntry, AuditFilter
from .builtin.events.bus import Event
from .builtin.health.checks import CheckResult, CheckStatus
from .builtin.process import Process
from .builtin.rpc.service import RetryPolicy
from .kernel.app import App
from .kernel.context import Context, correlation
from .kernel.errors import (
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
from .kernel.leaf import HubListen, LeafOf
from .kernel.options import (
    AvoidLabel,
    AwayFromApp,
    Budget,
    Election,
    OnLabel,
    OnNodes,
    PreferLabel,
    PreferNode,
    Rebalance,
    Replicas,
    Singleton,
    Spread,
    Strategy,
    WithApp,
)
from .kernel.platform import Platform
from .kernel.stages import FailurePolicy, Stage, StageOrder
from .kernel.types import Role
from .kernel.zones import Partition, PromoteOnHubFailure, ZoneFencedError
from .middleware import AuthMiddleware, Middleware, Request, SignedAuth
from .plugins import hookimpl

__all__ = [
    "App",
    "AuditEntry",
    "AuditFilter",
    "AuthMiddleware",
    "AvoidLabel",
    "AwayFromApp",
    "BreakerPolicy",
    "Budget",
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
    "HubListen",
    "InvalidNameError",
    "KeyExistsError",
    "LeafOf",
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
    "Partition",
    "PayloadTooLargeError",
    "Platform",
    "PluginError",
    "PreferLabel",
    "PreferNode",
    "Process",
    "PromoteOnHubFailure",
    "PyclusterError",
    "ReadNotConfirmedError",
    "Rebalance",
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
    "Strategy",
    "ToAny",
    "ToLeader",
    "ToNode",
    "UnauthorizedError",
    "UnclaimedOptionError",
    "WithApp",
    "ZoneFencedError",
    "__version__",
    "correlation",
    "hookimpl",
]
