"""Every fault keeps the promise: each test injects a fault where it really happens (sshd killed
or a connection dropped at a chosen request, a request hanging past the command timeout, AWS
refusing or losing an answer, SIGINT to the `fab` process, a controller that goes silent) and
asserts the end state of every host: what nginx serves, the `current` and `previous` links,
the lock, the readiness record."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import awsapi.classic
import awsapi.clients
import awsapi.parameters
from tests.conftest import PROJECT_DIR
from tests.support.faults import AwsFaults, hanging_nginx
from tests.support.procs import free_port
from tests.test_rollout import driver, fab, live_digests, record, settings, targets

pytestmark = pytest.mark.integration
FLEET_SIZE = 3


# --- the end state of every host ----------------------------------------------------------

def link(path: Path) -> str | None:
    return os.readlink(path) if path.is_symlink() else None


def progress(host: str, step: str) -> str:
    """A progress line's text for a host reaching a step."""
    return f"{host:<16} {step}"


def record_text(fleet) -> str | None:
    """The stored record, read from moto itself (never through the fault injector)."""
    s = settings(fleet)
    direct = s.aws.model_copy(update={"endpoints": {k: fleet.aws_url for k in s.aws.endpoints}})
    return awsapi.parameters.read_record_text(s.model_copy(update={"aws": direct}))


def snapshot(fleet) -> dict:
    """What every host serves and has (both links), and the stored record's text."""
    digests = live_digests(fleet)
    return {"hosts": {h.name: (digests[h.name], link(h.root / "current"), link(h.root / "previous"))
                      for h in fleet.hosts},
            "record": record_text(fleet)}


def settle(fleet, want: dict, timeout: float = 6.0) -> dict:
    """The fleet's state once it matches `want` three times in a row (old workers may answer a
    connection or two after a reload), or as it is when `timeout` is up."""
    deadline, streak, now = time.monotonic() + timeout, 0, snapshot(fleet)
    while streak < 3 and time.monotonic() < deadline:
        now = snapshot(fleet)
        streak = streak + 1 if now == want else 0
        time.sleep(0.05)
    return now


def lock_free(host) -> bool:
    with open(host.root / ".rollout.lock", "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(f, fcntl.LOCK_UN)
        return True


def assert_back(fleet, before: dict) -> None:
    """Every host exactly as before (digest served, both links), the record as before, no lock
    held and no stage left."""
    assert settle(fleet, before) == before
    for h in fleet.hosts:
        assert lock_free(h), f"{h.name}: the rollout lock is still held"
        assert not [p for p in (h.root / "releases").iterdir() if p.name.startswith(".stage")]


def two_releases(fleet) -> dict:
    """Two successful rollouts: every host has a `current` and a `previous`, and a record."""
    for timeout in (5, 6):
        fleet.set("wsgate:nginx", {"workerShutdownTimeout": timeout})
        result = fab(fleet, "rollout")
        assert result.returncode == 0, result.stdout + result.stderr
    fleet.set("wsgate:nginx", {"workerShutdownTimeout": 7})  # what the next rollout brings
    state = snapshot(fleet)
    assert all(cur and prev and cur != prev for _, cur, prev in state["hosts"].values())
    return state


@pytest.fixture
def faults(fleet, aws):
    """The fleet's AWS calls go through a fault injector in front of moto."""
    proxy = AwsFaults(aws.url)
    fleet.set("aws:endpoints", [{s: proxy.url for s in ("ec2", "elb", "ssm", "sts")}])
    yield proxy
    proxy.stop()


@pytest.fixture
def slow_nginx(fleet, tmp_path):
    """The fleet's nginx binary, with a reload that hangs on a chosen host: slow_nginx(host, seconds)."""
    fleet.set("wsgate:nginx", {"binary": str(hanging_nginx(tmp_path))})

    def hang(host, seconds: float) -> None:
        (host.root / "hang-reload").write_text(str(seconds))

    return hang


def when_swapped(host, then) -> threading.Thread:
    """Call `then` once `host`'s `current` link changed (its swap is done, its answer not yet back)."""
    start = link(host.root / "current")

    def watch():
        deadline = time.monotonic() + 20
        while link(host.root / "current") == start and time.monotonic() < deadline:
            time.sleep(0.005)
        then()

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    return t


def once_swapped(host, action):
    """A driver hook: once `host`'s swap request is out and its `current` link changed, `action`."""
    def hook(outcome):
        if outcome.host == host.name and outcome.step.value == "swap":
            when_swapped(host, action)

    return hook


def drop_connections(host) -> None:
    """Kill the host's per-connection sshd processes: every open connection drops; sshd still listens."""
    subprocess.run(["pkill", "-KILL", "-P", str(host.pid())], check=False)


# --- 1. an nginx we did not start -----------------------------------------------------------

FOREIGN_CONF = """pid {pid}; error_log {dir}/error.log; daemon on;
events {{}}
http {{ access_log off; server {{ listen {address}:{port}; return 200 "foreign\\n"; }} }}
"""


def test_first_rollout_onto_a_host_running_another_nginx_refuses_and_leaves_it_serving(fleet, tmp_path):
    h2 = fleet.hosts[1]
    (h2.root / "logs").mkdir(parents=True, exist_ok=True)
    pid_file, port = h2.root / "logs" / "nginx.pid", free_port(h2.address)
    conf = tmp_path / "foreign.conf"
    conf.write_text(FOREIGN_CONF.format(pid=pid_file, dir=tmp_path, address=h2.address, port=port))
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    subprocess.run([nginx, "-p", f"{tmp_path}/", "-c", str(conf)], check=True)
    try:
        pid = int(pid_file.read_text())
        result = fab(fleet, "rollout")
        assert result.returncode == 1
        assert f"h2: failed at lock: nginx pid {pid} (pid file {pid_file}) runs `nginx: master process" in result.stderr
        assert "wsgate never signals an nginx it did not start" in result.stderr
        assert "handing-a-host-over" in result.stderr
        assert "Traceback" not in result.stderr
        # the other nginx still serves, same process; no host changed anything
        with socket.create_connection((h2.address, port), timeout=2) as s:
            s.sendall(b"GET / HTTP/1.0\r\n\r\n")
            assert b"foreign" in s.recv(1000)
        assert int(pid_file.read_text()) == pid
        for h in fleet.hosts:
            assert link(h.root / "current") is None
            assert lock_free(h)
        assert record(fleet) is None
    finally:
        subprocess.run([nginx, "-p", f"{tmp_path}/", "-c", str(conf), "-s", "quit"], check=False)


# --- 2. a failure after the first swap that is not a host's -----------------------------------

def test_locking_an_unchanged_host_failing_after_the_swaps_puts_every_changed_host_back(fleet):
    before_all = two_releases(fleet)
    h1, h3 = fleet.hosts[0], fleet.hosts[2]
    verdict, _ = driver(fleet, only="h3")  # h3 already serves the target: the next run leaves it alone
    assert verdict.ok
    before = snapshot(fleet)
    assert before["hosts"]["h3"] != before_all["hosts"]["h3"]
    holder = []

    def hold_h3(outcome):  # someone takes h3's lock while h1 goes live
        if outcome.host == "h1" and outcome.step.value == "probe" and not holder:
            holder.append(subprocess.Popen(["flock", str(h3.root / ".rollout.lock"), "sleep", "30"],
                                           start_new_session=True))
            time.sleep(0.2)

    try:
        verdict, outcomes = driver(fleet, hold_h3)
    finally:
        for p in holder:  # flock and its sleep, which holds the lock too
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    assert verdict.code == 1
    assert "another run holds the lock" in outcomes["h3"].error
    assert outcomes["h1"].restored and outcomes["h2"].restored and not outcomes["h3"].changed
    assert_back(fleet, before)
    assert link(h1.root / "previous") == before["hosts"]["h1"][2]


def test_a_refused_record_write_puts_every_changed_host_back(fleet, faults):
    before = two_releases(fleet)
    faults.add("PutParameter", "refuse")
    result = fab(fleet, "rollout")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "error: ssm put-parameter" in result.stderr and "AccessDenied" in result.stderr
    assert "FAILED, restored" in result.stdout or "restored" in result.stdout
    assert_back(fleet, before)


# --- 3. a lost answer during `live` -----------------------------------------------------------

def test_connection_dropped_after_the_swap_is_reconnected_and_restored(fleet, slow_nginx):
    before = two_releases(fleet)
    h2 = fleet.hosts[1]
    slow_nginx(h2, 2)
    verdict, outcomes = driver(fleet, once_swapped(h2, lambda: drop_connections(h2)))
    assert verdict.code == 1
    assert "connection lost" in outcomes["h2"].error
    assert outcomes["h2"].restored and not outcomes["h2"].restore_failed
    assert outcomes["h1"].restored and outcomes["h3"].restored
    assert_back(fleet, before)


def test_request_hanging_past_the_command_timeout_is_restored_once_the_host_lets_go(fleet, slow_nginx):
    fleet.set("wsgate:ssh", {"commandTimeout": 3})
    before = two_releases(fleet)
    h2 = fleet.hosts[1]
    slow_nginx(h2, 30)  # far past the timeout; the host's own bound (the same timeout) ends it
    verdict, outcomes = driver(fleet)
    assert verdict.code == 1
    assert "no answer within 3s" in outcomes["h2"].error
    assert outcomes["h2"].restored, outcomes["h2"].error
    assert_back(fleet, before)


def test_host_gone_during_the_restore_is_reported_restore_failed(fleet, slow_nginx):
    before = two_releases(fleet)
    h2 = fleet.hosts[1]
    slow_nginx(h2, 2)  # the host goes away between its swap and its answer
    verdict, outcomes = driver(fleet, once_swapped(h2, h2.stop))
    assert verdict.code == 3  # a person is needed
    assert outcomes["h2"].restore_failed and outcomes["h2"].result == "RESTORE FAILED"
    assert "RESTORE FAILED" in outcomes["h2"].error and "cannot connect" in outcomes["h2"].error
    assert f"`current` was {before['hosts']['h2'][1]}" in outcomes["h2"].error
    assert outcomes["h1"].restored and outcomes["h3"].restored
    now = settle(fleet, {**before, "hosts": {**before["hosts"], "h2": snapshot(fleet)["hosts"]["h2"]}})
    for name in ("h1", "h3"):
        assert now["hosts"][name] == before["hosts"][name]
    assert now["record"] == before["record"]


# --- 4. the record survives a failed run -----------------------------------------------------

def test_record_write_whose_answer_is_lost_is_put_back(fleet, faults):
    before = two_releases(fleet)
    attempts = awsapi.clients.ATTEMPTS
    faults.add("PutParameter", "drop", times=attempts)  # every attempt reaches AWS, unanswered
    result = fab(fleet, "rollout")
    assert result.returncode == 1, str(faults.seen) + result.stdout + result.stderr
    # the lost writes; then the restore reads the record, puts it back, and reads it back
    assert faults.seen[-attempts - 3:] == ["PutParameter"] * attempts + ["GetParameter", "PutParameter",
                                                                         "GetParameter"]
    assert "put back as it was" in result.stderr
    assert_back(fleet, before)


def test_record_that_cannot_be_put_back_fails_loudly(fleet, faults):
    before = two_releases(fleet)
    faults.add("PutParameter", "drop")
    result = fab(fleet, "rollout")
    assert result.returncode == 3, result.stdout + result.stderr
    assert f"readiness record {settings(fleet).parameter_path} could not be put back" in result.stderr
    assert "aws ssm put-parameter --overwrite" in result.stderr
    faults.clear()
    now = settle(fleet, {**before, "record": snapshot(fleet)["record"]})
    assert now["hosts"] == before["hosts"]  # the hosts are back; the record is what the message names


# --- 5. restore puts `previous` back too ------------------------------------------------------

def test_failed_run_leaves_previous_as_it_was_so_rollback_still_works(fleet):
    before = two_releases(fleet)
    fleet.set("wsgate:app", {"upstreams": [f"127.0.0.1:{free_port()}"]})  # probe fails: 502
    result = fab(fleet, "rollout")
    assert result.returncode == 1
    assert_back(fleet, before)
    rolled = fab(fleet, "rollback")
    assert rolled.returncode == 0, rolled.stdout + rolled.stderr
    for h in fleet.hosts:
        assert link(h.root / "current") == before["hosts"][h.name][2]


# --- 6. turning off with --apply ----------------------------------------------------------------

def test_turning_off_with_apply_prepares_every_host_before_detaching(fleet):
    result = fab(fleet, "rollout", "--apply")
    assert result.returncode == 0, result.stdout + result.stderr
    s = settings(fleet)
    on = sorted(s.ports.proxied)
    assert awsapi.classic.header_ports(s) == on
    before = snapshot(fleet)

    fleet.set("wsgate:proxyProtocol", False)
    h2 = fleet.hosts[1]
    (h2.root / "logs" / "error.log").unlink()
    (h2.root / "logs" / "error.log").mkdir()  # nginx -t fails on h2
    failed = fab(fleet, "rollout", "--apply")
    assert failed.returncode == 1
    assert "h2: failed at test" in failed.stderr
    assert awsapi.classic.header_ports(s) == on  # never detached
    assert_back(fleet, before)

    fleet.hosts[2].stop()  # unreachable: the same
    failed = fab(fleet, "rollout", "--apply")
    assert failed.returncode == 1 and "h3: failed at connect" in failed.stderr
    assert awsapi.classic.header_ports(s) == on
    fleet.hosts[2].start()
    (h2.root / "logs" / "error.log").rmdir()

    done = fab(fleet, "rollout", "--apply")
    assert done.returncode == 0, done.stdout + done.stderr
    assert awsapi.classic.header_ports(s) == []
    assert record(fleet) is None
    assert live_digests(fleet) == targets(fleet)


def test_turning_off_without_apply_while_the_policy_is_on_refuses_before_any_change(fleet):
    assert fab(fleet, "rollout", "--apply").returncode == 0
    before = snapshot(fleet)
    fleet.set("wsgate:proxyProtocol", False)
    result = fab(fleet, "rollout")
    assert result.returncode == 1
    assert "the load balancer still sends the PROXY header to ports" in result.stderr
    assert_back(fleet, before)


# --- 7. AWS preconditions before the first swap -------------------------------------------------

@pytest.mark.parametrize("action, args", [("GetParameter", ()), ("DescribeLoadBalancers", ("--apply",))])
def test_aws_read_refused_stops_the_run_before_any_swap(fleet, faults, action, args):
    before = two_releases(fleet)
    faults.add(action, "refuse")
    result = fab(fleet, "rollout", *args)
    assert result.returncode == 1
    assert "error: before any change:" in result.stderr and "AccessDenied" in result.stderr
    assert "swap" not in result.stderr
    assert_back(fleet, before)


# --- 8. Ctrl-C --------------------------------------------------------------------------------

def fab_until(fleet, line_has: str, *args):
    """Start `fab rollout`; return it once a progress line contains `line_has` (with the lines so far)."""
    proc = subprocess.Popen([sys.executable, "-m", "fabric", "rollout", "--env", str(fleet.env_file), *args],
                            cwd=PROJECT_DIR, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    assert proc.stderr is not None
    for line in proc.stderr:
        lines.append(line)
        if line_has in line:
            return proc, lines
    raise AssertionError("never saw " + line_has + ":\n" + "".join(lines))


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])  # Ctrl-C, and a cancelled CI job
def test_ctrl_c_while_going_live_restores_and_defers_a_second_interrupt(fleet, slow_nginx, sig):
    before = two_releases(fleet)
    slow_nginx(fleet.hosts[1], 2)
    proc, lines = fab_until(fleet, progress("h2", "swap"))
    proc.send_signal(sig)
    for line in proc.stderr:
        lines.append(line)
        if "restoring" in line:
            proc.send_signal(sig)
            break
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError("fab did not end: " + "".join(lines) + err + out) from None
    err = "".join(lines) + err
    assert proc.returncode == 130, out + err
    assert "interrupt: stopping after the steps in flight" in err
    assert "deferred until every host is back" in err
    assert "rollout fleet: INTERRUPTED" in out and "h2" in out and "restored" in out
    assert "Traceback" not in err
    assert_back(fleet, before)


# --- 9. unchanged means: what runs, `current` and the rendered digest agree ------------------------

def test_host_serving_the_target_while_current_points_elsewhere_is_not_taken_as_unchanged(fleet):
    assert fab(fleet, "rollout").returncode == 0
    want = targets(fleet)
    h2 = fleet.hosts[1]
    stray = h2.root / "releases" / ("f" * 64)
    shutil.copytree(h2.root / "current", stray)
    os.symlink(f"releases/{'f' * 64}", h2.root / "current.tmp")
    os.replace(h2.root / "current.tmp", h2.root / "current")
    result = fab(fleet, "rollout")
    assert result.returncode == 0, result.stdout + result.stderr
    assert progress("h2", "lock") in result.stderr and progress("h1", "lock") not in result.stderr
    assert link(h2.root / "current") == f"releases/{want['h2']}"
    assert live_digests(fleet) == want


# --- 10. a lock that outlives its controller ------------------------------------------------------

def test_lock_of_a_controller_gone_silent_ends_within_the_idle_timeout(fleet):
    fleet.set("wsgate:ssh", {"idleTimeout": 2})
    proc, _ = fab_until(fleet, progress("h3", "upload"))  # every host is locked by now
    proc.send_signal(signal.SIGSTOP)  # a partition: the TCP connection stays, nothing more comes
    try:
        stopped = time.monotonic()
        assert not lock_free(fleet.hosts[2])
        while not all(lock_free(h) for h in fleet.hosts):
            assert time.monotonic() - stopped < 2 + 8, "the lock outlived the idle timeout"
            time.sleep(0.1)
    finally:
        proc.kill()
        proc.communicate()
    assert fab(fleet, "rollout").returncode == 0  # the next run is not refused


# --- 11. leftovers ----------------------------------------------------------------------------

def test_stale_stages_are_cleaned_under_the_lock_and_check_takes_no_rollout_lock(fleet):
    assert fab(fleet, "rollout").returncode == 0
    h1 = fleet.hosts[0]
    stale = h1.root / "releases" / ".stage-20200101T000000-dead"
    stale.mkdir()
    owner = (h1.root / ".rollout.owner").read_text()
    fleet.set("wsgate:nginx", {"workerShutdownTimeout": 7})
    with open(h1.root / ".rollout.lock", "a") as held:  # a check runs beside a shared holder
        fcntl.flock(held, fcntl.LOCK_SH)
        checked = fab(fleet, "check")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert (h1.root / ".rollout.owner").read_text() == owner and stale.exists()
    result = fab(fleet, "rollout")
    assert result.returncode == 0
    assert not stale.exists() and "h1: removed 1 stage(s) left by interrupted runs" in result.stderr


# --- 12. a restore after a port change is verified on the restored release's ports ---------------

def test_restore_after_a_health_port_change_is_verified_on_the_old_port(fleet):
    before = two_releases(fleet)
    h2 = fleet.hosts[1]
    with contextlib.closing(socket.socket()) as blocker:
        blocker.bind((h2.address, 0))
        blocker.listen()
        fleet.set("wsgate:ports", {"health": blocker.getsockname()[1]})  # h2 cannot take it
        result = fab(fleet, "rollout")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "RESTORE FAILED" not in result.stdout + result.stderr
    assert "h2: failed at probe" in result.stderr
    assert_back(fleet, before)
