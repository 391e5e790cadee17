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

    def __init__(self, plugin: str, distribution: str | None, version: str | None, reason: str):
        self.plugin = plugin
        self.distribution = distribution
        self.version = version
        self.reason = reason
        dist = f" ({distribution} {version})" if distribution else ""
        super().__init__(f"plugin {plugin!r}{dist}: {reason}")


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


class NotLeaderError(PyclusterError):
    """An operation that needs leadership ran on a node that does not hold it."""

    def __init__(self, app: str, leader: str | None, epoch: int | None) -> None:
        self.app = app
        self.leader = leader
        self.epoch = epoch
        super().__init__(f"app {app!r}: this node is not the leader (leader={leader}, epoch={epoch})")


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
