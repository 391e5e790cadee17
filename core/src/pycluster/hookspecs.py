"""Every hook of pycluster on one page: the whole extension surface.

Hooks are synchronous and cheap (pluggy has no async support). Registration hooks fill a small
typed registry; "first result wins" hooks return an object whose async methods do the work;
notification hooks may return an awaitable, which the core awaits with a timeout
(`pycluster.plugins.call_notify`). Async hook implementations are never combined with
``firstresult`` or hook wrappers.

Implement a hook by decorating a function of your plugin module with ``pycluster.hookimpl`` and
naming the module under the entry-point group ``pycluster`` in your distribution::

    [project.entry-points.pycluster]
    mybackend = "my_package.plugin"
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import click
    from prometheus_client import CollectorRegistry

    from .builtin.audit.log import AuditCategoryRegistry
    from .builtin.health.checks import PlatformHealth
    from .kernel.app import App
    from .kernel.election import Election
    from .kernel.platform import Platform
    from .kernel.registry import BackendRegistry, ConfigRegistry, OptionRegistry, StageRegistry
    from .kernel.types import NodeInfo

hookspec = pluggy.HookspecMarker("pycluster")

__all__ = [
    "pycluster_add_cli_commands",
    "pycluster_app_registered",
    "pycluster_audit_categories",
    "pycluster_check",
    "pycluster_claim_option",
    "pycluster_config_sections",
    "pycluster_election",
    "pycluster_health_changed",
    "pycluster_health_checks",
    "pycluster_middleware",
    "pycluster_placement_filter",
    "pycluster_platform_started",
    "pycluster_platform_stopping",
    "pycluster_register_backends",
    "pycluster_register_metrics",
    "pycluster_register_options",
    "pycluster_role_changed",
    "pycluster_route_key",
    "pycluster_stages",
    "pycluster_status",
]

# ---------------------------------------------------------------------------------------------
# Registration: called once per plugin manager / platform, fill a typed registry.
# ---------------------------------------------------------------------------------------------


@hookspec
def pycluster_register_options(registry: OptionRegistry) -> None:
    """Declare the App option classes this plugin defines (e.g. ``Docker``, ``VIP``).

    Called once when a platform is created. An option passed to ``App(...)`` whose class no
    plugin declared is refused with the name of the distribution that provides it.

    :param registry: call ``registry.add(option_class, plugin=name)`` for each class.
    """


@hookspec
def pycluster_register_backends(registry: BackendRegistry) -> None:
    """Map backend kinds ("process", "systemd", "docker", ...) to controller factories.

    Called once when a platform is created. A backend controller implements the
    `pycluster.backend.Backend` protocol (async ``start``, ``stop``, ``health``).

    :param registry: call ``registry.add(kind, option_class, factory)``; an unknown kind later
        fails with the list of installed kinds.
    """


@hookspec
def pycluster_config_sections(registry: ConfigRegistry) -> None:
    """Add a settings section for this plugin to the config file (section name = plugin name).

    Called once when a config file is loaded.

    :param registry: call ``registry.add(name, model, to_option)`` with a pydantic model for the
        section and a function turning a validated section into an App option.
    """


@hookspec
def pycluster_add_cli_commands(cli: click.Group) -> None:
    """Add click commands (or groups) to the ``pycluster`` command line.

    Called once in ``main()`` before the command line is parsed.

    :param cli: the root ``pycluster`` click group; call ``cli.add_command(...)``.
    """


# ---------------------------------------------------------------------------------------------
# Apps: options, election, placement.
# ---------------------------------------------------------------------------------------------


@hookspec(firstresult=True)
def pycluster_claim_option(app: App, option: Any) -> bool | None:
    """Claim an App option object that is not one of the core's own.

    Called once per foreign option when the app is registered with a platform. Stops at the
    first non-None result. Return True to accept it (keep a reference, e.g. to add stages later).

    :param app: the app being registered.
    :param option: the option object passed to ``App(...)``.
    """


@hookspec(firstresult=True)
def pycluster_election(app: App, platform: Platform, keys: list[str]) -> Election | None:
    """Provide the election implementation of an app.

    Called once when an elected app (Singleton, Replicas) starts on this node. Stops at the
    first non-None result; the core default is the NATS KV lease election
    (`pycluster.builtin.election.lease.LeaseElection`).

    :param app: the app that campaigns.
    :param platform: its platform (connection, node id, settings).
    :param keys: the lease keys to campaign for, holding at most one (``["leader"]`` for a
        Singleton, ``slot-0..n-1`` for ``Replicas(n)``).
    """


@hookspec
def pycluster_placement_filter(app: App, node: NodeInfo) -> bool | None:
    """Decide whether ``node`` may run an instance of ``app`` (hard constraints).

    Called for every app and candidate node whenever eligibility is evaluated (start, label
    change). All implementations are called; any False excludes the node, None abstains.

    :param app: the app to place.
    :param node: id and labels of the candidate node.
    """


@hookspec
def pycluster_app_registered(app: App, platform: Platform) -> None:
    """Notification: ``platform.register(app)`` accepted an app (its options are claimed).

    Called once per app, synchronously, before the platform starts it.

    :param app: the registered app.
    :param platform: the platform it was registered with.
    """


# ---------------------------------------------------------------------------------------------
# Lifecycle: the coordinator's ordered failover stages, and notifications.
# ---------------------------------------------------------------------------------------------


@hookspec
def pycluster_stages(app: App, platform: Platform, registry: StageRegistry) -> None:
    """Join the failover sequence of one app with ordered stages.

    Called once per app when the platform starts it. Each stage has an ``order`` (see
    `pycluster.kernel.registry.StageOrder`), async ``activate(ctx)`` / ``deactivate(ctx)`` and a
    timeout.
    Becoming active runs stages in ascending order; stepping down runs the activated ones in
    reverse. A stage that fails or times out is handled by its ``on_failure`` policy
    (`pycluster.kernel.registry.FailurePolicy`): by default the node undoes what ran, steps down and
    backs off; ``RETRY`` re-runs the stage first; ``CONTINUE`` carries on (optional stages).

    :param app: the app whose sequence is being built.
    :param platform: its platform.
    :param registry: call ``registry.add(Stage(...))``.
    """


@hookspec
def pycluster_role_changed(app: App, role: str, epoch: int | None, leader: str | None) -> Any:
    """Notification: an app changed role on this node ("active", "passive", "stopped").

    Called after each completed transition, for every app. May return an awaitable, which is
    awaited with the app's hook timeout; a failure is logged, never propagated.

    :param app: the app.
    :param role: the new role.
    :param epoch: the current leadership epoch (fencing token), if any.
    :param leader: the node id of the current leader, if known.
    """


@hookspec
def pycluster_platform_started(platform: Platform) -> Any:
    """Notification: the platform is connected and its membership record is published.

    Called once per ``Platform.start()``. May return an awaitable (awaited with a timeout).

    :param platform: the started platform.
    """


@hookspec
def pycluster_platform_stopping(platform: Platform) -> Any:
    """Notification: the platform is about to leave (after apps stepped down, before NATS closes).

    Called once per ``Platform.stop()``. May return an awaitable (awaited with a timeout).

    :param platform: the stopping platform.
    """


# ---------------------------------------------------------------------------------------------
# Introspection.
# ---------------------------------------------------------------------------------------------


@hookspec
def pycluster_check() -> str | None:
    """Report a missing system dependency (no container engine, no netlink rights, ...).

    Called once per plugin, directly on each implementation, when the plugin manager is built
    (so the answer is attributed to its plugin). Return None when usable, else the reason; the
    plugin is then reported as unusable by name, distribution and version.
    """


# ---------------------------------------------------------------------------------------------
# Communication: RPC, the API bus and events.
# ---------------------------------------------------------------------------------------------


@hookspec(firstresult=True)
def pycluster_route_key(app_name: str, key: str, platform: Platform) -> str | None:
    """Name the node whose instance of an app owns ``key`` (API bus calls with ``ForKey``).

    Called before every attempt of a key-routed call (ownership may move between attempts),
    synchronously: answer from memory. Stops at the first non-None result. Without any
    implementation such a call fails with a `PluginError` naming the ring plugin; a None result
    makes it fail with `NoInstanceError` (nobody owns the key now).

    :param app_name: the target app.
    :param key: the routing key given to ``ForKey(key)``.
    :param platform: the calling platform (membership, settings).
    """


@hookspec
def pycluster_middleware(platform: Platform) -> Any:
    """Contribute middleware to a platform's calls, handlers and events (e.g. tracing).

    Called once when the platform is created. Return a middleware object (see
    `pycluster.middleware.Middleware`: ``on_call``, ``on_request``, ``on_publish``,
    ``on_event``, each with access to the NATS headers), a list of them, or None. Plugin
    middleware wraps the middleware added later with ``pycluster.middleware.use``.

    :param platform: the platform being created.
    """


# ---------------------------------------------------------------------------------------------
# Observability: metrics, audit categories, health checks, status.
# ---------------------------------------------------------------------------------------------


@hookspec
def pycluster_register_metrics(registry: CollectorRegistry, platform: Platform) -> None:
    """Add this plugin's Prometheus metrics to a platform's registry.

    Called once per platform, when the platform is created (its metrics service is built).
    Create metrics with ``registry=registry`` (or register a custom collector, computed at
    scrape time); they are served on ``/metrics`` with the core's. Name them
    ``pycluster_<plugin>_...`` and document them with your plugin.

    :param registry: the platform's own `prometheus_client.CollectorRegistry`.
    :param platform: the platform (settings, apps; not connected yet).
    """


@hookspec
def pycluster_audit_categories(registry: AuditCategoryRegistry) -> None:
    """Declare the audit categories and actions this plugin writes.

    Called once per platform, when the platform is created. Entries themselves are written
    with ``platform.audit.log(category, action, data, app=...)``; declaring them lists them
    for ``pycluster audit --categories`` and the docs.

    :param registry: call ``registry.add(category, {action: description}, plugin=name)``.
    """


@hookspec
def pycluster_health_checks(platform: Platform, health: PlatformHealth) -> None:
    """Register this plugin's platform-level health checks.

    Called once per platform, when the platform is created (after the built-in ``nats`` and
    ``jetstream`` checks, so those can be named in ``depends_on``). App-level checks are
    registered with ``app.health.register(...)``, e.g. when claiming an option.

    :param platform: the platform.
    :param health: call ``health.register(name, check, interval=..., depends_on=[...])``.
    """


@hookspec
def pycluster_health_changed(
    platform: Platform, check: str, status: str, previous: str, app: App | None
) -> Any:
    """Notification: a health check changed status ("unknown", "healthy", "unhealthy").

    Called on every change of every check on this node. May return an awaitable, which is
    awaited in the background with the hook timeout; a failure is logged, never propagated.

    :param platform: the platform.
    :param check: the check's full name (``nats``, ``{app}.{name}``, ...).
    :param status: the new status.
    :param previous: the status before.
    :param app: the app the check belongs to, or None for a platform check.
    """


@hookspec
def pycluster_status(platform: Platform) -> dict[str, Any] | None:
    """Add this plugin's view (e.g. replication lag) to the node's ``/status`` document.

    Called on every ``GET /status``, directly on each implementation, so it must be cheap and
    synchronous (read in-process state). The result appears under ``plugins_status`` keyed by
    plugin name; None adds nothing; an exception is shown as ``{"error": ...}``.

    :param platform: the platform.
    """
