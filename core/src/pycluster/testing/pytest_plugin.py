"""pytest plugin of pycluster: NATS fixtures and strict mode.

Enabled by the ``pytest11`` entry point ``pycluster`` once pycluster-core is installed (before
that: ``pytest -p pycluster.testing.pytest_plugin``).

Fixtures:

- ``nats_server`` (session): one shared JetStream server. Tests sharing it must use unique
  bucket/stream/platform names: take them from ``unique_name``.
- ``nats_url`` : its client URL.
- ``unique_name``: ``t`` + 8 hex digits, valid as a NATS bucket, stream or platform name.
- ``nats_cluster`` (function): a fresh 3-server :class:`~pycluster.testing.NatsCluster` with
  partition / kill / pause / restart.
- ``make_platform`` (function, needs pytest-asyncio): ``await make_platform("n1", app, ...)``
  builds a `~pycluster.Platform` named ``unique_name`` on the shared server with the core's
  default plugins (no entry points; ``extra_plugins=[(name, plugin)]`` adds some,
  ``disabled_plugins=[name]`` leaves some out), short test
  timings, and starts it (``start=False`` to start it yourself); the started ones are stopped
  at teardown, in reverse order.

Strict mode: with ``PYCLUSTER_STRICT=1`` in the environment (or ``--pycluster-strict``), every
skipped test is reported as failed, with the skip reason, so CI cannot go green by skipping
(e.g. because a component is missing). A skip raised during setup (a ``skipif`` mark, a fixture
that skips, :func:`require` in a fixture) is reported as an error, a skip inside the test body as
a failure; a skip at collection (module-level ``pytest.skip``/``importorskip``) fails the
collection. ``xfail`` is left alone.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Callable, Generator, Iterator
from contextlib import AsyncExitStack
from typing import Any

import pytest

from pycluster.kernel.embedded import find_nats_server

from .servers import NatsCluster, NatsServer

try:  # make_platform is an async fixture: pytest-asyncio runs it (an optional dependency)
    import pytest_asyncio
except ImportError:  # pragma: no cover - without pytest-asyncio there is no make_platform
    pytest_asyncio = None  # type: ignore[assignment]

__all__ = ["STRICT_ENV", "require", "strict_mode"]

STRICT_ENV = "PYCLUSTER_STRICT"
_STRICT_OPTION = "--pycluster-strict"


def strict_mode(config: pytest.Config | None = None) -> bool:
    """True when skips must fail: ``PYCLUSTER_STRICT`` is 1/true/yes/on, or ``config`` was given
    ``--pycluster-strict``."""
    if os.environ.get(STRICT_ENV, "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    return bool(config is not None and config.getoption("pycluster_strict", False))


def require(component: str, available: bool, reason: str) -> None:
    """Skip the current test unless ``component`` is ``available`` (a failure in strict mode).

    Example::

        require("podman", shutil.which("podman") is not None, "podman is not installed")
    """
    if not available:
        pytest.skip(f"{component} unavailable: {reason}")


# -- hooks -------------------------------------------------------------------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    """Add ``--pycluster-strict`` (same as ``PYCLUSTER_STRICT=1``)."""
    parser.getgroup("pycluster").addoption(
        _STRICT_OPTION,
        action="store_true",
        dest="pycluster_strict",
        default=False,
        help=f"report skipped tests as failures (same as {STRICT_ENV}=1)",
    )


def pytest_configure(config: pytest.Config) -> None:
    """Register the ``slow`` marker (harmless if the project's ini already does)."""
    config.addinivalue_line(
        "markers", "slow: multi-process end-to-end tests (`-m 'not slow'` is the quick loop)"
    )


def _skip_reason(report: pytest.TestReport | pytest.CollectReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


def _fail_skip(report: pytest.TestReport | pytest.CollectReport) -> None:
    reason = _skip_reason(report)
    report.outcome = "failed"
    report.longrepr = (
        f"skipped in strict mode ({STRICT_ENV}=1), which counts as a failure: {reason}"
    )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """In strict mode, turn a skipped test (not an xfail) into a failure."""
    report = yield
    if report.skipped and not hasattr(report, "wasxfail") and strict_mode(item.config):
        _fail_skip(report)
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(
    collector: pytest.Collector,
) -> Generator[None, pytest.CollectReport, pytest.CollectReport]:
    """In strict mode, a module skipped at collection fails its collection."""
    report = yield
    if report.skipped and strict_mode(collector.config):
        _fail_skip(report)
    return report


# -- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def nats_server() -> Iterator[NatsServer]:
    """A JetStream nats-server shared by the whole session (stopped at its end).

    Skips (fails in strict mode) when no nats-server binary is installed.
    """
    try:
        find_nats_server()
    except FileNotFoundError as exc:
        require("nats-server", False, str(exc))
    server = NatsServer()
    server.start_sync()  # a failed start removes the server's temporary directory itself
    try:
        yield server
    finally:
        server.stop_sync()


@pytest.fixture
def nats_url(nats_server: NatsServer) -> str:
    """Client URL of the shared session server."""
    return nats_server.url


@pytest.fixture
def unique_name() -> str:
    """A fresh name per test (``t`` + 8 hex digits): a valid bucket, stream or platform name."""
    return f"t{uuid.uuid4().hex[:8]}"


@pytest.fixture
def nats_cluster() -> Iterator[NatsCluster]:
    """A fresh 3-server JetStream cluster (all links healed, every process stopped after)."""
    try:
        find_nats_server()
    except FileNotFoundError as exc:
        require("nats-server", False, str(exc))
    cluster = NatsCluster(size=3)
    cluster.start_sync()
    try:
        yield cluster
    finally:
        cluster.stop_sync()


if pytest_asyncio is not None:

    @pytest_asyncio.fixture
    async def make_platform(nats_url: str,
                            unique_name: str) -> AsyncIterator[Callable[..., Any]]:
        """Build and start platforms on the shared server (stopped at teardown, in reverse).

        ``make(node_id, *apps, start=True, name=unique_name, extra_plugins=(),
        disabled_plugins=(), **platform_kw)`` returns the `~pycluster.Platform`; ``lease_ttl``
        defaults to 2 s, ``heartbeat_interval`` to 0.5 s and ``hook_timeout`` to 5 s.
        """
        from pycluster import Platform
        from pycluster.plugins import create_plugin_manager

        async with AsyncExitStack() as stack:

            async def make(node_id: str, *apps: Any, start: bool = True, **kw: Any) -> Platform:
                kw.setdefault("lease_ttl", 2.0)
                kw.setdefault("heartbeat_interval", 0.5)
                kw.setdefault("hook_timeout", 5.0)
                extra = kw.pop("extra_plugins", ())
                disabled = kw.pop("disabled_plugins", ())
                pm = create_plugin_manager(load_entrypoints=False, extra=extra, disabled=disabled)
                p = Platform(kw.pop("name", unique_name), node_id=node_id, nats_url=nats_url,
                             plugin_manager=pm, **kw)
                for app in apps:
                    p.register(app)
                # Also when the test starts it itself: a node left running at teardown keeps
                # tasks alive until the event loop closes (stop is a no-op if it never ran).
                stack.push_async_callback(p.stop)
                if start:
                    await p.start()
                return p

            yield make
