"""Control requests (step-down, node ping) through the middleware chain, audited.

Anything on the bus can publish to a control subject, so each request runs through the
platform's server-side middleware chain (``on_request``, ``platform.middleware``, the chain of
``app.rpc`` too: `pycluster.middleware.SignedAuth` or `pycluster.middleware.AuthMiddleware`
refuses it before it does anything) as a `Request` of kind ``"rpc"`` with method
``control.<name>`` (``allow={"control.stepdown": ["ops"]}`` limits who may ask), and is reported
through ``pycluster_control_request`` (the audit plugin writes it to category ``control``) with
its source: the subject, the reply subject, the identity the middleware established and the
caller's ``Pycluster-Auth-App`` header. At most ``_AUDIT_PER_SECOND`` requests a second are
reported; the rest of a flood is counted and summarised in the log. Outgoing control requests
of this node run through the client-side chain (``on_call``, then ``Call.before_send``), so
they carry the node's credentials or signature.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from nats.aio.msg import Msg

from ..middleware import Call, Request
from ..plugins import call_each
from .errors import ConfigError, PyclusterError

if TYPE_CHECKING:
    from .platform import Platform

log = logging.getLogger("pycluster.control")

MAX_CONTROL_PAYLOAD = 4096
"""Control requests are tiny JSON objects; larger ones are refused unread."""
APP_HEADER = "Pycluster-Auth-App"
_AUDIT_PER_SECOND = 20  # audit entries per second for control requests (a flood is counted)

Handler = Callable[[Request], Awaitable[Any]]


class ControlRefused(PyclusterError):
    """A control request that is refused before its handler (too large, not JSON, ...)."""

    code = "bad_request"

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class ControlPlane:
    """Serves and sends this node's control requests (one per platform)."""

    def __init__(self, platform: Platform) -> None:
        self.platform = platform
        self._window = 0.0
        self._in_window = 0
        self.suppressed = 0

    def _chain(self, hook: str, inner: Callable[[Any], Awaitable[Any]]) -> Any:
        return self.platform.middleware.wrap(hook, inner, cache=False)

    async def serve(self, msg: Msg, *, app: str, name: str, handler: Handler,
                    audit: bool = True) -> tuple[Any, BaseException | None]:
        """Run ``handler`` for ``msg`` behind the middleware chain; audit it.

        Returns ``(result, error)``: the handler's result, or the exception that refused the
        request (a middleware's `UnauthorizedError`, `ControlRefused`, ...). Never raises.
        """
        headers = {k: str(v) for k, v in (msg.headers or {}).items()}
        p = self.platform
        req = Request(
            kind="rpc", app=app, method=f"control.{name}", route="control", node=p.node_id,
            subject=msg.subject, headers=headers, data=msg.data or b"",
            content_type="application/json", payload=None, request_id="",
            source_node=None, source_app=headers.get(APP_HEADER), deadline=None,
        )
        result: Any = None
        error: BaseException | None = None
        try:
            if len(req.data) > MAX_CONTROL_PAYLOAD:
                raise ControlRefused(f"payload of {len(req.data)} bytes (at most "
                                     f"{MAX_CONTROL_PAYLOAD})")
            result = await self._chain("on_request", handler)(req)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            error = exc
        if audit or error is not None:
            self._report(req, msg, error)
        return result, error

    def _report(self, req: Request, msg: Msg, error: BaseException | None) -> None:
        now = time.monotonic()
        if now - self._window >= 1.0:
            if self.suppressed:
                log.warning("control: %d control requests not audited (more than %d a second)",
                            self.suppressed, _AUDIT_PER_SECOND)
            self._window, self._in_window, self.suppressed = now, 0, 0
        self._in_window += 1
        if self._in_window > _AUDIT_PER_SECOND:
            self.suppressed += 1
            return
        p = self.platform
        call_each(p.pm.hook.pycluster_control_request, "control request", platform=p,
                  request=req, subject=msg.subject, reply=msg.reply or None, error=error)

    async def serve_stepdown(self, app: Any, msg: Msg) -> None:
        """Handle a step-down request for ``app`` (see `serve_stepdown`)."""
        await serve_stepdown(self.platform, app, msg)

    async def request(self, subject: str, payload: bytes, *, app: str, name: str,
                      timeout: float, gather: float | None = None,
                      enough: Callable[[Msg], bool] | None = None) -> list[Msg]:
        """Send a control request with this node's credentials (the ``on_call`` chain).

        Returns the replies: the first one, or with ``gather`` every reply that arrives
        within ``gather`` seconds (several processes may answer one subject), ending early at
        a reply for which ``enough(reply)`` is true. An empty list means nobody answered.
        """
        p = self.platform
        nc = p.nc_control or p.nc  # control traffic: on the control connection
        if nc is None:
            return []

        async def send(call: Call) -> list[Msg]:
            if call.before_send is not None:  # e.g. SignedAuth: signs this subject and body
                call.before_send(subject, payload, call.headers)
            if gather is None:
                try:
                    return [await nc.request(subject, payload, timeout=timeout,
                                             headers=call.headers or None)]
                except Exception:
                    return []
            replies: list[Msg] = []
            done = asyncio.Event()

            async def cb(m: Msg) -> None:
                if no_responders(m):
                    done.set()  # nobody listens: no need to wait out the window
                    return
                replies.append(m)
                if enough is not None and enough(m):
                    done.set()

            inbox = nc.new_inbox()
            sub = await nc.subscribe(inbox, cb=cb)
            try:
                await nc.publish(subject, payload, reply=inbox, headers=call.headers or None)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(gather):
                        await done.wait()
            finally:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
            return replies

        call = Call(kind="rpc", app=app, method=f"control.{name}", route="control",
                    payload=payload, headers={}, timeout=timeout, idempotent=True,
                    source_node=p.node_id)
        replies: list[Msg] = await self._chain("on_call", send)(call)
        return replies


def no_responders(msg: Msg) -> bool:
    """Whether ``msg`` is the server's "no responders" status (nobody subscribes the
    subject a request was published to)."""
    return bool(msg.headers) and msg.headers.get("Status") == "503"  # type: ignore[union-attr]


def error_reply(error: BaseException) -> dict[str, Any]:
    """The ``error`` member of a refused control request's reply."""
    code = getattr(error, "code", None)
    return {"field": "request", "value": None, "code": code if isinstance(code, str) else None,
            "reason": f"{type(error).__name__}: {error}"[:300]}


def decode_object(data: bytes) -> dict[str, Any]:
    """A control request's JSON object body (empty body: ``{}``); `ControlRefused` else."""
    if not data:
        return {}
    try:
        body = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise ControlRefused("the body is not JSON") from None
    if not isinstance(body, dict):
        raise ControlRefused(f"the body is a JSON {type(body).__name__}, not an object")
    return body


async def serve_stepdown(platform: Platform, app: Any, msg: Msg) -> None:
    """Handle a step-down request for ``app`` (this node is its active instance).

    The body must be a JSON object with at most ``successor`` (a live node id that can lead
    the app, not this node) and ``cooldown`` (seconds, finite, ``0 <= cooldown <=
    max(60, 10 x lease_ttl)``); anything else is refused with the reason, and nothing changes.
    The reply is ``{"node", "epoch"}``, plus ``"error": {field, value, reason}`` if refused.
    """
    epoch = app.epoch

    async def handler(req: Request) -> None:
        body = decode_object(req.data)
        unknown = sorted(set(body) - {"successor", "cooldown"})
        if unknown:
            raise ConfigError("request", ", ".join(str(k)[:32] for k in unknown[:5]),
                              "unknown fields (a step-down request has successor, cooldown)")
        successor, cooldown = body.get("successor"), body.get("cooldown")
        req.extra["request"] = {"successor": successor if isinstance(successor, str) else
                                None if successor is None else repr(successor)[:64],
                                "cooldown": cooldown if isinstance(cooldown, int | float) else
                                None if cooldown is None else repr(cooldown)[:64]}
        await app.step_down(successor=successor, cooldown=cooldown)

    _, error = await platform.control.serve(msg, app=app.name, name="stepdown",
                                            handler=handler)
    reply: dict[str, Any] = {"node": platform.node_id, "epoch": epoch}
    if isinstance(error, ConfigError):
        log.warning("app %s: step-down request refused: %s", app.name, error)
        value = error.value if isinstance(error.value, str | int | float | None) else None
        if isinstance(value, str):
            value = value[:64]
        reply["error"] = {"field": error.field, "value": value, "reason": error.reason}
    elif error is not None:
        log.warning("app %s: step-down request refused: %s", app.name, error)
        reply["error"] = error_reply(error)
    if msg.reply:
        with contextlib.suppress(Exception):
            await msg.respond(json.dumps(reply, default=str).encode())
