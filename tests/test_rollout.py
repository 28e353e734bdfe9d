"""`fab rollout` against real hosts: one sshd and one nginx per host on its own loopback
address, host keys checked strictly, the record written to a loopback AWS endpoint."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time

import pytest

import awsapi.parameters
from core.render import render_hosts
from core.settings import load
from tests.conftest import PROJECT_DIR
from tests.support.fleet import keygen

pytestmark = pytest.mark.integration
FLEET_SIZE = 3


def fab(fleet, *args, timeout=120, env=None):
    return subprocess.run([sys.executable, "-m", "fabric", *args[:1], "--env", str(fleet.env_file), *args[1:]],
                          cwd=PROJECT_DIR, capture_output=True, text=True, timeout=timeout, env=env)


def settings(fleet):
    return load(str(fleet.env_file))


def live_digest(address: str, port: int) -> str | None:
    """What nginx at address:port says it runs (plain HTTP to its health port); None: no answer."""
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://{address}:{port}/healthz", timeout=2) as r:
            return r.read().decode().split()[1]
    except OSError:
        return None


def live_digests(fleet, port: int | None = None, hold: float = 0.3, timeout: float = 15.0) -> dict[str, str | None]:
    """What each host's nginx says it runs on health port `port` (default: the fleet's), once the
    answers stayed the same for `hold` seconds (just after a reload an old worker may answer a
    connection or two, longer on a loaded machine), or as last read when `timeout` is up."""
    def read() -> dict[str, str | None]:
        return {h.name: live_digest(h.address, port or fleet.ports["health"]) for h in fleet.hosts}

    deadline, now = time.monotonic() + timeout, read()
    since = time.monotonic()
    while time.monotonic() - since < hold and time.monotonic() < deadline:
        time.sleep(0.05)
        again = read()
        if again != now:
            now, since = again, time.monotonic()
    return now


def targets(fleet) -> dict[str, str]:
    return {name: t.digest for name, t in render_hosts(settings(fleet)).items()}


def record(fleet):
    return awsapi.parameters.read_record(settings(fleet))


def test_happy_path_then_a_rerun_is_a_no_op(fleet):
    result = fab(fleet, "rollout", env={**os.environ, "PYTHONPROFILEIMPORTTIME": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines()
                if line.startswith("import time:")}
    assert "paramiko" in imported
    assert not {m for m in imported if m.split(".")[0] in ("pulumi", "pulumi_aws")}, "start-up counts: no Pulumi SDK"
    want = targets(fleet)
    assert live_digests(fleet) == want
    rec = record(fleet)
    assert rec is not None and rec.instances == {h.instance_id: want[h.name] for h in fleet.hosts}
    assert rec.proxy_protocol_ports == sorted([fleet.ports["http"], fleet.ports["tls"]])
    assert (rec.env, rec.load_balancer) == (settings(fleet).env, settings(fleet).load_balancer.name)
    assert "every host ready" in result.stdout

    pids = {h.name: h.nginx.pid() for h in fleet.hosts}
    rerun = fab(fleet, "rollout")
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "upload" not in rerun.stderr and "reload" not in rerun.stderr
    assert "unchanged" in rerun.stdout
    assert record(fleet) == rec  # same record, not rewritten
    assert {h.name: h.nginx.pid() for h in fleet.hosts} == pids


# --- helpers for the failure cases ----------------------------------------------------------

def baseline(fleet):
    """A first successful rollout: every host on a known config, a record written."""
    result = fab(fleet, "rollout")
    assert result.returncode == 0, result.stdout + result.stderr
    return live_digests(fleet), record(fleet)


def assert_untouched(fleet, before_digests, before_record):
    # Right after a reload an old worker may still answer a connection or two: the hosts must
    # settle on the old config (three answers in a row) within a few seconds.
    deadline, streak = time.monotonic() + 5, 0
    while streak < 3 and time.monotonic() < deadline:
        streak = streak + 1 if live_digests(fleet) == before_digests else 0
        time.sleep(0.05)
    assert live_digests(fleet) == before_digests
    for h in fleet.hosts:
        assert h.live_link() == f"releases/{before_digests[h.name]}"
    assert record(fleet) == before_record


def driver(fleet, hook=None, only=None, **kwargs):
    """The rollout in-process (the same order `fab rollout` runs), with a hook called at every
    step (to break things mid-run). Returns (verdict, host name -> outcome)."""
    from remote import cutover
    from remote.hosts import resolve
    from remote.readiness import ParameterRecord
    from remote.report import Reporter
    from remote.rollout import Rollout
    from remote.ssh import Ssh

    class Hooked(Reporter):
        def step(self, outcome):
            super().step(outcome)
            if hook:
                hook(outcome)

    s = settings(fleet)
    hosts = resolve(s, only)
    if only:  # a subset: as an environment of those hosts alone (else the gate would wait for the rest)
        lb = s.load_balancer.model_copy(update={"instances": [h.instance_id for h in hosts if h.instance_id]})
        s = s.model_copy(update={"load_balancer": lb})
    reporter = Hooked()
    run = Rollout(s, hosts, render_hosts(s, hosts), Ssh(s), reporter, **kwargs)
    verdict = cutover.rollout(run, ParameterRecord(s, reporter))
    return verdict, {o.host: o for o in run.outcomes}


# --- safety properties ----------------------------------------------------------------------

def test_a_record_path_holding_another_environments_record_is_never_overwritten(fleet):
    """Two environments pointed at one record path: the run stops before any change."""
    from core import record as records

    before, _ = baseline(fleet)
    s = settings(fleet)
    theirs = records.build("prod", [80, 81], {"i-0123456789abcdef9": "e" * 64}, load_balancer="wsgate-prod")
    awsapi.parameters.write_record(s, theirs)
    fleet.set("wsgate:nginx", {"workerShutdownTimeout": 7})  # a change to roll out
    result = fab(fleet, "rollout")
    assert result.returncode == 1
    assert f"the readiness record at {s.parameter_path} is not this environment's (record is for environment " \
           "'prod')" in result.stdout + result.stderr
    assert_untouched(fleet, before, theirs)


def test_nginx_t_failing_on_one_host_changes_no_host(fleet):
    before, rec = baseline(fleet)
    fleet.set("wsgate:nginx", {"workerShutdownTimeout": 7})
    h2 = fleet.hosts[1]
    (h2.root / "logs" / "error.log").unlink()
    (h2.root / "logs" / "error.log").mkdir()  # nginx -t cannot open its error log there
    result = fab(fleet, "rollout")
    assert result.returncode == 1
    assert_untouched(fleet, before, rec)
    assert "h2: failed at test: nginx -t rejected the new config: " in result.stderr
    assert "[emerg]" in result.stderr and "error.log\" failed (21: Is a directory)" in result.stderr
    assert "Is a directory" in result.stderr
    assert "Traceback" not in result.stderr
    for h in fleet.hosts:  # no stage left behind
        assert not [p for p in (h.root / "releases").iterdir() if p.name.startswith(".stage")]


def test_unreachable_host_stops_the_run_before_any_change(fleet):
    before, rec = baseline(fleet)
    fleet.set("wsgate:nginx", {"workerShutdownTimeout": 7})
    fleet.hosts[2].stop()
    result = fab(fleet, "rollout")
    assert result.returncode == 1
    assert_untouched(fleet, before, rec)
    assert "h3: failed at connect: ssh 127.0." in result.stderr and "cannot connect" in result.stderr


def test_host_dropping_mid_run_puts_every_changed_host_back(fleet):
    before, rec = baseline(fleet)
    fleet.set("wsgate:nginx", {"workerShutdownTimeout": 7})
    h3 = fleet.hosts[2]

    def drop(outcome):
        if outcome.host == "h3" and outcome.step.value == "swap":
            h3.stop()

    verdict, outcomes = driver(fleet, drop, parallel=1)
    assert not verdict.ok
    assert outcomes["h3"].ok is False and "connection lost" in outcomes["h3"].error
    assert outcomes["h1"].restored and outcomes["h2"].restored
    assert_untouched(fleet, before, rec)


@contextlib.contextmanager
def tls_port_taken_on(fleet, host):
    """The environment's tls port moved to one that `host` already has in use: `nginx -t`
    passes (it ignores address-in-use) and the reload keeps the old config."""
    blocker = socket.socket()
    blocker.bind((host.address, 0))
    blocker.listen()
    try:
        fleet.set("wsgate:ports", {"tls": blocker.getsockname()[1]})
        yield
    finally:
        blocker.close()


def test_reload_that_does_not_take_is_caught_and_restored(fleet):
    before, rec = baseline(fleet)
    with tls_port_taken_on(fleet, fleet.hosts[1]):
        result = fab(fleet, "rollout")
    assert result.returncode == 1
    assert "h2: failed at probe:" in result.stderr and "the reload did not take" in result.stderr
    assert_untouched(fleet, before, rec)


def test_failing_probe_restores_every_host(fleet):
    from tests.support.procs import free_port

    before, rec = baseline(fleet)
    fleet.set("wsgate:app", {"upstreams": [f"127.0.0.1:{free_port()}"]})  # nothing listens: 502
    result = fab(fleet, "rollout")
    assert result.returncode == 1
    assert "failed at probe" in result.stderr and "expected the app, got HTTP 502" in result.stderr
    assert_untouched(fleet, before, rec)


@pytest.mark.parametrize("change", ["unknown", "changed"])
def test_unknown_or_changed_host_key_is_refused_before_any_upload(fleet, change, tmp_path):
    h2 = fleet.hosts[1]
    lines = fleet.known_hosts.read_text().splitlines()
    mine = [ln for ln in lines if ln.startswith(f"[{h2.address}]")]
    others = [ln for ln in lines if ln not in mine]
    if change == "changed":
        other_key = keygen(tmp_path / "other")
        others.append(f"[{h2.address}]:{h2.ssh_port} {' '.join(other_key.split()[:2])}")
    fleet.known_hosts.write_text("\n".join(others) + "\n")
    result = fab(fleet, "rollout")
    assert result.returncode == 1
    want = "CHANGED" if change == "changed" else "is not in"
    assert f"h2: failed at connect: host key of {h2.address} {want}" in result.stderr
    for h in fleet.hosts:
        assert not (h.root / "releases").exists() or not list((h.root / "releases").iterdir())
        assert h.live_link() is None
    assert record(fleet) is None


def test_a_second_rollout_of_the_same_environment_refuses_while_one_runs(fleet):
    seen = {}

    def second_run(outcome):
        if outcome.host == "h1" and outcome.step.value == "probe" and not seen:
            seen["result"] = fab(fleet, "rollout")

    verdict, _ = driver(fleet, second_run, parallel=1)
    assert verdict.ok
    second = seen["result"]
    assert second.returncode == 1
    assert "another run holds the lock on" in second.stderr
    assert live_digests(fleet) == targets(fleet)
    assert fab(fleet, "rollout").returncode == 0  # the locks were released


def test_canary_failure_leaves_the_rest_untouched(fleet):
    before, rec = baseline(fleet)
    with tls_port_taken_on(fleet, fleet.hosts[0]):
        result = fab(fleet, "rollout", "--batch", "1,100%")
    assert result.returncode == 1
    assert "h1: failed at probe" in result.stderr
    assert "h2               swap" not in result.stderr and "h3               swap" not in result.stderr
    assert_untouched(fleet, before, rec)


def test_check_shows_a_diff_and_changes_nothing(fleet):
    before, rec = baseline(fleet)
    fleet.set("wsgate:nginx", {"workerShutdownTimeout": 7})
    result = fab(fleet, "check")
    assert result.returncode == 0, result.stderr
    assert "-worker_shutdown_timeout 5s;" in result.stdout and "+worker_shutdown_timeout 7s;" in result.stdout
    assert "would change" in result.stdout
    assert_untouched(fleet, before, rec)


def test_rollback_returns_every_host_to_its_previous_release(fleet):
    first, _ = baseline(fleet)
    fleet.set("wsgate:nginx", {"workerShutdownTimeout": 7})
    assert fab(fleet, "rollout").returncode == 0
    second = live_digests(fleet)
    assert second != first
    result = fab(fleet, "rollback")
    assert result.returncode == 0, result.stdout + result.stderr
    assert live_digests(fleet) == first
    assert record(fleet).instances == {h.instance_id: first[h.name] for h in fleet.hosts}


def test_bad_batch_spec_is_refused_before_any_host_is_touched(fleet):
    result = fab(fleet, "rollout", "--batch", "50%,1")
    assert result.returncode == 1
    assert "batches must not shrink" in result.stderr
    assert all(h.live_link() is None for h in fleet.hosts)


