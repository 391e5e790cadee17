"""`Platform`: one node's membership in a named cluster, and the apps it may run.

The platform is the kernel's root object: it connects to NATS (a data and a control
connection), joins the membership, builds the services of the enabled plugins
(``pycluster_platform_services``), runs each app placed on this node through its
`AppRuntime`, and turns what happens into notification hooks (members joining and leaving,
connection state, lock events, ...). It never depends on a plugin's service: accessors such as
``platform.audit`` go through the services registry and raise `PluginError` naming the plugin
when it is missing.

Size: the kernel's root object: the start and stop sequences (read as one), the public
accessors, and the notification hooks it turns events into.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import json
import logging
import operator
import signal
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from dataclasses import replace
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from .. import __version__
from ..middleware import MiddlewareChain
from ..plugins import (
    PluginManager,
    call_each,
    call_notify,
    create_plugin_manager,
    distribution_of,
)
from . import backends
from .aio import TaskSet
from .app import App
from .app import app_of as kernel_app_of
from .connection import Connections, check_stream_replicas, replicas_error
from .context import Context
from .control import ControlPlane, decode_object, error_reply
from .coordinator import AppRuntime, run_hooks
from .election import Election
from .errors import (
    ConfigError,
    DuplicateNodeError,
    NodeFailedError,
    NodeReplacedError,
    PyclusterError,
    UnclaimedOptionError,
)
from .kv import AppKV
from .locks import Lock, LockService
from .membership import PRIORITY_LIMIT, Membership
from .names import app_subject, bucket, platform_subject, validate_ident
from .options import Replicas, check_timing
from .placement import Operations, Placement, merge_labels, read_operations, update_operations
from .registry import AppEventRegistry, BackendRegistry, OptionRegistry
from .replication import ReplicatorRegistry
from .services import PlatformServices
from .settings import PlatformSettings, load_settings
from .types import ConnectionState, MembershipEvent, NodeInfo, PluginStatus, Role
from .vip import VipRegistry

if TYPE_CHECKING:
    import nats.errors

    from ..builtin.api.bus import ApiClient
    from ..builtin.audit.log import AuditLog
    from ..builtin.events.bus import EventBus
    from ..builtin.health.service import PlatformHealth
    from ..builtin.leaf.remote import RemotePlatform
    from ..builtin.metrics.service import PlatformMetrics

log = logging.getLogger("pycluster")

_LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"
_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def default_logging() -> None:
    """Log to stderr at INFO, unless the application configured logging already (the root
    logger has a handler): a node that logs nothing hides why a backend did not start."""
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=logging.INFO, format=_LOG_FORMAT)


def _handler_is_default(sig: signal.Signals) -> bool:
    """Whether ``sig`` still has Python's or asyncio.run()'s own handler (not the app's)."""
    handler = signal.getsignal(sig)
    if handler in (signal.SIG_DFL, None):
        return True
    if sig == signal.SIGINT:
        if handler is signal.default_int_handler:
            return True
        func = getattr(getattr(handler, "func", None), "__func__", None)
        return isinstance(handler, functools.partial) and func is getattr(
            asyncio.runners.Runner, "_on_sigint", object())
    return False


class Platform:
    """One node of a named cluster ("prod").

    Example::

        platform = Platform("prod", node_id="node-1", labels={"zone": "a"})
        platform.register(app)
        await platform.run()            # until SIGTERM/SIGINT or cancelled

        async with Platform("prod", node_id="n1", nats_url="nats://127.0.0.1:4222") as p:
            ...                         # connected, apps started; left gracefully on exit

    :param name: the platform (cluster) name; it prefixes every bucket and subject.
    :param node_id: this node's id, unique among live nodes (default: the host name).
    :param nats_url: a URL, a list, or a comma-separated string; None starts an embedded
        nats-server with JetStream under the node's data directory.
    :param labels: node labels for placement.
    :param config_file: a YAML or TOML file with the same settings (lower precedence than
        keyword arguments and ``PYCLUSTER_*`` environment variables).
    :param plugin_manager: a prepared plugin manager (tests); default: built from entry points.
    :param settings: any other `PlatformSettings` field (``lease_ttl``, ``heartbeat_interval``,
        ``hook_timeout``, ``priority``, ``no_failover``, ``nats_creds``, ``tls_ca``, ...).
    """

    def __init__(
        self,
        name: str | None = None,
        *,
        node_id: str | None = None,
        nats_url: str | list[str] | None = None,
        labels: dict[str, str] | None = None,
        health_addr: str | None = None,
        metrics_addr: str | None = None,
        config_file: str | Path | None = None,
        plugin_manager: PluginManager | None = None,
        **settings: Any,
    ) -> None:
        self.settings: PlatformSettings = load_settings(
            config_file, name=name, node_id=node_id, nats_url=nats_url, labels=labels,
            health_addr=health_addr, metrics_addr=metrics_addr, **settings,
        )
        self.name = self.settings.name
        self.node_id = self.settings.node_id
        if self.settings.nats_url and (self.settings.hub or self.settings.leaf):
            field = "hub" if self.settings.hub else "leaf"
            raise ConfigError(field, "...", "hub/leaf configure the embedded nats-server "
                              "(nats_url unset); for a server of your own, write its leaf-node "
                              "configuration with `pycluster nats-config --hub/--leaf`")
        self.labels = dict(self.settings.labels)
        self.pm = plugin_manager or create_plugin_manager()
        self.options = OptionRegistry()
        self.backends = BackendRegistry()
        self.replicators = ReplicatorRegistry()
        self.vips = VipRegistry()
        self.app_events = AppEventRegistry()
        self.pm.hook.pycluster_register_options(registry=self.options)
        self.pm.hook.pycluster_register_backends(registry=self.backends)
        self.pm.hook.pycluster_register_replicators(registry=self.replicators)
        self.pm.hook.pycluster_register_vips(registry=self.vips)
        self.pm.hook.pycluster_app_events(registry=self.app_events)
        self.apps: dict[str, App] = {}
        self.runtimes: dict[str, AppRuntime] = {}
        self.nc: NATS | None = None
        self.js: JetStreamContext | None = None
        # The control plane's own connection (election, membership, step-down requests): a
        # flood on the data plane (self.nc) cannot hold up lease renewals.
        self.nc_control: NATS | None = None
        self.js_control: JetStreamContext | None = None
        self.connections = Connections()
        self.membership: Membership | None = None
        self.embedded: Any = None
        self.started_at: float | None = None
        self.plugin_mismatches: dict[str, dict[str, Any]] = {}
        self._tasks = TaskSet("platform", logger=log)
        self._subs: list[Any] = []
        self._locks: LockService | None = None
        self._stop_event: asyncio.Event | None = None
        self._running = False
        self._embedded_lock: Any = None
        self._signal_received: signal.Signals | None = None
        self._signal_task: asyncio.Task[Any] | None = None
        self._signal_restore: list[tuple[signal.Signals, Callable[..., Any] | int | None]] = []
        self._started_services: list[Any] = []
        #: Why the node stopped on its own (`fail`): `run` raises it after leaving.
        self.failure: PyclusterError | None = None
        self._in_run = False
        self._fail_task: asyncio.Task[None] | None = None
        #: Placement decisions (filters, scores, the rank of this node among standbys).
        self.placement = Placement(self)
        #: Serves and sends this node's control requests (step-down, ping).
        self.control = ControlPlane(self)
        #: The middleware chain around calls, handlers and events: plugins' first
        #: (``pycluster_middleware``), then those added with `pycluster.middleware.use`.
        self.middleware = MiddlewareChain()
        for contributed in self.pm.hook.pycluster_middleware(platform=self):
            for mw in contributed if isinstance(contributed, list | tuple) else [contributed]:
                if mw is not None:
                    self.middleware.add(mw)
        #: The services of the enabled plugins, in start order (``pycluster_platform_services``).
        self.services = PlatformServices(self.pm)
        self.pm.hook.pycluster_platform_services(platform=self, registry=self.services)
        self.services.build()

    def __repr__(self) -> str:
        return f"Platform({self.name!r}, node_id={self.node_id!r})"

    # -- apps -------------------------------------------------------------------------------

    def register(self, app: App) -> App:
        """Add an app; every plugin option must be claimed by an installed plugin, every app
        event it has hooks for must be fired by one, and the features it declared (RPC and
        API handlers) need their plugins (`PluginError` naming a missing one)."""
        if app.name in self.apps:
            raise ConfigError("app", app.name, "an app of this name is already registered")
        if self._running:
            raise ConfigError("app", app.name, "register apps before the platform starts")
        for opt in app.options:
            if self.backends.for_option(opt) is not None:
                continue  # a backend option: the kernel builds its stage, check and metrics
            claimed = self.pm.hook.pycluster_claim_option(app=app, option=opt)
            if not claimed and self.options.plugin_for(opt) is None:
                raise UnclaimedOptionError(app.name, opt, distribution_of(opt))
        app.check_events(self.app_events)
        for plugin in app.needs():
            if plugin not in self.services:
                raise self.services.error(plugin)
        e = app.election_options
        check_timing(
            e.lease_ttl or self.settings.lease_ttl,
            e.heartbeat_interval or self.settings.heartbeat_interval,
            f"App({app.name!r}).election",
        )
        priority = self.settings.priority if e.priority is None else e.priority
        if abs(priority) > PRIORITY_LIMIT:  # other nodes would ignore our membership record
            raise ConfigError(f"App({app.name!r}).election.priority", priority,
                              f"must be within ±{PRIORITY_LIMIT}")
        backends.attach(self, app)
        app.platform = self
        self.apps[app.name] = app
        return app

    def app_of(self, option: object) -> App | None:
        """The app registered here that ``option`` (an object passed to ``App(...)``) belongs
        to (`pycluster.kernel.app.app_of`, limited to this platform's apps)."""
        app = kernel_app_of(option)
        return app if app is not None and self.apps.get(app.name) is app else None

    def service(self, name: str) -> Any:
        """The service of plugin ``name`` (`PluginError` naming the plugin and why it is
        missing: disabled, not installed, or lacking a plugin it requires)."""
        return self.services[name]

    def node_info(self) -> NodeInfo:
        """This node as placement sees it."""
        return NodeInfo(self.node_id, dict(self.labels))

    def eligible(self, app: App) -> bool:
        """Whether every placement filter admits this node for ``app``."""
        return self.placement.eligible(app)

    # -- lifecycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> Platform:
        """Start (see :meth:`start`); until the block ends, SIGTERM and SIGINT (Ctrl-C) cancel
        the block and the node leaves gracefully, after which the program goes on after the
        ``async with`` (an application's own handler of either signal is left alone). Logs to
        stderr at INFO unless the application configured logging."""
        default_logging()
        # Installed before the start, so a signal that arrives while the node starts (after an
        # app's on_passive hook printed, say) is not fatal: the node leaves right after.
        self._install_signal_handlers()
        self._signal_task = None
        try:
            await self.start()
        except BaseException:
            self._remove_signal_handlers()
            self._signal_received = None
            raise
        self._signal_task = task = asyncio.current_task()
        if self._signal_received is not None and task is not None:
            task.cancel()  # the block ends at its first await and the node leaves gracefully
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> bool:
        """Leave gracefully; swallow only the cancellation that our signal handler caused."""
        try:
            if self._signal_received is None:
                await self.stop()
            else:
                await self._stop_through_cancellation()
        finally:
            self._remove_signal_handlers()
        if self._signal_received is None:
            return False
        self._signal_received = None
        task = asyncio.current_task()
        if task is not None and task.uncancel() > 0:
            raise asyncio.CancelledError  # cancelled by someone else as well: not ours to eat
        return isinstance(e, asyncio.CancelledError)

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        loop = asyncio.get_running_loop()
        self._signal_task = asyncio.current_task()
        for sig in _SIGNALS:
            if not _handler_is_default(sig):
                continue  # the application handles it
            previous = signal.getsignal(sig)
            try:
                loop.add_signal_handler(sig, self._on_signal, sig)
            except (NotImplementedError, RuntimeError, ValueError):
                continue
            self._signal_restore.append((sig, previous))

    def _remove_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig, previous in self._signal_restore:
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.remove_signal_handler(sig)
                signal.signal(sig, previous)  # e.g. asyncio.run()'s own Ctrl-C handler
        self._signal_restore.clear()
        self._signal_task = None

    def _on_signal(self, sig: signal.Signals) -> None:
        if self._signal_received is not None:
            log.info("node %s: %s again: already leaving", self.node_id, sig.name)
            return
        self._signal_received = sig
        log.info("node %s: %s: leaving gracefully", self.node_id, sig.name)
        if self._signal_task is not None:
            self._signal_task.cancel()

    async def _stop_through_cancellation(self) -> None:
        """Finish the graceful stop even if our own cancellation is delivered meanwhile."""
        stopping = asyncio.ensure_future(self.stop())
        while True:
            try:
                await asyncio.shield(stopping)
                return
            except asyncio.CancelledError:
                if stopping.done():
                    raise

    async def start(self) -> None:
        """Connect, join the membership and start every registered app."""
        if self._running:
            return
        self._stop_event = asyncio.Event()
        self._report_plugin_problems()
        settings = self.settings
        try:
            await self._tasks.open()  # the platform's own tasks: one group, none lost
            if not settings.nats_url:
                settings = await self._start_embedded(settings)
            c = self.connections = Connections()
            await c.open(settings, on_control_reconnect=self._reconnected,
                         on_slow_consumer=self._message_dropped,
                         on_state=self._connection_state,
                         js_timeout=max(2.0, settings.heartbeat_interval))
            self.nc, self.js, self.nc_control, self.js_control = (
                c.nc, c.js, c.nc_control, c.js_control)
            assert self.nc is not None
            check_stream_replicas(self.nc, settings.stream_replicas)  # before any bucket
            self._running = True
            self.started_at = time.time()
            try:
                await self._join()
                await self.placement.load()
                for name, svc in self.services.items():
                    await svc.start()
                    self._started_services.append((name, svc))
                for app in self.apps.values():
                    await self._start_app(app)
            except Exception as exc:
                clear = replicas_error(exc, settings.stream_replicas, self.nc)
                if clear is None:
                    raise
                raise clear from None  # the server's own words are in the message
            assert self.nc_control is not None
            self._subs.append(await self.nc_control.subscribe(
                platform_subject(self.name, "node", self.node_id, "labels"),
                cb=self._on_labels))
            self.spawn(self.placement.run(min(1.0, settings.heartbeat_interval)), "placement")
            for app_name in self.apps:
                # One subscription per app (not "{platform}.*.control.stepdown"): NATS
                # permissions let a node subscribe to its own apps' subjects only.
                self._subs.append(await self.nc_control.subscribe(
                    stepdown_subject(self.name, app_name), cb=self._on_stepdown))
                self._subs.append(await self.nc_control.subscribe(
                    move_subject(self.name, app_name), cb=self._on_move))
            self.notify(call_each(self.pm.hook.pycluster_platform_started, platform=self),
                        "platform_started")
        except BaseException:
            await self.stop()
            raise

    def _report_plugin_problems(self) -> None:
        """A plugin that failed to load is reported always; one that is unusable here (a
        missing system dependency) only when an app of this node uses it."""
        users: dict[str, list[str]] = {}
        for app in self.apps.values():
            for opt in app.options:
                kind = self.backends.for_option(opt)
                name = self.options.plugin_for(opt) or (kind.plugin if kind else None)
                if name is not None and app.name not in users.setdefault(name, []):
                    users[name].append(app.name)
        for info in self.pm.problems():
            where = f"{info.name} ({info.distribution} {info.version})"
            if info.status is not PluginStatus.UNUSABLE:
                log.warning("plugin %s is %s: %s", where, info.status, info.reason)
            elif info.name in users:
                log.warning("plugin %s, used by app(s) %s, is unusable here: %s", where,
                            ", ".join(users[info.name]), info.reason)
            else:
                log.debug("plugin %s is unusable here (no app uses it): %s", where, info.reason)

    async def _start_embedded(self, settings: PlatformSettings) -> PlatformSettings:
        """Start the embedded nats-server (one per platform and data root, see
        `EmbeddedServerLock`); returns the settings pointing at it."""
        from .embedded import EmbeddedNatsServer, EmbeddedServerLock, LocalCredentials
        from .leaf import write_zone_config
        from .settings import secret_value

        if settings.nats_nkey_seed or settings.nats_creds:
            raise ConfigError("nats_nkey_seed" if settings.nats_nkey_seed else "nats_creds",
                              "***", "the embedded server (nats_url unset) authenticates with "
                              "nats_user/nats_password or nats_token; give a nats_url to use "
                              "NKeys or a creds file")
        node_dir = settings.resolved_data_dir()
        lock = EmbeddedServerLock(node_dir.parent, self.name)
        lock.acquire()  # EmbeddedServerConflictError: another node of this platform has one
        self._embedded_lock = lock
        data = node_dir / "nats"
        data.mkdir(parents=True, exist_ok=True)
        # Never an open server: the settings' credentials, or a random password kept in a
        # 0600 file of the data directory (reused across restarts; the CLI reads it there).
        creds = LocalCredentials.load_or_create(
            data, user=settings.nats_user, password=secret_value(settings.nats_password),
            token=secret_value(settings.nats_token))
        config = creds.write_server_config()
        if settings.hub is not None or settings.leaf is not None or (
                settings.zone or settings.jetstream_domain):
            config = write_zone_config(config, settings)
        self.embedded = EmbeddedNatsServer(data, config_file=config,
                                           auth=creds.connect_options())
        await self.embedded.start()
        lock.describe(node_id=self.node_id, url=self.embedded.url, data_dir=str(data),
                      credentials=str(creds.path))
        log.info("started an embedded nats-server at %s (data in %s, credentials in %s)",
                 self.embedded.url, data, creds.path)
        # Plugins that connect on their own (Litestream) read the credentials from here.
        self.settings = self.settings.model_copy(update=creds.settings())
        return settings.model_copy(update={"nats_url": [self.embedded.url], **creds.settings()})

    async def _join(self) -> None:
        assert self.nc_control is not None and self.js_control is not None
        assert self.js is not None
        s = self.settings
        self.membership = Membership(
            self.nc_control, self.js_control, self.name, self.node_id, ttl=s.lease_ttl,
            heartbeat=s.heartbeat_interval, record=self.membership_record,
            on_join=self._member_joined, on_leave=self._member_left, on_replaced=self._replaced,
            poll_interval=min(1.0, s.heartbeat_interval), replicas=s.stream_replicas,
            control=self.control, on_restored=self._record_restored,
            on_change=lambda _rec: self.placement.kick(),
        )
        try:
            await self.membership.join()
        except DuplicateNodeError as exc:
            # Awaited (bounded): an audit entry is stored before the start fails.
            await call_notify(call_each(
                self.pm.hook.pycluster_membership_event, platform=self,
                event=MembershipEvent.DUPLICATE_REFUSED,
                data={"node": self.node_id, "holder": exc.holder}),
                s.hook_timeout, "membership_event")
            raise
        self._locks = LockService(
            self.js, bucket(self.name, suffix="platform"), self.node_id, prefix="locks.",
            replicas=s.stream_replicas,
        )
        self.observe_locks(self._locks, "_platform")
        await self._locks.ensure()

    def _timing(self, app: App) -> dict[str, Any]:
        e, s = app.election_options, self.settings
        return {
            "lease_ttl": e.lease_ttl or s.lease_ttl,
            "heartbeat_interval": e.heartbeat_interval or s.heartbeat_interval,
            "priority": s.priority if e.priority is None else e.priority,
            "no_failover": s.no_failover if e.no_failover is None else e.no_failover,
            "hook_timeout": e.hook_timeout or s.hook_timeout,
            "cooldown": e.cooldown if e.cooldown is not None else s.cooldown,
        }

    async def _start_app(self, app: App) -> None:
        assert self.nc is not None and self.js is not None
        if not self.eligible(app):
            log.info("app %s: node %s is not eligible (placement); not running it",
                     app.name, self.node_id)
            return
        t = self._timing(app)
        self.placement.published[app.name] = self.placement.placeable(app)
        kv = AppKV(self.js, bucket(self.name, app.name))
        await kv.ensure(replicas=self.settings.stream_replicas)
        locks = LockService(self.js, bucket(self.name, app.name, "locks"), self.node_id,
                            replicas=self.settings.stream_replicas)
        self.observe_locks(locks, app.name)
        await locks.ensure()
        slots = app.mode.slots()
        election: Election | None = None
        if slots is not None:
            keys = ["leader"] if slots == 1 else [f"slot-{i}" for i in range(slots)]
            election = self.pm.hook.pycluster_election(app=app, platform=self, keys=keys)
            if election is None:
                raise ConfigError("election", app.name, "no election plugin is enabled")
        rt = AppRuntime(
            app, self, election=election, kv=kv, locks=locks, hook_timeout=t["hook_timeout"],
            cooldown=t["cooldown"] if t["cooldown"] is not None else t["heartbeat_interval"],
        )
        app._runtime = rt
        self.runtimes[app.name] = rt
        # Awaited in turn, errors propagate: the app's endpoints, checks and streams exist
        # before it campaigns.
        for result in self.pm.hook.pycluster_app_started(app=app, runtime=rt):
            if inspect.isawaitable(result):
                await result
        if election is not None:
            worst = election.worst_case_failover()
            log.info(
                "app %s: lease_ttl=%.1fs heartbeat=%.1fs priority=%d%s; worst-case crash "
                "failover %.1fs (plus up to ~9s if the node that leads the election stream "
                "dies too)", app.name, t["lease_ttl"], t["heartbeat_interval"], t["priority"],
                " no-failover" if t["no_failover"] else "", worst,
            )
        await rt.start()

    def election_kwargs(self, app: App) -> dict[str, Any]:
        """Keyword arguments for a `LeaseElection` of ``app`` (used by the election plugin)."""
        t = self._timing(app)
        return {
            "lease_ttl": t["lease_ttl"],
            "heartbeat_interval": t["heartbeat_interval"],
            "no_failover": t["no_failover"],
            "rank": lambda: self.placement.rank(app),
            "may_campaign": lambda: self.placement.may_campaign(app),
            "cooldown": t["cooldown"],
            "replicas": self.settings.stream_replicas,
        }

    async def stop(self) -> None:
        """Leave gracefully: apps step down in reverse order, membership is deleted, NATS
        closes, an embedded server stops.

        Every step is bounded (the app's stages and hooks by their own timeouts, everything
        else by ``hook_timeout``): a step that hangs is logged and skipped, so leaving never
        hangs — the lease and the membership record then simply expire.
        """
        was_running, self._running = self._running, False
        limit = self.settings.hook_timeout
        if was_running:
            for name in reversed(list(self.runtimes)):
                rt = self.runtimes[name]
                await self._bounded(rt.stop(), limit * (len(rt.stages) + 3), f"app {name}: stop")
                await call_notify(
                    call_each(self.pm.hook.pycluster_app_stopped, f"app {name}: app_stopped",
                              app=rt.app, runtime=rt), limit, f"app {name}: app_stopped")
            await call_notify(
                call_each(self.pm.hook.pycluster_platform_stopping, platform=self), limit,
                "platform_stopping",
            )
            for svc_name, svc in reversed(self._started_services):
                await self._bounded(svc.stop(), limit, f"service {svc_name}: stop")
            self._started_services.clear()
            if self.membership is not None:
                await self._bounded(self.membership.leave(), limit, "membership: leave")
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        self._subs.clear()
        await self._tasks.close()
        await self.connections.close(limit)
        if self.embedded is not None:
            await self.embedded.stop()
            self.embedded = None
        if self._embedded_lock is not None:
            self._embedded_lock.release()
            self._embedded_lock = None
        for app in self.apps.values():
            app._runtime = None
        self.runtimes.clear()

    @staticmethod
    async def _bounded(aw: Awaitable[Any], timeout: float, what: str) -> None:
        """Await one step of leaving: errors and overruns are logged, never raised."""
        try:
            async with asyncio.timeout(timeout):
                await aw
        except TimeoutError:
            log.error("%s did not finish within %.1fs; going on", what, timeout)
        except Exception:
            log.exception("%s failed", what)

    async def run(self) -> None:
        """Start, run until SIGTERM/SIGINT or cancellation, then leave gracefully.

        Logs to stderr at INFO unless the application configured logging (the root logger has
        a handler).
        """
        default_logging()
        loop = asyncio.get_running_loop()

        def request_stop() -> None:
            if self._stop_event is not None:  # start() makes it before its first await
                self._stop_event.set()

        # Installed before the start: a signal while the node starts makes it leave right after.
        installed = []
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, request_stop)
                installed.append(sig)
        try:
            await self.start()
        except BaseException:
            for sig in installed:
                loop.remove_signal_handler(sig)
            raise
        assert self._stop_event is not None
        self._in_run = True
        try:
            await self._stop_event.wait()
            log.info("node %s: leaving gracefully", self.node_id)
        finally:
            self._in_run = False
            for sig in installed:
                loop.remove_signal_handler(sig)
            await asyncio.shield(self.stop())
        if self.failure is not None:
            raise self.failure

    def fail(self, error: PyclusterError) -> None:
        """Leave because this node cannot go on (it was replaced, an internal task died):
        logged CRITICAL, recorded as `failure`; `run` leaves gracefully and raises ``error``
        (``pycluster run`` exits non-zero: ``error.exit_code``). Outside `run` the platform
        stops by itself."""
        if self.failure is None:
            self.failure = error
        log.critical("node %s: %s; leaving", self.node_id, error)
        if self._in_run:
            self.request_stop()
        elif self._running and self._fail_task is None:
            self._fail_task = asyncio.get_running_loop().create_task(self.stop())

    def request_stop(self) -> None:
        """Ask ``run()`` to leave gracefully."""
        if self._stop_event is not None:
            self._stop_event.set()

    # -- plumbing for apps and plugins -------------------------------------------------------

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        """Run ``coro`` in a task owned by the platform (cancelled at stop)."""
        return self._tasks.run(name, coro)

    def notify(self, results: Iterable[Any], what: str) -> None:
        """Await notification-hook results in the background, with the hook timeout."""
        pending = [r for r in results if r is not None]
        if pending:
            self.spawn(call_notify(pending, self.settings.hook_timeout, what), what)

    def transition(self, app: App, role: str, epoch: int | None, reason: str) -> None:
        """Record a transition: logged, and the membership record refreshed so others see it
        at once. Cheap: no I/O here."""
        log.info("app %s on %s: %s (epoch %s): %s", app.name, self.node_id, role, epoch, reason)
        if self.membership is not None and role in (Role.ACTIVE, Role.PASSIVE, Role.STOPPED):
            self.spawn(self.membership.publish_now(), "membership:publish")

    def observe_locks(self, locks: LockService, scope: str) -> None:
        """Connect a lock service to the plugins: ``pycluster_lock_observers`` (asked once,
        per event) and ``pycluster_lock_event`` (every event)."""
        by_event: dict[str, list[Callable[[Any, dict[str, Any]], None]]] = {}
        results = call_each(self.pm.hook.pycluster_lock_observers, platform=self, scope=scope)
        for observers in results:
            for event, fn in (observers or {}).items():
                by_event.setdefault(event, []).append(fn)
        locks.observers = {event: tuple(fns) for event, fns in by_event.items()}
        locks.on_event = self.lock_observer(scope)

    def lock_observer(self, scope: str) -> Callable[[str, Any, dict[str, Any]], None] | None:
        """The ``on_event`` observer of a lock service: ``pycluster_lock_event`` (None when no
        plugin implements it: a lock then costs nothing more)."""
        hook = self.pm.hook.pycluster_lock_event
        impls = list(reversed(hook.get_hookimpls()))
        if not impls:
            return None
        # Called on every acquire and release: the implementations are resolved once (when the
        # lock service starts) and called directly, each isolated like `call_each`.
        order = ("platform", "scope", "event", "lock", "fields")
        calls = [(impl.function, impl.plugin_name,
                  operator.itemgetter(*[order.index(a) for a in impl.argnames], 0))
                 for impl in impls]  # the trailing 0: the getter always returns a tuple

        def on_event(event: str, lock: Any, fields: dict[str, Any]) -> None:
            args = (self, scope, event, lock, fields)
            for fn, plugin, pick in calls:
                try:
                    fn(*pick(args)[:-1])
                except Exception:
                    log.exception("lock event: plugin %s failed in pycluster_lock_event", plugin)

        return on_event

    def _message_dropped(self, exc: nats.errors.SlowConsumerError) -> None:
        call_each(self.pm.hook.pycluster_message_dropped, platform=self, error=exc)

    def _connection_state(self, connection: str, state: ConnectionState) -> None:
        call_each(self.pm.hook.pycluster_connection_state, platform=self,
                  connection=connection, state=state)

    @property
    def running(self) -> bool:
        """True while the platform is started: from its connection in `start` until `stop`
        begins."""
        return self._running

    @property
    def audit(self) -> AuditLog:
        """The audit trail (stream ``{platform}_audit``): ``log``, ``query``, ``stream``
        (plugin ``audit``)."""
        return self.service("audit")  # type: ignore[no-any-return]

    @property
    def health(self) -> PlatformHealth:
        """Health checks of this node: ``register``, ``status``, ``readiness``, ``on_change``
        (plugin ``health``)."""
        return self.service("health")  # type: ignore[no-any-return]

    @property
    def metrics(self) -> PlatformMetrics:
        """Prometheus metrics of this node (``metrics.registry``, ``metrics.render()``;
        plugin ``metrics``)."""
        return self.service("metrics")  # type: ignore[no-any-return]

    def lock(self, name: str, ttl: float = 10.0) -> Lock:
        """A platform-wide fair lock (in ``{platform}_platform``, key ``locks.{name}``)."""
        if self._locks is None:
            raise RuntimeError("the platform is not started")
        return self._locks.lock(name, ttl=ttl)

    async def lock_holder(self, name: str) -> Any:
        """Who holds platform lock ``name`` (None when free)."""
        if self._locks is None:
            raise RuntimeError("the platform is not started")
        return await self._locks.holder(name)

    def api(self, app_name: str, **options: Any) -> ApiClient:
        """A client of another app's API (the API bus): ``await platform.api("convex").call(
        "query", payload, route=ToLeader())``. ``options``: ``timeout``, ``codec``, ``retry``,
        ``breaker`` (a `BreakerPolicy` for that app), ``source_app`` (see
        `pycluster.builtin.api.bus.ApiClient`; plugin ``api``)."""
        return self.service("api").client(app_name, **options)  # type: ignore[no-any-return]

    def remote(self, platform: str) -> RemotePlatform:
        """Another platform in another zone, over the leaf links: ``await platform.remote(
        "prod").api("convex").call("query", ...)``, ``.events.publish(...)``, ``.ping()`` (see
        `pycluster.builtin.leaf.remote.RemotePlatform`; plugin ``leaf``)."""
        return self.service("leaf").remote(platform)  # type: ignore[no-any-return]

    @property
    def events(self) -> EventBus:
        """Platform-wide events (stream ``{platform}_events``): ``publish``, ``subscribe``,
        ``subscribe_durable`` (see `pycluster.builtin.events.bus.EventBus`; plugin
        ``events``); needs a started platform."""
        return self.service("events").bus(None)  # type: ignore[no-any-return]

    def membership_record(self) -> dict[str, Any]:
        """This node's membership record as it is published now (placement, apps, plugins)."""
        apps: dict[str, Any] = {}
        for app in self.apps.values():
            rt = self.runtimes.get(app.name)
            t = self._timing(app)
            apps[app.name] = {
                "role": rt.role.value if rt else Role.STOPPED.value,
                "epoch": app.epoch,
                "leader": app.leader,
                "mode": app.mode.kind,
                "eligible": rt is not None and self.placement.published.get(app.name, True),
                "priority": t["priority"],
                "no_failover": t["no_failover"],
                # What `pycluster app list|show` shows of the app's placement options.
                "placement": [repr(c)[:200] for c in app.constraints[:16]],
                "strategy": app.strategy.name,
                "budget": ({"min_available": app.budget.min_available,
                            "max_unavailable": app.budget.max_unavailable}
                           if app.budget is not None else None),
            }
        return {
            "platform": self.name,
            "labels": self.labels,
            "version": __version__,
            "plugins": self.pm.plugin_set(),
            "apps": apps,
        }

    def _member_joined(self, rec: dict[str, Any]) -> None:
        node = rec.get("node_id")
        if node != self.node_id:
            mine, theirs = self.pm.plugin_set(), rec.get("plugins") or {}
            if mine != theirs:
                diff = {
                    k: {"here": mine.get(k), "there": theirs.get(k)}
                    for k in sorted(set(mine) | set(theirs)) if mine.get(k) != theirs.get(k)
                }
                self.plugin_mismatches[str(node)] = diff
                log.warning("node %s runs a different plugin set: %s", node, diff)
        call_each(self.pm.hook.pycluster_member_joined, platform=self, node=str(node),
                  record=rec)
        self.placement.kick()
        self._member_hook("member_join", rec)

    def _member_left(self, rec: dict[str, Any]) -> None:
        node = str(rec.get("node_id"))
        self.plugin_mismatches.pop(node, None)
        call_each(self.pm.hook.pycluster_member_left, platform=self, node=node, record=rec)
        self.placement.kick()
        self._member_hook("member_leave", rec)

    def _membership_event(self, event: MembershipEvent, data: dict[str, Any]) -> None:
        self.notify(call_each(self.pm.hook.pycluster_membership_event, platform=self,
                              event=event, data=data), f"membership_event {event}")

    def _member_hook(self, event: str, rec: dict[str, Any]) -> None:
        for rt in self.runtimes.values():
            ctx = Context(app=rt.app, platform=self, node_id=self.node_id, member=rec,
                          reason=event)
            self.spawn(run_hooks(rt.app.hooks(event), ctx, rt.hook_timeout, f"on_{event}",
                                 False), f"{rt.app.name}:{event}")

    def _replaced(self) -> None:
        for rt in self.runtimes.values():
            if rt.election is not None:
                rt.election.pause_campaign(float("inf"))
        self._membership_event(MembershipEvent.REPLACED, {"node": self.node_id})
        self.fail(NodeReplacedError(self.name, self.node_id))

    def _record_restored(self, forged: dict[str, Any]) -> None:
        """Our record was overwritten by an incarnation nobody answers for, and taken back."""
        self._membership_event(MembershipEvent.RECORD_RESTORED,
                               {"node": self.node_id, "found": forged})

    def task_failed(self, name: str, exc: BaseException) -> None:
        """An internal task that cannot be restarted died (`pycluster.kernel.aio.supervise`'s
        ``on_fatal``): the node leaves and `run` raises `NodeFailedError`."""
        self.fail(NodeFailedError(name, exc))

    async def _reconnected(self) -> None:
        for rt in self.runtimes.values():
            if rt.election is not None:
                self.spawn(rt.election.reconnected(), "election:reconnected")
        if self.membership is not None:
            self.spawn(self.membership.reconnected(), "membership:reconnected")
        self.spawn(self.placement.reconnected(), "placement:reconnected")

    async def _on_stepdown(self, msg: Msg) -> None:
        """A step-down request: validated, through the middleware chain, audited
        (`pycluster.kernel.control.serve_stepdown`); only the active instance answers."""
        app = self.apps.get(msg.subject.split(".")[1])
        if app is None or not app.is_active or app.mode.slots() is None:
            return
        try:
            await self.control.serve_stepdown(app, msg)
        except Exception:  # never into nats-py's delivery loop
            log.exception("app %s: step-down request failed", app.name)

    # -- labels and operations ---------------------------------------------------------------

    async def set_labels(self, changes: dict[str, str | None]) -> dict[str, str]:
        """Change this node's labels at runtime: ``{"zone": "b", "disk": None}`` sets ``zone``
        and removes ``disk``. Validated (`ConfigError`, nothing changed), published in the
        membership record at once, and placement re-evaluated here (and on the other nodes as
        soon as their membership watch delivers the changed record). Runtime labels last as
        long as this process: a restart starts from the configured ones. Returns the new labels."""
        new = merge_labels(self.labels, changes)
        if new == self.labels:
            return dict(new)
        log.info("node %s: labels %s -> %s", self.node_id, self.labels, new)
        self.placement.event(None, "labels_changed", {"labels": new, "previous": self.labels})
        self.labels = new
        if self.membership is not None:
            await self.membership.publish_now()
        if self._running:
            await self.placement.reevaluate()
        return dict(new)

    async def _on_labels(self, msg: Msg) -> None:
        """A label request (``pycluster node label``): ``{"set": {k: v}, "remove": [k]}``,
        through the middleware chain, audited; the reply is ``{"node", "labels"}`` or
        ``{"node", "error"}``."""
        async def handler(req: Any) -> dict[str, str]:
            body = decode_object(req.data)
            unknown = sorted(set(body) - {"set", "remove"})
            if unknown:
                raise ConfigError("request", ", ".join(str(k)[:32] for k in unknown[:5]),
                                  "unknown fields (a label request has set, remove)")
            set_, remove = body.get("set") or {}, body.get("remove") or []
            if not isinstance(set_, dict) or not isinstance(remove, list):
                raise ConfigError("request", None, "set is an object, remove a list")
            changes: dict[str, str | None] = dict(set_)
            for key in remove:
                if not isinstance(key, str):
                    raise ConfigError("label", str(key)[:64], "a label key is a string")
                changes[key] = None
            req.extra["request"] = {"set": set_, "remove": remove}
            return await self.set_labels(changes)

        try:
            labels, error = await self.control.serve(msg, app="_", name="labels",
                                                     handler=handler)
            reply: dict[str, Any] = {"node": self.node_id}
            if error is not None:
                reply["error"] = error_reply(error)
            else:
                reply["labels"] = labels
            if msg.reply:
                await msg.respond(json.dumps(reply).encode())
        except Exception:  # never into nats-py's delivery loop
            log.exception("node %s: label request failed", self.node_id)

    async def _update_operations(self, change: Callable[[Operations], Operations]) -> Operations:
        js = self.js_control or self.js
        if js is None:
            raise RuntimeError("the platform is not started")
        ops = await update_operations(js, self.name, change)
        self.placement.ops = ops
        self.placement.kick()
        return ops

    async def cordon(self, node: str | None = None, *, by: str = "api") -> Operations:
        """Cordon ``node`` (default: this node): no new instances are placed there (no new
        leadership, no new Spread instance); what runs there stays. Stored in NATS: every
        node and the CLI see it."""
        node = node or self.node_id
        validate_ident("node", node)
        entry = {"at": time.time(), "by": by}
        ops = await self._update_operations(
            lambda o: replace(o, cordoned={**o.cordoned, node: entry}))
        self.placement.event(None, "cordoned", {"node": node, "by": by})
        return ops

    async def uncordon(self, node: str | None = None) -> Operations:
        """Undo `cordon` for ``node`` (default: this node)."""
        node = node or self.node_id
        ops = await self._update_operations(
            lambda o: replace(o, cordoned={k: v for k, v in o.cordoned.items() if k != node}))
        self.placement.event(None, "uncordoned", {"node": node})
        return ops

    async def set_maintenance(self, on: bool, app: str | None = None) -> Operations:
        """Turn maintenance mode on or off, platform-wide or for ``app``: while on, no standby
        campaigns (no automatic failover, no automatic hand-over); a leader keeps its lease
        as long as it renews it. Stored in NATS: every node and the CLI see it."""
        if app is None:
            ops = await self._update_operations(
                lambda o: replace(o, maintenance=on).without_stale_moves())
        else:
            validate_ident("app", app)
            ops = await self._update_operations(lambda o: replace(
                o, maintenance_apps=o.maintenance_apps | {app} if on
                else o.maintenance_apps - {app}).without_stale_moves())
        self.placement.event(self.apps.get(app) if app else None, "maintenance",
                             {"on": on, "app": app})
        return ops

    async def move(self, app: str, to: str | None = None, reason: str = "move",
                   source: str | None = None, force: bool = False) -> dict[str, Any]:
        """Move the active instance of ``app`` to node ``to`` (default: the best eligible
        standby; a graceful migration, see `pycluster.kernel.placement.Placement.migrate`):
        run here when this node leads it, else asked of its leader over NATS (``pycluster app
        move`` sends the same request). ``source``: the active instance on that node (for
        ``Replicas``, which has several). ``force``: skip the app's migration cooldown (not
        the platform's concurrent and per-minute limits).

        In maintenance mode an operator's move to a named node still works: ``to`` is
        recorded in the operations state (``operator_moves``: that node alone may campaign),
        then the leader hands over to it, or, with no leader, ``to`` takes the vacant lease;
        the record is removed once ``to`` leads (or the move failed)."""
        js = self.js_control or self.js
        if js is None:
            raise RuntimeError("the platform is not started")
        ops, _ = await read_operations(js, self.name)
        granted = ops.in_maintenance(app) and to is not None
        if granted:
            assert to is not None
            await self._update_operations(
                lambda o: replace(o, operator_moves={**o.operator_moves, app: to}))
        try:
            return await self._move(app, to, reason, source, force, granted)
        finally:
            if granted:
                await self._update_operations(lambda o: replace(o, operator_moves={
                    a: n for a, n in o.operator_moves.items() if a != app}))

    async def _move(self, app: str, to: str | None, reason: str, source: str | None,
                    force: bool, maintenance: bool) -> dict[str, Any]:
        local = self.apps.get(app)
        if local is not None and local.is_active and source == self.node_id \
                and local.mode.slots() is None:
            return await self.placement.vacate(local, to, reason)
        if local is not None and local.is_active and source in (None, self.node_id):
            return await self.placement.migrate(local, to, reason, force=force)
        view = self.placement.view()
        if maintenance and to is not None and source is None and not any(
                view.alive(n) for n in view.active_on(app)):
            # No leader: standbys do not answer a move, so do not wait for a reply.
            return await self._place_leaderless(app, to, reason)
        replies = await self.control.request(
            move_subject(self.name, app),
            json.dumps({"to": to, "reason": reason, "from": source, "force": force}).encode(),
            app=app, name="move", timeout=60)
        if not replies:
            raise ConfigError("app", app, "no active instance answered the move request")
        res: dict[str, Any] = json.loads(replies[0].data)
        err = res.get("error")
        if isinstance(err, dict):
            raise ConfigError("move", to, f"refused by {res.get('node')}: {err.get('reason')}")
        return res

    async def _place_leaderless(self, app: str, to: str, reason: str) -> dict[str, Any]:
        """Maintenance mode, no leader: ``to`` (named in ``operator_moves``) campaigns for the
        vacant lease; wait until its record shows it active."""
        started = time.monotonic()
        lease = self.settings.lease_ttl
        placement = self.placement
        entry = placement.view().app_record(to, app) or {}
        if (not placement.view().alive(to) or entry.get("eligible") is not True
                or entry.get("no_failover") is True):
            raise ConfigError("to", to, f"is not a live node that may lead app {app!r} (not "
                              "running it, ineligible, cordoned or no_failover)")

        def active() -> bool:
            rec = placement.view().app_record(to, app) or {}
            return rec.get("role") == Role.ACTIVE.value

        while not active() and time.monotonic() - started < 3 * lease + 5:
            await asyncio.sleep(0.1)
            if self.membership is not None:
                await self.membership.refresh_view()
        outcome = "completed" if active() else "failed"
        rec = placement.view().app_record(to, app) or {}
        data = {"app": app, "from": None, "to": to, "reason": reason}
        placement.event(self.apps.get(app), f"migration_{outcome}",
                        {**data, "seconds": time.monotonic() - started, "leaderless": True})
        return {**data, "outcome": outcome, "leader": to if outcome == "completed" else None,
                "epoch": rec.get("epoch"), "seconds": round(time.monotonic() - started, 3)}

    async def _on_move(self, msg: Msg) -> None:
        """A move request (``{"to", "reason"}``): served by the active instance only, through
        the middleware chain, audited; the reply is the migration's result or ``error``."""
        app = self.apps.get(msg.subject.split(".")[1])
        if app is None:
            return
        try:
            body = json.loads(msg.data or b"{}")
        except ValueError:
            body = {}
        source = body.get("from") if isinstance(body, dict) else None
        if source is not None and source != self.node_id:
            return  # addressed to another node's instance (Replicas, drains)
        if source is None and app.mode.slots() is None:
            return  # a Spread instance moves only when named (every node runs one)
        if not app.is_active:
            if source == self.node_id and msg.reply:  # asked of us by name: say so at once
                refusal = {"node": self.node_id, "error": {
                    "field": "from", "value": source, "code": "not_active",
                    "reason": f"app {app.name} is not active on {self.node_id}"}}
                with contextlib.suppress(Exception):
                    await msg.respond(json.dumps(refusal).encode())
            return

        async def handler(req: Any) -> dict[str, Any]:
            body = decode_object(req.data)
            unknown = sorted(set(body) - {"to", "from", "reason", "rebalance", "dry_run",
                                          "force"})
            if unknown:
                raise ConfigError("request", ", ".join(str(k)[:32] for k in unknown[:5]),
                                  "unknown fields (a move request has to, from, reason, "
                                  "force, rebalance, dry_run)")
            if body.get("rebalance") is True:
                req.extra["request"] = {"rebalance": True, "dry_run": bool(body.get("dry_run"))}
                return await self.placement.rebalance(app, dry_run=body.get("dry_run") is True)
            to, reason = body.get("to"), body.get("reason") or "move"
            if to is not None:
                if not isinstance(to, str):
                    raise ConfigError("to", str(to)[:64], "must be a node id")
                validate_ident("to", to)
            if app.mode.slots() is None:  # Spread: this node's instance leaves (a drain)
                req.extra["request"] = {"to": to, "from": source, "reason": str(reason)[:200]}
                return await self.placement.vacate(app, to, str(reason))
            force = body.get("force") is True
            req.extra["request"] = {"to": to, "from": source, "reason": str(reason)[:200],
                                    "force": force}
            return await self.placement.migrate(app, to, reason, force=force)

        try:
            result, error = await self.control.serve(msg, app=app.name, name="move",
                                                     handler=handler)
            reply: dict[str, Any] = result if error is None else {
                "node": self.node_id, "error": error_reply(error)}
            reply.setdefault("node", self.node_id)
            if msg.reply:
                await msg.respond(json.dumps(reply, default=str).encode())
        except Exception:  # never into nats-py's delivery loop
            log.exception("app %s: move request failed", app.name)

    def status(self) -> dict[str, Any]:
        """This node's view: node, labels, apps with role, leader, epoch, placement (pending,
        maintenance, cordon)."""
        ops = self.placement.ops
        return {
            "platform": self.name,
            "node_id": self.node_id,
            "labels": self.labels,
            "cordoned": self.placement.cordoned,
            "maintenance": ops.maintenance,
            "version": __version__,
            "started": self.started_at,
            "connected": bool(self.nc and self.nc.is_connected),
            "control_connected": bool(self.nc_control and self.nc_control.is_connected),
            "members": sorted(self.membership.members) if self.membership else [],
            "plugin_mismatches": self.plugin_mismatches,
            "apps": {
                name: {
                    "role": app.role.value,
                    "active": app.is_active,
                    "leader": app.leader,
                    "epoch": app.epoch,
                    "mode": app.mode.kind,
                    "slots": app.mode.slots(),
                    "pending": name in self.placement.pending,
                    "maintenance": ops.in_maintenance(name),
                    "placement_invalid": name in self.placement.invalid,
                }
                for name, app in self.apps.items()
            },
        }


def stepdown_subject(platform: str, app: str) -> str:
    """Subject on which the active instance of ``app`` accepts a step-down request."""
    validate_ident("platform", platform)
    validate_ident("app", app)
    return app_subject(platform, app, "control", "stepdown")


def move_subject(platform: str, app: str) -> str:
    """Subject on which the active instance of ``app`` accepts a move (migration) request."""
    validate_ident("platform", platform)
    validate_ident("app", app)
    return app_subject(platform, app, "control", "move")


__all__ = ["Platform", "Replicas", "move_subject", "stepdown_subject"]
