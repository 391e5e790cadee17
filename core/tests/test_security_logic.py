"""Pure logic of the security features: redaction, the backend environment, signature checks
and the shape of the generated NATS permissions (tests/test_security.py checks them on a real
nats-server)."""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

import pytest

from pycluster.backend import base_environ, scrubbed_environ
from pycluster.kernel.errors import ConfigError, UnauthorizedError
from pycluster.kernel.settings import load_settings, redact_text, server_address
from pycluster.middleware import SIG_HEADER, SignedAuth
from pycluster.natsauth import NatsUser, check_collisions, generate, permissions
from pycluster.signing import SigningKey, VerifyingKey, generate_keypair, load_seed


def matches(pattern: str, subject: str) -> bool:
    """NATS subject matching: ``*`` one token, ``>`` the rest (one or more tokens)."""
    p, s = pattern.split("."), subject.split(".")
    for i, tok in enumerate(p):
        if tok == ">":
            return len(s) > i
        if i >= len(s) or (tok != "*" and tok != s[i]):
            return False
    return len(p) == len(s)


def overlaps(a: str, b: str) -> bool:
    """Whether two subject patterns can match a common subject."""
    pa, pb = a.split("."), b.split(".")
    for i in range(max(len(pa), len(pb))):
        x = pa[i] if i < len(pa) else None
        y = pb[i] if i < len(pb) else None
        if x is None or y is None:
            return False
        if x == ">" or y == ">":
            return True
        if x != "*" and y != "*" and x != y:
            return False
    return True


# -- redaction -----------------------------------------------------------------------------------


def test_redact_text_masks_every_url_and_secret() -> None:
    text = ("NATS at nats://ops:hunter2@a:4222, tls://tok3n@b:4222 failed: x "
            "(password hunter2, token s3cr3t)")
    out = redact_text(text, ["s3cr3t", None, "ab"])
    assert "hunter2" not in out and "tok3n" not in out and "s3cr3t" not in out
    assert "nats://ops:***@a:4222" in out and "tls://***@b:4222" in out


def test_server_address_never_has_credentials() -> None:
    assert server_address("nats://u:p@10.0.0.1:4222") == "10.0.0.1:4222"
    assert server_address("tls://[::1]:4443") == "[::1]:4443"
    assert server_address(None) is None


def test_settings_repr_and_dump_mask_url_passwords() -> None:
    s = load_settings(name="p", node_id="n", nats_url="nats://u:pw-42x@h:4222",
                      nats_password="pw-42x")
    for shown in (repr(s), str(s), str(s.model_dump()), s.model_dump_json()):
        assert "pw-42x" not in shown
    assert s.nats_url == ["nats://u:pw-42x@h:4222"]  # the connection still has it


@pytest.mark.parametrize("prefix", ["_INBOX", "_INBOX_prod.node.n-1", "$X.y"])
def test_inbox_prefix_accepts_subject_prefixes(prefix: str) -> None:
    assert load_settings(name="p", node_id="n", inbox_prefix=prefix).inbox_prefix == prefix


@pytest.mark.parametrize("prefix", ["", "_INBOX.>", "a..b", "a.*", "with space"])
def test_inbox_prefix_refuses_wildcards_and_empty_tokens(prefix: str) -> None:
    with pytest.raises(ConfigError, match="inbox_prefix"):
        load_settings(name="p", node_id="n", inbox_prefix=prefix)


# -- the environment of backends -----------------------------------------------------------------


def test_base_environ_is_an_allow_list() -> None:
    env = {"PATH": "/bin", "HOME": "/root", "LC_ALL": "C", "PYCLUSTER_NATS_PASSWORD": "x",
           "NATS_TOKEN": "y", "AWS_KEY": "z", "AWS_REGION": "eu", "PYTHONPATH": "/src"}
    assert base_environ(environ=env) == {"PATH": "/bin", "HOME": "/root", "LC_ALL": "C",
                                         "PYTHONPATH": "/src"}
    assert base_environ(["AWS_*"], environ=env)["AWS_REGION"] == "eu"
    assert "PYCLUSTER_NATS_PASSWORD" not in scrubbed_environ(env)
    assert scrubbed_environ(env)["NATS_TOKEN"] == "y"  # helper tools keep what is not ours


def test_process_inherit_env_is_validated() -> None:
    from pycluster import Process

    assert Process("true", inherit_env=["A", "B_*"]).inherit_env == ("A", "B_*")
    for bad in ("A", ["A=1"], [""]):
        with pytest.raises(ConfigError, match="inherit_env"):
            Process("true", inherit_env=bad)  # type: ignore[arg-type]


# -- signatures ------------------------------------------------------------------------------------


def test_keys_round_trip_and_refuse_garbage(tmp_path: Path) -> None:
    seed, public = generate_keypair()
    assert seed.startswith("SU") and public.startswith("U") and len(public) == 56
    assert SigningKey(seed).public_key == public and seed not in repr(SigningKey(seed))
    path = tmp_path / "web.nk"
    path.write_text(seed + "\n")
    assert load_seed(str(path)) == seed and load_seed(seed) == seed
    with pytest.raises(ConfigError):
        VerifyingKey(public[:-1] + ("A" if public[-1] != "A" else "B"))  # checksum
    with pytest.raises(ConfigError):
        SigningKey("SUnot-a-seed")


def _signed(auth: SignedAuth, subject: str = "p._.api.shop.x", body: bytes = b"{}"
            ) -> dict[str, str]:
    headers = {"Content-Type": "application/json"}
    auth._sign(subject, body, headers)
    return headers


def test_verify_refuses_stale_replayed_and_malformed_requests(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seed, public = generate_keypair()
    client = SignedAuth("web", seed)
    server = SignedAuth(trusted={"web": public}, max_skew=5, max_nonces=3)
    headers = _signed(client)
    now = float(headers[SIG_HEADER].split(" ")[2]) / 1000
    assert server.verify("p._.api.shop.x", b"{}", headers, now=now) == "web"
    with pytest.raises(UnauthorizedError, match="replayed"):
        server.verify("p._.api.shop.x", b"{}", headers, now=now)
    fresh = _signed(client)
    with pytest.raises(UnauthorizedError, match="stale"):
        server.verify("p._.api.shop.x", b"{}", fresh, now=now + 6)
    with pytest.raises(UnauthorizedError, match="bad signature"):  # another subject
        server.verify("p._.api.other.x", b"{}", fresh, now=now)
    with pytest.raises(UnauthorizedError, match="bad signature"):  # another content type
        server.verify("p._.api.shop.x", b"{}", dict(fresh, **{"Content-Type": "x"}), now=now)
    for bad in ("", "web", "web a b c d e", "web xxxxxx 12 n s"):
        with pytest.raises(UnauthorizedError):
            server.verify("s", b"", {SIG_HEADER: bad} if bad else {}, now=now)
    # The replay cache is bounded: full of live nonces, it refuses rather than forgets.
    for _ in range(2):
        server.verify("p._.api.shop.x", b"{}", _signed(client), now=now)
    with pytest.raises(UnauthorizedError, match="replay cache full"):
        server.verify("p._.api.shop.x", b"{}", _signed(client), now=now)
    # Nonces whose requests went stale make room again.
    import pycluster.middleware as mw

    later = now + 6
    monkeypatch.setattr(mw.time, "time", lambda: later)
    assert server.verify("p._.api.shop.x", b"{}", _signed(client), now=later) == "web"


def test_signed_auth_configuration_errors() -> None:
    _seed, public = generate_keypair()
    with pytest.raises(ConfigError):
        SignedAuth("web")  # identity without a seed
    with pytest.raises(ConfigError):
        SignedAuth()  # neither signs nor verifies
    with pytest.raises(ConfigError, match="not trusted"):
        SignedAuth(trusted={"web": public}, allow={"reset": ["ops"]})
    rotated = SignedAuth(trusted={"web": [public, generate_keypair()[1]]})
    assert len(rotated.trusted["web"]) == 2


# -- generated NATS permissions ----------------------------------------------------------------


def _resources(p: str, app: str) -> list[str]:
    """Subjects that are one app's own (what another app must never reach)."""
    return [f"$KV.{p}_{app}.k", f"$KV.{p}_{app}_locks.l", f"$KV.{p}_{app}_election.leader",
            f"$O.{p}_{app}_wal.C.x", f"$JS.API.STREAM.INFO.KV_{p}_{app}",
            f"$JS.API.DIRECT.GET.KV_{p}_{app}.$KV.{p}_{app}.k",
            f"$JS.API.CONSUMER.CREATE.{p}_{app}_events", f"$JS.ACK.KV_{p}_{app}.c.1.1.1.1.0",
            f"{p}.{app}.rpc.n1.m", f"{p}.{app}.events.t", f"{p}.{app}.control.stepdown",
            f"{p}._.events.{app}.t", f"{p}._.audit.lock.{app}.n9", f"_INBOX_{p}.node.n-{app}.x",
            f"_INBOX_{p}.app.{app}.x"]


def test_one_apps_permissions_reach_nothing_of_another() -> None:
    gen = generate("prod", nodes={"n-a": ["a"], "n-b": ["b"]}, apps=["a"], sqlite_apps=["b"],
                   auth="password")  # Litestream takes no NKey seeds
    users = {c.user.user: c.user for c in gen.credentials}
    for name in ("prod:node:n-a", "prod:app:a"):
        perms = permissions(users[name])
        for direction in ("publish", "subscribe"):
            for allowed in perms[direction]["allow"]:
                for subject in _resources("prod", "b"):
                    if direction == "subscribe" and subject.startswith("prod._.events."):
                        continue  # platform events are read by all, by design
                    assert not matches(allowed, subject), (name, direction, allowed, subject)
                assert allowed != ">" and not allowed.startswith("_INBOX.")
        assert perms["allow_responses"] is True
        # Never stream administration: a stream could capture another app's subjects.
        assert not any("STREAM.CREATE" in s or "STREAM.UPDATE" in s or "STREAM.DELETE" in s
                       for s in perms["publish"]["allow"])
    node_a = permissions(users["prod:node:n-a"])["publish"]["allow"]
    assert "$KV.prod_platform.nodes.n-a" in node_a and not any(
        matches(s, "$KV.prod_platform.nodes.n-b") for s in node_a)
    app_a = permissions(users["prod:app:a"])["publish"]["allow"]
    assert any(matches(s, "$KV.prod_platform.nodes.n-b") for s in app_a)  # not node-bound
    sub_a = permissions(users["prod:node:n-a"])["subscribe"]["allow"]
    assert sub_a[0] == "_INBOX_prod.node.n-a.>"
    # The operator reaches everything of the platform; SQLite apps get their object stores.
    op = permissions(users["prod:operator"])["publish"]["allow"]
    assert all(any(matches(s, r) for s in op) for r in _resources("prod", "b")
               if not r.startswith("_INBOX"))
    node_b = permissions(users["prod:node:n-b"])["publish"]["allow"]
    assert "$O.prod_b_wal.>" in node_b and "$O.prod_b_snapshots.>" in node_b


def test_resource_name_collisions_are_refused() -> None:
    with pytest.raises(ConfigError, match="also"):
        check_collisions("prod", ["web", "web_locks"])
    with pytest.raises(ConfigError, match="platform"):
        check_collisions("prod", ["audit"])  # prod_audit is the platform's stream
    check_collisions("prod", ["web", "web-locks"])


def test_written_files_are_private_and_credentials_are_kept(tmp_path: Path) -> None:
    gen = generate("prod", nodes={"n1": ["web"]})
    files = gen.write(tmp_path)
    conf = files["server"][0].read_text()
    seeds = [c.seed for c in gen.credentials if c.seed]
    assert seeds and not any(s in conf for s in seeds)  # public keys only
    assert all(c.public_key in conf for c in gen.credentials)
    for paths in files.values():
        for path in paths:
            assert stat.S_IMODE(path.stat().st_mode) == 0o600
    env = (tmp_path / "node-n1.env").read_text()
    assert "PYCLUSTER_INBOX_PREFIX=_INBOX_prod.node.n1" in env
    assert "PYCLUSTER_NATS_NKEY_SEED=" in env and "PYCLUSTER_NODE_ID=n1" in env
    again = generate("prod", nodes={"n1": ["web", "api"]}, existing=tmp_path)
    assert [c.seed for c in again.credentials] == seeds  # adding an app rotates nothing
    pw = generate("prod", apps=["web"], auth="password")
    assert all(c.password and c.password in pw.server_config() for c in pw.credentials)
    assert 'user: "prod:app:web"' in pw.server_config()


def test_user_names_and_inboxes_never_collide_across_platforms() -> None:
    a = NatsUser("a", "node", "node-b")
    b = NatsUser("a-node", "node", "b")
    assert a.user != b.user and a.inbox_prefix != b.inbox_prefix
    assert not overlaps(a.inbox_prefix + ".>", b.inbox_prefix + ".>")


def test_nats_config_reads_node_config_files(tmp_path: Path) -> None:
    import json

    from click.testing import CliRunner

    from pycluster.cli.main import cli
    from pycluster.plugins import create_plugin_manager

    conf = tmp_path / "node-1.yaml"
    conf.write_text("name: prod\nnode_id: node-1\napps:\n  - name: web\n"
                    "  - name: db\n    sqlite: {path: /data/db.sqlite}\n")
    out_dir = tmp_path / "auth"

    def run(*args: str) -> Any:
        return CliRunner().invoke(cli, ["nats-config", "--config", str(conf), *args, "--out",
                                        str(out_dir), "--output", "json"],
                                  obj=create_plugin_manager(load_entrypoints=False))

    refused = run()
    assert refused.exit_code == 2 and "--auth password" in refused.output
    ok = run("--auth", "password", "--app", "api")
    assert ok.exit_code == 0, ok.output
    users = {u["user"]: u for u in json.loads(ok.output)["users"]}
    assert users["prod:node:node-1"]["apps"] == ["web", "db"]
    assert "$O.prod_db_wal.>" in users["prod:node:node-1"]["permissions"]["publish"]["allow"]
    assert users["prod:app:api"]["inbox_prefix"] == "_INBOX_prod.app.api"
    assert set(users) == {"prod:node:node-1", "prod:app:api", "prod:operator"}
    other = tmp_path / "other.yaml"
    other.write_text("name: staging\nnode_id: n2\napps: [{name: web}]\n")
    mixed = CliRunner().invoke(cli, ["nats-config", "--config", str(conf), "--config",
                                     str(other), "--out", str(out_dir)],
                               obj=create_plugin_manager(load_entrypoints=False))
    assert mixed.exit_code == 2 and "another platform" in mixed.output


def test_a_config_file_that_cannot_be_parsed_is_named_without_its_lines(tmp_path: Path) -> None:
    bad = tmp_path / "node.yaml"
    bad.write_text('name: p\nnats_password: "pw-never-shown\nnode_id: [x\n')
    with pytest.raises(ConfigError) as info:
        load_settings(bad)
    assert "pw-never-shown" not in str(info.value)
    assert "line 2, column 16" in str(info.value) and "quoted scalar" in str(info.value)
