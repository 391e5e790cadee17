"""A third-party backend through one registration: the kernel builds its stage, health check,
metrics and audit entries, and the shared Supervisor restarts it, fences nothing it does not
own and steps the node down when its restart policy is exhausted. Real nats-server, real
files; the "engine" is a file the controller writes."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pycluster import App, ConfigError, Singleton, hookimpl
from pycluster.backend import BackendHealth, BackendState, Controller, Supervisor, backends_of
from pycluster.cli.config_apps import build_app
from pycluster.kernel import backends
from pycluster.kernel.declare import option
from pycluster.kernel.registry import BackendMetrics, ConfigRegistry
from pycluster.kernel.settings import AppConfig
from pycluster.testing import wait_for

pytestmark = pytest.mark.timeout(90)


@option(eq=False)
class Echo:
    """Writes ``text`` and the epoch to ``path`` while active."""

    path: str
    text: str = "hello"
    max_restarts: int = 2

    def __post_init__(self) -> None:
        if not self.path:
            raise ConfigError("Echo.path", self.path, "must not be empty")


class EchoController(Controller):
    kind = "echo"
    check_interval = 0.1

    def __init__(self, option: Echo, app: Any, platform: Any) -> None:
        super().__init__(option, app, platform)
        self.option: Echo = option
        self.policy.max_restarts = option.max_restarts
        self.policy.backoff = 0.05
        self.starts = 0

    async def start(self, ctx: Any) -> BackendHealth:
        self.starts += 1
        Path(self.option.path).write_text(f"{self.option.text} {ctx.epoch}")
        return BackendHealth(True, "written")

    async def stop(self, ctx: Any) -> dict[str, object]:
        Path(self.option.path).unlink(missing_ok=True)
        return {"removed": True}

    async def probe(self) -> BackendHealth:
        ok = Path(self.option.path).exists()
        return BackendHealth(ok, "written" if ok else "file gone")

    def describe(self) -> str:
        return f"echo file {self.option.path}"

    def identity(self) -> dict[str, object]:
        return {"path": self.option.path}


class EchoPlugin:
    @hookimpl
    def pycluster_register_backends(self, registry: Any) -> None:
        registry.add("echo", Echo, EchoController, plugin="echo",
                     audit={"started": "s", "stopped": "s", "restarted": "r", "failed": "f"},
                     metrics=BackendMetrics(
                         label="path", label_of=lambda sup: sup.controller.option.path,
                         healthy=("echo_healthy", "1 when the file was there"),
                         restarts=("echo_restarts", "Rewrites of the file")))

    @hookimpl
    def pycluster_config_sections(self, registry: Any) -> None:
        registry.add("echo", Echo)


def supervisor(app: App) -> Supervisor:
    rt = app._runtime
    assert rt is not None
    ((_, sup),) = backends_of(rt.stages)
    assert isinstance(sup, Supervisor)
    return sup


def metrics(platform: Any) -> dict[str, Any]:
    text = platform.services["metrics"].render().decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


async def test_one_registration_gives_stage_check_metrics_audit_and_restarts(
    make_platform: Any, tmp_path: Path,
) -> None:
    target = tmp_path / "echo.txt"
    opt = Echo(str(target), text="hi")
    app = App("svc", Singleton(), opt)
    p = await make_platform("n1", app, extra_plugins=[("echo", EchoPlugin())])
    # Claimed by the kernel (no claim hook), its check registered under the kind's name.
    assert "echo-0" in app.health.specs
    await wait_for(lambda: app.is_active, 15)
    sup = supervisor(app)
    assert sup.stage == "echo-0" and sup.state is BackendState.RUNNING
    assert target.read_text() == f"hi {app.epoch}"
    assert backends.supervisor_of(opt) is sup  # the option holds nothing: found via its app
    with pytest.raises(dataclasses.FrozenInstanceError):
        opt.text = "changed"  # type: ignore[misc]
    await wait_for(lambda: app.health.status().get("svc.echo-0", {}).get("status")
                   == "healthy", 15)
    fams = metrics(p)
    assert [s.value for s in fams["echo_healthy"].samples
            if s.labels == {"app": "svc", "path": str(target)}] == [1.0]

    # The service fails while active: the supervisor restarts it (audited, counted).
    target.unlink()
    await wait_for(lambda: sup.policy.total >= 1 and target.exists(), 15)
    assert isinstance(sup.controller, EchoController) and sup.controller.starts == 2
    fams = metrics(p)
    assert [s.value for s in fams["echo_restarts"].samples
            if s.name == "echo_restarts_total"] == [1.0]

    # Failing past the policy steps the node down (report_failure), audited as "failed".
    sup.controller.policy.max_restarts = 0
    target.unlink()
    await wait_for(lambda: not app.is_active, 15)
    await wait_for(lambda: sup.state is BackendState.STOPPED, 15)
    assert not target.exists()  # stopped on the step-down
    assert await p.audit.flush()
    actions = [e.action for e in await p.audit.query(category="echo")]
    assert actions[:3] == ["started", "restarted", "failed"] and "stopped" in actions
    entry = (await p.audit.query(category="echo", limit=1))[0]
    assert entry.data["path"] == str(target)
    assert p.audit.categories.categories["echo"]["failed"] == "f"


def test_config_section_derived_from_the_declaration() -> None:
    reg = ConfigRegistry()
    EchoPlugin().pycluster_config_sections(registry=reg)
    app = build_app(AppConfig.model_validate(
        {"name": "web", "echo": {"path": "/tmp/x", "text": "yo"}}), reg)
    (opt,) = [o for o in app.options if isinstance(o, Echo)]
    assert (opt.path, opt.text, opt.max_restarts) == ("/tmp/x", "yo", 2)
    for raw, where in (({"path": "/x", "colour": 1}, r"apps\.web\.echo\.colour"),
                       ({"path": "/x", "max_restarts": "many"},
                        r"apps\.web\.echo\.max_restarts='many'"),
                       ({"path": ""}, r"apps\.web\.echo\.path=''")):
        with pytest.raises(ConfigError, match=where):
            build_app(AppConfig.model_validate({"name": "web", "echo": raw}), reg)
    with pytest.raises(ConfigError, match=r"Echo\.max_restarts='many'"):
        Echo("/x", max_restarts="many")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"Echo\.path=''"):
        Echo("")


class FlakyController(EchoController):
    """Probes answer what the test puts in ``answers`` (then "written" health)."""

    failure_threshold = 3
    settle_timeout = 30.0

    def __init__(self, option: Echo, app: Any, platform: Any) -> None:
        super().__init__(option, app, platform)
        self.answers: list[BackendHealth] = []
        self.probes = 0

    async def probe(self) -> BackendHealth:
        self.probes += 1
        return self.answers.pop(0) if self.answers else BackendHealth(True, "written")


class FlakyPlugin:
    @hookimpl
    def pycluster_register_backends(self, registry: Any) -> None:
        registry.add("flaky", Echo, FlakyController, plugin="flaky")


async def test_failure_threshold_and_settling_are_not_failures(make_platform: Any,
                                                                tmp_path: Path) -> None:
    """Fewer failed probes in a row than the threshold, and "settling" answers (the engine
    restarting the service itself) within the settle timeout, restart nothing."""
    app = App("svc", Singleton(), Echo(str(tmp_path / "f.txt")))
    await make_platform("n1", app, extra_plugins=[("flaky", FlakyPlugin())])
    await wait_for(lambda: app.is_active, 15)
    sup = supervisor(app)
    c = sup.controller
    assert isinstance(c, FlakyController) and sup.stage == "flaky-0"
    bad = BackendHealth(False, "flaky")
    settling = BackendHealth(False, "activating", settling=True)
    c.answers = [bad, bad, BackendHealth(True, "ok"), *[settling] * 10, bad, bad]
    seen = c.probes
    await wait_for(lambda: not c.answers and c.probes > seen + 16, 15)
    assert sup.policy.total == 0 and c.starts == 1 and sup.state is BackendState.RUNNING
    c.answers = [bad, bad, bad]  # the threshold: restarted once
    await wait_for(lambda: sup.policy.total == 1 and sup.state is BackendState.RUNNING, 15)
    assert c.starts == 2 and app.is_active
