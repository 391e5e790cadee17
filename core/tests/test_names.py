"""Name validation happens before anything touches NATS."""

from __future__ import annotations

import pytest

from pycluster import App, InvalidNameError
from pycluster.kernel.names import (
    bucket,
    platform_subject,
    validate_ident,
    validate_key,
    validate_pattern,
)


@pytest.mark.parametrize("name", ["prod", "node-1", "a_b", "A9", "x" * 64])
def test_valid_idents(name: str) -> None:
    assert validate_ident("app", name) == name


@pytest.mark.parametrize(
    "name", ["", "_x", "-x", "a.b", "a b", "a*", "a>", "x" * 65, "ü", "a/b", 3, None]
)
def test_invalid_idents(name: object) -> None:
    with pytest.raises(InvalidNameError) as info:
        validate_ident("app name", name)
    assert "app name" in str(info.value)


@pytest.mark.parametrize("key", ["k", "a.b.c", "user/1", "x=y", "a-b_c"])
def test_valid_keys(key: str) -> None:
    assert validate_key(key) == key


@pytest.mark.parametrize("key", ["", ".a", "a.", "a..b", "a b", "a*", "a.>", "ä", "x" * 1025])
def test_invalid_keys(key: str) -> None:
    with pytest.raises(InvalidNameError):
        validate_key(key)


def test_patterns() -> None:
    assert validate_pattern("a.*.c") == "a.*.c"
    assert validate_pattern("a.>") == "a.>"
    with pytest.raises(InvalidNameError):
        validate_pattern("a.>.b")


def test_resource_names_follow_the_contract() -> None:
    assert bucket("prod", "convex") == "prod_convex"
    assert bucket("prod", "convex", "election") == "prod_convex_election"
    assert bucket("prod", suffix="platform") == "prod_platform"
    assert platform_subject("prod", "api", "convex", "query") == "prod._.api.convex.query"


def test_app_name_checked_at_construction() -> None:
    with pytest.raises(InvalidNameError):
        App("bad name")
