"""pycluster: highly available Python services on NATS JetStream.

The public API re-exported here is documented in docs/ (getting started, concepts, hooks).
"""

from __future__ import annotations

__version__ = "0.1.0"

from typing import TYPE_CHECKING

from .lazy import lazy_exports

if TYPE_CHECKING:
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

# Where each public name lives: the names are imported on first use (PEP 562), so that
# `import pycluster.<submodule>` and the command line do not load the whole toolkit.
_EXPORTS: dict[str, str] = {
    "App": ".kernel.app",
    "AuditEntry": ".builtin.audit.query",
    "AuditFilter": ".builtin.audit.query",
    "AuthMiddleware": ".middleware",
    "AvoidLabel": ".kernel.options",
    "AwayFromApp": ".kernel.options",
    "BreakerPolicy": ".builtin.api.breaker",
    "Budget": ".kernel.options",
    "CallTimeoutError": ".kernel.errors",
    "CheckResult": ".builtin.health.checks",
    "CheckStatus": ".builtin.health.checks",
    "CircuitOpenError": ".kernel.errors",
    "ConfigError": ".kernel.errors",
    "Context": ".kernel.context",
    "DuplicateNodeError": ".kernel.errors",
    "Election": ".kernel.options",
    "EmbeddedServerConflictError": ".kernel.errors",
    "Event": ".builtin.events.bus",
    "FailurePolicy": ".kernel.stages",
    "ForKey": ".builtin.api.bus",
    "HealthCheck": ".backend",
    "HubListen": ".kernel.leaf",
    "InvalidNameError": ".kernel.errors",
    "KeyExistsError": ".kernel.errors",
    "LeafOf": ".kernel.leaf",
    "LockLostError": ".kernel.errors",
    "LockTimeoutError": ".kernel.errors",
    "Middleware": ".middleware",
    "NatsUnavailableError": ".kernel.errors",
    "NoInstanceError": ".kernel.errors",
    "NoLiveNodesError": ".kernel.errors",
    "NoSuchAppError": ".kernel.errors",
    "NodeFailedError": ".kernel.errors",
    "NodeReplacedError": ".kernel.errors",
    "NotLeaderError": ".kernel.errors",
    "OnLabel": ".kernel.options",
    "OnNodes": ".kernel.options",
    "Partition": ".kernel.zones",
    "PayloadTooLargeError": ".kernel.errors",
    "Platform": ".kernel.platform",
    "PluginError": ".kernel.errors",
    "PreferLabel": ".kernel.options",
    "PreferNode": ".kernel.options",
    "Process": ".builtin.process",
    "PromoteOnHubFailure": ".kernel.zones",
    "PyclusterError": ".kernel.errors",
    "ReadNotConfirmedError": ".kernel.errors",
    "Rebalance": ".kernel.options",
    "RemoteError": ".kernel.errors",
    "Replicas": ".kernel.options",
    "Request": ".middleware",
    "RetryPolicy": ".builtin.rpc.service",
    "RevisionMismatchError": ".kernel.errors",
    "Role": ".kernel.types",
    "SignedAuth": ".middleware",
    "Singleton": ".kernel.options",
    "Spread": ".kernel.options",
    "Stage": ".kernel.stages",
    "StageOrder": ".kernel.stages",
    "Strategy": ".kernel.options",
    "ToAny": ".builtin.api.bus",
    "ToLeader": ".builtin.api.bus",
    "ToNode": ".builtin.api.bus",
    "UnauthorizedError": ".kernel.errors",
    "UnclaimedOptionError": ".kernel.errors",
    "WithApp": ".kernel.options",
    "ZoneFencedError": ".kernel.zones",
    "correlation": ".kernel.context",
    "hookimpl": ".plugins",
}


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())



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
