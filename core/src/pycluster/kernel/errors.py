"""Typed exceptions of pycluster. Each one carries the fields a caller needs to react."""

from __future__ import annotations


class PyclusterError(Exception):
    """Base class of every error pycluster raises on purpose."""


class ConfigError(PyclusterError, ValueError):
    """A setting or option is invalid: names the field, the value and why."""

    def __init__(self, field: str, value: object, reason: str) -> None:
        self.field = field
        self.value = value
        self.reason = reason
        super().__init__(f"invalid {field}={value!r}: {reason}")


class InvalidNameError(ConfigError):
    """A platform, app, node, key or lock name breaks the NATS naming rules."""


class PluginError(PyclusterError):
    """A plugin could not be loaded or used; names the plugin and its distribution."""

    def __init__(self, plugin: str, distribution: str | None, version: str | None, reason: str,
                 *, message: str | None = None) -> None:
        self.plugin = plugin
        self.distribution = distribution
        self.version = version
        self.reason = reason
        dist = f" ({distribution} {version})" if distribution else ""
        super().__init__(message or f"plugin {plugin!r}{dist}: {reason}")


class UnclaimedOptionError(PyclusterError, TypeError):
    """An App option that no installed plugin claims."""

    def __init__(self, app: str, option: object, distribution: str | None) -> None:
        self.app = app
        self.option = option
        self.distribution = distribution
        hint = (
            f"it is provided by the distribution {distribution!r}; install or enable it"
            if distribution
            else "no installed plugin knows this option type"
        )
        super().__init__(
            f"app {app!r}: option {type(option).__name__} is not claimed by any plugin: {hint}"
        )


class NatsUnavailableError(PyclusterError, ConnectionError):
    """NATS could not be reached, or has no JetStream."""

    def __init__(self, servers: list[str], reason: str) -> None:
        self.servers = servers
        self.reason = reason
        super().__init__(f"NATS at {', '.join(servers)}: {reason}")


class DuplicateNodeError(PyclusterError):
    """Another live process already runs this node id in this platform."""

    def __init__(self, platform: str, node_id: str, holder: dict[str, object] | None = None):
        self.platform = platform
        self.node_id = node_id
        self.holder = holder or {}
        where = self.holder.get("address") or self.holder.get("host") or "another process"
        super().__init__(
            f"node id {node_id!r} is already alive in platform {platform!r} ({where}); "
            "stop it first or choose another node id"
        )


class NodeReplacedError(PyclusterError):
    """Another process took this node id over (confirmed: it answers for the new record);
    this process left. ``pycluster run`` exits with `exit_code` (4)."""

    exit_code = 4

    def __init__(self, platform: str, node_id: str) -> None:
        self.platform = platform
        self.node_id = node_id
        super().__init__(f"node id {node_id!r} of platform {platform!r} was taken over by "
                         "another process; this process left")


class NodeFailedError(PyclusterError):
    """An internal task of this node died and cannot be restarted; the node left.
    ``pycluster run`` exits with `exit_code` (3)."""

    exit_code = 3

    def __init__(self, what: str, cause: BaseException) -> None:
        self.what = what
        self.cause = cause
        super().__init__(f"{what} failed and cannot be restarted: "
                         f"{type(cause).__name__}: {cause}")


class KeyExistsError(PyclusterError):
    """`kv.create()` on a key that already has a value."""

    def __init__(self, bucket: str, key: str) -> None:
        self.bucket = bucket
        self.key = key
        super().__init__(f"key {key!r} already exists in {bucket}")


class RevisionMismatchError(PyclusterError):
    """A conditional write (`kv.update()`, `kv.delete(revision=)`) met a newer revision."""

    def __init__(self, bucket: str, key: str, expected: int) -> None:
        self.bucket = bucket
        self.key = key
        self.expected = expected
        super().__init__(f"key {key!r} in {bucket}: revision is no longer {expected}")


class ReadNotConfirmedError(PyclusterError, TimeoutError):
    """A linearizable read could not be confirmed by the stream's quorum in time.

    Raised instead of returning a value that may be stale: the reader's NATS server is cut off
    from the majority, or the stream is electing a leader. Retry, or read with ``stale_ok=True``.
    """

    def __init__(self, bucket: str, key: str, timeout: float) -> None:
        self.bucket = bucket
        self.key = key
        self.timeout = timeout
        super().__init__(
            f"read of {key!r} in {bucket} not confirmed by the stream's quorum within "
            f"{timeout:g}s (server cut off, or stream leader election); retry, or pass "
            "stale_ok=True to accept a possibly stale value"
        )


class NotLeaderError(PyclusterError):
    """An operation that needs leadership ran on a node that does not hold it."""

    def __init__(self, app: str, leader: str | None, epoch: int | None) -> None:
        self.app = app
        self.leader = leader
        self.epoch = epoch
        super().__init__(
            f"app {app!r}: this node is not the leader (leader={leader}, epoch={epoch})"
        )


class NoLiveNodesError(PyclusterError, LookupError):
    """No node of the platform is alive on this NATS: a wrong platform name or NATS URL?

    :ivar platform: the platform asked for.
    :ivar servers: the NATS URLs that were asked (passwords masked).
    :ivar platforms: platforms that have nodes records on this NATS (to spot a typo).
    """

    def __init__(self, platform: str, servers: list[str], platforms: list[str]) -> None:
        self.platform = platform
        self.servers = servers
        self.platforms = platforms
        known = ", ".join(platforms) if platforms else "none"
        super().__init__(
            f"no node of platform {platform!r} is alive (NATS at {', '.join(servers)}; "
            f"platforms found there: {known})"
        )


class EmbeddedServerConflictError(PyclusterError):
    """Another node of the platform already runs an embedded nats-server on this data root.

    A second embedded server would make a separate one-node cluster with its own leader (two
    "leaders" that never see each other). Several nodes on one machine share one nats-server.

    :ivar platform: the platform.
    :ivar lock: the lock file under the data root.
    :ivar holder: what the first node wrote there (node_id, pid, url), possibly empty.
    """

    def __init__(self, platform: str, lock: str, holder: dict[str, object]) -> None:
        self.platform = platform
        self.lock = lock
        self.holder = holder
        who = ", ".join(f"{k} {holder[k]}" for k in ("node_id", "pid", "url") if k in holder)
        super().__init__(
            f"platform {platform!r} already runs an embedded nats-server on this machine "
            f"({who or 'starting'}; lock {lock}); a second one would be a separate one-node "
            "cluster electing its own leader. For several nodes on one machine, start one "
            "nats-server (nats-server -js -sd <dir>) and give every node its URL, e.g. "
            "nats_url='nats://127.0.0.1:4222' (docs/getting-started.md, \"Several nodes on one "
            "machine\"); for an unrelated platform choose another name or data_dir"
        )


class NoSuchAppError(PyclusterError, LookupError):
    """No live node of the platform runs the app: a wrong app or platform name?

    :ivar platform: the platform.
    :ivar app: the app asked for.
    :ivar apps: the apps that its live nodes run.
    """

    def __init__(self, platform: str, app: str, apps: list[str]) -> None:
        self.platform = platform
        self.app = app
        self.apps = apps
        known = ", ".join(apps) if apps else "none"
        super().__init__(
            f"no app {app!r} on platform {platform!r} (apps of its live nodes: {known})"
        )


class LockTimeoutError(PyclusterError, TimeoutError):
    """A lock was not acquired within its timeout."""

    def __init__(self, name: str, timeout: float, holder: str | None = None) -> None:
        self.name = name
        self.timeout = timeout
        self.holder = holder
        super().__init__(f"lock {name!r} not acquired within {timeout}s (held by {holder})")


class LockLostError(PyclusterError):
    """A held lock could not be renewed and expired; the fencing token is no longer valid."""

    def __init__(self, name: str, token: int) -> None:
        self.name = name
        self.token = token
        super().__init__(f"lock {name!r} (token {token}) was lost")


class PayloadTooLargeError(PyclusterError, ValueError):
    """A value or message exceeds the server's limit; nothing was sent."""

    def __init__(self, size: int, limit: int, what: str = "payload") -> None:
        self.size = size
        self.limit = limit
        super().__init__(f"{what} of {size} bytes exceeds the limit of {limit} bytes")


# -- communication (RPC, API bus, events) ------------------------------------------------------


class RemoteError(PyclusterError):
    """A remote handler (or the server side of a call) failed; raised on the caller's side.

    :ivar app: the app that was called.
    :ivar method: the method that was called.
    :ivar type: the class name of the exception raised remotely (e.g. ``"ValueError"``).
    :ivar message: its message.
    :ivar code: a stable, machine-readable code: the exception's ``code`` attribute when it has
        one, else one of ``handler_error``, ``unknown_method``, ``bad_request``,
        ``invalid_request`` (pydantic validation), ``unauthorized``, ``reply_too_large``,
        ``deadline_exceeded``, ``cancelled``, ``overloaded`` (the node runs its limit of
        handlers for the app already, ``max_inflight``: the handler did not run, retry later),
        ``bad_reply`` (the reply could not be read: not from a pycluster node).
    :ivar node: the node that answered, when known.
    :ivar details: extra JSON data (e.g. pydantic's error list), or None.
    """

    def __init__(
        self,
        app: str,
        method: str,
        type: str,
        message: str,
        code: str = "handler_error",
        node: str | None = None,
        details: object = None,
    ) -> None:
        self.app = app
        self.method = method
        self.type = type
        self.message = message
        self.code = code
        self.node = node
        self.details = details
        where = f" on {node}" if node else ""
        super().__init__(f"{app}.{method}{where} failed [{code}]: {type}: {message}")


class NoInstanceError(PyclusterError, LookupError):
    """No instance of the app can take the call (none runs, or the target node does not).

    Raised at once, without waiting for a timeout.

    :ivar app: the target app.
    :ivar route: the route that was asked for (``"leader"``, ``"any"``, ``"node:n1"``, ...).
    :ivar reason: why nothing could answer.
    """

    def __init__(self, app: str, route: str, reason: str) -> None:
        self.app = app
        self.route = route
        self.reason = reason
        super().__init__(f"no instance of app {app!r} for route {route}: {reason}")


class CallTimeoutError(PyclusterError, TimeoutError):
    """A call got no answer before its deadline.

    :ivar app: the target app.
    :ivar method: the method.
    :ivar timeout: the call's timeout in seconds.
    :ivar route: the route (``"leader"``, ``"node:n1"``, ...).
    :ivar reason: what was seen while waiting (e.g. "no leader answered: failover in progress").
    """

    def __init__(self, app: str, method: str, timeout: float, route: str, reason: str = "") -> None:
        self.app = app
        self.method = method
        self.timeout = timeout
        self.route = route
        self.reason = reason
        extra = f": {reason}" if reason else ""
        super().__init__(f"{app}.{method} via {route}: no answer within {timeout:g}s{extra}")


class CircuitOpenError(PyclusterError):
    """The circuit breaker of the target app is open: the call was refused without sending.

    :ivar app: the target app.
    :ivar failures: consecutive failures that opened it.
    :ivar retry_after: seconds until a probe call is let through.
    """

    def __init__(self, app: str, failures: int, retry_after: float) -> None:
        self.app = app
        self.failures = failures
        self.retry_after = retry_after
        super().__init__(
            f"circuit to app {app!r} is open after {failures} consecutive failures; "
            f"next probe in {retry_after:.2f}s"
        )


class UnauthorizedError(PyclusterError, PermissionError):
    """A server-side middleware refused a request (missing or wrong credentials).

    The caller receives it as a `RemoteError` with ``code == "unauthorized"``.

    :ivar reason: why the request was refused.
    """

    code = "unauthorized"

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)
