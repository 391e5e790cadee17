"""Public test harness of pycluster: real NATS servers, clusters with fault injection, waits.

The pytest fixtures (``nats_server``, ``nats_url``, ``nats_cluster``, ``unique_name``,
``make_platform``) and strict mode live in :mod:`pycluster.testing.pytest_plugin`, enabled by
the ``pytest11`` entry point of pycluster-core.
"""

from pycluster.kernel.embedded import (
    EmbeddedNatsServer,
    NatsServerError,
    NatsServerNotFoundError,
    find_nats_server,
    free_port,
)

from .proxy import BackgroundLoop, TcpProxy
from .servers import NatsCluster, NatsServer
from .wait import WaitTimeoutError, wait_for, wait_for_sync

__all__ = [
    "BackgroundLoop",
    "EmbeddedNatsServer",
    "NatsCluster",
    "NatsServer",
    "NatsServerError",
    "NatsServerNotFoundError",
    "TcpProxy",
    "WaitTimeoutError",
    "find_nats_server",
    "free_port",
    "require",
    "wait_for",
    "wait_for_sync",
]


def require(component: str, available: bool, reason: str) -> None:
    """Skip the current test unless ``component`` is available (a failure in strict mode).

    Same as :func:`pycluster.testing.pytest_plugin.require`; imported lazily so that using the
    harness outside pytest does not import pytest.
    """
    from .pytest_plugin import require as _require

    _require(component, available, reason)
