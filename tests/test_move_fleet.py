"""`fab move` end to end on real hosts (sshd, nginx) against the lab's AWS endpoint (moto, with
its Route 53), the lab's applier standing in for `pulumi up`: a Classic ELB with the header on
moved to a network load balancer. Each fault is injected where it happens (AWS refusing a call
of a step, a host's sshd gone during the drain, connections held through the drain's bound) and
the end state asserted: what every host serves, the record, the move record, which load
balancers exist and where DNS sends clients. A rerun goes on from the step reached."""

from __future__ import annotations

import socket

import pytest

from awsapi import route53
from awsapi.parameters import read_move, read_record
from core.move import Step
from core.render import render_hosts
from remote.move import exists
from tests.support.faults import AwsFaults
from tests.support.procs import accepts, free_ports
from tests.test_rollout import fab, live_digests, settings

pytestmark = pytest.mark.integration
FLEET_SIZE = 2
SOURCE, TARGET = "wsgate-fleet", "wsgate-fleet-nlb"
SERVICES = ("ec2", "elb", "elbv2", "ssm", "sts", "route53")


def set_up_move(fleet, url: str, **dns) -> dict[str, int]:
    """The fleet on a Classic ELB with the header on (rolled out and applied), its record in Route 53;
    then moveTo a network load balancer with ports of its own. Returns the new ports."""
    import boto3

    fleet.set("aws:endpoints", [{s: url for s in SERVICES}])
    r53 = boto3.client("route53", endpoint_url=fleet.aws_url, region_name="us-east-1")
    zone = r53.create_hosted_zone(Name="fleet.test", CallerReference="fleet")["HostedZone"]["Id"].rsplit("/", 1)[-1]
    ec2 = boto3.client("ec2", endpoint_url=fleet.aws_url, region_name="us-east-1")
    vpc = ec2.create_vpc(CidrBlock="10.98.0.0/16")["Vpc"]["VpcId"]
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.98.1.0/24", AvailabilityZone="us-east-1a")["Subnet"]["SubnetId"]
    fleet.set("wsgate:dns", {"zoneId": zone, "name": "ws.fleet.test", "ttl": 1, "quiet": 1, "drainMax": 4,
                             "steps": [50, 100], "pause": 1, **dns})
    first = fab(fleet, "rollout", "--apply")
    assert first.returncode == 0, first.stdout + first.stderr
    assert route53.weights(settings(fleet)) == {SOURCE: 100}
    ports = dict(zip(("http", "tls", "proxyHttp", "proxyTls"), free_ports(4, [h.address for h in fleet.hosts]),
                     strict=True))
    ports["health"] = fleet.ports["health"]
    lb = {k: v for k, v in fleet.config["wsgate:loadBalancer"].items() if k != "availabilityZones"}
    fleet.set("wsgate:moveTo", {
        "loadBalancer": {**lb, "name": TARGET, "type": "network", "subnets": [subnet], "vpcId": vpc,
                         "deregistrationDelay": 0, "switchDrain": 1},
        "proxyProtocol": True, "ports": ports})
    return ports


def assert_old_serving(fleet, new_ports: dict[str, int]) -> None:
    """The move stopped before retire: the old load balancer exists, DNS gives it weight, and every
    host serves both port sets."""
    s = settings(fleet)
    assert exists(s)
    assert route53.weights(s).get(SOURCE, 0) > 0
    for h in fleet.hosts:
        assert accepts(h.address, fleet.ports["tls"]) and accepts(h.address, new_ports["proxyTls"])


def test_a_move_from_a_classic_elb_to_a_network_load_balancer_end_to_end(fleet, aws):
    new = set_up_move(fleet, aws.url)
    result = fab(fleet, "move", timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout + result.stderr
    for words in ("step serve: proven", "step create: proven", "verified: every instance is healthy",
                  "DNS: 50% wsgate-fleet, 50% wsgate-fleet-nlb", "step drain: proven", "step done: proven"):
        assert words in out
    s = settings(fleet)
    target = s.moving_to
    # AWS: the old load balancer and its record gone, DNS all on the new one, which sends PROXY v2
    assert not exists(s) and exists(target)
    assert route53.weights(s) == {TARGET: 100}
    move = read_move(s)
    assert move.reached == Step.DONE and move.held == {}
    # the hosts: the new load balancer's ports alone, the record proving them for it
    rendered = fab(fleet, "render")  # as the load balancers have it now (a network one retires plain ports)
    assert live_digests(fleet) == dict(line.split("\t") for line in rendered.stdout.splitlines())
    assert live_digests(fleet) != {n: t.digest for n, t in render_hosts(s.serving([s, target])).items()}
    for h in fleet.hosts:
        assert not accepts(h.address, fleet.ports["tls"]) and accepts(h.address, new["proxyTls"])
    record = read_record(s)
    assert record.balancers == [TARGET] and set(record.proxy_protocol_ports) >= {new["proxyHttp"], new["proxyTls"]}
    # a rerun: nothing left to do
    again = fab(fleet, "move", timeout=120)
    assert again.returncode == 0 and "is done: promote moveTo" in again.stdout + again.stderr


@pytest.mark.parametrize("action, step", [
    ("CreateLoadBalancer", "create"),  # AWS refuses the new load balancer (its record: the weight test)
])
def test_aws_refusing_a_step_stops_with_the_old_one_serving_and_a_rerun_goes_on(fleet, aws, action, step):
    proxy = AwsFaults(aws.url)
    try:
        new = set_up_move(fleet, proxy.url)
        proxy.add(action, "refuse")
        result = fab(fleet, "move", timeout=300)
        assert result.returncode == 1, result.stdout + result.stderr
        assert f"step {step}: pulumi up failed" in result.stderr
        s = settings(fleet)
        assert read_move(s).reached == Step.SERVE
        assert_old_serving(fleet, new)
        assert route53.weights(s).get(TARGET, 0) == 0
        proxy.clear()
        again = fab(fleet, "move", timeout=300)
        assert again.returncode == 0, again.stdout + again.stderr
        assert "reached step serve: going on from there" in again.stdout + again.stderr
        assert route53.weights(s) == {TARGET: 100} and not exists(s)
    finally:
        proxy.stop()


def test_a_weight_change_refused_is_put_back(fleet, aws):
    proxy = AwsFaults(aws.url)
    try:
        new = set_up_move(fleet, proxy.url)
        s = settings(fleet)
        run_until(fleet, Step.PROVE)
        proxy.add("ChangeResourceRecordSets", "refuse", times=1)  # the first weight step's change
        result = fab(fleet, "move", timeout=300)
        assert result.returncode == 1, result.stdout + result.stderr
        assert "step weigh: pulumi up failed" in result.stderr and "the DNS weights were put back" in result.stderr
        assert read_move(s).reached == Step.PROVE
        assert route53.weights(s) == {SOURCE: 100, TARGET: 0}  # as the last proven step left it
        assert_old_serving(fleet, new)
    finally:
        proxy.stop()


def run_until(fleet, step: Step) -> None:
    """`fab move` cut short once `step` was proven (the first time), as a run stopped there leaves it."""
    from lab.applier import LabApplier
    from remote.move import Move
    from remote.tasks import _run

    s = settings(fleet)

    class Stop(Exception):
        pass

    def note(line: str) -> None:
        if line == f"step {step.value}: proven":
            raise Stop

    def rollout(balancers) -> bool:
        _run(str(fleet.env_file), True, 10, None, False, True, "rollout", served=balancers)
        return True

    with pytest.raises(Stop):
        Move(s, s.hosts, LabApplier(s), rollout, note).run()


def test_connections_held_past_the_drain_bound_stop_the_move_until_cut(fleet, aws):
    new = set_up_move(fleet, aws.url, drainMax=3, steps=[100])
    s = settings(fleet)
    run_until(fleet, Step.WEIGH)
    # a held connection (a WebSocket, say) through the old load balancer's port on the first host
    first = fleet.hosts[0]
    held = socket.create_connection((first.address, fleet.ports["tls"]))
    try:
        result = fab(fleet, "move", timeout=300)
        assert result.returncode == 3, result.stdout + result.stderr
        assert f"{first.name}: port {fleet.ports['tls']}: 1" in result.stderr
        assert "nothing was cut" in result.stderr
        assert read_move(s).reached == Step.WEIGH and exists(s)  # nothing of the old one deleted
        assert route53.weights(s) == {SOURCE: 0, TARGET: 100}
        status = fab(fleet, "status")
        assert f"{first.name}: established" in status.stdout and "step reached: weigh" in status.stdout
        cut = fab(fleet, "move", "--cut", timeout=300)
        assert cut.returncode == 0, cut.stdout + cut.stderr
        move = read_move(s)
        assert move.reached == Step.DONE and move.held == {first.name: 1} and move.held_at
        assert not exists(s)
        assert not accepts(first.address, fleet.ports["tls"]) and accepts(first.address, new["proxyTls"])
    finally:
        held.close()


def test_a_host_lost_during_the_drain_stops_the_move_with_the_old_one_there(fleet, aws):
    new = set_up_move(fleet, aws.url, steps=[100])
    s = settings(fleet)
    run_until(fleet, Step.WEIGH)
    lost = fleet.hosts[1]
    lost.stop()  # its sshd is gone: its connections cannot be counted
    try:
        result = fab(fleet, "move", timeout=300)
        assert result.returncode == 1, result.stdout + result.stderr
        assert f"step drain: {lost.name}: cannot count its connections" in result.stderr
        assert read_move(s).reached == Step.WEIGH and exists(s)
        assert route53.weights(s) == {SOURCE: 0, TARGET: 100}
    finally:
        lost.start()
    again = fab(fleet, "move", timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert not exists(s) and route53.weights(s) == {TARGET: 100}
    for h in fleet.hosts:
        assert accepts(h.address, new["proxyTls"]) and not accepts(h.address, fleet.ports["tls"])


def fab_until(fleet, words: str, sig: int, *args: str) -> tuple[int, str]:
    """`fab move` in the background, sent `sig` once its output shows `words`: (exit code, output)."""
    import subprocess
    import sys
    import time

    from tests.support.procs import PROJECT_DIR

    proc = subprocess.Popen([sys.executable, "-m", "fabric", "move", "--env", str(fleet.env_file), *args],
                            cwd=PROJECT_DIR, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = ""
    deadline = time.monotonic() + 240
    assert proc.stdout is not None
    for line in proc.stdout:
        seen += line
        if words in line:
            proc.send_signal(sig)
            break
        assert time.monotonic() < deadline, seen
    rest, _ = proc.communicate(timeout=240)
    return proc.returncode, seen + rest


@pytest.mark.parametrize("sig", ["SIGTERM"])  # as Ctrl-C: the same handler (remote/tasks.py)
def test_interrupted_between_two_weights_the_move_stays_at_the_last_proven_one(fleet, aws, sig):
    import signal

    new = set_up_move(fleet, aws.url, steps=[50, 100], pause=600)
    s = settings(fleet)
    code, out = fab_until(fleet, "DNS: 50% wsgate-fleet", getattr(signal, sig))
    assert code == 130, out
    move = read_move(s)
    assert move.reached == Step.WEIGH and move.weight == 50
    assert route53.weights(s) == {SOURCE: 50, TARGET: 50}
    assert_old_serving(fleet, new)
    again = fab(fleet, "move", timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert route53.weights(s) == {TARGET: 100} and not exists(s)
