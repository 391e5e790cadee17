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


@pytest.mark.slow
async def test_steady_state_reads_no_records_and_a_silent_watch_recovers(
        make_platform: Any) -> None:
    """Idle nodes follow each other through the watch alone (no record read per heartbeat);
    a watch that goes silent (its server-side consumer deleted) is noticed by this node's own
    refreshes not coming back, re-created, and a node joining afterwards is seen well before
    the slow reconciliation (15 s) would find it."""
    pa = await make_platform("a")  # heartbeat 0.5 s, lease 2 s
    pb = await make_platform("b")
    ma, mb = pa.membership, pb.membership
    assert ma is not None and mb is not None
    await wait_for(lambda: "b" in ma.members and "a" in mb.members, 10)
    reads = ma.full_reads
    first_b = ma._fresh["b"][0]
    await wait_for(lambda: ma._fresh["b"][0] > first_b + 2, 10)  # b's refreshes arrive
    assert ma.full_reads == reads and ma.watch_restarts == 0
    assert ma.alive("b")

    info = await ma._watch_sub.consumer_info()
    assert pa.js_control is not None
    await pa.js_control.delete_consumer(info.stream_name, info.name)
    await wait_for(lambda: ma.watch_restarts >= 1, 10)
    await make_platform("c")
    await wait_for(lambda: "c" in ma.members, 10)
    first_c = ma._fresh["c"][0]
    await wait_for(lambda: ma._fresh["c"][0] > first_c, 10)  # through the new watch


def test_refresh_interval_and_stream_sequence_from_the_reply() -> None:
    """Unchanged records are refreshed every half TTL (at least every heartbeat): every member
    receives every refresh, and a dead node's record still expires one TTL after its last.
    The watch reads a delivery's stream sequence straight from its reply subject."""
    from nats.aio.msg import Msg

    from pycluster.kernel.membership import Membership, _stream_seq

    def membership(ttl: float, heartbeat: float) -> Membership:
        return Membership(None, None, "p", "n1", ttl=ttl, heartbeat=heartbeat,  # type: ignore[arg-type]
                          record=dict, on_join=print, on_leave=print, on_replaced=print)

    assert membership(10.0, 3.0).refresh_interval == 5.0
    assert membership(1.0, 0.3).refresh_interval == 0.5
    assert membership(10.0, 6.0).refresh_interval == 6.0  # never more often than asked
    reply = "$JS.ACK.KV_p_platform.cons1.1.4711.17.1700000000000000000.0"
    assert _stream_seq(Msg(None, subject="$KV.p_platform.nodes.n2", reply=reply)) == 4711  # type: ignore[arg-type]
    domain = "$JS.ACK.dom.acchash.KV_p_platform.cons1.1.42.17.1700000000000000000.0.rand"
    assert _stream_seq(Msg(None, subject="$KV.p_platform.nodes.n2", reply=domain)) == 42  # type: ignore[arg-type]
