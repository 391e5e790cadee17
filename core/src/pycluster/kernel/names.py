"""Validation of every name that ends up in a NATS subject or bucket, before anything is sent.

Rules: platform, app and node ids become parts of bucket names (``[A-Za-z0-9_-]``) and of subject
tokens; pycluster reserves ``_`` as a platform-wide subject token, so names may not start with it.
Keys and lock names may contain dots (hierarchies) but no wildcards, spaces or empty tokens.
"""

from __future__ import annotations

import re

from .errors import InvalidNameError

_IDENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
_KEY = re.compile(r"^[-/_=.A-Za-z0-9]+$")
MAX_KEY_LENGTH = 1024


def validate_ident(kind: str, value: object) -> str:
    """Check a platform, app or node id; return it or raise `InvalidNameError`."""
    if not isinstance(value, str):
        raise InvalidNameError(kind, value, "must be a string")
    if not _IDENT.match(value):
        raise InvalidNameError(
            kind,
            value,
            "must be 1-64 characters of letters, digits, '-' or '_', starting with a letter or "
            "digit (it becomes part of NATS bucket names and subjects)",
        )
    return value


def validate_key(value: object, kind: str = "key") -> str:
    """Check a KV key or lock name: letters, digits, ``-/_=.``; no leading/trailing/double dots."""
    if not isinstance(value, str) or not value:
        raise InvalidNameError(kind, value, "must be a non-empty string")
    if len(value) > MAX_KEY_LENGTH:
        raise InvalidNameError(kind, value[:40] + "...", f"longer than {MAX_KEY_LENGTH} characters")
    if not _KEY.match(value):
        raise InvalidNameError(
            kind, value, "may contain only letters, digits and '-/_=.' (no spaces or wildcards)"
        )
    if value.startswith(".") or value.endswith(".") or ".." in value:
        raise InvalidNameError(kind, value, "may not start or end with '.' or contain '..'")
    return value


def validate_pattern(value: object) -> str:
    """Check a watch pattern: like a key, but '*' and a final '>' tokens are allowed."""
    if not isinstance(value, str) or not value:
        raise InvalidNameError("pattern", value, "must be a non-empty string")
    tokens = value.split(".")
    for i, tok in enumerate(tokens):
        if tok == "*" or (tok == ">" and i == len(tokens) - 1):
            continue
        if tok == ">":
            raise InvalidNameError("pattern", value, "'>' may only be the last token")
        validate_key(tok, "pattern")
    return value


def bucket(platform: str, app: str | None = None, suffix: str | None = None) -> str:
    """Bucket/stream name: ``{platform}_{app}[_{suffix}]`` or ``{platform}_{suffix}``."""
    parts = [platform] + ([app] if app else []) + ([suffix] if suffix else [])
    return "_".join(parts)


def app_subject(platform: str, app: str, component: str, target: str) -> str:
    """App subject ``{platform}.{app}.{component}.{target}``."""
    return f"{platform}.{app}.{component}.{target}"


def platform_subject(platform: str, component: str, *rest: str) -> str:
    """Platform-wide subject ``{platform}._.{component}.{...}``."""
    return ".".join([platform, "_", component, *rest])
