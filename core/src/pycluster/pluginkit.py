"""Small helpers for plugins that add an App option which is not a backend.

A backend kind needs none of this: registered with ``pycluster_register_backends``, the
kernel claims its options and builds their stages, health checks, metrics and audit entries
(`pycluster.kernel.backends`). An option of another kind (a VIP, a database) is claimed by
its plugin; `claim_with_health_check` is the body of such a ``pycluster_claim_option`` hook.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

if TYPE_CHECKING:
    from .kernel.app import App

__all__ = [
    "CheckedOption",
    "claim_with_health_check",
]


class CheckedOption(Protocol):
    """An App option whose controller is checked every ``check_interval`` seconds."""

    @property
    def check_interval(self) -> float:
        """Seconds between checks of the controller while active."""


OptionT = TypeVar("OptionT", bound=CheckedOption)


def claim_with_health_check(
    app: App,
    option: object,
    kind: type[OptionT],
    name: Callable[[App, OptionT], str],
    check: Callable[[OptionT], Callable[[], Any]],
    *,
    timeout: float,
) -> bool | None:
    """Claim ``option`` when it is a ``kind`` and register its app health check once.

    Use it as the whole body of a ``pycluster_claim_option`` hook.

    :param app: the app the option was passed to.
    :param option: the option offered to the hook.
    :param kind: the option class this plugin owns.
    :param name: the check's name for ``(app, option)``, e.g. ``"docker-0"``.
    :param check: builds the check function for the option.
    :param timeout: seconds one run of the check may take.
    :returns: None when the option is not a ``kind`` (not ours), else True.
    """
    if not isinstance(option, kind):
        return None
    check_name = name(app, option)
    if check_name not in app.health.specs:
        app.health.register(check_name, check(option), interval=option.check_interval,
                            timeout=timeout)
    return True
