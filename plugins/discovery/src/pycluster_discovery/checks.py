"""Health checks of registered services: HTTP, TCP and Python callables."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import urllib.parse

from .options import HealthSpec, HttpCheck, PyCheck, TcpCheck


class CheckFailed(Exception):
    """A health check did not pass (the message says why)."""


async def _http(spec: HttpCheck, host: str, port: int) -> str:
    url = spec.path if spec.path.startswith(("http://", "https://")) else (
        f"http://{host}:{port}{spec.path if spec.path.startswith('/') else '/' + spec.path}")
    u = urllib.parse.urlsplit(url)
    if u.scheme != "http":
        raise CheckFailed(f"only http:// checks are supported, not {u.scheme}://")
    reader, writer = await asyncio.open_connection(u.hostname, u.port or 80)
    try:
        target = (u.path or "/") + (f"?{u.query}" if u.query else "")
        writer.write(f"GET {target} HTTP/1.1\r\nHost: {u.netloc}\r\nConnection: close\r\n"
                     "User-Agent: pycluster-discovery\r\n\r\n".encode())
        await writer.drain()
        raw = await reader.read(1 << 20)
        while chunk := await reader.read(1 << 16):
            raw += chunk
            if len(raw) > 1 << 20:
                break
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
    head, _, body = raw.partition(b"\r\n\r\n")
    try:
        status = int(head.split(b" ", 2)[1])
    except (IndexError, ValueError):
        raise CheckFailed(f"GET {url}: not an HTTP answer") from None
    ok = status == spec.status if spec.status is not None else 200 <= status < 300
    if not ok:
        raise CheckFailed(f"GET {url}: status {status}")
    if spec.body is not None and spec.body.encode() not in body:
        raise CheckFailed(f"GET {url}: body lacks {spec.body!r}")
    return f"GET {url}: {status}"


async def _tcp(spec: TcpCheck, host: str, port: int) -> str:
    port = spec.port or port
    _reader, writer = await asyncio.open_connection(host, port)
    writer.close()
    with contextlib.suppress(Exception):
        await writer.wait_closed()
    return f"TCP {host}:{port} open"


async def _py(spec: PyCheck) -> str:
    result = spec.fn()
    if inspect.isawaitable(result):
        result = await result
    if result is False:
        raise CheckFailed(f"{getattr(spec.fn, '__name__', 'check')} returned False")
    return "ok" if result is None or result is True else str(result)


async def run_check(spec: HealthSpec, host: str, port: int) -> tuple[bool, str]:
    """Run one check within its timeout: (passed, detail)."""
    try:
        async with asyncio.timeout(spec.timeout):
            if isinstance(spec, HttpCheck):
                detail = await _http(spec, host, port)
            elif isinstance(spec, TcpCheck):
                detail = await _tcp(spec, host, port)
            else:
                detail = await _py(spec)
        return True, detail
    except TimeoutError:
        return False, f"timed out after {spec.timeout} s"
    except Exception as exc:
        return False, f"{type(exc).__name__}: {exc}"
