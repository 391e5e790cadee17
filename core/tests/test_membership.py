"""Membership through the public API (real NATS, platforms in one process)."""

from __future__ import annotations

from typing import Any

import pytest

from pycluster import App, Context, DuplicateNodeError, hookimpl
from pycluster.testing import wait_for

pytestmark = pytest.mark.timeout(60)


async def test_join_and_leave_hooks(make_platform: Any) -> None:
    joined: list[str] = []
    left: list[str] = []
    app = App("svc")

    @app.on_member_join
    async def on_join(ctx: Context) -> None:
        assert ctx.member is not None
        joined.append(ctx.member["node_id"])

    @app.on_member_leave
    async def on_leave(ctx: Context) -> None:
        assert ctx.member is not None
        left.append(ctx.member["node_id"])

    pa = await make_platform("a", app)
    pb = await make_platform("b", App("svc"), labels={"zone": "z1"})
    await wait_for(lambda: "b" in joined, 10)
    assert pa.membership is not None
    rec = pa.membership.members["b"]
    assert rec["labels"] == {"zone": "z1"} and rec["apps"]["svc"]["role"] in ("passive", "active")
    assert {"version", "plugins", "started", "host", "pid"} <= set(rec)
    await pb.stop()
    await wait_for(lambda: "b" in left, 10)


async def test_expired_member_leaves(make_platform: Any, nats_url: str) -> None:
    """A node that stops refreshing (here: its connection closes without a goodbye) expires."""
    left: list[str] = []
    app = App("svc")

    @app.on_member_leave
    async def on_leave(ctx: Context) -> None:
        left.append(ctx.member["node_id"] if ctx.member else "")

    await make_platform("a", app, lease_ttl=1.0, heartbeat_interval=0.25)
    pb = await make_platform("b", lease_ttl=1.0, heartbeat_interval=0.25)
    await wait_for(lambda: pb.membership is not None and "a" in pb.membership.members, 10)
    # Cut b off without a graceful leave: stop its tasks and close its connection.
    assert pb.membership is not None and pb.nc is not None
    pb.membership._stopped = True
    for t in pb.membership._tasks:
        t.cancel()
    await pb.nc.close()
    await wait_for(lambda: "b" in left, 10)


async def test_duplicate_node_id_refused_in_process(make_platform: Any) -> None:
    await make_platform("same")
    with pytest.raises(DuplicateNodeError, match="already alive"):
        await make_platform("same")


async def test_plugin_set_mismatch_is_reported(make_platform: Any) -> None:
    class Extra:
        @hookimpl
        def pycluster_placement_filter(self, app: App, node: Any) -> None:
            return None

    pa = await make_platform("a")
    pb = await make_platform("b", extra_plugins=[("extra", Extra())])
    await wait_for(lambda: "b" in pa.plugin_mismatches, 10)
    assert "extra" in pa.plugin_mismatches["b"]
    await wait_for(lambda: "a" in pb.plugin_mismatches, 10)
