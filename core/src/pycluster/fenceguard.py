"""The fence guard: a tiny supervisor between a node and its process backend.

A backend must never outlive its node's lease, even when the node cannot stop it: a node killed
with SIGKILL runs no code, and a paused node (SIGSTOP, a frozen VM) runs none either while its
lease runs out and another node takes over. The guard closes both holes. The node starts it as
``python -I -S fenceguard.py --control-fd N -- COMMAND...`` (the process backend does this); the
guard starts COMMAND in a session of its own and then:

* keeps every descendant of COMMAND: it is a child subreaper (``PR_SET_CHILD_SUBREAPER``), so
  even a double-forked daemon stays below it, and stopping kills the whole tree (the process
  group and every descendant found in ``/proc``), not only the direct child;
* learns the lease deadline from the node on every renewal (``deadline TERM_AT KILL_AT`` on the
  control socket, monotonic instants; the clock is shared by every process of the machine).
  When TERM_AT passes without a newer deadline (the node is paused or its loop is stuck), the
  guard sends SIGTERM to the tree, and SIGKILL at KILL_AT, which the node chooses before the
  earliest instant another node can win the lease;
* treats the end of the control socket (the node died: the kernel closes its end) and the
  parent-death signal (``PR_SET_PDEATHSIG``) as "stop now": SIGTERM, then SIGKILL after the grace
  period or at KILL_AT, whichever comes first;
* on ``stop GRACE`` stops the tree the same way (the node's graceful stop);
* when COMMAND exits, kills what is left of the tree, reports ``exited CODE`` and exits with
  COMMAND's status (128+N for a signal N).

The guard itself gets nothing but this module and the standard library (it runs with ``-I -S``,
without importing pycluster), so it starts in a few milliseconds. COMMAND gets
``PR_SET_PDEATHSIG=SIGKILL`` toward the guard, so even a SIGKILLed guard takes COMMAND with it.

Messages to the node (one line each on the control socket): ``started PID``, ``failed REASON``,
``fencing REASON``, ``exited CODE``. Linux only (``/proc``, ``prctl``).

**Fence-action mode** (``--fence-action ARGV_JSON`` and/or ``--docker-kill URL NAME`` instead of
COMMAND) is for a backend the node does not run itself (a systemd unit, a container): the guard
supervises nothing, reports ``armed``, takes ``deadline TERM_AT KILL_AT`` like above and runs its
stop actions — each bounded by ``--action-timeout`` — when fencing triggers: TERM_AT passes
without renewal, the control socket closes (the node died), or a signal arrives (parent death).
It then reports ``fenced ok`` / ``fenced failed`` and exits (0 / 1). ``release`` (the node's
graceful stop) makes it exit 0 without any action, after ``released``. ``--docker-kill`` needs no
SDK: it is `docker_kill`, plain ``http.client`` against the engine API.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
import urllib.parse

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36

# Exit status of the guard when COMMAND could not be started (like a shell's "not found").
EXEC_FAILED = 127


def _prctl(option: int, arg: int) -> bool:
    """Call prctl(2); False when unavailable (no ctypes/libc, not Linux)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(option, arg, 0, 0, 0)) == 0
    except (OSError, AttributeError, ImportError):
        return False


def _child_setup() -> None:  # runs in COMMAND's process between fork and exec
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _ppid_map() -> dict[int, list[int]]:
    """parent pid → child pids, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may contain spaces and parentheses.
        rest = stat[stat.rfind(b")") + 2:].split()
        if len(rest) > 1:
            children.setdefault(int(rest[1]), []).append(int(entry))
    return children


def descendants(root: int) -> list[int]:
    """Every live descendant of ``root`` (not ``root`` itself)."""
    tree = _ppid_map()
    out: list[int] = []
    todo = list(tree.get(root, ()))
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(tree.get(pid, ()))
    return out


class _Channel:
    """The control socket to the node and the diagnostic output (both modes)."""

    ctl: socket.socket
    label: str
    _ctl_open: bool

    def say(self, line: str) -> None:
        """Send one line to the node (ignored once the node is gone)."""
        if not self._ctl_open:
            return
        try:
            self.ctl.sendall(line.encode() + b"\n")
        except OSError:
            self._ctl_open = False

    def log(self, msg: str) -> None:
        """A diagnostic line on stderr (the node logs it with the app name)."""
        with contextlib.suppress(OSError):
            sys.stderr.write(f"fenceguard[{self.label}]: {msg}\n")
            sys.stderr.flush()


class Guard(_Channel):
    """The guard's state machine (one instance per guard process)."""

    def __init__(self, ctl: socket.socket, command: list[str], grace: float, label: str,
                 term_at: float | None, kill_at: float | None) -> None:
        self.ctl = ctl
        self.command = command
        self.grace = grace
        self.label = label
        self.term_at = term_at
        self.kill_at = kill_at
        self.stop_until: float | None = None  # end of the grace period of a stop
        self.terminating = False
        self.fenced = False  # stopping because the lease deadline passed: renewals are too late
        self.killed = False
        self.main: subprocess.Popen[bytes] | None = None
        self.status: int | None = None
        self._buf = b""
        self._ctl_open = True

    # -- signalling the tree -----------------------------------------------------------------

    def signal_tree(self, sig: int) -> int:
        """Send ``sig`` to COMMAND's process group and every descendant; return how many."""
        n = 0
        if self.main is not None and self.status is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.main.pid, sig)
                n += 1
        for pid in descendants(os.getpid()):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
                n += 1
        return n

    def begin_stop(self, why: str, grace: float) -> None:
        """SIGTERM the tree now; SIGKILL after ``grace`` or at ``kill_at``, what comes first
        (a lease renewed meanwhile moves ``kill_at``, unless the guard already fenced)."""
        now = time.monotonic()
        until = now + max(0.0, grace)
        self.stop_until = until if self.stop_until is None else min(self.stop_until, until)
        if not self.terminating:
            self.terminating = True
            if self.kill_at is not None:
                until = min(until, self.kill_at)
            self.log(f"{why}: SIGTERM to the backend, SIGKILL in {until - now:.2f}s")
            self.signal_tree(signal.SIGTERM)

    def kill_all(self, why: str) -> None:
        """SIGKILL the whole tree."""
        if not self.killed:
            self.log(f"{why}: SIGKILL to the backend")
        self.killed = True
        self.signal_tree(signal.SIGKILL)

    # -- the loop --------------------------------------------------------------------------

    def reap(self) -> None:
        """Collect every exited child (COMMAND and adopted orphans)."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if self.main is not None and pid == self.main.pid:
                self.status = os.waitstatus_to_exitcode(status)
                self.main.returncode = self.status

    def on_control(self) -> None:
        """Read commands from the node; EOF means the node is gone."""
        try:
            data = self.ctl.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._ctl_open = False
            self.begin_stop("node gone (control socket closed)", self.grace)
            return
        self._buf += data
        while b"\n" in self._buf:
            raw, self._buf = self._buf.split(b"\n", 1)
            self.command_line(raw.decode(errors="replace").split())

    def command_line(self, words: list[str]) -> None:
        """Apply one command from the node."""
        if not words:
            return
        if words[0] == "deadline" and len(words) == 3 and not self.fenced:
            self.term_at = None if words[1] == "none" else float(words[1])
            self.kill_at = None if words[2] == "none" else float(words[2])
        elif words[0] == "stop":
            self.begin_stop("stop requested", float(words[1]) if len(words) > 1 else self.grace)

    def next_timer(self) -> float | None:
        """The next instant at which something is due."""
        if self.killed:
            return None
        due = [t for t in (self.kill_at, self.stop_until) if t is not None]
        if not self.terminating and self.term_at is not None:
            due.append(self.term_at)
        return min(due) if due else None

    def on_timers(self) -> None:
        """Act on deadlines that passed."""
        now = time.monotonic()
        if self.killed:
            return
        if self.kill_at is not None and now >= self.kill_at:
            self.say("fencing lease kill deadline passed")
            self.kill_all("lease kill deadline passed (node paused or stuck)")
            return
        if self.stop_until is not None and now >= self.stop_until:
            self.kill_all("grace period over")
            return
        if not self.terminating and self.term_at is not None and now >= self.term_at:
            self.fenced = True
            self.say("fencing lease deadline passed")
            self.begin_stop("lease deadline passed without renewal (node paused or stuck)",
                            self.grace)

    def run(self) -> int:
        """Start COMMAND and supervise it; returns the guard's exit status."""
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_w, False)
        os.set_blocking(wake_r, False)
        signal.set_wakeup_fd(wake_w)
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, lambda *_: None)
        try:
            self.main = subprocess.Popen(
                self.command, stdin=subprocess.DEVNULL, start_new_session=True,
                preexec_fn=_child_setup,
            )
        except OSError as exc:
            self.say(f"failed {exc.strerror or exc}: {self.command[0]}")
            return EXEC_FAILED
        self.say(f"started {self.main.pid}")
        self.ctl.setblocking(False)
        while True:
            self.reap()
            if self.status is not None:
                break
            self.on_timers()
            due = self.next_timer()
            timeout = None if due is None else max(0.0, due - time.monotonic())
            if self.killed:
                timeout = 0.05 if timeout is None else min(timeout, 0.05)
            fds = [wake_r] + ([self.ctl] if self._ctl_open else [])
            try:
                ready, _, _ = select.select(fds, [], [], timeout)
            except InterruptedError:
                continue
            for fd in ready:
                if fd == wake_r:
                    with contextlib.suppress(BlockingIOError):
                        sigs = os.read(wake_r, 512)
                        if any(s in sigs for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)):
                            self.begin_stop("signalled", self.grace)
                else:
                    self.on_control()
            if self.killed:
                self.signal_tree(signal.SIGKILL)  # forks racing with the first SIGKILL
        # COMMAND is gone: nothing of it may stay behind.
        self.finish()
        code = self.status
        assert code is not None
        self.say(f"exited {code}")
        return code if code >= 0 else 128 - code

    def finish(self, timeout: float = 10.0) -> None:
        """SIGKILL and reap whatever is left of the tree."""
        deadline = time.monotonic() + timeout
        while descendants(os.getpid()) and time.monotonic() < deadline:
            self.signal_tree(signal.SIGKILL)
            time.sleep(0.01)
            self.reap()
        self.reap()


class _UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP over a unix socket (the engine's API socket)."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def _engine_connection(url: str, timeout: float) -> http.client.HTTPConnection:
    """A connection to the engine at ``unix:///PATH``, ``tcp://HOST:PORT`` or ``http://...``."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme in ("unix", "http+unix"):
        return _UnixHTTPConnection(parts.path or parts.netloc, timeout)
    if parts.scheme in ("tcp", "http") and parts.hostname:
        return http.client.HTTPConnection(parts.hostname, parts.port or 2375, timeout=timeout)
    raise ValueError(f"unsupported engine URL {url!r} (unix://, tcp:// or http:// only)")


def docker_kill(url: str, name: str, timeout: float = 10.0) -> str:
    """Stop container ``name`` at once through the Docker-compatible API at ``url``.

    ``POST /containers/NAME/stop?t=0`` (SIGKILL at once, and counts as a manual stop, so the
    engine's restart policy leaves it stopped); ``POST /containers/NAME/kill`` if that failed.
    Returns what happened; raises `OSError` (or `ValueError` for a bad URL) when the container
    may still be running.
    """
    quoted = urllib.parse.quote(name, safe="")
    errors = []
    for path in (f"/containers/{quoted}/stop?t=0", f"/containers/{quoted}/kill"):
        conn = _engine_connection(url, timeout)
        try:
            conn.request("POST", path, headers={"Content-Length": "0"})
            resp = conn.getresponse()
            body = resp.read(500).decode(errors="replace").strip()
        except OSError as exc:
            errors.append(f"{path}: {exc}")
            continue
        finally:
            conn.close()
        if resp.status in (204, 304):
            return f"{path}: {resp.status}"
        if resp.status == 404:
            return f"{path}: no such container"
        errors.append(f"{path}: HTTP {resp.status} {body}")
    raise OSError("; ".join(errors))


def docker_running(url: str, name: str, timeout: float = 10.0) -> bool:
    """True when container ``name`` exists and runs (``GET /containers/NAME/json``)."""
    conn = _engine_connection(url, timeout)
    try:
        conn.request("GET", f"/containers/{urllib.parse.quote(name, safe='')}/json")
        resp = conn.getresponse()
        body = resp.read()
    finally:
        conn.close()
    if resp.status == 404:
        return False
    if resp.status != 200:
        raise OSError(f"inspect {name}: HTTP {resp.status}")
    state = json.loads(body).get("State") or {}
    return bool(state.get("Running"))


def docker_fence(url: str, name: str, timeout: float = 10.0, watch: float = 3.0) -> str:
    """`docker_kill`, then watch the container for ``watch`` seconds and stop it again if it
    runs: a node that died while creating or starting it may have left a start request in
    flight at the engine, which would otherwise run the container after the first stop."""
    result = docker_kill(url, name, timeout)
    end = time.monotonic() + watch
    while time.monotonic() < end:
        time.sleep(0.2)
        try:
            if docker_running(url, name, timeout):
                again = docker_kill(url, name, timeout)
                result += f"; started after the stop, stopped again: {again}"
        except (OSError, ValueError):
            continue
    return result


class ActionGuard(_Channel):
    """Fence-action mode: run stop actions when the node can no longer stop its backend."""

    def __init__(self, ctl: socket.socket, actions: list[list[str]],
                 docker: list[tuple[str, str]], timeout: float, label: str,
                 term_at: float | None) -> None:
        self.ctl = ctl
        self.actions = actions
        self.docker = docker
        self.timeout = timeout
        self.label = label
        self.term_at = term_at
        self._buf = b""
        self._ctl_open = True

    def run_actions(self) -> bool:
        """Run every action (bounded); True when all succeeded."""
        ok = True
        for url, name in self.docker:
            try:
                self.log(f"docker kill {name}: {docker_fence(url, name, self.timeout)}")
            except (OSError, ValueError) as exc:
                ok = False
                self.log(f"docker kill {name} failed: {exc}")
        for argv in self.actions:
            try:
                rc = subprocess.run(argv, stdin=subprocess.DEVNULL, timeout=self.timeout,
                                    check=False).returncode
            except (OSError, subprocess.TimeoutExpired) as exc:
                ok = False
                self.log(f"action {argv[:6]} failed: {exc}")
                continue
            self.log(f"action {argv[:6]} exited with {rc}")
            ok = ok and rc == 0
        return ok

    def fence(self, why: str) -> int:
        """Fence now: report it, run the actions, report the outcome."""
        self.say(f"fencing {why}")
        self.log(f"{why}: running the fence actions")
        ok = self.run_actions()
        self.say(f"fenced {'ok' if ok else 'failed'}")
        return 0 if ok else 1

    def run(self) -> int:
        """Wait for deadlines, renewals and the node's end; returns the guard's exit status."""
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_w, False)
        os.set_blocking(wake_r, False)
        signal.set_wakeup_fd(wake_w)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, lambda *_: None)
        self.say("armed")
        self.ctl.setblocking(False)
        while True:
            if self.term_at is not None and time.monotonic() >= self.term_at:
                return self.fence("lease deadline passed without renewal (node paused or stuck)")
            timeout = None if self.term_at is None else max(0.0, self.term_at - time.monotonic())
            try:
                ready, _, _ = select.select([wake_r, self.ctl.fileno()], [], [], timeout)
            except InterruptedError:
                continue
            if wake_r in ready:
                with contextlib.suppress(BlockingIOError):
                    if os.read(wake_r, 512):
                        return self.fence("signalled (node gone)")
            if self.ctl.fileno() not in ready:
                continue
            try:
                data = self.ctl.recv(4096)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                data = b""
            if not data:
                self._ctl_open = False
                return self.fence("node gone (control socket closed)")
            self._buf += data
            while b"\n" in self._buf:
                raw, self._buf = self._buf.split(b"\n", 1)
                words = raw.decode(errors="replace").split()
                if words[:1] == ["deadline"] and len(words) == 3:
                    self.term_at = None if words[1] == "none" else float(words[1])
                elif words[:1] == ["release"]:
                    self.say("released")
                    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments and run the guard."""
    p = argparse.ArgumentParser(prog="fenceguard")
    p.add_argument("--control-fd", type=int, required=True)
    p.add_argument("--parent-pid", type=int, default=0)
    p.add_argument("--grace", type=float, default=10.0)
    p.add_argument("--label", default="backend")
    p.add_argument("--term-at", type=float, default=None)
    p.add_argument("--kill-at", type=float, default=None)
    p.add_argument("--fence-action", action="append", default=[], metavar="ARGV_JSON",
                   help="fence-action mode: an argv (JSON list) to run when fencing")
    p.add_argument("--docker-kill", action="append", nargs=2, default=[], metavar=("URL", "NAME"),
                   help="fence-action mode: stop container NAME through the engine at URL")
    p.add_argument("--action-timeout", type=float, default=10.0)
    p.add_argument("command", nargs=argparse.REMAINDER)
    ns = p.parse_args(argv)
    command = ns.command[1:] if ns.command[:1] == ["--"] else ns.command
    actions: list[list[str]] = []
    for raw in ns.fence_action:
        try:
            action = json.loads(raw)
        except ValueError as exc:
            p.error(f"--fence-action {raw!r}: {exc}")
        if not (isinstance(action, list) and action and all(isinstance(w, str) for w in action)):
            p.error(f"--fence-action {raw!r}: must be a non-empty JSON list of strings")
        actions.append(action)
    docker = [(url, name) for url, name in ns.docker_kill]
    if command and (actions or docker):
        p.error("give either a command or fence actions, not both")
    if not command and not (actions or docker):
        p.error("no command given")
    ctl = socket.socket(fileno=ns.control_fd)
    if not command:
        _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        fencer = ActionGuard(ctl, actions, docker, ns.action_timeout, ns.label, ns.term_at)
        if ns.parent_pid and os.getppid() != ns.parent_pid:
            return fencer.fence("node gone before the guard started")
        return fencer.run()
    # Orphans of the tree come to us, and our own parent's death reaches us as SIGTERM; the
    # parent may have died before prctl took effect, hence the check that follows it.
    _prctl(PR_SET_CHILD_SUBREAPER, 1)
    _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    guard = Guard(ctl, command, ns.grace, ns.label, ns.term_at, ns.kill_at)
    if ns.parent_pid and os.getppid() != ns.parent_pid:
        guard.log("node gone before the backend started")
        return EXEC_FAILED
    return guard.run()


if __name__ == "__main__":
    sys.exit(main())
