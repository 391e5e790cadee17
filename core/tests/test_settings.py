"""Settings precedence and clear errors (pure logic, no NATS)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pycluster import ConfigError, Platform
from pycluster.kernel.settings import load_settings
from pycluster.plugins import create_plugin_manager


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


# -- clear errors for a newcomer's mistakes -------------------------------------------------------


def test_labels_that_are_not_json_name_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYCLUSTER_LABELS", "zone=a")
    with pytest.raises(ConfigError) as info:
        load_settings(name="p", node_id="n")
    assert info.value.field == "PYCLUSTER_LABELS"
    assert "zone=a" in str(info.value) and "JSON" in str(info.value)
    assert '{"zone": "a"' in str(info.value)  # an example of the right form


def test_an_invalid_variable_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYCLUSTER_STREAM_REPLICAS", "2")
    with pytest.raises(ConfigError, match=r"PYCLUSTER_STREAM_REPLICAS='2': must be 1, 3 or 5"):
        load_settings(name="p", node_id="n")


@pytest.mark.parametrize(
    ("url", "needle"),
    [
        ("htp://alice:s3cret@nats-1:4222", "scheme 'htp://'; accepted: nats://, tls://, ws://, wss://"),
        ("nats://alice:s3cret@nats-1:42x2", "not a valid URL"),
        ("nats://:4222", "names no host"),
        ("nats-1:4222", "not a URL"),
    ],
)
def test_a_bad_nats_url_is_named_without_its_password(
    url: str, needle: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for source in ("kwargs", "env"):
        with pytest.raises(ConfigError) as info:
            if source == "env":
                monkeypatch.setenv("PYCLUSTER_NATS_URL", f"nats://ok:4222,{url}")
                load_settings(name="p", node_id="n")
            else:
                load_settings(name="p", node_id="n", nats_url=["nats://ok:4222", url])
        msg = str(info.value)
        assert needle in msg and "s3cret" not in msg, msg
        assert url.replace("s3cret", "***") in msg
    assert load_settings(name="p", node_id="n", nats_url="tls://h:4222,wss://h:443").nats_url


def test_secrets_are_never_echoed() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(name="p", node_id="n", nats_password=["not", "a", "string"])
    assert "nats_password='***'" in str(info.value) and "['not'" not in str(info.value)


def test_unknown_pycluster_variable_warns_with_the_closest_name(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from pycluster.kernel import settings

    monkeypatch.setattr(settings, "_warned_env", set())
    monkeypatch.setenv("PYCLUSTER_LEASE_TTTL", "3")
    monkeypatch.setenv("PYCLUSTER_STRICT", "1")  # read elsewhere: not a typo
    monkeypatch.setenv("PYCLUSTER_EPOCH", "7")  # what a node started by a backend inherits
    caplog.set_level("WARNING", logger="pycluster.settings")
    load_settings(name="p", node_id="n")
    load_settings(name="p", node_id="n")
    warned = [r.getMessage() for r in caplog.records if r.name == "pycluster.settings"]
    assert len(warned) == 1, warned  # once per process
    assert "PYCLUSTER_LEASE_TTTL" in warned[0] and "did you mean PYCLUSTER_LEASE_TTL?" in warned[0]


def test_every_pycluster_variable_the_project_uses_is_known() -> None:
    """A new ``PYCLUSTER_*`` variable read outside the settings must be listed in
    ``pycluster.kernel.settings.OTHER_ENV_VARS``, or every user setting it gets a typo warning."""
    import re

    from pycluster.kernel.settings import OTHER_ENV_VARS, PlatformSettings

    root = Path(__file__).resolve().parents[2]
    known = {"PYCLUSTER_" + f.upper() for f in PlatformSettings.model_fields} | set(OTHER_ENV_VARS)
    used: dict[str, str] = {}
    packaging = [p for p in root.glob("packaging/**/*") if p.is_file()]
    for path in [*root.glob("*.md"), *root.glob("docs/*.md"), *packaging,
                 *root.glob("core/src/**/*.py"), *root.glob("plugins/*/src/**/*.py")]:
        for name in re.findall(r"PYCLUSTER_[A-Z0-9_]*[A-Z0-9]\b", path.read_text()):
            used.setdefault(name, str(path.relative_to(root)))
    typo_example = {"PYCLUSTER_LEASE_TTTL"}  # docs/configuration.md shows the warning with it
    assert {n: f for n, f in used.items() if n not in known | typo_example} == {}
