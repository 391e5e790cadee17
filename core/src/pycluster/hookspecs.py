"""Every hook of pycluster on one page: the whole extension surface.

The core itself is a kernel plus default plugins (`pycluster.plugins.DEFAULT_PLUGINS`): every
feature beyond the kernel (election, placement, the process backend, RPC, the API bus, events,
health, audit, metrics, tracing, systemd notification) is a module of hook implementations
registered through these same hooks, so a third-party plugin can do whatever a default one does.

Hooks are synchronous and cheap (pluggy has no async support). Registration hooks fill a small
typed registry; "first result wins" hooks return an object whose async methods do the work;
notification hooks may return an awaitable where their docstring says so, which the core awaits
with a timeout (`pycluster.plugins.call_notify`). Async hook implementations are never combined
with ``firstresult`` or hook wrappers. Notification hooks are called implementation by
implementation (`pycluster.plugins.call_each`): one that raises is logged and the others still
run.

Implement a hook by decorating a function of your plugin module with ``pycluster.hookimpl`` and
naming the module under the entry-point group ``pycluster`` in your distribution::

    [project.entry-points.pycluster]
    mybackend = "my_package.plugin"

Size: this module is the one page of the extension surface (about 40 hooks, each with its
documentation), so it is longer than the others by design.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import contextlib
    from collections.abc import Callable, Mapping

    import click
    from prometheus_client import CollectorRegistry

    from .builtin.audit.log import AuditCategoryRegistry
    from .builtin.health.service import PlatformHealth
    from .httpserver import Route
    from .kernel.app import App
    from .kernel.coordinator import AppRuntime
    from .kernel.discovery import DiscoveryExporterRegistry, ServiceRegistry
    from .kernel.election import Election
    from .kernel.placement import PlacementStrategy, PlacementView
    from .kernel.platform import Platform
    from .kernel.registry import (
        AppEventRegistry,
        BackendRegistry,
        ConfigRegistry,
        OptionRegistry,
    )
    from .kernel.replication import ReplicatorRegistry
    from .kernel.services import PlatformServices
    from .kernel.stages import StageEvent, StageRegistry
    from .kernel.types import ConnectionState, MembershipEvent, NodeInfo, Role
    from .kernel.vip import VipRegistry
    from .middleware import Request

hookspec = pluggy.HookspecMarker("pycluster")

__all__ = [
    "pycluster_activation_failed",
    "pycluster_add_cli_commands",
    "pycluster_app_events",
    "pycluster_app_hook_call",
    "pycluster_app_started",
    "pycluster_app_stopped",
    "pycluster_approve_promotion",
    "pycluster_audit_categories",
    "pycluster_check",
    "pycluster_claim_option",
    "pycluster_config_sections",
    "pycluster_connection_state",
    "pycluster_control_request",
    "pycluster_discovery_exporters",
    "pycluster_election",
    "pycluster_health_changed",
    "pycluster_health_checks",
    "pycluster_http_routes",
    "pycluster_leader_alive",
    "pycluster_leader_observed",
    "pycluster_lease_renewed",
    "pycluster_lock_event",
    "pycluster_lock_observers",
    "pycluster_member_joined",
    "pycluster_member_left",
    "pycluster_membership_event",
    "pycluster_message_dropped",
    "pycluster_middleware",
    "pycluster_placement_event",
    "pycluster_placement_filter",
    "pycluster_placement_score",
    "pycluster_placement_strategy",
    "pycluster_platform_services",
    "pycluster_platform_started",
    "pycluster_platform_stopping",
    "pycluster_register_backends",
    "pycluster_register_metrics",
    "pycluster_register_options",
    "pycluster_register_replicators",
    "pycluster_register_vips",
    "pycluster_role_changed",
    "pycluster_role_transition",
    "pycluster_route_key",
    "pycluster_service_registry",
    "pycluster_stage_event",
    "pycluster_stages",
    "pycluster_status",
    "pycluster_zone_demote",
    "pycluster_zone_position",
    "pycluster_zone_promote",
]

GROUPS: dict[str, tuple[str, ...]] = {
    "registration": ("pycluster_register_options", "pycluster_claim_option",
                     "pycluster_platform_services", "pycluster_app_events"),
    "election": ("pycluster_election",),
    "placement": ("pycluster_placement_filter", "pycluster_placement_score",
                  "pycluster_placement_strategy", "pycluster_placement_event"),
    "replication": ("pycluster_register_replicators",),
    "backends": ("pycluster_register_backends",),
    "vip": ("pycluster_register_vips",),
    "discovery": ("pycluster_service_registry", "pycluster_discovery_exporters"),
    "key routing": ("pycluster_route_key",),
    "stages": ("pycluster_stages", "pycluster_stage_event", "pycluster_activation_failed"),
    "lifecycle": ("pycluster_app_started", "pycluster_app_stopped", "pycluster_role_changed",
                  "pycluster_role_transition", "pycluster_lease_renewed",
                  "pycluster_leader_observed", "pycluster_leader_alive",
                  "pycluster_platform_started", "pycluster_platform_stopping"),
    "membership and connection": ("pycluster_member_joined", "pycluster_member_left",
                                  "pycluster_membership_event", "pycluster_connection_state",
                                  "pycluster_message_dropped", "pycluster_control_request"),
    "communication": ("pycluster_middleware",),
    "observability": ("pycluster_app_hook_call", "pycluster_lock_observers",
                      "pycluster_lock_event",
                      "pycluster_register_metrics", "pycluster_audit_categories",
                      "pycluster_health_checks", "pycluster_health_changed",
                      "pycluster_status", "pycluster_http_routes"),
    "zones": ("pycluster_zone_position", "pycluster_zone_promote", "pycluster_zone_demote",
              "pycluster_approve_promotion"),
    "cli and config": ("pycluster_config_sections", "pycluster_add_cli_commands",
                       "pycluster_check"),
}
"""The hooks by design group (the order of the generated reference)."""

# ---------------------------------------------------------------------------------------------
# Registration: called once per plugin manager / platform, fill a typed registry.
# ---------------------------------------------------------------------------------------------


@hookspec
def pycluster_register_options(registry: OptionRegistry) -> None:
    """Declare the App option classes this plugin defines (e.g. ``Docker``, ``VIP``).

    Called once when a platform is created. The plugin that declared an option's class is named
    when that plugin is unusable on this node.

    :param registry: call ``registry.add(option_class, plugin=name)`` for each class.
    """


@hookspec(firstresult=True)
def pycluster_claim_option(app: App, option: Any) -> bool | None:
    """Claim an App option object that is not one of the core's own nor a backend's.

    Called once per such option when the app is registered with a platform (options of a
    registered backend kind are claimed by the kernel without it). Stops at the first non-None
    result. Return True to accept it (e.g. after registering its health check).
    An option nobody claims is refused (`pycluster.UnclaimedOptionError`).

    :param app: the app being registered.
    :param option: the option object passed to ``App(...)``.
    """


@hookspec
def pycluster_platform_services(platform: Platform, registry: PlatformServices) -> None:
    """Register this plugin's service object for a platform (only when its feature is on).

    Called once when a platform is created. ``registry.add(name, factory, after=(...),
    requires=(...))``: the kernel builds the services in dependency order (``after`` names
    services that must be built and started first when they exist; ``requires`` names those
    without which this one is not built), starts them once NATS is connected and the node
    joined, and stops them in reverse order when the platform leaves. The service is then
    ``platform.services.get(name)`` / ``platform.service(name)`` (`PluginError` naming the
    plugin when it is missing). Follow apps with ``pycluster_app_started`` /
    ``pycluster_app_stopped``.

    :param platform: the platform being created (settings; not connected yet).
    :param registry: the platform's `pycluster.kernel.services.PlatformServices`.
    """


@hookspec
def pycluster_app_events(registry: AppEventRegistry) -> None:
    """Declare the app events this plugin fires (the ``App.on_<event>`` hooks it runs).

    Called once when a platform is created. ``platform.register(app)`` refuses an app that has
    hooks for an event no installed plugin fires (``on_own`` without a ring plugin), naming
    what would fire it.

    :param registry: call ``registry.add(event, plugin=name)`` (``"own"``, ``"release"``,
        ``"migration_start"``, ...).
    """


# ---------------------------------------------------------------------------------------------
# Election.
# ---------------------------------------------------------------------------------------------


@hookspec(firstresult=True)
def pycluster_election(app: App, platform: Platform, keys: list[str]) -> Election | None:
    """Provide the election implementation of an app.

    Called once when an elected app (Singleton, Replicas) starts on this node. Stops at the
    first non-None result; the default plugin ``election`` provides the NATS KV lease election
    (`pycluster.builtin.election.lease.LeaseElection`). The result implements the
    `pycluster.kernel.election.Election` protocol.

    :param app: the app that campaigns.
    :param platform: its platform (connection, node id, settings).
    :param keys: the lease keys to campaign for, holding at most one (``["leader"]`` for a
        Singleton, ``slot-0..n-1`` for ``Replicas(n)``).
    """


# ---------------------------------------------------------------------------------------------
# Placement.
# ---------------------------------------------------------------------------------------------


@hookspec
def pycluster_placement_filter(app: App, node: NodeInfo) -> bool | None:
    """Decide whether ``node`` may run an instance of ``app`` (hard constraints).

    Called for every app and candidate node whenever eligibility is evaluated (start, label
    change). All implementations are called; any False excludes the node, None abstains.

    :param app: the app to place.
    :param node: id and labels of the candidate node.
    """


@hookspec
def pycluster_placement_score(app: App, node: NodeInfo, view: PlacementView) -> float | None:
    """Score an eligible node for an app (soft preferences; higher is preferred).

    Called for this node and every live standby of the app when the kernel ranks candidates
    (`pycluster.kernel.placement.Placement`): a standby defers its campaign by the number of
    distinct higher scores among live standbys, so the best-scored one takes over first. All
    implementations are called and their numbers summed; None abstains. The default plugin
    ``placement`` scores a node by its ``priority`` for the app.

    :param app: the app to place.
    :param node: id and labels of the candidate node.
    :param view: what this node knows of the others (membership records, liveness).
    """


@hookspec(firstresult=True)
def pycluster_placement_strategy(name: str) -> PlacementStrategy | None:
    """Provide a named placement strategy (how scored candidates are ordered).

    Called when a strategy is looked up by name. Stops at the first non-None result. The
    result implements `pycluster.kernel.placement.PlacementStrategy`.

    :param name: the strategy's name.
    """


@hookspec
def pycluster_placement_event(platform: Platform, app: App | None, event: str,
                              data: dict[str, Any]) -> None:
    """Report a placement operation of this node (notification).

    Called on the node that performs the operation, as it happens. Events:
    ``migration_started``, ``migration_completed``, ``migration_vetoed``, ``migration_failed``
    (data: ``from``, ``to``, ``reason``, ``seconds`` when finished, ``error`` when vetoed or
    failed), ``labels_changed`` (``labels``, ``previous``),
    ``placement_invalid`` (``labels``), ``cordoned`` / ``uncordoned`` (``node``),
    ``maintenance`` (``on``, ``app``), ``rebalance_waiting`` (``reason``: why an automatic
    move waits; once per reason). The default plugins ``audit`` (category
    ``placement``) and ``metrics`` (``pycluster_migrations_total``,
    ``pycluster_migration_seconds``) implement it. Must not block.

    :param platform: the platform.
    :param app: the app concerned (None for node-wide operations).
    :param event: what happened.
    :param data: its details (JSON-serialisable).
    """


# ---------------------------------------------------------------------------------------------
# Replication.
# ---------------------------------------------------------------------------------------------


@hookspec
def pycluster_register_replicators(registry: ReplicatorRegistry) -> None:
    """Map App option classes to replicators of the app's data (e.g. a SQLite database).

    Called once when a platform is created. For every option of an app matched here the kernel
    builds ``factory(option, app, platform)`` when the app starts on this node and drives it
    (`pycluster.kernel.replication`): ``follow`` while standby; the stages ``<name>-catchup``
    (CATCH_UP: ``catch_up``), ``<name>-promote`` (PROMOTE: ``promote``), ``<name>-replicate``
    (REPLICATE: ``replicate``) and, with a snapshot schedule, ``<name>-snapshots`` (SNAPSHOTS,
    policy CONTINUE) when becoming active; ``stop_replicating``, ``demote`` and ``follow`` again
    when stepping down; ``stop`` when the app stops here. The health plugin runs its ``check``
    as the app health check ``<name>``. The replicator implements
    `pycluster.kernel.replication.Replicator` (the contract: only the lease holder replicates,
    the epoch fences every write, replication stops before ``ctx.deadline``).

    :param registry: call ``registry.add(option_class, factory, plugin=name)``;
        ``factory(option, app, platform)`` returns the replicator (cheap: no I/O).
    """


# ---------------------------------------------------------------------------------------------
# Backends.
# ---------------------------------------------------------------------------------------------


@hookspec
def pycluster_register_backends(registry: BackendRegistry) -> None:
    """Register backend kinds ("process", "systemd", "docker", ...): one call per kind is the
    whole of a backend plugin's wiring.

    Called once when a platform is created. For every App option of a registered class the
    kernel claims the option, builds the controller (``factory(option, app, platform)``, a
    `pycluster.backend.Controller`), runs it under the shared `pycluster.backend.Supervisor`
    (restart policy, health probes, fence guard, audit entries, ``report_failure``), and
    makes it the app's BACKEND stage and health check (``{kind}-{i}``) and, when declared, the
    kind's metrics and audit category (see `pycluster.kernel.registry.BackendKind`).

    :param registry: call ``registry.add(kind, option_class, factory, plugin=..., stage_name=,
        check_name=, audit=, metrics=)``; an unknown kind later fails with the list of
        installed kinds.
    """


# ---------------------------------------------------------------------------------------------
# Virtual IPs.
# ---------------------------------------------------------------------------------------------


@hookspec
def pycluster_register_vips(registry: VipRegistry) -> None:
    """Map App option classes to virtual-IP managers.

    Called once when a platform is created. For every option of an app matched here the kernel
    builds ``factory(option, app, platform)`` when the app starts on this node, adds the stage
    ``vip-<address>`` (`pycluster.kernel.stages.StageOrder.VIP`: ``acquire`` after promotion
    and before the backend, ``release`` after the backend stopped, bounded by the lease's end
    when it was lost) and calls ``close`` when the app stops here. A manager implements
    `pycluster.kernel.vip.VipManager`.

    :param registry: call ``registry.add(option_class, factory, plugin=name)``;
        ``factory(option, app, platform)`` returns the manager (cheap: no I/O).
    """


# ---------------------------------------------------------------------------------------------
# Discovery.
# ---------------------------------------------------------------------------------------------


@hookspec(firstresult=True)
def pycluster_service_registry(platform: Platform) -> ServiceRegistry | None:
    """Provide the service registry apps are announced in (register, deregister, lookup,
    watch).

    Called once per platform when discovery is first used. Stops at the first non-None
    result. The result implements `pycluster.kernel.discovery.ServiceRegistry`.

    :param platform: the platform.
    """


@hookspec
def pycluster_discovery_exporters(registry: DiscoveryExporterRegistry) -> None:
    """Add exporters that publish discovered instances elsewhere (DNS, a file, Consul, ...).

    Called once per platform when discovery is first used.

    :param registry: call ``registry.add(name, factory, plugin=name)``.
    """


# ---------------------------------------------------------------------------------------------
# Key routing.
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


# ---------------------------------------------------------------------------------------------
# Stages: the coordinator's ordered failover sequence.
# ---------------------------------------------------------------------------------------------


@hookspec
def pycluster_stages(app: App, platform: Platform, registry: StageRegistry) -> None:
    """Join the failover sequence of one app with ordered stages.

    Called once per app when the platform starts it, after the kernel added the stages of the
    app's replicators and VIP managers (``pycluster_register_replicators``,
    ``pycluster_register_vips``). Each stage has an ``order`` (see
    `pycluster.kernel.stages.StageOrder`), async ``activate(ctx)`` / ``deactivate(ctx)`` and a
    timeout. Becoming active runs stages in ascending order; stepping down runs the activated
    ones in reverse. A stage that fails or times out is handled by its ``on_failure`` policy
    (`pycluster.kernel.stages.FailurePolicy`): by default the node undoes what ran, steps down
    and backs off; ``RETRY`` re-runs the stage first; ``CONTINUE`` carries on (optional stages).

    :param app: the app whose sequence is being built.
    :param platform: its platform.
    :param registry: call ``registry.add(Stage(...))``.
    """


@hookspec
def pycluster_stage_event(app: App, event: StageEvent) -> None:
    """Notification: one call of a failover stage ended (or a stage failed while active).

    Called synchronously after every stage ``activate``/``deactivate`` and for every
    `AppRuntime.report_failure`; keep it cheap (no I/O).

    :param app: the app.
    :param event: what ran, how it ended, and what follows (`pycluster.kernel.stages.StageEvent`).
    """


@hookspec
def pycluster_activation_failed(app: App, epoch: int | None, error: str) -> None:
    """Notification: becoming active failed (a stage or ``on_active`` hook failed or timed
    out, or the lease was lost meanwhile); the node undoes what ran and steps down.

    Called synchronously, once per failed activation; keep it cheap.

    :param app: the app.
    :param epoch: the epoch of the failed activation.
    :param error: what failed, in words.
    """


# ---------------------------------------------------------------------------------------------
# Lifecycle: apps, roles, leases and leaders on this node.
# ---------------------------------------------------------------------------------------------


@hookspec
def pycluster_app_started(app: App, runtime: AppRuntime) -> Any:
    """Notification: an app starts on this node (it is placed here; it will campaign next).

    Called once per app start, before its ``on_start`` hooks and its campaign. May return an
    awaitable (subscribe the app's endpoints, start its checks, ...), awaited in turn before
    the app starts; an error fails the platform's start.

    :param app: the app.
    :param runtime: its `pycluster.kernel.coordinator.AppRuntime` on this node (per-app plugin
        state: ``runtime.state(plugin)``).
    """


@hookspec
def pycluster_app_stopped(app: App, runtime: AppRuntime) -> Any:
    """Notification: an app stopped on this node (it stepped down already).

    Called once per app when the platform leaves. May return an awaitable, awaited with the
    hook timeout; a failure is logged, never propagated.

    :param app: the app.
    :param runtime: its runtime on this node.
    """


@hookspec
def pycluster_role_changed(app: App, role: str, epoch: int | None, leader: str | None,
                           reason: str) -> Any:
    """Notification: an app changed role on this node ("active", "passive", "stopped").

    Called after each completed transition, for every app. May return an awaitable, which is
    awaited with the app's hook timeout; a failure is logged, never propagated.

    :param app: the app.
    :param role: the new role.
    :param epoch: the current leadership epoch (fencing token), if any.
    :param leader: the node id of the current leader, if known.
    :param reason: why ("elected (leader)", "stepped down", "lease not renewed in time", ...).
    """


@hookspec
def pycluster_role_transition(app: App, runtime: AppRuntime, role: Role, epoch: int | None,
                              reason: str) -> None:
    """Notification: an app's role on this node is changing, including the transitional
    ``activating`` and ``deactivating``.

    Called synchronously in the task that runs the transition, before the stages of that
    transition run (a tracing plugin opens a span there that the stages and hooks inherit);
    keep it cheap, return nothing.

    :param app: the app.
    :param runtime: its runtime on this node.
    :param role: the role being entered (`pycluster.kernel.types.Role`).
    :param epoch: the epoch of the transition.
    :param reason: why.
    """


@hookspec
def pycluster_lease_renewed(app: App, deadline: float) -> None:
    """Notification: this node won or renewed an app's lease.

    Called synchronously on every renewal (each heartbeat) and win; keep it cheap. Fence
    guards take the new deadline from here; the systemd watchdog pings.

    :param app: the app.
    :param deadline: the lease's new local end (``time.monotonic()`` clock); the node stops
        acting as leader at that instant unless renewed.
    """


@hookspec
def pycluster_leader_observed(app: App, leader: str | None, epoch: int | None) -> None:
    """Notification: the leader this node observes for an app changed.

    Called synchronously on every change seen (None: vacant); keep it cheap.

    :param app: the app.
    :param leader: the node id of the new leader, or None.
    :param epoch: its epoch.
    """


@hookspec
def pycluster_leader_alive(app: App, leader: str, epoch: int | None) -> None:
    """Notification: a standby saw a sign of life of the app's leader (a lease renewal, or its
    graceful release).

    Called synchronously on standbys, about once per renewal of the leader; keep it cheap.
    Failover times are measured from the last one.

    :param app: the app.
    :param leader: the leader's node id.
    :param epoch: its epoch.
    """


@hookspec
def pycluster_platform_started(platform: Platform) -> Any:
    """Notification: the platform is connected, its membership record is published and its
    apps started (as standbys).

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
# Membership and connection.
# ---------------------------------------------------------------------------------------------


@hookspec
def pycluster_member_joined(platform: Platform, node: str, record: dict[str, Any]) -> None:
    """Notification: a node joined the platform (or was first seen by this one).

    Called synchronously, once per node seen; keep it cheap.

    :param platform: this node's platform.
    :param node: the node id.
    :param record: its validated membership record (labels, version, plugins, apps, ...).
    """


@hookspec
def pycluster_member_left(platform: Platform, node: str, record: dict[str, Any]) -> None:
    """Notification: a node left gracefully, or its membership record expired.

    Called synchronously, once per node; keep it cheap.

    :param platform: this node's platform.
    :param node: the node id.
    :param record: its last membership record.
    """


@hookspec
def pycluster_membership_event(platform: Platform, event: MembershipEvent,
                               data: dict[str, Any]) -> Any:
    """Notification: something happened to this node's own membership.

    Called on ``duplicate_refused`` (another live process has this node id: the start is
    refused), ``replaced`` (another incarnation took this node's record: the node leaves) and
    ``record_restored`` (a record nobody answers for was taken back). May return an awaitable;
    for ``duplicate_refused`` it is awaited (bounded) before the start fails, so an audit entry
    can be stored first.

    :param platform: the platform.
    :param event: what happened (`pycluster.kernel.types.MembershipEvent`, a `str`).
    :param data: details (node, holder, the record found, ...).
    """


@hookspec
def pycluster_connection_state(platform: Platform, connection: str,
                               state: ConnectionState) -> None:
    """Notification: a NATS connection of this node changed state.

    Called synchronously when the ``data`` or ``control`` connection is lost
    (``disconnected``), comes back (``reconnected``), or is moved away from a server whose
    JetStream writes kept failing (``moved``); keep it cheap.

    :param platform: the platform.
    :param connection: ``"data"`` or ``"control"``.
    :param state: the new state (`pycluster.kernel.types.ConnectionState`).
    """


@hookspec
def pycluster_message_dropped(platform: Platform, error: Any) -> None:
    """Notification: nats-py dropped a message because a subscription's pending queue was full.

    Called synchronously for every dropped message (a flood): keep it very cheap.

    :param platform: the platform.
    :param error: nats-py's ``SlowConsumerError`` (``sub``, ``subject``).
    """


@hookspec
def pycluster_control_request(platform: Platform, request: Request, subject: str,
                              reply: str | None, error: BaseException | None) -> None:
    """Notification: this node served (or refused) a control request (step-down, ping).

    Called synchronously after each control request, at most about 20 times a second (more
    are counted, not reported); keep it cheap.

    :param platform: the platform.
    :param request: the request as middleware saw it (method ``control.<name>``, identity,
        source app, ``extra["request"]``: what the handler understood).
    :param subject: the subject it arrived on.
    :param reply: its reply subject, if any.
    :param error: why it was refused, or None.
    """


# ---------------------------------------------------------------------------------------------
# Communication: RPC, the API bus and events.
# ---------------------------------------------------------------------------------------------


@hookspec
def pycluster_middleware(platform: Platform) -> Any:
    """Contribute middleware to a platform's calls, handlers and events (e.g. tracing).

    Called once when the platform is created. Return a middleware object (see
    `pycluster.middleware.Middleware`: ``on_call``, ``on_request``, ``on_publish``,
    ``on_event``, each with access to the NATS headers), a list of them, or None. Plugin
    middleware wraps the middleware added later with ``pycluster.middleware.use``; among
    plugins, the first called is outermost (``tryfirst`` puts a plugin's first).

    :param platform: the platform being created.
    """


# ---------------------------------------------------------------------------------------------
# Observability: app hooks and locks, metrics, audit categories, health checks, status.
# ---------------------------------------------------------------------------------------------


@hookspec
def pycluster_app_hook_call(app: App, hook: str, function: str
                            ) -> contextlib.AbstractContextManager[Any] | None:
    """Wrap one run of an app hook (``on_active``, ``on_passive``, ...): return a context
    manager entered around it, or None.

    Called before every run of an app hook function. The context manager sees the hook's
    exception (a failure, or a ``TimeoutError`` when it overran its timeout) and must let it
    pass; a cancellation is not a failure. Used for spans, durations and failure records.

    :param app: the app.
    :param hook: the hook (``"on_active"``, ``"stage:NAME"``, ...).
    :param function: the function's name.
    """


@hookspec
def pycluster_lock_event(platform: Platform, scope: str, event: str, lock: Any,
                         fields: dict[str, Any]) -> None:
    """Notification: a lock of this node started waiting, was acquired, released or lost.

    Called synchronously for every lock event (``wait``, ``acquired``, ``wait_failed``,
    ``released``, ``expired``); keep it very cheap.

    :param platform: the platform.
    :param scope: the app name, or ``"_platform"`` for ``platform.lock()``.
    :param event: the event.
    :param lock: the `pycluster.kernel.locks.Lock`.
    :param fields: details (``token``, ``waited``, ``held``, ``reason``, ...).
    """


@hookspec
def pycluster_lock_observers(platform: Platform, scope: str
                             ) -> Mapping[str, Callable[[Any, dict[str, Any]], None]] | None:
    """Observers of the locks of ``scope``, per event: ``{event: fn(lock, fields)}``.

    Called once per lock service (when the platform or an app starts), not per event: the
    kernel keeps, for each event, the list of functions that asked for it and calls them
    synchronously, so an event no plugin asked for costs nothing. The events and fields are
    those of `pycluster_lock_event` (which is called for every event; prefer this hook on hot
    paths). Keep the functions very cheap; an exception is logged and does not reach the lock.

    :param platform: the platform.
    :param scope: the app name, or ``"_platform"`` for ``platform.lock()``.
    :return: the functions by event (``wait``, ``acquired``, ``wait_failed``, ``released``,
        ``expired``), or None.
    """


@hookspec
def pycluster_register_metrics(registry: CollectorRegistry, platform: Platform) -> None:
    """Add this plugin's Prometheus metrics to a platform's registry.

    Called once per platform, when its metrics service is built (the platform is being
    created; not called when the ``metrics`` plugin is disabled). Create metrics with
    ``registry=registry`` (or register a custom collector, computed at scrape time); they are
    served on ``/metrics`` with the core's. Name them ``pycluster_<plugin>_...`` and document
    them with your plugin.

    :param registry: the platform's own `prometheus_client.CollectorRegistry`.
    :param platform: the platform (settings, apps; not connected yet).
    """


@hookspec
def pycluster_audit_categories(registry: AuditCategoryRegistry) -> None:
    """Declare the audit categories and actions this plugin writes.

    Called once per platform, when its audit service is built. Entries themselves are written
    with ``platform.audit.log(category, action, data, app=...)``; declaring them lists them
    for ``pycluster audit --categories`` and the docs.

    :param registry: call ``registry.add(category, {action: description}, plugin=name)``.
    """


@hookspec
def pycluster_health_checks(platform: Platform, health: PlatformHealth) -> None:
    """Register this plugin's platform-level health checks.

    Called once per platform, when its health service is built (after the built-in ``nats``
    and ``jetstream`` checks, so those can be named in ``depends_on``). App-level checks are
    registered with ``app.health.register(...)``, e.g. when claiming an option.

    :param platform: the platform.
    :param health: call ``health.register(name, check, interval=..., depends_on=[...])``.
    """


@hookspec
def pycluster_health_changed(
    platform: Platform, check: str, status: str, previous: str, app: App | None,
    error: str | None,
) -> Any:
    """Notification: a health check changed status ("unknown", "healthy", "unhealthy").

    Called on every change of every check on this node. May return an awaitable, which is
    awaited in the background with the hook timeout; a failure is logged, never propagated.

    :param platform: the platform.
    :param check: the check's full name (``nats``, ``{app}.{name}``, ...).
    :param status: the new status.
    :param previous: the status before.
    :param app: the app the check belongs to, or None for a platform check.
    :param error: the failing run's error, or None.
    """


@hookspec
def pycluster_status(platform: Platform) -> dict[str, Any] | None:
    """Add this plugin's view (e.g. replication lag) to the node's ``/status`` document.

    Called on every ``GET /status``, directly on each implementation, so it must be cheap and
    synchronous (read in-process state). The result appears under ``plugins_status`` keyed by
    plugin name; None adds nothing; an exception is shown as ``{"error": ...}``.

    :param platform: the platform.
    """


@hookspec
def pycluster_http_routes(platform: Platform) -> list[Route] | None:
    """Serve this plugin's HTTP endpoints on the node's health address (``health_addr``).

    Called once when the health plugin's HTTP server starts (not at all without
    ``health_addr``). Return a list of `pycluster.httpserver.Route` (``path``, ``async
    handler(request) -> Response``, ``prefix=True`` to serve every path under ``path``) or
    None. Handlers run on the server's event loop for every ``GET``/``HEAD`` of their path:
    answer from in-process state (the server keeps answering while NATS is unreachable), and
    look services up at request time (``platform.services.get(name)``): the plugin's service
    may start after the server. Every route of the server comes from this hook, the default
    plugins' too (health: ``/health``, ``/ready``, ``/status``; metrics: ``/metrics``), so a
    disabled plugin's paths are not served. A path an earlier plugin took (the default
    plugins come first) is skipped with a warning; an exception skips that plugin's
    routes (logged).

    :param platform: the platform (its services are built, maybe not started yet).
    """


@hookspec(firstresult=True)
def pycluster_zone_position(app: App) -> int | None:
    """The replicated position of `app`'s zone replica on this node (higher = more caught up),
    or None when no replica plugin serves the app. Used to prefer the most caught-up zone when
    zones vote on a promotion.

    Called by the zone vote (the ``leaf`` plugin) when this zone campaigns or votes; answer
    from in-process state.

    :param app: the app (it has a ``PromoteOnHubFailure`` option).
    """


@hookspec
def pycluster_zone_promote(app: App, term: int) -> Any:
    """This zone was promoted for `app` with fencing epoch `term`: turn the zone replica into
    the writable primary (stop following, final catch-up, replicate in this zone).

    Called on every node of the promoted platform: on the node that won the vote before the
    app's ``on_promoted`` hooks, on the platform's other nodes when they learn the zone's new
    term. May return an awaitable, awaited (bounded by the hook timeout) before the zone
    writes; an error or a timeout means the promotion did not happen on this node: it does not
    write (``app.zone.check()`` raises) until it is demoted or promoted again.

    :param app: the app.
    :param term: the zone's new term (its fencing epoch, above every earlier primary's).
    """


@hookspec
def pycluster_zone_demote(app: App, primary_platform: str, term: int) -> Any:
    """Another platform is primary for `app` with the higher epoch `term`: stop writing and
    replicating before anything else, then follow `primary_platform`'s data as a replica.

    Called on every node of this platform that held the primary role when it learns of the
    higher term (this zone is fenced already), before the app's ``on_demoted`` hooks. May
    return an awaitable, awaited (bounded by the hook timeout).

    :param app: the app.
    :param primary_platform: the platform that is primary now ("" when an operator demoted
        this zone without a successor: stop writing and replicating, follow nothing yet).
    :param term: that platform's term.
    """


@hookspec(firstresult=True)
def pycluster_approve_promotion(app: App, term: int, zone: str) -> bool | None:
    """Approve (True) or refuse (False) the promotion of ``zone`` for ``app`` at ``term``
    (the ``coordinated`` partition strategy); None: no opinion.

    Called by the candidate zone after it won the vote, before it waits out the old primary's
    lease. With no approver installed (every implementation returns None) a ``coordinated``
    app is never promoted.

    :param app: the app (``Partition("coordinated")``).
    :param term: the term the zone won.
    :param zone: the candidate zone (this platform's zone).
    """


# ---------------------------------------------------------------------------------------------
# Command line, config file, introspection.
# ---------------------------------------------------------------------------------------------


@hookspec
def pycluster_config_sections(registry: ConfigRegistry) -> None:
    """Add a settings section for this plugin to the config file (section name = plugin name).

    Called once when a config file is loaded.

    :param registry: call ``registry.add(name, OptionClass)`` with an option class declared
        with `pycluster.kernel.declare.option` (the section has its fields and is validated by
        the same declaration), or ``registry.add(name, model, to_option)`` with a pydantic model
        for the section and a function turning a validated section into an App option.
    """


@hookspec
def pycluster_add_cli_commands(cli: click.Group) -> None:
    """Add click commands (or groups) to the ``pycluster`` command line.

    Called when ``pycluster`` is given a command name that no declaration knows, before it
    gives up, and when it lists its commands while a plugin of another distribution is
    installed (the command line builds the plugin manager only for a command that needs it).
    Declaring the command with a ``pycluster.cli`` entry point
    (`pycluster.cli.lazy.LazyCommand`) as well spares ``pycluster --help`` the import of every
    plugin.

    :param cli: the root ``pycluster`` click group; call ``cli.add_command(...)``.
    """


@hookspec
def pycluster_check() -> str | None:
    """Report a missing system dependency (no container engine, no netlink rights, ...).

    Called once per plugin, directly on each implementation, when the plugin manager is built
    (so the answer is attributed to its plugin). Return None when usable, else the reason; the
    plugin is then reported as unusable by name, distribution and version.
    """
