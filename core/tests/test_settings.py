"""Settings precedence and clear errors (pure logic, no NATS)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pycluster import ConfigError, Platform
from pycluster.plugins import create_plugin_manager
from pycluster.settings import load_settings


def test_defaults() -> None:
    s = load_settings(name="prod", node_id="n1")
    assert s.lease_ttl == 10.0 and s.heartbeat_interval == 3.0
    assert s.nats_url is None


def test_precedence_kwargs_env_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("name: fromfile\nnode_id: filenode\nlease_ttl: 8\nlabels: {zone: a}\n")
    s = load_settings(f)
    assert (s.name, s.node_id, s.lease_ttl, s.labels) == ("fromfile", "filenode", 8, {"zone": "a"})
    monkeypatch.setenv("PYCLUSTER_LEASE_TTL", "7")
    monkeypatch.setenv("PYCLUSTER_NATS_URL", "nats://a:4222,nats://b:4222")
    s = load_settings(f)
    assert s.lease_ttl == 7 and s.nats_url == ["nats://a:4222", "nats://b:4222"]
    s = load_settings(f, lease_ttl=9)
    assert s.lease_ttl == 9


def test_toml(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text('name = "t"\nnode_id = "n"\nheartbeat_interval = 1.0\n')
    assert load_settings(f).heartbeat_interval == 1.0


@pytest.mark.parametrize(
    ("kwargs", "field", "needle"),
    [
        ({"lease_ttl": 0.5}, "lease_ttl", "at least 1 second"),
        ({"heartbeat_interval": 6.0}, "heartbeat_interval", "half the lease_ttl"),
        ({"name": "bad name"}, "name", "letters, digits"),
        ({"nats_url": "localhost:4222"}, "nats_url", "not a URL"),
        ({"stream_replicas": 2}, "stream_replicas", "1, 3 or 5"),
        ({"unknown_setting": 1}, "unknown_setting", "Extra inputs"),
    ],
)
def test_invalid_settings_name_field_value_reason(
    kwargs: dict[str, object], field: str, needle: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(name=kwargs.pop("name", "p"), node_id="n", **kwargs)  # type: ignore[arg-type]
    msg = str(info.value)
    assert field in msg and needle in msg


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot be parsed"):
        (tmp_path / "x.yaml").write_text("a: [")
        load_settings(tmp_path / "x.yaml")
    with pytest.raises(ConfigError, match=r"\.yaml, \.yml or \.toml"):
        (tmp_path / "x.ini").write_text("a=1")
        load_settings(tmp_path / "x.ini")
    with pytest.raises(ConfigError, match="No such file"):
        load_settings(tmp_path / "missing.yaml")


def test_platform_rejects_bad_settings_before_connecting() -> None:
    pm = create_plugin_manager(load_entrypoints=False)
    with pytest.raises(ConfigError, match="node_id"):
        Platform("prod", node_id="no spaces", plugin_manager=pm)
