"""`fab rollout` while a move between load balancers is set: real hosts serve what both load
balancers need, the readiness record proves both; once the old one is retired its ports go; a
move record of another move half done refuses the run before any host changes."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

import awsapi.parameters
from core import proxyproto
from core.move import MoveRecord, Step
from core.render import render_hosts
from lab.client import dial, http_get
from tests.support.procs import free_ports
from tests.test_rollout import fab, live_digests, record, settings

pytestmark = pytest.mark.integration
FLEET_SIZE = 2
TARGET = "wsgate-fleet-nlb"


def start_move(fleet) -> dict[str, int]:
    """A first rollout (Classic, proxy protocol on), then moveTo a network load balancer with proxy
    protocol on at ports of its own (the health port shared). Returns the new ports."""
    first = fab(fleet, "rollout")
    assert first.returncode == 0, first.stdout + first.stderr
    ports = dict(zip(("http", "tls", "proxyHttp", "proxyTls"), free_ports(4, [h.address for h in fleet.hosts]),
                     strict=True))
    ports["health"] = fleet.ports["health"]
    lb = {k: v for k, v in fleet.config["wsgate:loadBalancer"].items() if k != "availabilityZones"}
    fleet.set("aws:endpoints", [{s: fleet.aws_url for s in ("ec2", "elb", "elbv2", "ssm", "sts")}])
    fleet.set("wsgate:dns", {"zoneId": "Z0123456789ABC", "name": "ws.fleet.test", "ttl": 5})
    fleet.set("wsgate:moveTo", {
        "loadBalancer": {**lb, "name": TARGET, "type": "network", "subnets": ["subnet-12345678"],
                         "vpcId": "vpc-12345678", "deregistrationDelay": 0, "switchDrain": 1},
        "proxyProtocol": True, "ports": ports})
    return ports


def answer(address: str, port: int, preface: bytes = b"", path: str = "/") -> int | None:
    try:
        status, _, _ = http_get(dial(address, port, preface=preface), "ws.fleet.test", path)
    except Exception:  # noqa: BLE001 - refused, or closed without an HTTP answer
        return None
    return status


def v1(address: str) -> bytes:
    return proxyproto.v1("203.0.113.9", address, 40000, 443)


def v2(address: str) -> bytes:
    return proxyproto.v2("203.0.113.9", address, 40000, 443)


def move_record(fleet, target: str = TARGET, reached: Step | None = None, **fields) -> MoveRecord:
    return MoveRecord(env=fleet.env, source="wsgate-fleet", target=target, reached=reached,
                      updated_at=datetime.now(timezone.utc), **fields)


def test_during_a_move_every_host_serves_both_and_the_record_proves_both_then_the_old_ports_go(fleet):
    new = start_move(fleet)
    old = fleet.ports
    result = fab(fleet, "rollout")
    assert result.returncode == 0, result.stdout + result.stderr
    s = settings(fleet)
    both = s.serving([s, s.moving_to])
    want = {name: t.digest for name, t in render_hosts(both).items()}
    assert live_digests(fleet) == want
    for h in fleet.hosts:
        a = h.address
        # the Classic ELB's ports read its v1 header, and refuse a plain request
        assert (answer(a, old["http"], v1(a), "/x"), answer(a, old["tls"], v1(a))) == (301, 200)
        assert answer(a, old["tls"]) in (None, 400)
        # the network load balancer's plain ports answer plain requests, its proxy ports v2 only
        assert (answer(a, new["http"], path="/x"), answer(a, new["tls"])) == (301, 200)
        assert answer(a, new["tls"], v2(a)) in (None, 400)
        assert (answer(a, new["proxyHttp"], v2(a), "/x"), answer(a, new["proxyTls"], v2(a))) == (301, 200)
        assert answer(a, new["proxyTls"]) in (None, 400)
    rec = record(fleet)
    assert rec is not None and rec.load_balancers == ["wsgate-fleet", TARGET] and rec.load_balancer == "wsgate-fleet"
    assert rec.proxy_protocol_ports == sorted([old["http"], old["tls"], new["proxyHttp"], new["proxyTls"]])
    assert rec.plain_ports == sorted([new["http"], new["tls"]])
    assert rec.instances == {h.instance_id: want[h.name] for h in fleet.hosts}
    assert rec.foreign(s.env, TARGET) is None and rec.foreign(s.env, "wsgate-fleet") is None

    # the old load balancer retired (fab move's step f): the next rollout stops serving its ports
    awsapi.parameters.write_move(s, move_record(fleet, reached=Step.RETIRE, target_declared=True, weight=100,
                                                source_declared=False))
    result = fab(fleet, "rollout")
    assert result.returncode == 0, result.stdout + result.stderr
    alone = {name: t.digest for name, t in render_hosts(s.moving_to).items()}
    assert live_digests(fleet) == alone != want
    for h in fleet.hosts:
        a = h.address
        assert answer(a, old["http"], v1(a), "/x") is None and answer(a, old["tls"], v1(a)) is None
        assert (answer(a, new["tls"]), answer(a, new["proxyTls"], v2(a))) == (200, 200)
    rec = record(fleet)
    assert (rec.load_balancer, rec.load_balancers) == (TARGET, None)
    assert rec.proxy_protocol_ports == sorted([new["proxyHttp"], new["proxyTls"]])


@pytest.mark.parametrize("task", ["rollout", "check"])
def test_a_half_done_move_to_another_load_balancer_refuses_before_any_host_changes(fleet, task):
    start_move(fleet)
    before_links = {h.name: h.live_link() for h in fleet.hosts}
    before_record, before = record(fleet), live_digests(fleet)
    s = settings(fleet)
    awsapi.parameters.write_move(s, move_record(fleet, target="wsgate-fleet-other", reached=Step.CREATE,
                                                target_declared=True))
    result = fab(fleet, task)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "a move from 'wsgate-fleet' to 'wsgate-fleet-other' is at step create: finish it first" in result.stderr
    assert "nothing was changed" in result.stderr
    assert {h.name: h.live_link() for h in fleet.hosts} == before_links
    assert live_digests(fleet) == before and record(fleet) == before_record
    assert not [p for h in fleet.hosts for p in (h.root / "releases").glob(".stage-*")]
