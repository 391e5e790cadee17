"""The RPC wire format: call metadata in the reply subject, framed replies, and compatibility
with callers and servers that use the ``Pc-Call`` / ``Pc-Node`` headers (pure logic first,
then on a real NATS server)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import nats
import nats.errors
import pytest

from pycluster import App, Middleware, NoInstanceError, RemoteError, Singleton
from pycluster.builtin.rpc.service import rpc_service
from pycluster.builtin.rpc.wire import (
    BAD_REQUEST,
    H_CALL,
    H_NODE,
    MAX_TIMEOUT_MS,
    REPLY_MARK,
    Reject,
    frame_reply,
    header_meta,
    node_frame,
    reply_subject_meta,
    unframe_reply,
)
from pycluster.kernel.names import app_subject
from pycluster.kernel.replies import ReplyMux
from pycluster.testing import wait_for

pytestmark = pytest.mark.timeout(60)


# -- pure logic --------------------------------------------------------------------------------

def test_reply_subject_meta_reads_what_a_caller_puts_there() -> None:
    meta = reply_subject_meta(f"_INBOX.abc.{REPLY_MARK}.0a1b-1f.0123456789abcdef.2500.n1.svc")
    assert meta is not None and meta.framed
    assert meta.key == "0a1b-1f/0123456789abcdef" and meta.request_id == "0a1b-1f"
    assert meta.timeout == 2.5 and meta.source_node == "n1" and meta.source_app == "svc"
    # No source app; a custom inbox prefix with more tokens (even one named like the mark).
    meta = reply_subject_meta(f"my.{REPLY_MARK}.inbox.x.{REPLY_MARK}.r.t.0.n2.-")
    assert meta is not None and meta.source_app is None and meta.timeout == 0.0
    # A huge timeout is clamped to a year.
    meta = reply_subject_meta(f"_INBOX.a.{REPLY_MARK}.r.t.{10**14}.n.-")
    assert meta is not None and meta.timeout == MAX_TIMEOUT_MS / 1000


@pytest.mark.parametrize("reply", [
    "_INBOX.abc.def",                                  # any other requester
    f"_INBOX.{REPLY_MARK}.r.t.100.n",                  # a token short
    f"_INBOX.a.{REPLY_MARK}.r.t.100.n.app.extra",      # a token too many
    f"_INBOX.a.{REPLY_MARK}.r.t.-5.n.app",             # not a number of ms
    f"_INBOX.a.{REPLY_MARK}.r.t.1e3.n.app",
    f"_INBOX.a.{REPLY_MARK}.r.t.{'9' * 16}.n.app",     # absurdly long
    "_INBOX.a.pcr2.r.t.100.n.app",                    # another mark
])
def test_reply_subjects_that_only_look_like_ours_carry_no_metadata(reply: str) -> None:
    assert reply_subject_meta(reply) is None


def test_header_metadata_of_older_callers() -> None:
    meta = header_meta("r1/tok 4.5 n1 svc")
    assert (meta.key, meta.timeout, meta.source_node, meta.source_app, meta.framed) == (
        "r1/tok", 4.5, "n1", "svc", False)
    assert header_meta("legacy-1 10 old-node").source_app is None
    assert header_meta("r 1e300 n").timeout == MAX_TIMEOUT_MS / 1000
    assert header_meta("r inf n").timeout == MAX_TIMEOUT_MS / 1000
    assert header_meta("r -3 n").timeout == 0.0
    for bad in ("", "r1", "r1 soon n1"):
        with pytest.raises(Reject) as err:
            header_meta(bad)
        assert err.value.code == BAD_REQUEST


def test_framed_replies_round_trip() -> None:
    head = node_frame("node-7")
    assert unframe_reply(frame_reply(head, None, b"\x00raw")) == ("node-7", None, b"\x00raw")
    assert unframe_reply(frame_reply(head, "application/json", b"{}")) == (
        "node-7", "application/json", b"{}")
    assert unframe_reply(frame_reply(head, "application/octet-stream", b"")) == (
        "node-7", "application/octet-stream", b"")


@pytest.mark.parametrize("data", [
    b"",                       # nothing
    b"\x00",                   # no node
    b"\x05ab",                 # node cut short
    b"\x02ab",                 # no content-type length
    b"\x02ab\x09json",         # content type cut short
    b"\x02\xff\xfe\x00body",   # node not UTF-8
])
def test_malformed_frames_are_refused(data: bytes) -> None:
    with pytest.raises(ValueError):
        unframe_reply(data)


# -- on a real server ---------------------------------------------------------------------------

def echo_app() -> App:
    app = App("svc", Singleton())

    @app.rpc.handler("echo")
    async def echo(data: Any) -> Any:
        return data

    return app


class Seen(Middleware):
    """Records what the caller learnt about each reply."""

    def __init__(self) -> None:
        self.replies: list[tuple[str | None, dict[str, str]]] = []

    async def on_call(self, call: Any, call_next: Any) -> Any:
        try:
            return await call_next(call)
        finally:
            self.replies.append((call.node, dict(call.reply_headers)))


class Served(Middleware):
    """Records what the server saw of each request."""

    def __init__(self) -> None:
        self.requests: list[Any] = []

    async def on_request(self, request: Any, call_next: Any) -> Any:
        self.requests.append(request)
        return await call_next(request)


async def drain(sub: Any, quiet: float = 1.0) -> list[Any]:
    """The messages a spy subscription got, until none came for ``quiet`` seconds."""
    out = []
    while True:
        try:
            out.append(await sub.next_msg(timeout=quiet))
        except nats.errors.TimeoutError:
            return out


async def test_calls_travel_without_headers_and_say_who_answered(make_platform: Any,
                                                                nats_url: str) -> None:
    srv, cli = echo_app(), echo_app()
    ps = await make_platform("srv", srv)
    served = Served()
    ps.middleware.add(served)
    await wait_for(lambda: srv.is_active, 15)
    pc = await make_platform("cli", cli)
    seen = Seen()
    pc.middleware.add(seen)
    spy = await nats.connect(nats_url)
    try:
        assert await cli.rpc.call("srv", "echo", b"") == b""  # sets up the caller's inbox
        seen.replies.clear()
        served.requests.clear()
        requests = await spy.subscribe(app_subject(ps.name, "svc", "rpc", "srv.*"))
        replies = await spy.subscribe(rpc_service(pc)._replies.prefix + ">")
        await spy.flush()
        assert await cli.rpc.call("srv", "echo", b"\x01bytes") == b"\x01bytes"
        assert await cli.rpc.call("srv", "echo", {"a": [1]}) == {"a": [1]}
        assert await cli.rpc.call_leader("echo", {"m": 2}, codec="msgpack") == {"m": 2}
        for _ in range(2):  # more copies for the spy
            assert await cli.rpc.call("srv", "echo", b"\x01bytes") == b"\x01bytes"
        del served.requests[3:], seen.replies[3:]
        # What the server saw: no headers but the content type of non-default bodies, and
        # the call's metadata from the reply subject.
        assert [r.headers for r in served.requests] == [
            {}, {"Content-Type": "application/json"}, {"Content-Type": "application/msgpack"}]
        for r in served.requests:
            assert (r.source_node, r.source_app) == ("cli", "svc")
            assert r.request_id and "/" not in r.request_id and r.deadline is not None
        # On the wire (a spy's copies): the plain-bytes call had no headers at all, and every
        # reply is framed, without headers.
        raw = [m for m in await drain(requests) if m.data == b"\x01bytes"]
        assert raw and all(m.headers is None for m in raw)
        meta = reply_subject_meta(raw[0].reply)
        assert meta is not None and meta.source_node == "cli" and meta.source_app == "svc"
        assert 0 < meta.timeout <= 30 and "/" in meta.key
        framed = await drain(replies)
        assert framed and all(m.headers is None for m in framed)
        assert {unframe_reply(m.data)[0] for m in framed} == {"srv"}
        assert ("srv", None, b"\x01bytes") in [unframe_reply(m.data) for m in framed]
        # What the caller learnt: who answered, and the content type, as headers would say.
        assert seen.replies == [
            ("srv", {H_NODE: "srv"}),
            ("srv", {H_NODE: "srv", "Content-Type": "application/json"}),
            ("srv", {H_NODE: "srv", "Content-Type": "application/msgpack"}),
        ]
    finally:
        await spy.close()


async def test_a_reply_header_set_by_middleware_travels_as_a_header(make_platform: Any) -> None:
    srv, cli = echo_app(), echo_app()

    class Stamp(Middleware):
        async def on_request(self, request: Any, call_next: Any) -> Any:
            request.reply_headers["X-Stamp"] = "yes"
            return await call_next(request)

    ps = await make_platform("srv", srv)
    ps.middleware.add(Stamp())
    await wait_for(lambda: srv.is_active, 15)
    pc = await make_platform("cli", cli)
    seen = Seen()
    pc.middleware.add(seen)
    assert await cli.rpc.call("srv", "echo", {"x": 1}) == {"x": 1}
    assert seen.replies == [("srv", {H_NODE: "srv", "X-Stamp": "yes",
                                     "Content-Type": "application/json"})]


async def test_older_callers_still_get_header_replies(make_platform: Any, nats_url: str) -> None:
    srv = echo_app()
    ps = await make_platform("srv", srv)
    await wait_for(lambda: srv.is_active, 15)
    old = await nats.connect(nats_url)
    try:
        subject = app_subject(ps.name, "svc", "rpc", "srv.echo")
        msg = await old.request(subject, b'{"v": 1}', timeout=5, headers={
            H_CALL: "old-1/0123456789abcdef 5.0 oldnode", "Content-Type": "application/json"})
        assert msg.headers is not None and msg.headers[H_NODE] == "srv"
        assert json.loads(msg.data) == {"v": 1}
        # A requester that knows nothing of pycluster: no metadata, header reply.
        msg = await old.request(subject, b"plain", timeout=5)
        assert msg.headers is not None and msg.headers[H_NODE] == "srv" and msg.data == b"plain"
        # A reply subject that only looks like a caller's: served, answered with headers.
        inbox = f"{old.new_inbox()}.{REPLY_MARK}.not.enough"
        sub = await old.subscribe(inbox)
        await old.publish(subject, b"odd", reply=inbox)
        msg = await sub.next_msg(timeout=5)
        assert msg.headers is not None and msg.headers[H_NODE] == "srv" and msg.data == b"odd"
    finally:
        await old.close()


async def test_a_caller_understands_an_older_server(make_platform: Any, nats_url: str) -> None:
    """A node of an older version answers with a ``Pc-Node`` header and a bare body."""
    cli = echo_app()
    pc = await make_platform("cli", cli)
    seen = Seen()
    pc.middleware.add(seen)
    old = await nats.connect(nats_url)
    got: list[Any] = []

    async def old_server(msg: Any) -> None:
        got.append(msg)
        await old.publish(msg.reply, msg.data, headers={H_NODE: "oldnode"})

    try:
        await old.subscribe(app_subject(pc.name, "svc", "rpc", "oldnode.*"), cb=old_server)
        await old.flush()
        # Once, in a whole-suite run, the first request right after the flush still found no
        # responder (the other connection's new interest not yet seen): retried, the
        # assertions below are on the call that was answered.
        value = await wait_for(lambda: cli.rpc.call("oldnode", "echo", b"\x00bin"), 15,
                               ignore=(NoInstanceError,))
        assert value == b"\x00bin"
        assert seen.replies[-1] == ("oldnode", {H_NODE: "oldnode"})
        assert got and reply_subject_meta(got[-1].reply) is not None
    finally:
        await old.close()


async def test_garbage_replies_fail_the_call_not_the_caller(make_platform: Any,
                                                            nats_url: str) -> None:
    cli = echo_app()
    await make_platform("cli", cli)
    rogue = await nats.connect(nats_url)
    answers = [b"", b"\x00", b"\x40short", b"\x02ab\x30x", b"\x02\xff\xfe\x00x"]

    async def liar(msg: Any) -> None:
        await rogue.publish(msg.reply, answers.pop(0))

    try:
        await rogue.subscribe(app_subject(cli.platform.name, "svc", "rpc", "rogue.*"),  # type: ignore[union-attr]
                              cb=liar)
        await rogue.flush()
        for _ in range(5):
            with pytest.raises(RemoteError) as err:
                await cli.rpc.call("rogue", "echo", b"x", timeout=5)
            assert err.value.code == "bad_reply"
        assert answers == []
        # The caller is unharmed: its own node still answers it.
        await wait_for(lambda: cli.is_active, 15)
        assert await cli.rpc.call("cli", "echo", {"ok": True}) == {"ok": True}
    finally:
        await rogue.close()


async def test_reply_mux_times_out_and_reports_no_responders(nats_url: str) -> None:
    nc = await nats.connect(nats_url)
    try:
        mux = ReplyMux(REPLY_MARK)
        await mux.attach(nc)
        await mux.attach(nc)  # once per connection
        silent = await nc.subscribe("wire.silent")  # takes requests, never answers
        await nc.flush()
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(nats.errors.TimeoutError):
            await mux.request("wire.silent", mux.prefix + "r.t.1.n.-", b"", None, 0.2)
        assert loop.time() - t0 >= 0.2
        assert await silent.next_msg(timeout=5)
        with pytest.raises(nats.errors.NoRespondersError):
            await mux.request("wire.nobody", mux.prefix + "r2.t.1.n.-", b"", None, 5)

        async def answer(msg: Any) -> None:
            await nc.publish(msg.reply, b"pong")

        await nc.subscribe("wire.echo", cb=answer)
        await nc.flush()
        replies = await asyncio.gather(*(
            mux.request("wire.echo", f"{mux.prefix}r{i}.t.1.n.-", b"ping", None, 5)
            for i in range(50)))
        assert {m.data for m in replies} == {b"pong"}
        assert not mux._waiting  # nothing left behind
        # A waiting call that is cancelled leaves nothing behind either.
        waiting = asyncio.create_task(
            mux.request("wire.silent", mux.prefix + "r3.t.1.n.-", b"", None, 30))
        await wait_for(lambda: len(mux._waiting) == 1, 5)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert not mux._waiting
        # Moving to another connection keeps the timeouts of calls still waiting on the first.
        other = await nats.connect(nats_url)
        try:
            waiting = asyncio.create_task(
                mux.request("wire.silent", mux.prefix + "r4.t.1.n.-", b"", None, 0.3))
            await wait_for(lambda: len(mux._waiting) == 1, 5)
            await mux.attach(other)
            assert mux.nc is other
            with pytest.raises(nats.errors.TimeoutError):
                await waiting
            await mux.close()
            with pytest.raises(nats.errors.ConnectionClosedError):
                await mux.request("wire.silent", mux.prefix + "r5.t.1.n.-", b"", None, 1)
        finally:
            await other.close()
    finally:
        await nc.close()
