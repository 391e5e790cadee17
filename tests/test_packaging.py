"""The repository's distributions agree with each other (STYLE.md, "A multi-distribution
repository"): the umbrella's extras, the plugin folders, their distribution names, versions,
dependencies and entry points, and ``requirements-dev.txt``.

One name per plugin, used everywhere: the extra, the entry point, the registration name, the
config section. Versions move in lockstep.
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from pycluster.kernel.registry import BackendRegistry, ConfigRegistry, OptionRegistry

ROOT = Path(__file__).resolve().parents[1]
GROUP = "pycluster"
_REQ = re.compile(r"^\s*([A-Za-z0-9_.-]+)\s*(?:\[[^\]]*\])?\s*(==|>=|<=|~=|!=|>|<)?\s*([^;\s]*)")


def _toml(path: Path) -> dict[str, Any]:
    with path.open("rb") as fh:
        return tomllib.load(fh)


def _req(spec: str) -> tuple[str, str | None, str | None]:
    m = _REQ.match(spec)
    assert m, f"unparseable requirement {spec!r}"
    return m.group(1).lower().replace("_", "-"), m.group(2), m.group(3) or None


UMBRELLA = _toml(ROOT / "pyproject.toml")["project"]
VERSION = UMBRELLA["version"]
PLUGIN_DIRS = sorted(p.parent for p in (ROOT / "plugins").glob("*/pyproject.toml"))
PLUGINS = {d.name: _toml(d / "pyproject.toml")["project"] for d in PLUGIN_DIRS}
EXTRAS: dict[str, list[str]] = {
    k: v for k, v in UMBRELLA.get("optional-dependencies", {}).items() if k not in ("all", "test")
}


def test_umbrella_depends_on_the_core_only() -> None:
    core = _toml(ROOT / "core" / "pyproject.toml")["project"]
    assert core["name"] == "pycluster-core" and core["version"] == VERSION
    assert UMBRELLA["name"] == "pycluster"
    assert [_req(d) for d in UMBRELLA["dependencies"]] == [("pycluster-core", "==", VERSION)]


def test_each_extra_names_exactly_one_plugin_distribution() -> None:
    dists = {p["name"] for p in PLUGINS.values()}
    for extra, reqs in EXTRAS.items():
        assert len(reqs) == 1, f"extra {extra!r} must name exactly one distribution: {reqs}"
        name, op, ver = _req(reqs[0])
        assert name in dists, f"extra {extra!r} names {name}, which no plugins/ folder builds"
        assert (op, ver) == ("==", VERSION), f"extra {extra!r}: pin {name}=={VERSION}"
    named = [_req(r[0])[0] for r in EXTRAS.values()]
    assert sorted(named) == sorted(dists), "every plugin distribution has exactly one extra"
    all_extra = sorted(_req(r) for r in UMBRELLA["optional-dependencies"].get("all", []))
    assert all_extra == sorted((n, "==", VERSION) for n in dists), "'all' lists every plugin"


@pytest.mark.parametrize("folder", [d.name for d in PLUGIN_DIRS])
def test_plugin_folder_distribution_and_entry_point_agree(folder: str) -> None:
    proj = PLUGINS[folder]
    dist = proj["name"]
    assert dist.startswith("pycluster-") and dist != "pycluster-core"
    assert proj["version"] == VERSION, f"{dist}: versions move in lockstep"
    deps = [_req(d) for d in proj.get("dependencies", [])]
    assert ("pycluster-core", "==", VERSION) in deps, f"{dist} must depend on pycluster-core"
    assert all(n != "pycluster" for n, _, _ in deps), f"{dist} must not depend on the umbrella"
    eps = proj.get("entry-points", {}).get(GROUP, {})
    assert len(eps) == 1, f"{dist}: exactly one entry point in group {GROUP!r}: {eps}"
    ((name, target),) = eps.items()
    pkg = dist.replace("-", "_")
    assert target == f"{pkg}.plugin", f"{dist}: entry point must name {pkg}.plugin"
    src = ROOT / "plugins" / folder / "src" / pkg
    assert (src / "__init__.py").is_file() and (src / "plugin.py").is_file()
    assert (src / "py.typed").is_file(), f"{dist} ships py.typed"
    extra = [k for k, v in EXTRAS.items() if _req(v[0])[0] == dist]
    assert extra == [name], f"{dist}: the extra must be named like the entry point ({name})"


@pytest.mark.parametrize("folder", [d.name for d in PLUGIN_DIRS])
def test_installed_entry_point_and_registration_names_agree(folder: str) -> None:
    proj = PLUGINS[folder]
    ((name, target),) = proj["entry-points"][GROUP].items()
    installed = {ep.name: ep for ep in md.entry_points(group=GROUP)}
    assert name in installed, f"{proj['name']} is not installed (run: pip install -r " \
        "requirements-dev.txt)"
    ep = installed[name]
    assert ep.value == target and ep.dist is not None and ep.dist.name == proj["name"]
    assert ep.dist.version == VERSION
    module = importlib.import_module(target)
    # Whatever the plugin registers carries its one name.
    options, backends, sections = OptionRegistry(), BackendRegistry(), ConfigRegistry()
    if hasattr(module, "pycluster_register_options"):
        module.pycluster_register_options(registry=options)
        assert set(options._by_class.values()) <= {name}
    if hasattr(module, "pycluster_register_backends"):
        module.pycluster_register_backends(registry=backends)
        assert set(backends.kinds()) <= {name}
    if hasattr(module, "pycluster_config_sections"):
        module.pycluster_config_sections(registry=sections)
        # A section is named after the plugin, or after an option the plugin registers
        # (the sqlite plugin's ``standby_of:`` builds its `StandbyOf`).
        for section, declared in sections.sections.items():
            assert section == name or options._by_class.get(declared.model) == name, \
                f"{proj['name']}: config section {section!r} is neither {name!r} nor one " \
                "of its options"


def test_requirements_dev_installs_every_distribution() -> None:
    lines = [ln.strip() for ln in (ROOT / "requirements-dev.txt").read_text().splitlines()
             if ln.strip() and not ln.strip().startswith("#")]
    assert lines[0] == "-e ./core"
    umbrella = next(i for i, ln in enumerate(lines) if ln.startswith("-e .["))
    for d in PLUGIN_DIRS:
        entry = f"-e ./plugins/{d.name}"
        assert entry in lines, f"requirements-dev.txt lacks {entry}"
        assert lines.index(entry) < umbrella, f"{entry} must come before {lines[umbrella]}"


DISTRIBUTION_DIRS = [ROOT, ROOT / "core", *PLUGIN_DIRS]


@pytest.mark.parametrize("folder", DISTRIBUTION_DIRS, ids=lambda d: d.name or "umbrella")
def test_each_distribution_declares_license_readme_and_classifiers(folder: Path) -> None:
    proj = _toml(folder / "pyproject.toml")["project"]
    assert proj["license"] == "Apache-2.0" and proj["license-files"] == ["LICENSE"]
    assert (folder / "LICENSE").read_text() == (ROOT / "LICENSE").read_text()
    assert "Apache License" in (ROOT / "LICENSE").read_text()
    assert (folder / proj["readme"]).is_file()
    assert "Topic :: System :: Clustering" in proj["classifiers"]


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("folder", DISTRIBUTION_DIRS, ids=lambda d: d.name or "umbrella")
def test_each_distribution_builds_with_its_license(folder: Path, tmp_path: Path) -> None:
    """A release build of every distribution (sdist and wheel, as ``python -m build`` does:
    the sdist first, the wheel from it) carries LICENSE, the README and the classifiers."""
    import subprocess
    import sys
    import tarfile
    import zipfile

    out = tmp_path / "dist"
    # The release build: `python -m build` makes the sdist, then the wheel from the sdist, each
    # in an isolated environment with the build-system requirements (setuptools >= 77).
    res = subprocess.run([sys.executable, "-m", "build", "--outdir", str(out), str(folder)],
                         capture_output=True, text=True, timeout=500)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    (wheel,) = out.glob("*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), names
    assert "License-Expression: Apache-2.0" in meta and "License-File: LICENSE" in meta
    assert "Classifier: Topic :: System :: Clustering" in meta
    assert "Description-Content-Type: text/markdown" in meta
    (sdist,) = out.glob("*.tar.gz")
    with tarfile.open(sdist) as t:
        members = t.getnames()
    assert any(m.endswith("/LICENSE") for m in members) and any(
        m.endswith("/README.md") for m in members)
