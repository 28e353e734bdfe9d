"""The hosts switch only where the load balancer can follow, and nobody else's hosts are taken.

Each test puts the fleet, the AWS endpoint (moto) and the record in the state named and asserts
the end state of every host (what nginx serves, both links, the lock), of the record and of the
load balancer, not only the exit code.
"""

from __future__ import annotations

import fcntl
import subprocess
import sys

import pytest
import yaml

import awsapi.classic
from tests.conftest import PROJECT_DIR
from tests.test_faults import assert_back, faults, snapshot, two_releases  # noqa: F401 (a fixture)
from tests.test_rollout import fab, live_digests, record, settings, targets

pytestmark = pytest.mark.integration
FLEET_SIZE = 3


def header_ports(fleet) -> list[int]:
    return awsapi.classic.header_ports(settings(fleet))


def plain_then_on(fleet) -> dict:
    """The Classic ELB made and every host on a plain config (two releases, the policy off); then
    the settings ask for the header. What every host and the record are before the next run."""
    fleet.set("wsgate:proxyProtocol", False)
    assert fab(fleet, "rollout", "--apply").returncode == 0
    before = two_releases(fleet)
    fleet.set("wsgate:proxyProtocol", True)
    return before


# --- A. the load balancer side is proven able to follow before any host goes live ------------

def test_apply_without_a_working_applier_is_refused_before_any_host_goes_live(fleet):
    before = plain_then_on(fleet)
    fleet.set("wsgate:loadBalancer", {"applier": "pulumi"})  # the Automation API: no CLI, or no such stack here
    result = fab(fleet, "rollout", "--apply")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "before any change: --apply cannot run pulumi up" in result.stderr
    assert_back(fleet, before)
    assert header_ports(fleet) == []


def test_pulumi_up_failing_after_the_classic_hosts_went_live_puts_them_back(fleet, faults):  # noqa: F811
    before = plain_then_on(fleet)
    faults.add("CreateLoadBalancerPolicy", "refuse")  # AWS refuses the policy: it never reaches a port
    result = fab(fleet, "rollout", "--apply")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "every host this run changed is put back" in result.stderr
    faults.clear()
    assert header_ports(fleet) == []
    assert_back(fleet, before)  # plain again, as the load balancer sends, and the record as it was
    done = fab(fleet, "rollout", "--apply")  # AWS answers again: the same command finishes the job
    assert done.returncode == 0, done.stdout + done.stderr
    assert header_ports(fleet) == sorted(settings(fleet).ports.proxied)
    assert live_digests(fleet) == targets(fleet)


def test_a_static_host_list_missing_an_instance_of_the_load_balancer_is_refused(fleet):
    before = plain_then_on(fleet)
    extra = "i-0000000000000dead"
    fleet.set("wsgate:loadBalancer", {"instances": [*(h.instance_id for h in fleet.hosts), extra]})
    result = fab(fleet, "rollout")
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"the gate would wait for instance(s) {extra}" in result.stderr
    assert_back(fleet, before)


# --- B. someone else's hosts ---------------------------------------------------------------

def other_environment(fleet, name: str = "other"):
    """A second environment file beside the fleet's naming the same hosts and roots (its own load
    balancer and record, as environments beside each other must have)."""
    config = yaml.safe_load(fleet.env_file.read_text())["config"]
    config["wsgate:loadBalancer"] = {**config["wsgate:loadBalancer"], "name": f"wsgate-{name}"}
    config["wsgate:record"] = {"parameterPath": f"/wsgate/{name}/readiness"}
    config["wsgate:nginx"] = {**config["wsgate:nginx"], "workerShutdownTimeout": 9}  # a config of its own
    path = fleet.env_file.with_name(f"Pulumi.{name}.yaml")
    path.write_text(yaml.safe_dump({"config": config}, sort_keys=False))
    return path


def fab_env(path, *args):
    return subprocess.run([sys.executable, "-m", "fabric", args[0], "--env", str(path), *args[1:]],
                          cwd=PROJECT_DIR, capture_output=True, text=True, timeout=120)


def test_a_host_whose_live_release_is_another_environments_is_refused_unless_taken_over(fleet):
    before = two_releases(fleet)
    other = other_environment(fleet)
    refused = fab_env(other, "rollout")
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "is environment 'fleet''s, not 'other''s" in refused.stderr and "--take-over" in refused.stderr
    assert_back(fleet, before)

    taken = fab_env(other, "rollout", "--take-over")
    assert taken.returncode == 0, taken.stdout + taken.stderr
    assert "taking the host over from environment 'fleet'" in taken.stderr
    now = snapshot(fleet)["hosts"]
    assert all(now[h.name][1] != before["hosts"][h.name][1] for h in fleet.hosts)  # every host is other's now
    assert fab(fleet, "rollout").returncode == 1  # and the first environment is refused in turn


# --- D. --apply holds the environment's lock ---------------------------------------------------

def test_apply_with_nothing_to_do_still_takes_every_hosts_lock(fleet):
    assert fab(fleet, "rollout", "--apply").returncode == 0
    on = header_ports(fleet)
    assert on
    before = snapshot(fleet)
    with open(fleet.hosts[1].root / ".rollout.lock", "a") as held:  # another run holds h2's lock
        fcntl.flock(held, fcntl.LOCK_EX)
        result = fab(fleet, "rollout", "--apply")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "another run holds the lock" in result.stderr
    assert "pulumi up" not in result.stderr and "boto3" not in result.stderr  # the applier never ran
    assert header_ports(fleet) == on and record(fleet) is not None
    assert_back(fleet, before)
