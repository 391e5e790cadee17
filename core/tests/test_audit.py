"""The audit trail: entries in ``{platform}_audit``, automatic recording, queries, the CLI."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import nats
import pytest
from click.testing import CliRunner

from pycluster import App, ConfigError, DuplicateNodeError, InvalidNameError, Singleton
from pycluster.builtin.audit import log as audit_log
from pycluster.builtin.audit.query import AuditEntry, AuditFilter, AuditReader, audit_stream
from pycluster.cli.audit_cmd import parse_time
from pycluster.cli.main import cli
from pycluster.kernel.context import Context, correlation
from pycluster.testing import wait_for

pytestmark = pytest.mark.timeout(120)


# -- pure logic -------------------------------------------------------------------------------


def test_entry_round_trip_and_truncation() -> None:
    e = AuditEntry(time=1.5, platform="p", node="n1", category="election",
                   action="leader_acquired", app="svc", data={"epoch": 3}, trace_id="ab",
                   correlation_id="c", id="x")
    back = AuditEntry.decode(e.encode(), seq=7)
    assert back is not None and back.seq == 7 and back.data == {"epoch": 3}
    assert back.subject() == "p._.audit.election.svc.n1"
    big = AuditEntry(time=1, platform="p", node="n", category="c", action="a",
                     data={"x": "y" * 100_000})
    assert json.loads(big.encode())["data"]["truncated"] is True
    assert AuditEntry.decode(b"not json") is None


def test_filter_subjects_and_validation() -> None:
    f = AuditFilter(category=["election", "lock"], app="svc")
    assert f.subjects("p") == ["p._.audit.election.svc.*", "p._.audit.lock.svc.*"]
    assert AuditFilter().subjects("p") == ["p._.audit.*.*.*"]
    with pytest.raises(InvalidNameError):
        AuditFilter(category="Bad Category").subjects("p")
    with pytest.raises(InvalidNameError):
        AuditFilter(app="a.b").subjects("p")


def test_parse_time() -> None:
    now = 1_000_000.0
    assert parse_time("10m", now) == now - 600
    assert parse_time("2h", now) == now - 7200
    assert parse_time("1700000000", now) == 1_700_000_000
    assert parse_time("2024-01-01T00:00:00", now) == 1_704_067_200
    assert parse_time(None) is None
    with pytest.raises(ConfigError):
        parse_time("yesterday")


# -- against NATS ------------------------------------------------------------------------------


async def test_log_query_filters_and_stream(make_platform: Any) -> None:
    p = await make_platform("n1")
    p.audit.log("deploy", "started", {"version": "1.2"}, app="web")
    with correlation("req-42"):
        p.audit.log("deploy", "finished", {"ok": True}, app="web")
    p.audit.log("backup", "done")
    with pytest.raises(InvalidNameError):
        p.audit.log("Deploy!", "x")
    assert await p.audit.flush()

    got = await p.audit.query(category="deploy")
    assert [e.action for e in got] == ["started", "finished"]
    assert got[1].correlation_id == "req-42" and got[1].app == "web" and got[1].node == "n1"
    assert got[0].seq is not None and got[0].seq < got[1].seq  # type: ignore[operator]
    assert [e.action for e in await p.audit.query(app="web", limit=1)] == ["finished"]
    assert await p.audit.query(node="other") == []
    assert [e.category for e in await p.audit.query(category=["backup", "deploy"])] == [
        "deploy", "deploy", "backup"]
    later = time.time() + 3600
    assert await p.audit.query(since=later) == []
    assert await p.audit.query(until=time.time() - 3600) == []

    # Following: entries written after the stream started arrive.
    seen: list[AuditEntry] = []

    async def follow() -> None:
        async for e in p.audit.stream(AuditFilter(category="deploy")):
            seen.append(e)
            if len(seen) == 2:
                return

    task = asyncio.create_task(follow())
    await asyncio.sleep(0.3)  # let the consumer exist (it delivers only new entries)
    p.audit.log("backup", "ignored")
    p.audit.log("deploy", "rolled_back", app="web")
    p.audit.log("deploy", "started", app="api")
    await asyncio.wait_for(task, 15)
    assert [(e.action, e.app) for e in seen] == [("rolled_back", "web"), ("started", "api")]


async def test_stream_config_and_dedupe(make_platform: Any, nats_url: str) -> None:
    p = await make_platform("n1", audit_retention=3600, audit_max_bytes=1 << 20)
    info = await p.js.stream_info(audit_stream(p.name))
    assert info.config.max_age == 3600 and info.config.max_bytes == 1 << 20
    assert info.config.max_msgs == 1_000_000
    assert info.config.subjects == [f"{p.name}._.audit.>"]
    # Another node with other retention settings updates the stream.
    await make_platform("n2", audit_retention=7200, audit_max_msgs=500)
    info = await p.js.stream_info(audit_stream(p.name))
    assert info.config.max_age == 7200 and info.config.max_msgs == 500
    assert info.config.max_bytes in (-1, None)
    # The same msg id (an event several nodes observe) is stored once.
    p.audit.log("membership", "left", {"node": "x"}, msg_id="same")
    p.audit.log("membership", "left", {"node": "x"}, msg_id="same")
    await p.audit.flush()
    assert len(await p.audit.query(category="membership", action="left")) == 1
    # Reading needs nothing but a connection.
    nc = await nats.connect(nats_url)
    try:
        entries = await AuditReader(nc.jetstream(), p.name).query(category="membership")
        assert any(e.action == "joined" and e.data["node"] == "n1" for e in entries)
        assert await AuditReader(nc.jetstream(), "absent-platform").query() == []
    finally:
        await nc.close()


async def test_election_membership_lock_and_hook_entries(make_platform: Any) -> None:
    apps = {n: App("svc", Singleton()) for n in ("n1", "n2")}

    @apps["n1"].on_member_join
    async def slow(ctx: Context) -> None:
        if ctx.member and ctx.member.get("node_id") == "n2":
            await asyncio.sleep(10)  # times out (hook_timeout=1)

    @apps["n2"].on_leader_change
    async def bad(ctx: Context) -> None:
        raise ValueError("boom")

    p1 = await make_platform("n1", apps["n1"], hook_timeout=1.0)
    assert await apps["n1"].wait_for_leadership(15)
    p2 = await make_platform("n2", apps["n2"], hook_timeout=1.0)
    e1 = apps["n1"].epoch
    async with apps["n1"].lock("job", ttl=2):
        pass
    await apps["n1"].step_down()
    await wait_for(lambda: apps["n2"].is_active, 15)
    e2 = apps["n2"].epoch

    async def timed_out() -> bool:
        await p1.audit.flush()
        return bool(await p1.audit.query(category="hook", action="timeout"))

    await wait_for(timed_out, 15, message="the slow hook never timed out")
    await p1.stop()
    await wait_for(lambda: "n1" not in p2.membership.members, 15)
    assert await p2.audit.flush()

    el = await p2.audit.query(category="election", app="svc")
    acts = [(e.action, e.data.get("epoch")) for e in el]
    assert ("leader_acquired", e1) in acts and ("step_down", e1) in acts
    assert ("leader_lost", e1) in acts and ("leader_acquired", e2) in acts
    assert acts.index(("leader_lost", e1)) < acts.index(("leader_acquired", e2))
    assert e2 > e1  # type: ignore[operator]
    assert sum(1 for a in acts if a == ("leader_lost", e1)) == 1  # observers de-duplicated
    changed = [e for e in el if e.action == "leader_changed"]
    assert changed and changed[0].data == {"previous": "n1", "leader": "n2", "epoch": e2}

    members = await p2.audit.query(category="membership")
    assert {(e.action, e.data.get("node")) for e in members} >= {
        ("joined", "n1"), ("joined", "n2"), ("left", "n1")}

    locks = await p2.audit.query(category="lock", app="svc")
    assert [e.action for e in locks] == ["held"]  # a short hold: one entry for both ends
    (hold,) = locks[0].data["holds"]
    assert locks[0].data["lock"] == "job" and hold["held"] >= 0 and hold["token"] > 0
    assert locks[0].node == "n1" and locks[0].time == hold["acquired"]

    hooks = await p2.audit.query(category="hook", app="svc")
    kinds = {(e.action, e.data["hook"], e.node) for e in hooks}
    assert ("failed", "on_leader_change", "n2") in kinds
    assert ("timeout", "on_member_join", "n1") in kinds
    assert any("boom" in e.data["error"] for e in hooks)


async def test_plugin_declares_categories(make_platform: Any) -> None:
    from pycluster import hookimpl

    class Vip:
        @hookimpl
        def pycluster_audit_categories(self, registry: Any) -> None:
            registry.add("vipx", {"acquired": "the address was added"}, plugin="vipx")

    p = await make_platform("n1", start=False, extra_plugins=[("vipx", Vip())])
    assert p.audit.categories.categories["vipx"] == {"acquired": "the address was added"}
    assert p.audit.categories.plugins["vipx"] == "vipx"
    assert "election" in p.audit.categories.categories


async def test_duplicate_node_refusal_is_audited(make_platform: Any) -> None:
    p = await make_platform("n1")
    with pytest.raises(DuplicateNodeError):
        await make_platform("n1")
    entries = await p.audit.query(category="membership", action="duplicate_refused")
    assert len(entries) == 1 and entries[0].data["node"] == "n1"


async def test_cli_audit(make_platform: Any, nats_url: str) -> None:
    p = await make_platform("n1")
    p.audit.log("deploy", "started", {"version": "9"}, app="web")
    await p.audit.flush()
    runner = CliRunner()

    def run(*args: str) -> Any:
        return runner.invoke(cli, ["audit", "--nats-url", nats_url, "-p", p.name, *args],
                             obj=None)

    res = await asyncio.to_thread(run, "--category", "deploy")
    assert res.exit_code == 0, res.output
    assert "deploy/started" in res.output and 'version="9"' in res.output
    res = await asyncio.to_thread(run, "--output", "json", "--since", "1h")
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in res.output.splitlines()]
    assert {"membership", "deploy"} <= {r["category"] for r in rows}
    assert all({"time", "iso", "node", "action", "data", "seq"} <= set(r) for r in rows)
    res = await asyncio.to_thread(run, "--since", "yesterday")
    assert res.exit_code == 2 and "30s, 10m" in res.output
    res = await asyncio.to_thread(runner.invoke, cli, ["audit", "--categories"])
    assert res.exit_code == 0 and "election/leader_lost" in res.output


@pytest.mark.timeout(120)
@pytest.mark.parametrize("clients", [8, 32])
async def test_lock_load_entries_all_stored_on_graceful_stop(
        make_platform: Any, nats_url: str, clients: int) -> None:
    # Many clients lock concurrently, each its own lock (8000 entries: one publish at a time
    # left thousands queued and lost some at the stop); the platform stops right after,
    # without an explicit flush: every acquired/released entry is in the stream, nothing
    # counted as dropped.
    app = App("svc", Singleton())
    p = await make_platform("n1", app, start=False)
    await p.start()
    rounds = 4000 // clients

    async def client(i: int) -> None:
        for _ in range(rounds):
            async with app.lock(f"l{i}", ttl=5):
                pass

    await asyncio.gather(*(client(i) for i in range(clients)))
    pending = p.audit.stats()["queued"]
    await p.stop()
    assert p.audit.dropped == 0, f"{p.audit.dropped} dropped ({pending} were queued at stop)"
    nc = await nats.connect(nats_url)
    try:
        reader = AuditReader(nc.jetstream(), p.name)
        entries = await reader.query(category="lock", app="svc", limit=None)
        left = await reader.query(category="membership", action="left", node="n1")
    finally:
        await nc.close()
    # Short holds are listed in ``held`` entries; every hold is there, each with its token.
    holds = [(e.data["lock"], h["token"]) for e in entries if e.action == "held"
             for h in e.data["holds"]]
    assert len(set(holds)) == len(holds) == clients * rounds
    assert {e.action for e in entries} == {"held"}
    assert len(left) == 1 and left[0].data["graceful"] is True  # written by the stop itself


async def test_lock_holds_coalesced_long_holds_written_on_their_own(
        make_platform: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # Short holds of a lock share one ``held`` entry (each hold listed with its token and
    # times); a hold that outlasts the coalescing window gets ``acquired`` while it is still
    # held and ``released`` at the end; a flush writes pending holds at once.
    monkeypatch.setattr(audit_log, "LOCK_COALESCE", 0.3)
    app = App("svc", Singleton())
    p = await make_platform("n1", app)
    tokens = []
    for _ in range(3):
        async with app.lock("short", ttl=2) as lk:
            tokens.append(lk.token)
    lk = app.lock("long", ttl=2)
    long_token = await lk.acquire()
    started = time.monotonic()

    async def written_while_held() -> bool:  # no flush: the window's timers write them
        acts = [e.action for e in await p.audit.query(category="lock", app="svc")]
        return sorted(acts) == ["acquired", "held"]

    await wait_for(written_while_held, 10, message="entries not written after the window")
    await asyncio.sleep(max(0.0, 0.5 - (time.monotonic() - started)))
    await lk.release()
    async with app.lock("short", ttl=2) as lk2:
        tokens.append(lk2.token)
    assert await p.audit.flush()  # writes the pending held entry without waiting
    entries = await p.audit.query(category="lock", app="svc")
    by_action: dict[str, list[Any]] = {}
    for e in entries:
        by_action.setdefault(e.action, []).append(e)
    assert sorted(by_action) == ["acquired", "held", "released"]
    assert [h["token"] for e in by_action["held"] for h in e.data["holds"]] == tokens
    assert all(e.data["lock"] == "short" for e in by_action["held"])
    (acq,) = by_action["acquired"]
    (rel,) = by_action["released"]
    assert acq.data["lock"] == rel.data["lock"] == "long"
    assert acq.data["token"] == rel.data["token"] == long_token and rel.data["held"] >= 0.5
    first = by_action["held"][0].data["holds"][0]
    assert set(first) == {"token", "acquired", "held", "waited"}


async def test_dropped_entries_are_counted(make_platform: Any) -> None:
    p = await make_platform("n1", audit_buffer=5)
    for i in range(20):  # queued without a chance to publish: the 15 oldest do not fit
        p.audit.log("deploy", "step", {"i": i})
    assert p.audit.dropped == 15
    assert p.metrics.audit_dropped_total.labels("buffer full")._value.get() == 15
    assert await p.audit.flush()
    stored = await p.audit.query(category="deploy")
    assert [e.data["i"] for e in stored] == list(range(15, 20))
    assert p.audit.stats()["dropped"] == 15


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_audit_after_sigkill_failover(nats_url: str, unique_name: str,
                                            tmp_path: Any) -> None:
    """Three node processes; SIGKILL the leader. The standbys record the loss (one entry,
    de-duplicated), the new leader its acquisition, with epochs in order."""
    from pycluster.testing.nodes import NodeCluster

    c = NodeCluster(unique_name, [nats_url], tmp_path, lease_ttl=1.0, heartbeat=0.25)
    nc = await nats.connect(nats_url)
    try:
        await c.start()
        leader = await c.wait_for_leader(30)
        epoch = c.role(leader)[1] or 0
        c.kill(leader)
        new = await c.wait_for_leader(30, exclude=[leader], min_epoch=epoch + 1)
        new_epoch = c.role(new)[1] or 0
        reader = AuditReader(nc.jetstream(), unique_name)

        async def election() -> list[AuditEntry] | None:
            entries = await reader.query(category="election", app="svc")
            acts = [(e.action, e.data.get("epoch")) for e in entries]
            return entries if ("leader_acquired", new_epoch) in acts else None

        entries = await wait_for(election, 20, message="the new leader's entry never came")
        seq = [(e.action, e.data.get("epoch"), e.node) for e in entries]
        i_first = seq.index(("leader_acquired", epoch, leader))
        lost = [i for i, s in enumerate(seq) if s[0] == "leader_lost" and s[1] == epoch]
        i_new = seq.index(("leader_acquired", new_epoch, new))
        assert len(lost) == 1, seq  # written by the standbys, stored once
        assert i_first < lost[0] < i_new, seq
        assert entries[lost[0]].data["leader"] == leader
        assert entries[lost[0]].node != leader  # a standby saw it: the leader was dead
        assert [e.seq for e in entries] == sorted(e.seq for e in entries)  # type: ignore[type-var]
        changed = [e for e in entries if e.action == "leader_changed" and
                   e.data["epoch"] == new_epoch]
        assert len(changed) == 1 and changed[0].data["previous"] == leader

        async def left() -> list[Any] | None:  # the crashed node's record expired
            entries = await reader.query(category="membership", action="left")
            nodes = [e.data.get("node") for e in entries]
            assert len(nodes) <= 1, nodes  # the observers' entries are de-duplicated
            return nodes or None

        assert await wait_for(left, 20, message="the crashed node's leave was not recorded") == [
            leader]
        await c.stop()
    finally:
        c.stop_sync()
        await nc.close()


@pytest.mark.slow
async def test_cli_audit_follow(make_platform: Any, nats_url: str) -> None:
    """``pycluster audit --follow`` prints stored entries, then new ones as they are written."""
    import os
    import signal
    import sys

    p = await make_platform("n1")
    p.audit.log("deploy", "first")
    await p.audit.flush()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "from pycluster.cli.main import main; main()", "audit",
        "--follow", "--category", "deploy", "--output", "json", "--nats-url", nats_url,
        "-p", p.name, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert proc.stdout is not None
        first = json.loads(await asyncio.wait_for(proc.stdout.readline(), 30))
        assert first["action"] == "first"  # no pause: following starts after the last one

        async def second() -> dict[str, Any]:
            p.audit.log("deploy", "second")
            assert proc.stdout is not None
            return dict(json.loads(await asyncio.wait_for(proc.stdout.readline(), 30)))

        assert (await second())["action"] == "second"
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGINT)
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()


@pytest.mark.timeout(30)
async def test_stop_right_after_start_stores_the_leave_entry(nats_url: str,
                                                            unique_name: str) -> None:
    """A node stopped while its start-up health checks were still flushing its connection
    stores its ``left`` entry (a cancelled flush used to break the connection's reader)."""
    from pycluster import Platform

    p = Platform(unique_name, node_id="n1", nats_url=nats_url, hook_timeout=5.0)
    await p.start()
    audit = p.audit
    await p.stop()
    assert audit.stats()["dropped"] == 0


@pytest.mark.timeout(10)
def test_a_resend_while_the_first_is_in_process_is_retried_not_dropped() -> None:
    """JetStream answers a re-sent id whose first publish is still being stored with "duplicate
    message id is in process": the entry is sent again (then acknowledged as a duplicate),
    never counted as refused."""
    import json as _json

    from nats.aio.msg import Msg

    from pycluster.builtin.audit.log import _ack_outcome

    def reply(body: dict[str, object]) -> Msg:
        return Msg(_client=None, subject="x", data=_json.dumps(body).encode())  # type: ignore[arg-type]

    in_process = {"error": {"code": 400, "err_code": 10065,
                            "description": "duplicate message id is in process"}}
    assert _ack_outcome(reply(in_process)) == "retry"
    assert _ack_outcome(reply({"stream": "s", "seq": 5, "duplicate": True})) == "ok"
    refused = {"error": {"code": 400, "err_code": 10054, "description": "maximum payload"}}
    assert _ack_outcome(reply(refused)) == "maximum payload"
