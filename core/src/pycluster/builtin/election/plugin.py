"""Core default plugin "election": the NATS KV lease election (replaceable via the hook)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ...kernel.election import Election
from ...kernel.names import bucket
from ...plugins import hookimpl
from .lease import LeaseElection

if TYPE_CHECKING:
    from ...kernel.app import App
    from ...kernel.platform import Platform


@hookimpl(trylast=True)
def pycluster_election(app: App, platform: Platform, keys: list[str]) -> Election | None:
    """A `LeaseElection` in ``{platform}_{app}_election``, on the platform's control
    connection (a data-plane flood cannot delay its renewals)."""
    nc = platform.nc_control or platform.nc
    js = platform.js_control or platform.js
    assert nc is not None and js is not None
    return LeaseElection(
        nc, js, bucket(platform.name, app.name, "election"), platform.node_id,
        keys=keys, **platform.election_kwargs(app),
    )
