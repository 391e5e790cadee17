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

    from .app import App
    from .election import Election
    from .platform import Platform
    from .registry import BackendRegistry, ConfigRegistry, OptionRegistry, StageRegistry
    from .types import NodeInfo

hookspec = pluggy.HookspecMarker("pycluster")

__all__ = [
    "pycluster_add_cli_commands",
    "pycluster_app_registered",
    "pycluster_check",
    "pycluster_claim_option",
    "pycluster_config_sections",
    "pycluster_election",
    "pycluster_placement_filter",
    "pycluster_platform_started",
    "pycluster_platform_stopping",
    "pycluster_register_backends",
    "pycluster_register_options",
    "pycluster_role_changed",
    "pycluster_stages",
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
    (`pycluster.election.LeaseElection`).

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
    `pycluster.registry.StageOrder`), async ``activate(ctx)`` / ``deactivate(ctx)`` and a timeout.
    Becoming active runs stages in ascending order; stepping down runs the activated ones in
    reverse. A stage that fails or times out makes the node undo what ran, step down and back off.

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
