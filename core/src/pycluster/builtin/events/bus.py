"""Events: publish/subscribe inside an app (``app.events``) and across the platform
(``platform.events``), live or durable.

Subjects and streams:

* app events: ``{platform}.{app}.events.{type}``, kept in the stream ``{platform}_{app}_events``;
* platform events: ``{platform}._.events.{source_app}.{type}`` (``_`` as the source when the
  platform itself publishes), kept in the stream ``{platform}_events``.

An event type is a dotted name (``order.created``); subscriptions take a pattern of types with
NATS wildcards (``order.*``, ``order.>``, ``>``); platform subscriptions may filter by source app,
which is a subject filter applied by the server.

The envelope: ``id`` (also ``Nats-Msg-Id``, so JetStream drops a re-published duplicate), ``type``,
``source_app``, ``source_node``, ``time`` (UTC) and ``data`` (bytes pass through, JSON by default,
msgpack selectable; the content type travels in a header, like RPC payloads).

Delivery:

* `EventBus.subscribe` — live, at most once: what is published while subscribed (a core NATS
  subscription; restored by nats-py after a reconnect, events published meanwhile are missed).
* `EventBus.subscribe_durable` — at least once, through a durable JetStream consumer named
  ``name``: a subscriber that was down gets what was published meanwhile, and an event whose
  callback raised (or that was not acknowledged within ``ack_wait``) is delivered again.
  Subscribers that share a name share the work. A pull loop fetches with a timeout, so it
  recovers from reconnects and server restarts by itself.

`publish` is acknowledged by JetStream (it returns once the event is stored); it fails with the
nats-py error when NATS is unreachable, and retrying is safe (the id de-duplicates).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, StreamConfig

from ... import codec as codecs
from ...kernel import natsutil
from ...kernel.aio import cancel_and_wait, supervise
from ...kernel.errors import ConfigError, PayloadTooLargeError
from ...kernel.names import (
    app_subject,
    bucket,
    platform_subject,
    validate_ident,
    validate_key,
    validate_pattern,
)

if TYPE_CHECKING:
    from ...kernel.coordinator import AppRuntime
    from ...kernel.platform import Platform

log = logging.getLogger("pycluster.events")

H_MSG_ID = "Nats-Msg-Id"
H_TYPE = "Pycluster-Event-Type"
H_TIME = "Pycluster-Event-Time"
H_SOURCE_APP = "Pycluster-Source-App"
H_SOURCE_NODE = "Pycluster-Source-Node"
PLATFORM_SOURCE = "_"

STREAM_MAX_AGE = 7 * 24 * 3600.0
# No byte limit by default: JetStream reserves a stream's max_bytes against the server's storage
# up front, so a generous default per app would exhaust small servers. Age bounds the streams.
STREAM_MAX_BYTES: int | None = None
FETCH_BATCH = 64
FETCH_TIMEOUT = 2.0

Callback = Callable[["Event"], Awaitable[Any]]


@dataclass(eq=False)
class Event:
    """One event: the envelope plus the decoded data.

    :ivar id: unique id (also the JetStream de-duplication id).
    :ivar type: the dotted event type.
    :ivar source_app: the app that published it (None for the platform itself).
    :ivar source_node: the node that published it.
    :ivar time: when it was published (UTC).
    :ivar data: the decoded payload.
    :ivar subject: the NATS subject.
    :ivar headers: the NATS headers (middleware may add, e.g. ``traceparent``).
    :ivar seq: the stream sequence (durable deliveries and publish results), else None.
    :ivar deliveries: how many times it was delivered (durable), 1 for live ones.
    """

    id: str
    type: str
    source_app: str | None
    source_node: str
    time: datetime
    data: Any
    subject: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    seq: int | None = None
    deliveries: int = 1
    _msg: Msg | None = field(default=None, repr=False)
    _settled: bool = field(default=False, repr=False)

    @property
    def durable(self) -> bool:
        """True for an event delivered by a durable subscription (it can be acknowledged)."""
        return self._msg is not None

    async def ack(self) -> None:
        """Acknowledge a durable delivery (done for you when the callback returns)."""
        if self._msg is not None and not self._settled:
            self._settled = True
            await self._msg.ack()

    async def nak(self, delay: float | None = None) -> None:
        """Ask for redelivery (after ``delay`` seconds)."""
        if self._msg is not None and not self._settled:
            self._settled = True
            await self._msg.nak(delay=delay)

    async def in_progress(self) -> None:
        """Extend the acknowledgement deadline of a long-running callback."""
        if self._msg is not None and not self._settled:
            await self._msg.in_progress()

    async def term(self) -> None:
        """Never redeliver this event (a poison message)."""
        if self._msg is not None and not self._settled:
            self._settled = True
            await self._msg.term()


def _decode_event(msg: Msg, base_len: int, platform_scope: bool) -> Event:
    """Build an Event from a message; malformed headers/bodies give a best-effort envelope."""
    h = msg.headers or {}
    rest = msg.subject[base_len:]
    source_app: str | None
    if platform_scope:
        src, _, etype = rest.partition(".")
        source_app = None if src == PLATFORM_SOURCE else src
    else:
        etype = rest
        source_app = h.get(H_SOURCE_APP)
    try:
        when = datetime.fromisoformat(h[H_TIME])
    except (KeyError, ValueError):
        when = datetime.now(UTC)
    try:
        data = codecs.decode(msg.data, h.get(codecs.CONTENT_TYPE))
    except codecs.CodecError:
        data = msg.data  # undecodable: hand over the bytes rather than lose the event
    seq = None
    deliveries = 1
    if msg.reply and msg.reply.startswith("$JS.ACK."):
        with contextlib.suppress(Exception):
            md = msg.metadata
            seq = md.sequence.stream
            deliveries = md.num_delivered
    return Event(
        id=h.get(H_MSG_ID, ""), type=h.get(H_TYPE, etype), source_app=source_app,
        source_node=h.get(H_SOURCE_NODE, ""), time=when, data=data, subject=msg.subject,
        headers=dict(h), seq=seq, deliveries=deliveries,
    )


class Subscription:
    """A live or durable subscription. Iterate it (``async for event in sub``) when it was made
    without a callback; `stop` it when done (the platform stops it when it leaves)."""

    def __init__(self, bus: EventBus, subject: str, durable: str | None) -> None:
        self.bus = bus
        self.subject = subject
        self.durable = durable
        self.queue: asyncio.Queue[Event] | None = None
        self._sub: Any = None
        self._task: asyncio.Task[None] | None = None
        self._stopped = False

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._iter()

    async def _iter(self) -> AsyncIterator[Event]:
        if self.queue is None:
            raise RuntimeError("this subscription delivers to its callback; it cannot be iterated")
        while not self._stopped:
            yield await self.queue.get()

    async def next(self, timeout: float | None = None) -> Event:
        """The next event (iteration mode); `TimeoutError` after ``timeout`` seconds."""
        if self.queue is None:
            raise RuntimeError("this subscription delivers to its callback")
        async with asyncio.timeout(timeout):
            return await self.queue.get()

    async def stop(self) -> None:
        """Stop receiving (a durable consumer is kept: it resumes under the same name)."""
        if self._stopped:
            return
        self._stopped = True
        self.bus.service._subs.discard(self)
        if self._task is not None:
            await cancel_and_wait(self._task)
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()

    unsubscribe = stop

    async def delete(self) -> None:
        """Stop and delete the durable consumer (what it had not received is dropped)."""
        await self.stop()
        if self.durable is not None:
            js = self.bus.service.platform.js
            if js is not None:
                with contextlib.suppress(nats.js.errors.NotFoundError):
                    await js.delete_consumer(self.bus.stream, self.durable)


def events_stream_config(platform: str, app: str | None, *, max_age: float = STREAM_MAX_AGE,
                         max_bytes: int | None = STREAM_MAX_BYTES,
                         replicas: int = 1) -> StreamConfig:
    """The configuration of an events stream: ``{platform}_{app}_events`` for an app,
    ``{platform}_events`` for the platform (``app`` None)."""
    if app is None:
        name, base = bucket(platform, suffix="events"), platform_subject(platform, "events")
    else:
        name, base = bucket(platform, app, "events"), app_subject(platform, app, "events", "")
        base = base.rstrip(".")
    return StreamConfig(name=name, subjects=[base + ".>"], max_age=max_age,
                        max_bytes=max_bytes or -1, duplicate_window=120.0,
                        num_replicas=replicas)


class EventBus:
    """Publish and subscribe within one scope: an app's events or the platform's."""

    def __init__(self, service: EventsService, app: str | None) -> None:
        self.service = service
        self.app = app
        p = service.platform.name
        if app is None:
            self.stream = bucket(p, suffix="events")
            self.base = platform_subject(p, "events") + "."
        else:
            self.stream = bucket(p, app, "events")
            self.base = app_subject(p, app, "events", "")
        self._ensured = False

    @property
    def platform_scope(self) -> bool:
        """True for ``platform.events``."""
        return self.app is None

    def _subject(self, etype: str, source_app: str | None) -> str:
        if self.app is None:
            return f"{self.base}{source_app or PLATFORM_SOURCE}.{etype}"
        return self.base + etype

    def _filter(self, pattern: str, source_app: str | None) -> str:
        validate_pattern(pattern)
        if self.app is None:
            src = validate_ident("source_app", source_app) if source_app else "*"
            return f"{self.base}{src}.{pattern}"
        if source_app not in (None, self.app):
            raise ConfigError("source_app", source_app,
                              f"app events of {self.app!r} all come from {self.app!r}")
        return self.base + pattern

    async def ensure_stream(self) -> None:
        """Create the scope's stream if it does not exist (idempotent)."""
        if self._ensured:
            return
        js = self.service._js()
        cfg = events_stream_config(
            self.service.platform.name, self.app, max_age=self.service.max_age,
            max_bytes=self.service.max_bytes,
            replicas=self.service.platform.settings.stream_replicas)
        await natsutil.ensure_stream(js, self.stream, lambda: js.add_stream(cfg))
        self._ensured = True

    async def publish(
        self, type: str, data: Any = None, *, source_app: str | None = None,
        headers: dict[str, str] | None = None, codec: str = "json", timeout: float = 5.0,
    ) -> Event:
        """Publish an event; returns it (with its stream sequence) once JetStream stored it.

        :param type: the dotted event type (``order.created``).
        :param data: the payload (bytes, JSON-able values, pydantic models).
        :param source_app: for platform events, the publishing app (default: none, the
            platform itself); app events always come from their app.
        :param headers: extra NATS headers.
        :param codec: ``"json"`` or ``"msgpack"``.
        :param timeout: seconds to wait for JetStream's acknowledgement.
        """
        validate_key(type, "event type")
        if self.app is not None:
            if source_app not in (None, self.app):
                raise ConfigError("source_app", source_app,
                                  f"app events of {self.app!r} come from {self.app!r}")
            source_app = self.app
        elif source_app is not None:
            validate_ident("source_app", source_app)
        platform = self.service.platform
        codecs.check_codec(codec)
        event = Event(
            id=os.urandom(12).hex(), type=type, source_app=source_app,
            source_node=platform.node_id, time=datetime.now(UTC), data=data,
            subject=self._subject(type, source_app), headers=dict(headers or {}),
        )
        h = event.headers
        h[H_MSG_ID] = event.id
        h[H_TYPE] = type
        h[H_TIME] = event.time.isoformat()
        h[H_SOURCE_NODE] = platform.node_id
        if source_app:
            h[H_SOURCE_APP] = source_app

        async def send(ev: Event) -> Event:
            # Encoded here, after middleware (which may change data or headers).
            body, ct = codecs.encode(ev.data, codec)
            if ct is not None:
                ev.headers[codecs.CONTENT_TYPE] = ct
            limit = self.service._max_payload()
            size = len(body) + sum(len(k) + len(v) + 4 for k, v in ev.headers.items())
            if size > limit:
                raise PayloadTooLargeError(
                    size, limit, f"event {ev.type!r} (body and headers; the NATS server's "
                    f"max_payload is {limit} bytes)")
            await self.ensure_stream()
            js = self.service._js()
            try:
                ack = await js.publish(ev.subject, body, timeout=timeout, headers=ev.headers)
            except (nats.errors.NoRespondersError, nats.js.errors.NoStreamResponseError):
                self._ensured = False  # the stream vanished (deleted, or a fresh server)
                await self.ensure_stream()
                ack = await js.publish(ev.subject, body, timeout=timeout, headers=ev.headers)
            ev.seq = ack.seq
            return ev

        chain = self.service.platform.middleware.wrap("on_publish", send, cache=False)
        result: Event = await chain(event)
        return result

    async def subscribe(
        self, subject: str = ">", cb: Callback | None = None, *, source_app: str | None = None,
        queue: str | None = None,
    ) -> Subscription:
        """Receive events live (at most once) whose type matches ``subject``.

        :param subject: a type pattern with ``*``/``>`` wildcards.
        :param cb: an async callback; without it, iterate the returned subscription.
        :param source_app: only events of this app (platform events).
        :param queue: a queue group: each event goes to one member of the group.
        """
        nc = self.service._nc()
        full = self._filter(subject, source_app)
        if queue is not None:
            validate_ident("queue", queue)
        sub = Subscription(self, full, None)
        deliver = self._deliverer(sub, cb)
        base_len = len(self.base)
        scope = self.platform_scope

        async def on_msg(msg: Msg) -> None:
            try:
                ev = _decode_event(msg, base_len, scope)
                await deliver(ev)
            except Exception:
                log.exception("events: subscriber of %s failed", full)

        sub._sub = await nc.subscribe(full, queue=queue or "", cb=on_msg)
        # Return only once the server knows the interest: an event published after subscribe()
        # returned (from any connection) is then delivered.
        await natsutil.flush(nc, timeout=10)
        self.service._subs.add(sub)
        return sub

    def _deliverer(self, sub: Subscription, cb: Callback | None) -> Callback:
        if cb is None:
            sub.queue = asyncio.Queue()
            q = sub.queue

            async def enqueue(ev: Event) -> None:
                q.put_nowait(ev)

            inner: Callback = enqueue
        else:
            if not callable(cb):
                raise ConfigError("cb", cb, "must be an async callable taking an Event")
            inner = cb
        chain = self.service.platform.middleware.wrap("on_event", inner, cache=False)
        return chain

    async def subscribe_durable(
        self, subject: str, name: str, cb: Callback | None = None, *,
        source_app: str | None = None, deliver: Literal["new", "all"] = "new",
        ack_wait: float = 30.0, max_deliver: int = -1, retry_delay: float = 1.0,
    ) -> Subscription:
        """Receive events at least once through the durable consumer ``name``.

        While no subscriber of that name runs, events are kept for it; what a callback did not
        acknowledge (it raised, or ``ack_wait`` passed) is delivered again.

        :param subject: a type pattern with ``*``/``>`` wildcards.
        :param name: the durable name (letters, digits, ``-``, ``_``); subscribers sharing it
            share the events.
        :param cb: an async callback; the event is acknowledged when it returns, redelivered
            after ``retry_delay`` when it raises. Without a callback, iterate the subscription
            and call ``event.ack()`` yourself.
        :param source_app: only events of this app (platform events).
        :param deliver: when the consumer is first created: ``"new"`` events only, or ``"all"``
            that the stream still holds.
        :param ack_wait: seconds before an unacknowledged delivery is redelivered.
        :param max_deliver: deliveries per event before giving up (-1: unlimited).
        :param retry_delay: seconds before a failed event is redelivered.
        """
        validate_ident("durable name", name)
        if deliver not in ("new", "all"):
            raise ConfigError("deliver", deliver, "must be 'new' or 'all'")
        if not ack_wait > 0:
            raise ConfigError("ack_wait", ack_wait, "must be positive")
        full = self._filter(subject, source_app)
        await self.ensure_stream()
        js = self.service._js()
        try:
            info = await js.consumer_info(self.stream, name)
            existing = info.config.filter_subject
            if existing and existing != full:
                raise ConfigError(
                    "durable name", name,
                    f"a durable subscription of this name already follows {existing!r}; use "
                    "another name, or delete it first",
                )
        except nats.js.errors.NotFoundError:
            await self._add_consumer(name, full, ack_wait, max_deliver, deliver)
        psub = await js.pull_subscribe_bind(durable=name, stream=self.stream)
        sub = Subscription(self, full, name)
        sub._sub = psub
        chain = self._deliverer(sub, cb)
        manual = cb is None
        base_len = len(self.base)
        scope = self.platform_scope

        async def loop() -> None:
            pause = 0.1
            while not sub._stopped:
                try:
                    msgs = await psub.fetch(FETCH_BATCH, timeout=FETCH_TIMEOUT)
                except nats.errors.TimeoutError:
                    continue
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # connection loss, server restart, ...
                    log.debug("events: fetch for %s failed: %s", name, exc)
                    await asyncio.sleep(pause)
                    pause = min(pause * 2, 2.0)
                    if pause >= 0.8:  # failing for a while: the stream may have been deleted
                        await self._restore_consumer(name, full, ack_wait, max_deliver)
                    continue
                pause = 0.1
                for msg in msgs:
                    await self._deliver_durable(msg, chain, manual, retry_delay, base_len, scope)

        sub._task = supervise(f"events:durable:{name}", loop)
        self.service._subs.add(sub)
        return sub

    async def _add_consumer(self, name: str, full: str, ack_wait: float, max_deliver: int,
                            deliver: str) -> None:
        js = self.service._js()
        cfg = ConsumerConfig(
            durable_name=name, name=name, filter_subject=full,
            ack_policy=AckPolicy.EXPLICIT, ack_wait=ack_wait, max_deliver=max_deliver,
            deliver_policy=DeliverPolicy.ALL if deliver == "all" else DeliverPolicy.NEW,
            max_ack_pending=1000,
        )
        try:
            await js.add_consumer(self.stream, cfg)
        except nats.js.errors.BadRequestError:
            await js.consumer_info(self.stream, name)  # created concurrently: fine

    async def _restore_consumer(self, name: str, full: str, ack_wait: float,
                                max_deliver: int) -> None:
        """Re-create a deleted stream and durable consumer (their events are gone; new ones
        are delivered again)."""
        try:
            js = self.service._js()
            try:
                await js.consumer_info(self.stream, name)
                return
            except nats.js.errors.NotFoundError:
                pass
            self._ensured = False
            await self.ensure_stream()
            await self._add_consumer(name, full, ack_wait, max_deliver, "all")
            log.warning("events: stream %s or durable %s was missing; re-created", self.stream,
                        name)
        except Exception as exc:
            log.debug("events: re-creating durable %s failed: %s", name, exc)

    async def _deliver_durable(self, msg: Msg, chain: Callback, manual: bool,
                               retry_delay: float, base_len: int, scope: bool) -> None:
        ev = _decode_event(msg, base_len, scope)
        ev._msg = msg
        try:
            await chain(ev)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("events: durable subscriber of %s failed on event %s; redelivering "
                          "in %.1fs", msg.subject, ev.id, retry_delay)
            with contextlib.suppress(Exception):
                await ev.nak(delay=retry_delay)
            return
        if not manual:
            with contextlib.suppress(Exception):
                await ev.ack()


class EventsService:
    """The core service behind ``app.events`` and ``platform.events``."""

    name = "events"

    def __init__(self, platform: Platform) -> None:
        self.platform = platform
        self.max_age = STREAM_MAX_AGE
        self.max_bytes: int | None = STREAM_MAX_BYTES
        self._buses: dict[str | None, EventBus] = {}
        self._subs: set[Subscription] = set()

    def _nc(self) -> Any:
        nc = self.platform.nc
        if nc is None or not self.platform.running:
            raise RuntimeError("the platform is not started (await platform.start() first)")
        return nc

    def _js(self) -> Any:
        self._nc()
        return self.platform.js

    def _max_payload(self) -> int:
        nc = self.platform.nc
        return int(nc.max_payload) if nc is not None else 1024 * 1024

    def bus(self, app: str | None) -> EventBus:
        """The bus of ``app`` (None: the platform's)."""
        b = self._buses.get(app)
        if b is None:
            b = self._buses[app] = EventBus(self, app)
        return b

    async def start(self) -> None:
        """Create the platform's event stream."""
        await self.bus(None).ensure_stream()

    async def app_started(self, rt: AppRuntime) -> None:
        """Create the app's event stream."""
        await self.bus(rt.app.name).ensure_stream()

    async def app_stopped(self, rt: AppRuntime) -> None:
        """Nothing to do: subscriptions belong to the platform's lifetime."""

    async def stop(self) -> None:
        """Stop every subscription made through this platform."""
        for sub in list(self._subs):
            await sub.stop()


def events_service(platform: Platform) -> EventsService:
    """The platform's `EventsService` (`PluginError` naming the plugin when it is missing)."""
    return platform.service("events")  # type: ignore[no-any-return]


__all__ = [
    "Event",
    "EventBus",
    "EventsService",
    "Subscription",
    "events_service",
]
