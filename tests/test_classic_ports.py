"""A Classic ELB's listeners forward to fixed instance ports: a rollout that would stop serving one
is refused before any change (real hosts, the Classic ELB in moto)."""

from __future__ import annotations

import boto3
import pytest

from tests.support.procs import free_ports
from tests.test_faults import assert_back, snapshot
from tests.test_rollout import fab, settings

pytestmark = pytest.mark.integration
FLEET_SIZE = 2


def classic_view(fleet) -> tuple[list, list]:
    """The load balancer as moto has it: its listeners and its backend policies."""
    s = settings(fleet)
    elb = boto3.client("elb", region_name=s.aws.region, endpoint_url=fleet.aws_url)
    d = elb.describe_load_balancers(LoadBalancerNames=[s.load_balancer.name])["LoadBalancerDescriptions"][0]
    listeners = sorted((x["Listener"]["LoadBalancerPort"], x["Listener"]["InstancePort"])
                       for x in d["ListenerDescriptions"])
    return listeners, sorted((b["InstancePort"], b["PolicyNames"]) for b in d.get("BackendServerDescriptions", []))


def test_moving_ports_tls_while_the_ssl_listener_forwards_there_is_refused_with_every_host_unchanged(fleet):
    applied = fab(fleet, "rollout", "--apply")
    assert applied.returncode == 0, applied.stdout + applied.stderr
    old_tls = fleet.ports["tls"]
    lb_before, before = classic_view(fleet), snapshot(fleet)
    assert (443, old_tls) in lb_before[0]

    new_tls = free_ports(1, [h.address for h in fleet.hosts])[0]
    fleet.set("wsgate:ports", {"tls": new_tls})
    result = fab(fleet, "rollout")

    assert result.returncode == 1, result.stdout + result.stderr
    assert f"the load balancer's listeners forward to ports [{old_tls}], which the new config no longer serves" \
        in result.stderr
    assert "A Classic listener's instance port changes only by deleting and recreating the listener" in result.stderr
    assert "upload" not in result.stderr
    assert_back(fleet, before)  # what each host serves, both links, the record, no lock, no stage
    assert classic_view(fleet) == lb_before


def test_rollout_apply_with_a_certificate_aws_would_refuse_stops_before_any_host_changes(fleet):
    """The fleet's IAM certificate ARN names no server certificate: `pulumi up` would refuse it after
    the hosts went live (reading a header the load balancer never starts sending), so the run stops first."""
    fleet.set("aws:endpoints", [{s: fleet.aws_url for s in ("ec2", "elb", "ssm", "sts", "iam")}])
    arn = fleet.config["wsgate:loadBalancer"]["certificateArn"]
    result = fab(fleet, "rollout", "--apply")
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"error: certificate {arn} does not exist" in result.stderr
    assert "`pulumi up` would refuse it; nothing was changed" in result.stderr
    for h in fleet.hosts:
        assert h.live_link() is None and h.nginx.pid() is None
    s = settings(fleet)
    elb = boto3.client("elb", region_name=s.aws.region, endpoint_url=fleet.aws_url)
    assert elb.describe_load_balancers()["LoadBalancerDescriptions"] == []
