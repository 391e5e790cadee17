"""`LeanJetStream.publish` answers exactly like nats-py's `JetStreamContext.publish` (same
acknowledgements, same errors), on one server and on a 3-server cluster with R3 streams under
a partition; compare-and-set races through it have exactly one winner."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import nats
import nats.errors
import nats.js.errors
import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext

from pycluster.kernel import natsutil as nu
from pycluster.kernel.connection import LeanJetStream
from pycluster.testing import NatsCluster
from pycluster.testing.wait import wait_for

pytestmark = pytest.mark.timeout(120)


async def outcome(fn: Callable[[], Awaitable[Any]]) -> tuple[str, Any]:
    """What a publish did: its acknowledgement's fields, or its error's type and codes."""
    try:
        ack = await fn()
    except nats.js.errors.APIError as exc:
        return type(exc).__name__, (exc.code, exc.err_code)
    except Exception as exc:
        return type(exc).__name__, None
    return "ack", (ack.stream, ack.duplicate, ack.domain)


async def test_acknowledgements_and_errors_match_nats_py(nats_url: str, unique_name: str) -> None:
    nc = await nats.connect(nats_url)
    try:
        plain, lean = nc.jetstream(), LeanJetStream(nc, timeout=2)
        await nu.ensure_kv(plain, unique_name, history=1, marker_ttl=1)
        silent = await nc.subscribe(f"{unique_name}.silent")  # takes requests, never answers
        await nc.flush()
        for js in (plain, lean):
            subject = nu.kv_subject(unique_name, f"k{id(js)}")
            first = await js.publish(subject, b"1")
            assert first.seq > 0 and first.stream == nu.kv_stream(unique_name)

            async def cas(seq: int, js: JetStreamContext = js, subject: str = subject) -> Any:
                return await js.publish(subject, b"x", headers={
                    nu.EXPECTED_LAST_SUBJECT_SEQ: str(seq), nu.TTL_HEADER: "10s"})

            won = await cas(first.seq)
            assert won.seq > first.seq

        async def both(make: Callable[[JetStreamContext], Awaitable[Any]]) -> None:
            got = [await outcome(lambda js=js: make(js)) for js in (plain, lean)]
            assert got[0] == got[1], got

        # A stale expected sequence: the same APIError kind, code and err_code (10071).
        await both(lambda js: js.publish(nu.kv_subject(unique_name, "k"), b"x", headers={
            nu.EXPECTED_LAST_SUBJECT_SEQ: "1"}))
        # A duplicate message id: acknowledged as a duplicate.
        for js in (plain, lean):
            await js.publish(nu.kv_subject(unique_name, "d"), b"x", headers={"Nats-Msg-Id": "m1"})
        await both(lambda js: js.publish(nu.kv_subject(unique_name, "d"), b"x",
                                         headers={"Nats-Msg-Id": "m1"}))
        # No stream for the subject; a responder that never answers; a bad expected stream
        # (nats-py's own path).
        await both(lambda js: js.publish(f"{unique_name}.nostream", b"x"))
        await both(lambda js: js.publish(f"{unique_name}.silent", b"x", timeout=0.2))
        await both(lambda js: js.publish(nu.kv_subject(unique_name, "e"), b"x",
                                         stream="NOT_THIS_ONE"))
        assert await silent.next_msg(timeout=5)
    finally:
        await nc.close()


@pytest.mark.slow
async def test_cas_on_r3_under_a_partition_has_one_winner(nats_cluster: NatsCluster,
                                                          unique_name: str) -> None:
    """Writers on every server race compare-and-set writes through both kinds of context;
    the stream leader is cut off in the middle: every expected revision is won at most once."""
    cluster = nats_cluster
    clients: list[Client] = [
        await nats.connect(cluster.url(i), connect_timeout=2, max_reconnect_attempts=-1,
                           reconnect_time_wait=0.2) for i in range(3)]
    try:
        ctxs = [LeanJetStream(nc, timeout=1) if i % 2 else nc.jetstream(timeout=1)
                for i, nc in enumerate(clients)]
        ctxs += [nc.jetstream(timeout=1) if i % 2 else LeanJetStream(nc, timeout=1)
                 for i, nc in enumerate(clients)]
        await nu.ensure_kv(ctxs[0], unique_name, history=1, marker_ttl=1, replicas=3)
        subject = nu.kv_subject(unique_name, "c")
        stream = nu.kv_stream(unique_name)
        first = await ctxs[1].publish(subject, b"0")
        wins: dict[int, list[int]] = {}  # expected revision -> revisions granted on it

        async def writer(js: JetStreamContext, stop: asyncio.Event) -> None:
            last = first.seq
            while not stop.is_set():
                try:
                    ack = await js.publish(subject, b"w", headers={
                        nu.EXPECTED_LAST_SUBJECT_SEQ: str(last)})
                    wins.setdefault(last, []).append(ack.seq)
                    last = ack.seq
                except (nats.js.errors.APIError, nats.errors.Error):
                    try:
                        last = (await js.get_last_msg(stream, subject)).seq or last
                    except Exception:
                        await asyncio.sleep(0.05)

        stop = asyncio.Event()
        tasks = [asyncio.create_task(writer(js, stop)) for js in ctxs]
        await wait_for(lambda: len(wins) >= 20, 30, message="writes before the cut")
        info = await ctxs[0].stream_info(stream)
        assert info.cluster is not None and info.cluster.leader
        cluster.partition(cluster.index_of(info.cluster.leader))
        before = len(wins)
        await wait_for(lambda: len(wins) >= before + 20, 60, message="writes after the cut")
        cluster.heal()
        await wait_for(lambda: len(wins) >= before + 40, 60, message="writes after healing")
        stop.set()
        await asyncio.gather(*tasks)
        assert all(len(granted) == 1 for granted in wins.values()), {
            k: v for k, v in wins.items() if len(v) > 1}
        granted = [seq for seqs in wins.values() for seq in seqs]
        assert len(granted) == len(set(granted))
        # Every granted write is stored (a replica that was cut off catches up after the heal;
        # until then a direct get there may answer from its stale copy).

        async def stored() -> bool:
            return bool((await ctxs[0].get_last_msg(stream, subject)).seq >= max(granted))

        await wait_for(stored, 30, ignore=(Exception,), message="every grant stored")
    finally:
        for nc in clients:
            await nc.close()
