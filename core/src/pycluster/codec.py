"""Payload encoding shared by RPC, the API bus and events.

Rules (the content type travels in the ``Content-Type`` NATS header):

* ``bytes`` (and ``bytearray``/``memoryview``) pass through untouched: ``application/octet-stream``.
* ``None`` is an empty body without a content type (decoded back to None).
* Anything else is JSON by default (``application/json``, encoded with pydantic-core, so pydantic
  models, dataclasses, datetimes, UUIDs, enums and sets work), or msgpack when selected
  (``application/msgpack``; models and other rich values are first turned into plain data).
* A body without a content type (e.g. from a plain nats-py client) decodes to its bytes; an
  unknown content type also decodes to bytes, so foreign clients interoperate.

Decoding or encoding failures raise `CodecError` (a ``ValueError``); the server side answers them
with a ``bad_request`` error instead of letting them reach the message loop.
"""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import msgpack
import pydantic_core
from pydantic import BaseModel, TypeAdapter

from .kernel.errors import ConfigError

CONTENT_TYPE = "Content-Type"
OCTET_STREAM = "application/octet-stream"
JSON = "application/json"
MSGPACK = "application/msgpack"

CodecName = Literal["json", "msgpack"]
CODECS: dict[str, str] = {"json": JSON, "msgpack": MSGPACK}


class CodecError(ValueError):
    """A payload could not be encoded or decoded.

    :ivar content_type: the content type involved.
    :ivar reason: what went wrong.
    """

    def __init__(self, content_type: str | None, reason: str) -> None:
        self.content_type = content_type
        self.reason = reason
        super().__init__(f"cannot handle {content_type or 'payload'}: {reason}")


def check_codec(codec: str) -> str:
    """Validate a codec name ("json" or "msgpack")."""
    if codec not in CODECS:
        raise ConfigError("codec", codec, f"must be one of {', '.join(sorted(CODECS))}")
    return codec


def _msgpack_default(obj: Any) -> Any:
    # Called by msgpack only for types it does not know (models, datetimes, ...).
    return pydantic_core.to_jsonable_python(obj)


def encode(value: Any, codec: str = "json") -> tuple[bytes, str | None]:
    """Encode ``value``; return the body and its content type (None for an empty body)."""
    if value is None:
        return b"", None
    if isinstance(value, bytes):
        return value, OCTET_STREAM
    if isinstance(value, bytearray | memoryview):
        return bytes(value), OCTET_STREAM
    try:
        if codec == "json":
            return pydantic_core.to_json(value), JSON
        if codec == "msgpack":
            return msgpack.packb(value, default=_msgpack_default, use_bin_type=True), MSGPACK
    except (pydantic_core.PydanticSerializationError, TypeError, ValueError, OverflowError) as exc:
        raise CodecError(CODECS.get(codec, codec), f"{type(value).__name__} value: {exc}") from None
    raise ConfigError("codec", codec, f"must be one of {', '.join(sorted(CODECS))}")


def decode(data: bytes, content_type: str | None) -> Any:
    """Decode a body by its content type (see the module docstring)."""
    if content_type is None:
        return data if data else None
    if content_type == JSON:
        if not data:
            return None
        try:
            return pydantic_core.from_json(data)
        except ValueError as exc:
            raise CodecError(content_type, f"invalid JSON: {exc}") from None
    if content_type == MSGPACK:
        if not data:
            return None
        try:
            return msgpack.unpackb(data, raw=False)
        except Exception as exc:  # msgpack raises several unrelated types
            reason = f"invalid msgpack: {type(exc).__name__}: {exc}"
            raise CodecError(content_type, reason) from None
    return data


def needs_header(body: bytes, content_type: str | None) -> bool:
    """Whether the content type must travel: not for non-empty raw bytes, which decode as
    bytes without one (saves a header on the hot path)."""
    return content_type is not None and (content_type != OCTET_STREAM or not body)


def codec_of(content_type: str | None) -> str:
    """The codec to answer in: the caller's, when it used one; JSON otherwise."""
    return "msgpack" if content_type == MSGPACK else "json"


@functools.lru_cache(maxsize=512)
def _adapter(tp: Any) -> TypeAdapter[Any]:
    return TypeAdapter(tp)


def validate(tp: Any, value: Any) -> Any:
    """Validate ``value`` as ``tp`` (a pydantic model or any type pydantic understands).

    Raises ``pydantic.ValidationError``.
    """
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        if isinstance(value, tp):
            return value
        return tp.model_validate(value)
    try:
        adapter = _adapter(tp)
    except TypeError:  # unhashable type expression: build it each time
        adapter = TypeAdapter(tp)
    return adapter.validate_python(value)


# -- handler signatures --------------------------------------------------------------------------

HandlerMode = Literal["none", "value", "request"]


@dataclass(frozen=True)
class HandlerSpec:
    """How to call a handler: without arguments, with the decoded payload (validated as
    ``model`` when the parameter is annotated with a pydantic model), or with the whole
    request object."""

    fn: Callable[..., Any]
    mode: HandlerMode
    model: type[BaseModel] | None
    is_async: bool


def handler_spec(fn: Callable[..., Any], request_type: type) -> HandlerSpec:
    """Inspect ``fn`` once: how many parameters, and what the first one is annotated with.

    :param fn: the handler.
    :param request_type: the class that means "give me the whole request" (`pycluster.Request`).
    """
    is_async = inspect.iscoroutinefunction(fn)
    try:
        params = [
            p for p in inspect.signature(fn).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
        ]
    except (TypeError, ValueError):
        return HandlerSpec(fn, "value", None, is_async)
    if not params:
        return HandlerSpec(fn, "none", None, is_async)
    ann: Any = params[0].annotation
    try:
        hints = typing.get_type_hints(fn)
        ann = hints.get(params[0].name, ann)
    except Exception:  # forward references that cannot be resolved: use the raw annotation
        pass
    named = isinstance(ann, str) and ann.split(".")[-1] == request_type.__name__
    if ann is request_type or named:
        return HandlerSpec(fn, "request", None, is_async)
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return HandlerSpec(fn, "value", ann, is_async)
    return HandlerSpec(fn, "value", None, is_async)
