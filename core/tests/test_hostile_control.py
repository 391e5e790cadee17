"""Attacks on the control plane by a hostile or buggy NATS client, on a real nats-server.

Each test performs the attack with a raw nats-py client (forged lease or membership records,
deleted keys, buckets and streams, bad step-down requests, spoofed pongs) and checks from
outside that the platform refuses it or recovers within the bound stated in the test.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import http.client
import json
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import nats
import pytest
from nats.aio.client import Client as NATS

from pycluster import App, Election, NodeFailedError, Singleton
from pycluster.builtin.election.records import parse_lease
from pycluster.kernel import natsutil as nu
from pycluster.kernel.aio import TaskSet, cancel_and_wait, supervise
from pycluster.kernel.membership import validate_member
from pycluster.kernel.natsutil import parse_ttl_header
from pycluster.kernel.platform import stepdown_subject
from pycluster.kernel.stages import Stage, StageOrder
from pycluster.middleware import AuthMiddleware, use
from pycluster.testing import wait_for
from pycluster.testing.chaos import Witness
from pycluster.testing.nodes import NodeCluster

LEASE = 2.0  # make_platform's default lease_ttl (heartbeat 0.5 s)


@pytest.fixture
async def raw(nats_url: str) -> AsyncIterator[NATS]:
    """The attacker: a plain nats-py client on the same server."""
    nc = await nats.connect(nats_url)
    try:
        yield nc
    finally:
        await nc.close()


def holds(app: App) -> bool:
    """Whether ``app``'s node holds a valid lease (active or not)."""
    rt = app._runtime
    return rt is not None and rt.election is not None and rt.election.is_leader


def leaders(apps: list[App]) -> list[App]:
    return [a for a in apps if holds(a)]


def one_leader(apps: list[App]) -> App | None:
    act = [a for a in apps if a.is_active]
    return act[0] if len(act) == 1 else None


async def sample_leaders(apps: list[App], stop: asyncio.Event, out: list[int]) -> None:
    """Record the number of nodes holding the lease every few ms until ``stop``."""
    while not stop.is_set():
        out.append(len(leaders(apps)))
        await asyncio.sleep(0.005)


async def audit_entries(platform: Any, category: str, timeout: float = 10.0) -> list[Any]:
    found: list[Any] = []

    async def have() -> bool:
        await platform.audit.flush(2.0)
        found[:] = await platform.audit.query(category=category)
        return bool(found)

    await wait_for(have, timeout, message=f"audit entries of {category}")
    return found


def _http(url: str) -> tuple[int, Any]:
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname or "127.0.0.1", u.port, timeout=5)
    try:
        conn.request("GET", u.path)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


async def get_json(url: str) -> tuple[int, Any]:
    return await asyncio.to_thread(_http, url)


# -- record validation (pure) ---------------------------------------------------------------------


def _msg(body: Any, seq: int = 5, ttl: str | None = "2s") -> nu.LastMsg:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {nu.TTL_HEADER: ttl} if ttl is not None else {}
    return nu.LastMsg(seq=seq, data=data, headers=headers)


@pytest.mark.timeout(10)
def test_lease_record_validation() -> None:
    ok = parse_lease(_msg({"node": "n1", "epoch": 3, "ttl": 2}), 60)
    assert not isinstance(ok, str) and ok.node == "n1" and ok.epoch == 3
    assert not isinstance(parse_lease(_msg({"node": "n1", "epoch": None, "ttl": 2}), 60), str)
    for body, ttl in [
        ({"node": "n1", "epoch": 3, "ttl": 2}, None),  # no TTL header
        ({"node": "n1", "epoch": 3, "ttl": 2}, "never"),
        ([1, 2, 3], "2s"), (b"\xff\xfe", "2s"), (42, "2s"),
        ({"node": 5, "epoch": 3, "ttl": 2}, "2s"),
        ({"node": "a b", "epoch": 3, "ttl": 2}, "2s"),
        ({"node": "n1", "epoch": 6, "ttl": 2}, "2s"),  # above its own revision
        ({"node": "n1", "epoch": 0, "ttl": 2}, "2s"),
        ({"node": "n1", "epoch": True, "ttl": 2}, "2s"),
        ({"node": "n1", "epoch": 3, "ttl": "2"}, "2s"),
        ({"node": "n1", "epoch": 3, "ttl": -1}, "2s"),
        ({"node": "n1", "epoch": 3, "ttl": 2}, "100000s"),  # above the cap
    ]:
        assert isinstance(parse_lease(_msg(body, ttl=ttl), 60), str), (body, ttl)
    assert parse_ttl_header("1m30s") == 90 and parse_ttl_header("5") == 5
    assert parse_ttl_header("x") is None and parse_ttl_header("0s") is None


@pytest.mark.timeout(10)
def test_member_record_validation() -> None:
    good = {"node_id": "n1", "incarnation": "abc", "labels": {"z": "a"},
            "apps": {"svc": {"eligible": True, "no_failover": False, "priority": 5,
                             "role": "passive", "mode": "singleton", "epoch": 3, "leader": "n2"}}}
    h = {nu.TTL_HEADER: "2s"}
    assert validate_member("n1", good, h, 60) is None
    bad_apps = [{"svc": {"priority": "high"}}, {"svc": {"priority": 10**9}},
                {"svc": {"eligible": "yes"}}, {"svc": [1]}, [1]]
    for apps in bad_apps:
        assert validate_member("n1", {**good, "apps": apps}, h, 60) is not None, apps
    assert validate_member("n2", good, h, 60) is not None  # record under another node's key
    assert validate_member("n1", {**good, "labels": {"z": 1}}, h, 60) is not None
    assert validate_member("n1", good, {}, 60) is not None  # no TTL: nobody refreshes it
    assert validate_member("n1", [good], h, 60) is not None


# -- 1. step-down control subject -----------------------------------------------------------------


@pytest.mark.timeout(90)
async def test_bad_stepdown_requests_are_refused_and_audited(
        make_platform: Any, raw: NATS, unique_name: str) -> None:
    a, b = App("svc", Singleton()), App("svc", Singleton())
    pa = await make_platform("a", a)
    assert await a.wait_for_leadership(10)
    await make_platform("b", b)
    await wait_for(lambda: b.leader == "a", 5)
    epoch = a.epoch
    subject = stepdown_subject(unique_name, "svc")
    bad: list[bytes] = [
        b'{"cooldown": 1e12}', b'{"cooldown": 1e12}', b'{"cooldown": "x"}',
        b'{"cooldown": -1}', b'{"cooldown": NaN}', b'{"cooldown": Infinity}',
        b'{"successor": 5}', b'{"successor": "a"}', b'{"successor": "ghost"}',
        b'{"successor": "b", "extra": 1}', b"not json", b"\xff\xfe", b"[1, 2]", b"42",
        b'{"cooldown": ' + b" " * 200_000 + b"1}",  # a huge payload
    ]
    for body in bad:
        reply = await raw.request(subject, body, timeout=10)
        res = json.loads(reply.data)
        assert res["node"] == "a" and "error" in res, (body[:40], res)
    # Nothing changed: same leader, same epoch, still active.
    assert a.is_active and a.epoch == epoch and not b.is_leader
    entries = await audit_entries(pa, "control")
    refused = [e for e in entries if e.data.get("outcome") == "refused"]
    assert len(refused) >= len(bad) - 2  # the audit rate limit keeps at least 20 a second
    assert all(e.data["subject"] == subject and e.data["reply"] for e in refused)

    # The largest valid cooldown, twice: both nodes cool down, yet the app is leaderless for
    # at most a lease (a cooldown is a preference, never a reason to leave the app empty).
    cap = json.dumps({"cooldown": 60}).encode()
    assert "error" not in json.loads((await raw.request(subject, cap, timeout=15)).data)
    await wait_for(lambda: b.is_active, 10)
    t0 = time.monotonic()
    assert "error" not in json.loads((await raw.request(subject, cap, timeout=15)).data)
    await wait_for(lambda: one_leader([a, b]) is not None, LEASE + 3.0,
                   message="a leader within a lease after two maximal cooldowns")
    print(f"leaderless after two 60 s cooldowns: {time.monotonic() - t0:.2f}s (lease {LEASE}s)")


@pytest.mark.timeout(60)
async def test_control_requests_go_through_the_auth_middleware(
        make_platform: Any, raw: NATS, unique_name: str) -> None:
    a, b = App("svc", Singleton()), App("svc", Singleton())
    pa = await make_platform("a", a, start=False)
    pb = await make_platform("b", b, start=False)
    for p in (pa, pb):
        use(p, AuthMiddleware(token="s3cret"))
        await p.start()
    try:
        assert await a.wait_for_leadership(10) or await b.wait_for_leadership(10)
        leader, standby = (a, b) if a.is_leader else (b, a)
        lp = pa if leader is a else pb
        epoch = leader.epoch
        subject = stepdown_subject(unique_name, "svc")
        res = json.loads((await raw.request(subject, b"{}", timeout=10)).data)
        assert res["error"]["code"] == "unauthorized"
        res = json.loads((await raw.request(subject, b"{}", timeout=10,
                                            headers={"Pycluster-Auth": "wrong"})).data)
        assert res["error"]["code"] == "unauthorized"
        assert leader.is_active and leader.epoch == epoch
        # A ping of a node id without credentials gets no pong (the node ids' own pings,
        # with credentials, work: both nodes joined).
        ping = f"{unique_name}._.node.{lp.node_id}.ping"
        with pytest.raises(nats.errors.TimeoutError):
            await raw.request(ping, b"", timeout=0.5)
        assert (await raw.request(ping, b"", timeout=2, headers={"Pycluster-Auth": "s3cret"}))
        # With the token the request is served, and the audit names its source.
        res = json.loads((await raw.request(
            subject, b'{"cooldown": 0}', timeout=15,
            headers={"Pycluster-Auth": "s3cret", "Pycluster-Auth-App": "ops"})).data)
        assert "error" not in res and res["node"] == lp.node_id
        await wait_for(lambda: standby.is_active, 10)
        entries = await audit_entries(lp, "control")
        ok = [e for e in entries if e.action == "stepdown" and e.data["outcome"] == "ok"]
        assert ok and ok[0].data["source_app"] == "ops" and ok[0].data["reply"]
        assert sum(e.data["outcome"] == "refused" for e in entries) >= 2
    finally:
        await pa.stop()
        await pb.stop()


@pytest.mark.timeout(30)
async def test_election_step_down_checks_its_cooldown(make_platform: Any) -> None:
    from pycluster import ConfigError

    a = App("svc", Singleton())
    await make_platform("a", a)
    assert await a.wait_for_leadership(10)
    el = a._rt().election
    for cd in (-1.0, float("nan"), float("inf"), 1e12):
        with pytest.raises(ConfigError):
            await el.step_down(cooldown=cd)
    assert a.is_leader


# -- 2. forged lease records ----------------------------------------------------------------------


async def _current(raw: NATS, bucket: str) -> nu.LastMsg | None:
    return await nu.last_msg(raw.jetstream(), bucket, "leader")


@pytest.mark.timeout(60)
async def test_lease_without_ttl_is_taken_over(
        make_platform: Any, raw: NATS, unique_name: str, caplog: Any) -> None:
    a, b = App("svc", Singleton()), App("svc", Singleton())
    await make_platform("a", a)
    assert await a.wait_for_leadership(10)
    await make_platform("b", b)
    await wait_for(lambda: b.leader == "a", 5)
    bucket = f"{unique_name}_svc_election"
    kv = await raw.jetstream().key_value(bucket)
    stop = asyncio.Event()
    counts: list[int] = []
    sampler = asyncio.create_task(sample_leaders([a, b], stop, counts))
    caplog.set_level(logging.WARNING, logger="pycluster.election")
    # A record that the server never expires, naming a node that does not exist.
    t0 = time.monotonic()
    await kv.put("leader", json.dumps({"node": "ghost", "epoch": None, "ttl": 2}).encode())
    await wait_for(lambda: not holds(a), 2, message="the leader fenced itself")
    fenced = time.monotonic() - t0
    await wait_for(lambda: one_leader([a, b]) is not None, LEASE + 2.5,
                   message="a leader within a lease of a forged record without TTL")
    back = time.monotonic() - t0
    stop.set()
    await sampler
    assert max(counts) <= 1
    msg = await _current(raw, bucket)
    assert msg is not None and nu.TTL_HEADER in msg.headers  # a real lease again
    print(f"TTL-less record: leader fenced after {fenced * 1000:.1f} ms, a leader again after "
          f"{back:.2f}s (lease {LEASE}s)")


@pytest.mark.timeout(60)
async def test_non_object_body_logs_once_and_recovers(
        make_platform: Any, raw: NATS, unique_name: str, caplog: Any) -> None:
    a, b = App("svc", Singleton()), App("svc", Singleton())
    await make_platform("a", a)
    assert await a.wait_for_leadership(10)
    await make_platform("b", b)
    await wait_for(lambda: b.leader == "a", 5)
    caplog.set_level(logging.DEBUG, logger="pycluster.election")
    js = raw.jetstream()
    bucket = f"{unique_name}_svc_election"
    t0 = time.monotonic()
    for body in (b"[1, 2, 3]", b"42", b"\xff\xfe"):
        cur = await _current(raw, bucket)
        await nu.cas_publish(js, bucket, "leader", body, expected_seq=cur.seq if cur else 0,
                             ttl=10)  # with a TTL header: invalid for its body alone
        await asyncio.sleep(0.2)
    await wait_for(lambda: one_leader([a, b]) is not None, LEASE + 3.0,
                   message="a leader again after non-object bodies")
    print(f"non-object bodies: a leader again after {time.monotonic() - t0:.2f}s")
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert not tracebacks, [r.getMessage() for r in tracebacks]
    ignored = [r for r in caplog.records if "ignoring the record" in r.getMessage()]
    assert 1 <= len(ignored) <= 3 * 2  # once per record and node, not once per poll


@pytest.mark.slow
@pytest.mark.timeout(60)
async def test_forged_epoch_never_goes_backwards(
        make_platform: Any, raw: NATS, unique_name: str) -> None:
    a, b = App("svc", Singleton()), App("svc", Singleton())
    await make_platform("a", a)
    assert await a.wait_for_leadership(10)
    await make_platform("b", b)
    await wait_for(lambda: b.leader == "a" and b.epoch == a.epoch, 5)
    js = raw.jetstream()
    bucket = f"{unique_name}_svc_election"
    seen: dict[str, list[int]] = {"a": [], "b": []}
    stop = asyncio.Event()

    async def sample() -> None:
        while not stop.is_set():
            for name, app in (("a", a), ("b", b)):
                if app.epoch is not None:
                    seen[name].append(app.epoch)
            await asyncio.sleep(0.005)

    sampler = asyncio.create_task(sample())
    for forged in (1, 10**9, 1):
        cur = await _current(raw, bucket)
        assert cur is not None
        body = json.dumps({"node": "a", "epoch": forged, "ttl": 2}).encode()
        await nu.cas_publish(js, bucket, "leader", body, expected_seq=cur.seq, ttl=2)
        await wait_for(lambda: one_leader([a, b]) is not None, LEASE + 3.0)
        await asyncio.sleep(0.3)
    stop.set()
    await sampler
    for name, epochs in seen.items():
        assert epochs == sorted(epochs), f"{name}'s epoch went backwards"
        assert max(epochs) < 10**9


# -- 3. forged membership records -----------------------------------------------------------------


def _member(node: str, priority: Any, app: str = "svc") -> bytes:
    return json.dumps({
        "node_id": node, "incarnation": "f0f0f0", "labels": {}, "plugins": {},
        "apps": {app: {"role": "passive", "epoch": None, "leader": None, "mode": "singleton",
                       "eligible": True, "priority": priority, "no_failover": False}},
    }).encode()


async def _forge_members(js: Any, bucket: str, nodes: dict[str, Any],
                         stop: asyncio.Event) -> None:
    """Keep forged member records alive (refreshed like real ones, with a TTL)."""
    revs = {n: 0 for n in nodes}
    while not stop.is_set():
        for n, prio in nodes.items():
            with contextlib.suppress(nu.CASConflict, *nu.TRANSIENT_ERRORS):
                revs[n] = await nu.cas_publish(js, bucket, f"nodes.{n}", _member(n, prio),
                                               expected_seq=revs[n], ttl=2)
        await asyncio.sleep(0.4)


@pytest.mark.timeout(60)
async def test_invalid_member_records_are_ignored(
        make_platform: Any, raw: NATS, unique_name: str) -> None:
    a = App("svc", Singleton())
    pa = await make_platform("a", a)
    assert await a.wait_for_leadership(10)
    js = raw.jetstream()
    bucket = f"{unique_name}_platform"
    stop = asyncio.Event()
    forger = asyncio.create_task(_forge_members(js, bucket, {"bad": "high"}, stop))
    kv = await js.key_value(bucket)
    await kv.put("nodes.notl", _member("notl", 99))  # valid shape, but no TTL
    await kv.put("nodes.junk", b"[1, 2]")
    await asyncio.sleep(1.5)
    assert pa.membership is not None
    assert set(pa.membership.members) == {"a"}
    assert pa.placement.rank(a) == 0
    stop.set()
    await forger


# -- 4. deleted buckets and streams ---------------------------------------------------------------


TARGETS = ["election", "platform", "kv", "locks", "events", "audit"]


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.timeout(90)
async def test_deleted_bucket_or_stream_is_recreated(
        make_platform: Any, raw: NATS, unique_name: str, target: str) -> None:
    apps = [App("svc", Singleton()), App("svc", Singleton())]
    pa = await make_platform("a", apps[0])
    pb = await make_platform("b", apps[1])
    await wait_for(lambda: one_leader(apps) is not None, 10)
    js = raw.jetstream()
    await pa.events.publish("before", {"n": 1})
    await pa.audit.write("test", "before", {})
    stream = {
        "election": f"KV_{unique_name}_svc_election", "platform": f"KV_{unique_name}_platform",
        "kv": f"KV_{unique_name}_svc", "locks": f"KV_{unique_name}_svc_locks",
        "events": f"{unique_name}_events", "audit": f"{unique_name}_audit",
    }[target]
    stop = asyncio.Event()
    counts: list[int] = []
    sampler = asyncio.create_task(sample_leaders(apps, stop, counts))
    t0 = time.monotonic()
    await js.delete_stream(stream)
    old = one_leader(apps)
    assert old is not None and old.epoch is not None
    epoch = old.epoch
    if target == "election":
        # The leader cannot renew: it loses the lease, and a leader is back (in the re-created
        # bucket, with a higher epoch: its revisions start above the old ones).
        await wait_for(lambda: (ld := one_leader(apps)) is not None and (ld.epoch or 0) > epoch,
                       LEASE + 3.0, message="a leader with a new epoch")
    await wait_for(lambda: one_leader(apps) is not None, 3 * LEASE + 3.0,
                   message=f"exactly one leader after deleting {stream}")
    back = time.monotonic() - t0
    stop.set()
    await sampler
    assert max(counts) <= 1, "two lease holders at once"
    # The platform keeps working: data, locks, events, audit, membership.
    leader = one_leader(apps)
    assert leader is not None
    await wait_for(lambda: _kv_put(leader), 10, message="app KV put")
    async with leader.lock("l", ttl=2):
        pass
    async with pa.lock("pl", ttl=2):
        pass
    await wait_for(lambda: _publish(pa), 10, message="events publish")
    assert await pa.audit.write("test", "after", {})
    await wait_for(lambda: _stream_exists(js, stream), 10, message=f"{stream} re-created")
    pc = await make_platform("c", App("svc", Singleton()))
    await wait_for(lambda: all(p.membership is not None and "c" in p.membership.members
                               for p in (pa, pb)), 10, message="a node joining afterwards is seen")
    await wait_for(lambda: pc.membership is not None and {"a", "b"} <= set(pc.membership.members),
                   5, message="the new node sees the others")
    print(f"{target}: {stream} deleted; exactly one leader {back:.2f}s later")


async def _kv_put(app: App) -> bool:
    try:
        await app.kv.put("k", b"v")
        return await app.kv.get("k") == b"v"
    except Exception:
        return False


async def _publish(p: Any) -> bool:
    try:
        await p.events.publish("after", {"n": 2}, timeout=2)
        return True
    except Exception:
        return False


async def _stream_exists(js: Any, stream: str) -> bool:
    try:
        await js.stream_info(stream)
        return True
    except Exception:
        return False


@pytest.mark.timeout(30)
async def test_supervise_restarts_and_fails_loudly(caplog: Any) -> None:
    runs: list[int] = []

    async def flaky() -> None:
        runs.append(1)
        if len(runs) < 3:
            raise RuntimeError("boom")
        await asyncio.sleep(3600)

    caplog.set_level(logging.ERROR, logger="pycluster.tasks")
    task = supervise("flaky", flaky, backoff=0.01)
    await wait_for(lambda: len(runs) == 3, 5)
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 2 and all(r.exc_info for r in errors)
    await cancel_and_wait(task)

    fatal: list[str] = []

    async def broken() -> None:
        raise ValueError("no way back")

    task = supervise("broken", broken, restart=False, on_fatal=lambda n, e: fatal.append(n))
    await wait_for(lambda: task.done(), 5)
    assert fatal == ["broken"]


@pytest.mark.timeout(30)
async def test_task_set_supervises_its_children_in_one_group(caplog: Any) -> None:
    """A crashing child is logged at once and restarted (its siblings untouched), a child that
    cannot be restarted reaches on_fatal, and close cancels and awaits every child."""
    caplog.set_level(logging.ERROR, logger="pycluster.tasks")
    tasks = TaskSet("owner")
    with pytest.raises(RuntimeError, match="not open"):
        tasks.spawn("early", lambda: asyncio.sleep(0))
    await tasks.open()
    runs: list[int] = []

    async def flaky() -> None:
        runs.append(1)
        if len(runs) < 3:
            raise RuntimeError("boom")
        await asyncio.sleep(3600)

    async def steady() -> None:
        await asyncio.sleep(3600)

    async def broken() -> None:
        raise ValueError("no way back")

    fatal: list[str] = []
    a = tasks.spawn("flaky", flaky, backoff=0.01)
    b = tasks.spawn("steady", steady)
    c = tasks.spawn("broken", broken, restart=False, on_fatal=lambda n, e: fatal.append(n))
    await wait_for(lambda: len(runs) == 3 and c.done(), 5)
    assert fatal == ["broken"] and not a.done() and not b.done()
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 2 and all(r.exc_info for r in errors)
    assert set(tasks) == {a, b}
    await cancel_and_wait(b)  # one child cancelled alone: the group and the others go on
    assert tasks.running and not a.done()
    await tasks.close()
    assert a.cancelled() and not tasks.running and list(tasks) == []


@pytest.mark.timeout(60)
async def test_membership_poll_crash_is_restarted(make_platform: Any, caplog: Any) -> None:
    pa = await make_platform("a", App("svc", Singleton()))
    m = pa.membership
    assert m is not None
    original = m.refresh_view
    calls: list[int] = []

    async def crashing() -> None:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("a bug in the poll")
        await original()

    caplog.set_level(logging.ERROR, logger="pycluster.membership")
    m.reconcile_interval = 0.5  # reconcile at every check (15 s by default)
    m.refresh_view = crashing  # type: ignore[method-assign]
    await wait_for(lambda: len(calls) >= 3, 10, message="the poll loop runs again")
    assert any(r.exc_info and "membership:poll" in r.getMessage() for r in caplog.records)
    m.refresh_view = original  # type: ignore[method-assign]


@pytest.mark.timeout(60)
async def test_dead_coordinator_fails_the_node(make_platform: Any) -> None:
    a, b = App("svc", Singleton()), App("svc", Singleton())
    pa = await make_platform("a", a)
    assert await a.wait_for_leadership(10)
    await make_platform("b", b)
    rt = a._rt()

    async def broken(reason: str) -> None:
        raise RuntimeError("coordinator bug")

    rt._deactivate = broken  # type: ignore[method-assign]
    rt.lost("leader", a.epoch or 0, "test")  # the worker runs _deactivate and dies
    await wait_for(lambda: isinstance(pa.failure, NodeFailedError), 5)
    await wait_for(lambda: not pa._running, 10, message="the failed node left")
    await wait_for(lambda: b.is_active, LEASE + 3.0, message="the other node took over")


# -- 5. forged record of a live node --------------------------------------------------------------


@pytest.mark.timeout(60)
async def test_forged_member_record_is_taken_back(
        make_platform: Any, raw: NATS, unique_name: str) -> None:
    a, b = App("svc", Singleton()), App("svc", Singleton())
    pa = await make_platform("a", a)
    pb = await make_platform("b", b)
    assert pa.membership is not None
    inc = pa.membership.incarnation
    js = raw.jetstream()
    bucket = f"{unique_name}_platform"
    # A spoofed pong (another incarnation) must not count as the new holder answering.
    async def pong(m: Any) -> None:
        await m.respond(json.dumps({"incarnation": "someone-else"}).encode())

    spoof = await raw.subscribe(f"{unique_name}._.node.a.ping", cb=pong)
    cur = await nu.last_msg(js, bucket, "nodes.a")
    assert cur is not None
    forged = json.loads(cur.data)
    forged.update(incarnation="deadbeef0000", pid=1, host="elsewhere")
    t0 = time.monotonic()
    await nu.cas_publish(js, bucket, "nodes.a", json.dumps(forged).encode(),
                         expected_seq=cur.seq, ttl=2)

    async def restored() -> bool:
        msg = await nu.last_msg(js, bucket, "nodes.a")
        return msg is not None and json.loads(msg.data).get("incarnation") == inc

    await wait_for(restored, 0.5 + 1.0 + 2.0, message="our record taken back")
    print(f"forged member record taken back after {time.monotonic() - t0:.2f}s")
    await asyncio.sleep(1.0)
    assert pa._running and pa.failure is None and pa.membership.restored >= 1
    assert pb.membership is not None and "a" in pb.membership.members
    entries = await audit_entries(pa, "membership")
    assert any(e.action == "record_restored" for e in entries)
    await spoof.unsubscribe()


@pytest.mark.timeout(60)
async def test_spoofed_pong_does_not_block_a_join(
        make_platform: Any, raw: NATS, unique_name: str) -> None:
    js = raw.jetstream()
    bucket = f"{unique_name}_platform"
    await make_platform("a", App("svc", Singleton()))  # creates the bucket
    body = json.loads(_member("c", 0))
    body["incarnation"] = "stale000"
    await nu.cas_publish(js, bucket, "nodes.c", json.dumps(body).encode(), expected_seq=0,
                         ttl=30)
    async def pong(m: Any) -> None:
        await m.respond(b'{"incarnation": "x"}')

    spoof = await raw.subscribe(f"{unique_name}._.node.c.ping", cb=pong)
    pc = await make_platform("c", App("svc", Singleton()))  # not refused
    assert pc.membership is not None and pc._running
    await spoof.unsubscribe()


# -- 7. health tells the truth --------------------------------------------------------------------


@pytest.mark.timeout(60)
async def test_health_fails_for_a_leaderless_app(make_platform: Any) -> None:
    app = App("svc", Singleton(), Election(no_failover=True))  # nobody ever leads
    p = await make_platform("a", app, health_addr="127.0.0.1:0", health_interval=0.2)
    base = p.health.url
    assert base is not None
    t0 = time.monotonic()

    async def failing() -> bool:
        status, body = await get_json(base + "/ready")
        return status == 503 and any("svc.election" in r for r in body["reasons"])

    await wait_for(failing, LEASE + 3.0, message="/ready reports the leaderless app")
    _, body = await get_json(base + "/health")
    assert "svc.election" in body["failing_checks"]
    err = p.health.checks["svc.election"].last
    assert err is not None and "no live leader" in (err.error or "")
    print(f"leaderless app reported after {time.monotonic() - t0:.2f}s (lease {LEASE}s)")


@pytest.mark.timeout(60)
async def test_health_fails_for_a_stuck_activation(make_platform: Any) -> None:
    from pycluster import hookimpl

    release = asyncio.Event()

    async def stuck(ctx: Any) -> None:
        await release.wait()

    async def undo(ctx: Any) -> None:
        return None

    class StuckStage:
        @hookimpl
        def pycluster_stages(self, app: Any, platform: Any, registry: Any) -> None:
            registry.add(Stage("stuck", StageOrder.BACKEND, stuck, undo, timeout=120,
                               plugin="test"))

    app = App("svc", Singleton())
    p = await make_platform("a", app, health_addr="127.0.0.1:0", health_interval=0.2,
                            hook_timeout=0.5, extra_plugins=[("stuck", StuckStage())])
    base = p.health.url
    assert base is not None
    await wait_for(lambda: holds(app), 10)
    budget = 0.5 * (len(app._rt().stages) + 2)

    async def failing() -> bool:
        status, body = await get_json(base + "/ready")
        return status == 503 and any("svc.election" in r for r in body["reasons"])

    await wait_for(failing, budget + 2.0, message="/ready reports the stuck activation")
    err = p.health.checks["svc.election"].last
    assert err is not None and "activating" in (err.error or "")
    release.set()
    await wait_for(lambda: app.is_active, 5)

    async def healthy() -> bool:
        status, _ = await get_json(base + "/ready")
        return status == 200

    await wait_for(healthy, 5, message="/ready recovers once active")


# -- node processes (slow) ------------------------------------------------------------------------


def _cluster(nats_url: str, platform: str, workdir: Path, size: int = 2,
             **kw: Any) -> NodeCluster:
    return NodeCluster(platform, [nats_url], workdir, size=size, lease_ttl=LEASE,
                       heartbeat=0.5, **kw)


def _fmt(xs: list[float]) -> str:
    return ", ".join(f"{x:.2f}" for x in xs)


async def _crash_failover(cluster: NodeCluster) -> float:
    leader = await cluster.wait_for_leader(20)
    epoch = cluster.role(leader)[1] or 0
    t0 = time.monotonic()
    cluster.kill(leader)
    await cluster.wait_for_leader(20, exclude=[leader], min_epoch=epoch + 1)
    elapsed = time.monotonic() - t0
    await cluster.start_node(leader)
    return elapsed


@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_fake_high_priority_members_do_not_delay_failover(
        nats_url: str, unique_name: str, tmp_path: Path, raw: NATS) -> None:
    """30 forged, refreshed, higher-priority standbys (and one with priority "high") change a
    crash failover by at most the deferral cap (0.45 x lease)."""
    cluster = _cluster(nats_url, unique_name, tmp_path)
    stop = asyncio.Event()
    try:
        await cluster.start()
        base = [await _crash_failover(cluster) for _ in range(2)]
        fakes: dict[str, Any] = {f"fake{i}": 100 + i for i in range(30)}
        fakes["weird"] = "high"
        forger = asyncio.create_task(
            _forge_members(raw.jetstream(), f"{unique_name}_platform", fakes, stop))
        await asyncio.sleep(1.0)
        attacked = [await _crash_failover(cluster) for _ in range(2)]
        print(f"crash failover (lease {LEASE}s): {_fmt(base)} s without, {_fmt(attacked)} s "
              "with 31 forged high-priority members")
        # Bound: the lease, a poll, the deferral cap and the activation.
        assert max(attacked) <= LEASE + 0.5 + 0.45 * LEASE + 2.0
        stop.set()
        await forger
    finally:
        stop.set()
        await cluster.stop()


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_real_duplicate_leaves_with_nonzero_exit(
        nats_url: str, unique_name: str, tmp_path: Path) -> None:
    first = _cluster(nats_url, unique_name, tmp_path / "first", size=1)
    second = _cluster(nats_url, unique_name, tmp_path / "second", size=1)  # also "n1"
    try:
        await first.start()
        first.pause("n1")
        await second.start(timeout=30)  # the paused one does not answer: taken over
        first.resume("n1")
        node = first.nodes["n1"]
        assert node.proc is not None
        t0 = time.monotonic()
        await wait_for(lambda: node.proc is not None and node.proc.poll() is not None, 15,
                       message="the replaced process exits")
        print(f"replaced process left {time.monotonic() - t0:.2f}s after resuming, exit code "
              f"{node.proc.returncode}")
        assert node.proc.returncode == 4, first.log_tail("n1")
        assert second.nodes["n1"].alive
    finally:
        await first.stop()
        await second.stop()


@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_deleting_the_lease_key_never_overlaps(
        nats_url: str, unique_name: str, tmp_path: Path, raw: NATS) -> None:
    witness = Witness(tmp_path / "w.sock").start()
    cluster = _cluster(nats_url, unique_name, tmp_path, size=3, extra_args=[
        "--setup", "pycluster.testing.chaos:options", "--setup-arg", f"witness={witness.path}",
        "--setup-arg", "workload=witness"])
    kv: Any = None
    notices: list[float] = []
    try:
        await cluster.start()
        kv = await raw.jetstream().key_value(f"{unique_name}_svc_election")
        for i in range(12):
            leader = await cluster.wait_for_leader(20)
            epoch = cluster.role(leader)[1] or 0
            await asyncio.sleep(0.3)
            t0 = time.monotonic()
            if i % 3 == 2:
                await kv.purge("leader")
            elif i % 3 == 1:
                await kv.put("leader", b'{"node": "x"}')
            else:
                await kv.delete("leader")
            await wait_for(functools.partial(_moved_on, cluster, leader, epoch), 5)
            # The old leader's last act, from the witness: how long it went on acting.
            last = [t for t, n, e in witness.records if n == leader and e == epoch]
            if last:
                notices.append(max(0.0, last[-1] - t0))
        await cluster.wait_for_leader(20)
        await asyncio.sleep(0.5)
    finally:
        await cluster.stop()
        witness.stop()
    overlap = _max_overlap(witness.records)
    # Role events: "passive" is recorded once deactivation finished, after acting stopped.
    roles = max((min(a[2], b[2]) - max(a[1], b[1]) for a, b in cluster.overlaps()), default=0.0)
    print(f"lease key deleted 12 times: old leader's last act {max(notices) * 1000:.1f} ms "
          f"after the delete at worst; largest overlap of two acting nodes "
          f"{overlap * 1000:.1f} ms (witness), {roles * 1000:.1f} ms (role events)")
    assert not witness.violations()
    assert overlap <= 0.05  # the witness loop itself acts every 10 ms
    assert roles <= 0.1


def _moved_on(cluster: NodeCluster, leader: str, epoch: int) -> bool:
    return leader not in cluster.active_nodes() or (cluster.role(leader)[1] or 0) > epoch


def _max_overlap(records: list[tuple[float, str, int]]) -> float:
    """The longest time two different (node, epoch) instances both acted: from the first act
    of the newer to the last act of the older."""
    first: dict[tuple[str, int], float] = {}
    last: dict[tuple[str, int], float] = {}
    for t, n, e in records:
        first.setdefault((n, e), t)
        last[(n, e)] = t
    worst = 0.0
    for old, end in last.items():
        for new, start in first.items():
            if new[1] > old[1] and new[0] != old[0]:
                worst = max(worst, end - start)
    return worst

