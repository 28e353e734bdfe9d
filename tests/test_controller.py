"""The controller's frame, without hosts: the heartbeat's scheduling (fake sessions: it is pure
scheduling), the signals a run treats as Ctrl-C, and the refusal of a host whose nginx runs
another release than its `current` link names."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from core.live import LiveState
from core.session import Remote
from remote.heartbeat import Heartbeat
from tests.conftest import settings_from

WAIT = 30  # seconds: a bound for anything to happen, never a measured duration
OLD, NEW, OTHER = "a" * 64, "b" * 64, "c" * 64


class FakeSession:
    def __init__(self, hang: threading.Event | None = None):
        self.pings = 0
        self.hang = hang  # a host that stopped answering: the ping returns when this is set
        self.in_flight = 0
        self.most_in_flight = 0
        self._lock = threading.Lock()

    def ping(self) -> None:
        with self._lock:
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        if self.hang is not None:
            self.hang.wait(WAIT)
        with self._lock:
            self.in_flight -= 1
            self.pings += 1


def eventually(check, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not check():
        assert time.monotonic() < deadline, f"not within {WAIT}s: {what}"
        time.sleep(0.01)


def heartbeat_threads() -> int:
    return sum(1 for t in threading.enumerate() if t.name.startswith("heartbeat"))


def test_hung_sessions_neither_stack_threads_nor_stop_the_others_being_pinged():
    released = threading.Event()
    hung = [FakeSession(released) for _ in range(3)]  # more hung hosts than pingers
    healthy = [FakeSession() for _ in range(200)]
    beat = Heartbeat(lambda: hung + healthy, interval=0.05, workers=2, stuck=0.1).start()
    most = 0
    try:
        def every_healthy_one_pinged_thrice() -> bool:
            nonlocal most
            most = max(most, heartbeat_threads())
            return all(s.pings >= 3 for s in healthy)

        eventually(every_healthy_one_pinged_thrice, "every healthy session pinged three times")
        assert all(s.pings == 0 and s.most_in_flight == 1 for s in hung)  # one ping each, never stacked
        assert most <= 1 + 2 + len(hung), f"{most} heartbeat threads"  # scheduler, pingers, one per hung host
    finally:
        released.set()
        beat.stop()
    eventually(lambda: heartbeat_threads() == 0, "every heartbeat thread ended")
    assert all(s.pings == 1 for s in hung)


def test_a_session_gone_from_the_run_is_not_pinged_any_more():
    sessions = [FakeSession(), FakeSession()]
    beat = Heartbeat(lambda: list(sessions), interval=0.05, workers=1, stuck=0.1).start()
    try:
        eventually(lambda: all(s.pings >= 1 for s in sessions), "both pinged")
        gone = sessions.pop()
        seen = gone.pings
        eventually(lambda: sessions[0].pings >= seen + 3, "the other pinged on")
        assert gone.pings <= seen + 1  # at most the ping already queued
    finally:
        beat.stop()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_a_run_notes_sigint_sigterm_and_sighup_as_an_interrupt_and_puts_the_handlers_back(sig):
    from remote.report import Reporter
    from remote.rollout import INTERRUPTS, Rollout
    from remote.ssh import Ssh

    settings = settings_from("lab")
    before = {s: signal.getsignal(s) for s in INTERRUPTS}
    run = Rollout(settings, [], {}, Ssh(settings), Reporter(quiet=True))
    with run.guarded():
        os.kill(os.getpid(), sig)  # not raised: noted, the run goes on to restore what it changed
        assert run.interrupted.wait(WAIT)
    assert {s: signal.getsignal(s) for s in INTERRUPTS} == before


def state(current: str, nginx: str = "ours") -> LiveState:
    return LiveState(current=current, previous=f"releases/{OTHER}", nginx=nginx, pid="1", cmdline="", manifest={})


REMOTE = Remote(root="/srv/wsgate", nginx="/usr/sbin/nginx", pid_file="/srv/wsgate/logs/nginx.pid")


def test_a_host_running_another_release_than_current_is_refused_with_the_reconcile_commands():
    why = state(f"releases/{NEW}").disagreement(running=OLD, target=OTHER, remote=REMOTE)
    assert why is not None
    assert f"nginx runs {OLD[:12]} but `current` names releases/{NEW}" in why
    assert f"`ln -sfn releases/{OLD} /srv/wsgate/current`" in why
    assert "`/usr/sbin/nginx -p /srv/wsgate/ -c /srv/wsgate/current/nginx.conf -s reload`" in why
    assert "docs/troubleshooting.md#nginx-runs-another-release" in why


@pytest.mark.parametrize("current, nginx, running, target", [
    (f"releases/{OLD}", "ours", OLD, NEW),  # they agree
    (f"releases/{NEW}", "ours", OLD, OLD),  # it runs the target: its restore brings the target back
    (f"releases/{NEW}", "ours", None, OLD),  # what runs is unknown (no health answer)
    (f"releases/{NEW}", "no", OLD, OTHER),  # no nginx of ours runs
    ("", "ours", None, OLD),
])
def test_no_refusal_where_a_restore_brings_back_what_ran(current, nginx, running, target):
    assert state(current, nginx).disagreement(running, target, REMOTE) is None


def test_a_host_running_the_target_is_restored_to_the_target():
    restored = state(f"releases/{NEW}").running(OLD, {"ports": {"health": 9}})
    assert restored.restore_line() == f"releases/{OLD}|releases/{OTHER}|yes".encode()
    assert restored.manifest == {"ports": {"health": 9}}
