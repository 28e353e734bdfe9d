"""The host's session script run as a script: the exact command a run sends (`Remote.session`),
under `sh -c` on this machine, with a temporary root and a stand-in nginx that records its
arguments and keeps a pid file. No network and no real nginx: the shell's own behaviour, fast.

The controller side is the product's own: requests go through `remote.ssh.Session` (over a
socket pair instead of an SSH channel) and the tree through `remote.rollout.archive`.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from core.live import LiveState, parse_state
from core.render import Tree
from core.session import DONE, LOCK_FAILED_EXIT, LOCKED, LOCKED_EXIT, STAGED, SWAPPED, Mode, Remote
from remote.rollout import archive
from remote.ssh import Result, Session

pytestmark = pytest.mark.skipif(not (shutil.which("flock") and shutil.which("timeout")),
                                reason="the session script needs util-linux's flock and coreutils' timeout")

WAIT = 30  # seconds: a bound for anything to happen, never a measured duration
OLD, NEW, OLDER = "a" * 64, "b" * 64, "c" * 64

FAKE_NGINX = '''#!__PYTHON__
"""nginx, as far as the session script can tell. Records its arguments (one JSON list a line in
nginx.calls beside it); `-t` fails a config that holds `reject`; a start runs a master that
writes PREFIX/nginx.pid and removes it on QUIT or TERM; `-s` signals the pid file's process."""
import json, os, signal, subprocess, sys, time

args = sys.argv[1:]
calls = os.path.join(os.path.dirname(os.path.abspath(__file__)), "nginx.calls")
master = args[:1] == ["--master"]
if master:
    args = args[1:]
prefix, conf = args[args.index("-p") + 1], args[args.index("-c") + 1]
pid_file = prefix + "nginx.pid"

def record(entry):
    with open(calls, "a") as f:
        f.write(json.dumps(entry) + "\\n")

if master:
    def stop(signum, frame):
        os.unlink(pid_file)
        sys.exit(0)
    signal.signal(signal.SIGQUIT, stop)
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGHUP, lambda signum, frame: record(["reloaded"]))
    with open(pid_file + ".new", "w") as f:
        f.write(f"{os.getpid()}\\n")
    os.rename(pid_file + ".new", pid_file)
    while True:
        signal.pause()

record(args)
if "-t" in args:
    text = open(conf).read()
    if "reject" in text:
        sys.exit(print(f'nginx: [emerg] unknown directive "reject" in {conf}:1', file=sys.stderr) or 1)
    sys.exit(print(f"nginx: the configuration file {conf} syntax is ok", file=sys.stderr) or 0)
if "-s" in args:
    sig = {"reload": signal.SIGHUP, "quit": signal.SIGQUIT, "stop": signal.SIGTERM}[args[args.index("-s") + 1]]
    try:
        os.kill(int(open(pid_file).read()), sig)
    except (OSError, ValueError) as exc:
        sys.exit(print(f"nginx: [error] {exc}", file=sys.stderr) or 1)
    sys.exit(0)
open(conf).close()
subprocess.Popen([sys.executable, __file__, "--master", *args], stdin=subprocess.DEVNULL,
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
deadline = time.monotonic() + 10
while not os.path.exists(pid_file) and time.monotonic() < deadline:
    time.sleep(0.02)
'''


class Host:
    """One host on this machine: a root under a temporary directory, and the stand-in nginx."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.root = directory / "root"
        self.nginx = directory / "bin" / "nginx"
        self.nginx.parent.mkdir(parents=True)
        self.nginx.write_text(FAKE_NGINX.replace("__PYTHON__", sys.executable))
        self.nginx.chmod(0o755)
        self.pid_file = self.root / "nginx.pid"
        self._started: list[Started] = []
        self.env: dict[str, str] | None = None  # the session's environment (None: this one's)

    def remote(self, idle: int = 30, timeout: int = WAIT) -> Remote:
        return Remote(root=str(self.root), nginx=str(self.nginx), pid_file=str(self.pid_file),
                      command_timeout=timeout, idle_timeout=idle)

    def start(self, owner: str = "run-1", stage: str = ".stage-run-1", target: str = NEW,
              mode: Mode = Mode.ROLLOUT, idle: int = 30, timeout: int = WAIT) -> Started:
        """The session command as `Rollout._lock` sends it, run as sshd would (`sh -c COMMAND`)."""
        ours, theirs = socket.socketpair()
        command = self.remote(idle, timeout).session(owner, stage, target, mode)
        with open(self.stderr(len(self._started)), "w") as stderr:
            proc = subprocess.Popen(command, shell=True, stdin=theirs, stdout=theirs, stderr=stderr, env=self.env)
        theirs.close()
        self._started.append(Started(proc, ours))
        return self._started[-1]

    def stderr(self, n: int) -> Path:
        return self.directory / f"stderr-{n}"

    def run(self, command: str) -> subprocess.CompletedProcess:
        return subprocess.run(command, shell=True, capture_output=True, text=True, timeout=WAIT, env=self.env)

    def fake(self, name: str, script: str) -> None:
        """A command of that name first on the host's PATH (a broken or hung tool)."""
        path = self.directory / "fakes" / name
        path.parent.mkdir(exist_ok=True)
        path.write_text(f"#!/bin/sh\n{script}\n")
        path.chmod(0o755)
        self.env = {**os.environ, "PATH": f"{path.parent}:{os.environ['PATH']}"}

    def release(self, digest: str) -> None:
        """A release already on the host, as a past run left it."""
        Tree({"nginx.conf": "events {}\n", "release.json": json.dumps({"ports": {"health": 9}})}, digest).write(
            self.root / "releases" / digest)

    def link(self, name: str) -> str | None:
        path = self.root / name
        return os.readlink(path) if path.is_symlink() else None

    def calls(self) -> list[list[str]]:
        path = self.nginx.parent / "nginx.calls"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def master_pid(self) -> int | None:
        try:
            return int(self.pid_file.read_text())
        except (FileNotFoundError, ValueError):
            return None

    def stop(self) -> None:
        """End every session (its stdin closes, as at the end of a run) and the master it started."""
        for started in self._started:
            started.sock.close()
            try:
                started.proc.wait(WAIT)
            except subprocess.TimeoutExpired:
                started.proc.kill()
        pid = self.master_pid()
        if pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)


class Started:
    """A session command that was started: its state report, then (if it took the lock) requests."""

    def __init__(self, proc: subprocess.Popen, sock: socket.socket):
        self.proc, self.sock = proc, sock
        self.head, self.session = self._until_locked()

    def _until_locked(self) -> tuple[str, Session | None]:
        """As `Ssh.hold`: what it printed up to the LOCKED line, and the session; None if it ended."""
        self.sock.settimeout(WAIT)
        out = b""
        while LOCKED.encode() not in out:
            chunk = self.sock.recv(65536)
            if not chunk:
                return out.decode(), None
            out += chunk
        head, _, rest = out.partition(LOCKED.encode())
        session = Session(self.sock, DONE, WAIT)  # type: ignore[arg-type]  # a socket reads like a channel
        session._buffer = rest.lstrip(b"\n")
        return head.decode(), session

    def request(self, word: str, payload: bytes | None = None) -> Result:
        assert self.session is not None, self.head
        return self.session.request(word, payload)

    @property
    def state(self) -> LiveState:
        return LiveState.parse(self.head)

    def close(self) -> int:
        """Close its stdin, as the controller does at the end of a run; its exit code."""
        self.sock.close()
        return self.proc.wait(WAIT)


@pytest.fixture
def host(tmp_path) -> Iterator[Host]:
    h = Host(tmp_path)
    yield h
    h.stop()


def payload(files: dict[str, str], digest: str = NEW) -> bytes:
    """The `stage` request's line, as `Rollout._payload` makes it."""
    return base64.b64encode(archive(Tree(files, digest)))


def eventually(check, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not check():
        assert time.monotonic() < deadline, f"not within {WAIT}s: {what}"
        time.sleep(0.05)


def test_a_second_exclusive_session_is_refused_and_names_the_owner(host):
    first = host.start(owner="run-first")
    assert first.session is not None

    second = host.start(owner="run-second", stage=".stage-run-second")
    assert second.session is None
    assert second.proc.wait(WAIT) == LOCKED_EXIT
    assert parse_state(second.head)["locked"] == "run-first"

    check = host.start(owner="check", mode=Mode.CHECK)  # a check's shared lock waits for no rollout either
    assert check.session is None and check.proc.wait(WAIT) == LOCKED_EXIT

    status = host.run(host.remote().inspect())  # `fab status` names the run, and takes nothing
    assert status.returncode == 0 and parse_state(status.stdout)["locked"] == "run-first"

    assert first.close() == 0  # the lock ends with the session
    third = host.start(owner="run-third")
    assert third.session is not None and third.request("ping").ok
    assert (host.root / ".rollout.owner").read_text().strip() == "run-third"


def test_stage_unpacks_the_tar_and_runs_nginx_t_against_the_staged_tree(host):
    s = host.start(stage=".stage-run-1")
    files = {"nginx.conf": "events {}\ninclude http.d/*.conf;\n", "http.d/app.conf": "# app\n"}
    r = s.request("stage", payload(files))
    assert r.ok and STAGED in r.stdout and "syntax is ok" in r.stdout
    staged = host.root / "releases" / ".stage-run-1"
    assert {str(p.relative_to(staged)): p.read_text() for p in staged.rglob("*") if p.is_file()} == files
    assert host.calls() == [["-p", f"{host.root}/", "-c", f"{staged}/nginx.conf", "-t"]]
    assert host.link("current") is None  # nothing live changed

    rejected = s.request("stage", payload({"nginx.conf": "reject;\n"}))
    assert rejected.exited == 1 and STAGED in rejected.stdout
    assert '[emerg] unknown directive "reject"' in rejected.stdout  # nginx's own words, for the table
    assert s.request("discard").ok and not staged.exists()


def test_live_points_current_at_the_target_and_previous_at_the_old_one(host):
    host.release(OLD)
    (host.root / "current").symlink_to(f"releases/{OLD}")
    s = host.start(target=NEW)
    assert s.state.current == f"releases/{OLD}" and s.state.nginx == "no"
    assert s.request("stage", payload({"nginx.conf": "events {}\n"})).ok

    r = s.request("live")
    assert r.ok and SWAPPED in r.stdout, r.stdout
    assert host.link("current") == f"releases/{NEW}" and host.link("previous") == f"releases/{OLD}"
    assert (host.root / "releases" / NEW / "nginx.conf").exists()
    assert not (host.root / "releases" / ".stage-run-1").exists()
    assert host.calls()[-1] == ["-p", f"{host.root}/", "-c", f"{host.root}/current/nginx.conf"]  # started
    assert host.master_pid() is not None

    again = s.request("reload")  # an nginx this kit started from `current` is signalled, not started twice
    assert again.ok and ["-p", f"{host.root}/", "-c", f"{host.root}/current/nginx.conf", "-s", "reload"] in host.calls()
    eventually(lambda: ["reloaded"] in host.calls(), "the master got its reload signal")


def test_restore_puts_both_links_back_as_given(host):
    for digest in (OLD, NEW, OLDER):
        host.release(digest)
    (host.root / "current").symlink_to(f"releases/{OLD}")
    (host.root / "previous").symlink_to(f"releases/{OLDER}")
    s = host.start(target=NEW)
    before = s.state
    assert s.request("live").ok  # releases/NEW is on the host already: no stage needed
    assert host.link("current") == f"releases/{NEW}" and host.master_pid() is not None

    gone = s.request("restore", f"releases/{'d' * 64}|releases/{OLDER}|no".encode())
    assert gone.exited == 1 and "is gone" in gone.stdout
    assert host.link("current") == f"releases/{NEW}"  # a restore it cannot finish changes nothing

    r = s.request("restore", before.restore_line())  # nginx did not run before: the one started stops
    assert r.ok, r.stdout
    assert host.link("current") == f"releases/{OLD}" and host.link("previous") == f"releases/{OLDER}"
    eventually(lambda: host.master_pid() is None, "the nginx this run started stopped")

    assert s.request("restore", f"releases/{NEW}||yes".encode()).ok
    assert host.link("current") == f"releases/{NEW}" and host.link("previous") is None  # empty: no link
    assert host.master_pid() is not None  # `yes`: nginx runs again, from the restored `current`


def test_an_nginx_the_kit_did_not_start_is_never_signalled(host):
    host.release(NEW)
    (host.root / "current").symlink_to(f"releases/{NEW}")
    other = subprocess.Popen(["sleep", str(WAIT * 4)])  # the packaged nginx, as far as the pid file says
    try:
        host.root.mkdir(exist_ok=True)
        host.pid_file.write_text(f"{other.pid}\n")
        s = host.start()
        assert s.state.nginx == "foreign" and s.state.pid == str(other.pid)
        r = s.request("reload")
        assert r.exited == 1 and "did not start" in r.stdout
        assert not any("-s" in call for call in host.calls()) and other.poll() is None
    finally:
        host.pid_file.unlink()
        other.kill()
        other.wait(WAIT)


def test_an_unknown_request_answers_2_and_the_session_goes_on(host):
    s = host.start()
    r = s.request("rm -rf /")
    assert r.exited == 2 and "unknown request: rm -rf /" in r.stdout
    assert s.request("ping").ok
    assert s.close() == 0


def test_the_session_ends_by_itself_after_the_idle_timeout(host):
    s = host.start(owner="run-gone", idle=2)
    assert s.request("ping").ok  # a request restarts the idle clock; then nothing more comes
    s.proc.wait(WAIT)  # the watchdog ended the session (well within the bound)
    after = host.start(owner="run-next")
    assert after.session is not None, after.head  # and with it the lock


def test_live_keeps_the_newest_releases_and_every_one_a_link_names(host):
    olds = [str(n) * 64 for n in range(1, 6)]  # oldest first
    for age, digest in enumerate(reversed(olds), start=1):
        host.release(digest)
        os.utime(host.root / "releases" / digest, (time.time() - 3600 * age,) * 2)
    (host.root / "current").symlink_to(f"releases/{olds[0]}")
    (host.root / "previous").symlink_to(f"releases/{olds[1]}")
    s = host.start(target=NEW)
    assert s.request("stage", payload({"nginx.conf": "events {}\n"})).ok
    assert s.request("live").ok
    kept = {p.name for p in (host.root / "releases").iterdir()}
    assert kept == {NEW, olds[4], olds[3], olds[1], olds[0]}  # the 3 newest, and both the run started with


# --- faults on the host itself -------------------------------------------------------------------

@pytest.mark.parametrize("bad", [
    b"",  # an empty line (a payload that did not arrive whole)
    f"releases/{OLD}|releases/{OLDER}".encode(),  # a field missing
    f"releases/{OLD}|releases/{OLDER}|maybe".encode(),  # the flag neither yes nor no
    f"releases/{OLD}|releases/{OLDER}|yes|no".encode(),  # a field too many
    f"/etc|releases/{OLDER}|yes".encode(),  # a link outside releases/
    f"releases/{OLD[:-1]}|releases/{OLDER}|yes".encode(),  # 63 hex digits
    f"releases/{OLD.upper()}|releases/{OLDER}|yes".encode(),  # not lowercase hex
    f"releases/../{OLD[3:]}|releases/{OLDER}|yes".encode(),  # a way out of releases/
])
def test_a_restore_whose_payload_does_not_parse_changes_nothing(host, bad):
    for digest in (OLD, NEW, OLDER):
        host.release(digest)
    (host.root / "current").symlink_to(f"releases/{OLD}")
    (host.root / "previous").symlink_to(f"releases/{OLDER}")
    s = host.start(target=NEW)
    assert s.request("live").ok and host.master_pid() is not None
    master = host.master_pid()

    r = s.request("restore", bad)
    assert r.exited == 2 and "restore refused" in r.stdout and "nothing changed" in r.stdout, r.stdout
    assert SWAPPED not in r.stdout
    assert host.link("current") == f"releases/{NEW}" and host.link("previous") == f"releases/{OLD}"
    assert host.master_pid() == master  # nginx runs on, unsignalled
    assert s.request("ping").ok  # and the session serves on


def test_flock_missing_is_not_reported_as_a_held_lock(host):
    host.fake("flock", 'echo "sh: 1: flock: not found" >&2; exit 127')
    s = host.start(owner="run-broken")
    assert s.session is None and s.proc.wait(WAIT) == LOCK_FAILED_EXIT
    assert "locked" not in parse_state(s.head)
    err = host.stderr(0).read_text()
    assert f"flock failed on {host.root}/.rollout.lock (exit 127: sh: 1: flock: not found" in err, err
    assert not (host.root / ".rollout.owner").exists()  # nothing written without the lock

    (host.root / ".rollout.lock").touch()
    status = host.run(host.remote().inspect())  # `fab status` says so too, and names no run
    assert status.returncode == LOCK_FAILED_EXIT and "flock failed" in status.stderr
    assert "docs/troubleshooting.md#flock-failed" in status.stderr


def test_inspect_creates_nothing_and_reports_a_missing_root(host):
    status = host.run(host.remote().inspect())
    assert status.returncode == 0, status.stderr
    assert parse_state(status.stdout)["root"] == "missing"
    assert not host.root.exists()  # a doctor changes nothing


@pytest.mark.parametrize("tool, when, request_word", [("tar", "*", "stage"), ("rm", "*.stage-*", "discard"),
                                                     ("find", "*", "show")])
def test_a_hung_file_command_is_bounded_by_the_command_timeout(host, tool, when, request_word):
    """A filesystem that hangs must not hold the lock past the idle limit: each command on the
    tree ends within ssh.commandTimeout (here 2 s) and the request is answered."""
    host.release(OLD)
    (host.root / "current").symlink_to(f"releases/{OLD}")
    host.fake(tool, f'case "$*" in {when}) exec sleep 600 ;; esac; exec {shutil.which(tool)} "$@"')
    s = host.start(timeout=2)
    r = s.request(request_word, payload({"nginx.conf": "events {}\n"}) if request_word == "stage" else None)
    assert r.exited != 0 or request_word == "show", r.stdout  # answered (the session's own bound is WAIT)
    assert s.request("ping").ok
