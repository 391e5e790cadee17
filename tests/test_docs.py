"""Every ```python block of README.md and docs/*.md works as written.

A block preceded by the line ``<!-- fragment -->`` (an HTML comment, invisible on a rendered
page) is a fragment: it uses names from its surroundings or needs machines the reader has, so
it is only compiled (top-level ``await`` allowed). A block with a top-level ``await``,
``async with`` or ``async for`` is a fragment by construction (no program can run it as it
stands), marked or not. Every other block is self-contained: it is
compiled, and (slow tests) run as a program in an empty folder with its own data directory.
A block that keeps running (a node) must print something, then leave gracefully on SIGTERM
(exit 0, no traceback); one that ends by itself must exit 0.

The "first app" of docs/getting-started.md is also run to the end by SIGINT (Ctrl-C): it must
leave gracefully and exit 0, without a KeyboardInterrupt traceback.
"""

from __future__ import annotations

import ast
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FRAGMENT = re.compile(r"^<!--\s*fragment\b.*-->\s*$")


@dataclass(frozen=True)
class Block:
    """One fenced python block."""

    file: str
    line: int  # of the opening fence, 1-based
    code: str
    fragment: bool

    @property
    def id(self) -> str:
        return f"{self.file}:{self.line}"


def _awaits(code: str) -> bool:
    """Whether ``code`` compiles only with top-level ``await`` allowed."""
    try:
        compile(code, "<doc>", "exec", dont_inherit=True)
    except SyntaxError:
        try:
            compile(code, "<doc>", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT, dont_inherit=True)
        except SyntaxError:
            return False  # broken either way: test_block_compiles says so
        return True
    return False


def blocks() -> list[Block]:
    found: list[Block] = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        lines = path.read_text().splitlines()
        i = 0
        while i < len(lines):
            if lines[i].strip() == "```python":
                start = i
                end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
                before = next((lines[k] for k in range(start - 1, -1, -1) if lines[k].strip()),
                              "")
                code = "\n".join(lines[start + 1:end]) + "\n"
                found.append(Block(str(path.relative_to(ROOT)), start + 1, code,
                                   bool(FRAGMENT.match(before.strip())) or _awaits(code)))
                i = end
            i += 1
    return found


ALL = blocks()
RUNNABLE = [b for b in ALL if not b.fragment]


def first_app() -> Block:
    text = (ROOT / "docs" / "getting-started.md").read_text()
    section = text.split("## Your first app", 1)[1].split("\n## ", 1)[0]
    (block,) = [b for b in RUNNABLE if b.file == "docs/getting-started.md"
                and b.code.strip() in section]
    return block


def test_the_documentation_has_runnable_examples() -> None:
    files = {b.file for b in RUNNABLE}
    assert {"README.md", "docs/getting-started.md"} <= files
    assert first_app().code


@pytest.mark.parametrize("block", ALL, ids=[b.id for b in ALL])
def test_block_compiles(block: Block) -> None:
    compile(block.code, block.id, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT,
            dont_inherit=True)


class Program:
    """A documentation block run as a program, its output collected by threads."""

    def __init__(self, block: Block, tmp: Path) -> None:
        script = tmp / "example.py"
        script.write_text(block.code)
        bindir = str(Path(sys.executable).parent)  # `python -m http.server` in the README
        env = dict(os.environ, XDG_DATA_HOME=str(tmp / "data"), PYTHONUNBUFFERED="1",
                   PATH=os.pathsep.join([bindir, os.environ.get("PATH", "")]))
        self.proc = subprocess.Popen([sys.executable, str(script)], cwd=tmp, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     start_new_session=True)
        self.out: list[str] = []
        self.err: list[str] = []
        self._readers = [threading.Thread(target=self._read, args=(pipe, sink), daemon=True)
                         for pipe, sink in ((self.proc.stdout, self.out),
                                            (self.proc.stderr, self.err))]
        for t in self._readers:
            t.start()

    @staticmethod
    def _read(pipe: object, sink: list[str]) -> None:
        for line in pipe:  # type: ignore[attr-defined]
            sink.append(line)

    def wait_output(self, needle: str, timeout: float) -> bool:
        """True once ``needle`` is in stdout; False if the program ended first."""
        deadline = time.monotonic() + timeout
        while not any(needle in line for line in self.out):
            if self.proc.poll() is not None:
                for t in self._readers:
                    t.join(5)
                return any(needle in line for line in self.out)
            assert time.monotonic() < deadline, self.report()
            time.sleep(0.05)
        return True

    def finish(self, sig: signal.Signals | None, timeout: float = 60) -> int:
        if sig is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(timeout)
        for t in self._readers:
            t.join(5)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def report(self) -> str:
        return f"stdout:\n{''.join(self.out)}\nstderr:\n{''.join(self.err)}"


@pytest.mark.slow
@pytest.mark.timeout(150)
@pytest.mark.parametrize("block", RUNNABLE, ids=[b.id for b in RUNNABLE])
def test_self_contained_block_runs(block: Block, tmp_path: Path) -> None:
    program = Program(block, tmp_path)
    try:
        # A node prints once it leads or stands by; a block of definitions just ends.
        deadline = time.monotonic() + 90
        while not program.out and program.proc.poll() is None:
            assert time.monotonic() < deadline, program.report()
            time.sleep(0.05)
        code = program.finish(signal.SIGTERM if program.proc.poll() is None else None)
        assert code == 0, program.report()
        assert "Traceback" not in "".join(program.err), program.report()
    finally:
        program.kill()


@pytest.mark.slow
@pytest.mark.timeout(150)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_first_app_leaves_gracefully_on_a_signal(sig: signal.Signals, tmp_path: Path) -> None:
    program = Program(first_app(), tmp_path)
    try:
        assert program.wait_output("active, epoch", 90), program.report()
        code = program.finish(sig)
        err = "".join(program.err)
        assert code == 0, program.report()
        assert "Traceback" not in err and "KeyboardInterrupt" not in err, program.report()
        # The graceful leave: the signal was handled, the app stepped down, the node left.
        assert f"{sig.name}: leaving gracefully" in err, program.report()
        assert "app orders on node-1: stopped" in err, program.report()
    finally:
        program.kill()
