"""The `Systemd` App option; its fields are also the config-file section ``systemd:``."""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Sequence
from typing import TYPE_CHECKING

from pycluster.backend import BackendHealth
from pycluster.kernel.declare import option
from pycluster.kernel.errors import ConfigError

if TYPE_CHECKING:
    from .backend import SystemdBackend

PREFIX_ENV = "PYCLUSTER_SYSTEMD_PREFIX"
"""Default command prefix (shell words) when `Systemd.prefix` is None, e.g. ``ssh db1``."""

_UNIT = re.compile(r"^[A-Za-z0-9:_.\\@-]{1,255}$")
_SUFFIXES = ("service", "socket", "target", "mount", "automount", "timer", "path", "slice",
             "scope", "swap", "device")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def unit_name(name: object, what: str = "Systemd.unit") -> str:
    """Validate a unit name; a name without a unit-type suffix gets ``.service``."""
    if not isinstance(name, str) or not _UNIT.match(name) or name.startswith("-"):
        raise ConfigError(what, name, "not a systemd unit name (letters, digits, ':_.\\@-')")
    if name.rsplit(".", 1)[-1] not in _SUFFIXES:
        name = f"{name}.service"
    return name


def split_prefix(prefix: str | Sequence[str] | None) -> tuple[str, ...]:
    """The command prefix as argv words (None: ``$PYCLUSTER_SYSTEMD_PREFIX`` or nothing)."""
    if prefix is None:
        prefix = os.environ.get(PREFIX_ENV, "")
    words = shlex.split(prefix) if isinstance(prefix, str) else [str(w) for w in prefix]
    return tuple(words)


@option(eq=False)
class Systemd:
    """Run a systemd unit while the app is active on this node (the BACKEND stage).

    Becoming active starts ``requires`` in order, then ``unit``, each with ``systemctl start``
    (which returns once the unit is started: for ``Type=notify`` units, once it sent READY=1),
    and checks that it is active. Stepping down stops ``unit``, then ``requires`` in reverse.
    While active the unit is checked every ``check_interval`` seconds: while systemd itself
    restarts it (``Restart=``), the backend waits; a unit that stays failed or inactive is
    restarted up to ``max_restarts`` times within ``restart_window`` seconds, and after that
    the node steps down so a standby takes over. Errors quote the unit's recent journal lines.

    The manager is reached through ``prefix``: nothing for this machine's systemd, or a
    command that runs a command elsewhere (``"ssh db1"``, ``"podman exec sd1"``); ``systemctl``
    and ``journalctl`` are appended to it.

    The option object is also the handle: ``await opt.health()``, ``await opt.journal()``
    (it holds no state: the controller is found through the app it was registered with).
    The same fields make the ``systemd:`` section of an app in a config file.

    :param unit: the unit (``"convex"`` means ``convex.service``).
    :param requires: units to start before ``unit`` (in order), stopped after it.
    :param prefix: command prefix reaching the manager (string of shell words or a list);
        None uses ``$PYCLUSTER_SYSTEMD_PREFIX`` (empty: local).
    :param user: talk to the user manager (``--user``).
    :param start_timeout: seconds a start (or restart) may take, per unit.
    :param stop_timeout: seconds a stop may take before the unit is killed (shortened to the
        lease deadline when the node must fence itself).
    :param stop_requires: also stop ``requires`` when stepping down.
    :param max_restarts: restarts within ``restart_window`` before the node steps down.
    :param restart_backoff: first restart delay (doubles each time).
    :param restart_window: seconds over which restarts are counted.
    :param check_interval: seconds between unit checks while active.
    :param journal_lines: how many journal lines an error quotes.
    :param epoch_variable: if set, ``systemctl set-environment NAME=<epoch>`` runs before the
        start, so the unit sees the fencing token (in the manager's environment).
    """

    unit: str
    requires: str | tuple[str, ...] = ()
    prefix: str | tuple[str, ...] | None = None
    user: bool = False
    start_timeout: float = 90.0
    stop_timeout: float = 90.0
    stop_requires: bool = True
    max_restarts: int = 3
    restart_backoff: float = 1.0
    restart_window: float = 300.0
    check_interval: float = 2.0
    journal_lines: int = 20
    epoch_variable: str | None = None

    def __post_init__(self) -> None:
        # Normalised once, at declaration (the instance is frozen).
        object.__setattr__(self, "unit", unit_name(self.unit))
        requires = (self.requires,) if isinstance(self.requires, str) else self.requires
        object.__setattr__(self, "requires",
                           tuple(unit_name(u, "Systemd.requires") for u in requires))
        if self.unit in self.requires:
            raise ConfigError("Systemd.requires", self.requires, "must not contain the unit")
        if isinstance(self.prefix, str):
            try:
                shlex.split(self.prefix)
            except ValueError as exc:
                raise ConfigError("Systemd.prefix", self.prefix, str(exc)) from None
        for name in ("start_timeout", "stop_timeout", "check_interval", "restart_window"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"Systemd.{name}", getattr(self, name), "must be > 0")
        if self.restart_backoff < 0:
            raise ConfigError("Systemd.restart_backoff", self.restart_backoff, "must be >= 0")
        if self.max_restarts < 0:
            raise ConfigError("Systemd.max_restarts", self.max_restarts, "must be >= 0")
        if not 0 <= self.journal_lines <= 1000:
            raise ConfigError("Systemd.journal_lines", self.journal_lines, "must be 0-1000")
        if self.epoch_variable is not None and not _ENV_NAME.match(self.epoch_variable):
            raise ConfigError("Systemd.epoch_variable", self.epoch_variable,
                              "not an environment variable name")

    def argv_prefix(self) -> tuple[str, ...]:
        """The resolved command prefix."""
        return split_prefix(self.prefix)

    # -- the handle ---------------------------------------------------------------------------

    @property
    def backend(self) -> SystemdBackend:
        """The controller on this node (once the option's app is registered with a platform;
        found through the kernel, the option holds no reference to it)."""
        from pycluster.kernel.backends import supervisor_of

        from .backend import SystemdBackend

        sup = supervisor_of(self)
        if sup is None or not isinstance(sup.controller, SystemdBackend):
            raise RuntimeError("this Systemd option is not attached to a registered app")
        return sup.controller

    async def health(self) -> BackendHealth:
        """Probe the unit now."""
        return await self.backend.probe()

    async def journal(self, lines: int | None = None) -> list[str]:
        """The unit's most recent journal lines."""
        return await self.backend.journal(self.unit, lines)
