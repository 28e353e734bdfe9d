"""The lab's DNS server against a real moto server (Route 53, Classic ELBs), with real HAProxy
stand-ins where health or traffic matters: answers as Route 53 gives them, and a client that keeps
to the TTL moving from one load balancer to the other."""

from __future__ import annotations

import random
import time
from collections import Counter

import dns.flags
import dns.message
import dns.query
import dns.rcode
import pytest

from lab.client import DnsClient
from lab.dns import CACHE, LB_TTL, Resolver, Route53, Server, resolve
from lab.standin import StandIns, address_of, healthy, standin_dir
from tests.conftest import settings_from
from tests.support.procs import free_port

pytestmark = [pytest.mark.integration]

ZONE, NAME = "lab.test", "ws.lab.test"
CLASSIC_ZONE = "Z35SXDOTRQ7X7K"


def elb(aws, name: str, instance_port: int = 81, instances: tuple[str, ...] = ()) -> str:
    """A Classic ELB in the endpoint with a TCP:443 listener; its DNS name."""
    api = Route53(aws.url).elb
    api.create_load_balancer(LoadBalancerName=name, AvailabilityZones=["us-east-1a"], Listeners=[
        {"Protocol": "TCP", "LoadBalancerPort": 443, "InstanceProtocol": "TCP", "InstancePort": instance_port}])
    api.configure_health_check(LoadBalancerName=name, HealthCheck={
        "Target": f"TCP:{instance_port}", "Interval": 5, "Timeout": 2, "UnhealthyThreshold": 2, "HealthyThreshold": 2})
    if instances:
        api.register_instances_with_load_balancer(LoadBalancerName=name, Instances=[{"InstanceId": i}
                                                                                    for i in instances])
    return api.describe_load_balancers(LoadBalancerNames=[name])["LoadBalancerDescriptions"][0]["DNSName"]


class Zone:
    """The hosted zone in the endpoint, and the service's weighted alias records in it."""

    def __init__(self, aws):
        self.api = Route53(aws.url).route53
        self.id = self.api.create_hosted_zone(Name=ZONE + ".", CallerReference=str(time.time()))["HostedZone"][
            "Id"].removeprefix("/hostedzone/")

    def weigh(self, **weights: tuple[str, int]) -> None:
        """identifier=(load balancer DNS name, weight) for each record."""
        self.api.change_resource_record_sets(HostedZoneId=self.id, ChangeBatch={"Changes": [
            {"Action": "UPSERT", "ResourceRecordSet": {
                "Name": NAME + ".", "Type": "A", "SetIdentifier": ident, "Weight": weight,
                "AliasTarget": {"HostedZoneId": CLASSIC_ZONE, "DNSName": target, "EvaluateTargetHealth": True}}}
            for ident, (target, weight) in weights.items()]})


@pytest.fixture
def two(aws):
    """Two Classic ELBs (a, b), the zone, and a DNS server on a free port: (zone, server, a, b)."""
    a, b = elb(aws, "a"), elb(aws, "b")
    zone = Zone(aws)
    addresses = {"a": "127.0.0.11", "b": "127.0.0.12"}
    health = {"a": True, "b": True}
    resolver = Resolver(Route53(aws.url), addresses.get, lambda name: health[name], lambda: 2, random.Random(7))
    server = Server(resolver, port=0).start()
    server.health = health  # type: ignore[attr-defined]
    yield zone, server, a, b
    server.stop()


def answers(server, n: int = 40) -> Counter:
    return Counter(resolve(server.address, NAME)[0] for _ in range(n))


def rcode(server, name: str) -> str:
    reply = dns.query.udp(dns.message.make_query(name, "A"), server.host, port=server.port, timeout=2)
    return dns.rcode.to_text(reply.rcode())


@pytest.mark.parametrize(("wa", "wb", "seen"), [(100, 0, {"127.0.0.11"}), (0, 100, {"127.0.0.12"}),
                                               (50, 50, {"127.0.0.11", "127.0.0.12"}),
                                               (0, 0, {"127.0.0.11", "127.0.0.12"})])
def test_weighted_answers_follow_the_weights(two, wa, wb, seen):
    zone, server, a, b = two
    zone.weigh(**{"wsgate:lab:a": (a, wa), "wsgate:lab:b": (b, wb)})
    got = answers(server, 60)
    assert set(got) == seen
    if len(seen) == 2:  # roughly even: 60 draws of 1/2 each, far from the edges
        assert min(got.values()) >= 12, got


def test_a_weight_change_is_the_next_answer(two):
    zone, server, a, b = two
    zone.weigh(**{"wsgate:lab:a": (a, 100), "wsgate:lab:b": (b, 0)})
    assert resolve(server.address, NAME)[0] == "127.0.0.11"
    zone.weigh(**{"wsgate:lab:a": (a, 0), "wsgate:lab:b": (b, 100)})
    time.sleep(CACHE)
    assert resolve(server.address, NAME)[0] == "127.0.0.12"


def test_the_ttl_is_the_environments_and_a_load_balancers_own_name_is_answered(two):
    zone, server, a, b = two
    zone.weigh(**{"wsgate:lab:a": (a, 100)})
    assert resolve(server.address, NAME) == ("127.0.0.11", 2)
    assert resolve(server.address, b) == ("127.0.0.12", LB_TTL)  # as AWS answers an ELB's name


def test_nxdomain_in_the_zone_refused_outside_it(two):
    zone, server, a, b = two
    zone.weigh(**{"wsgate:lab:a": (a, 100)})
    assert rcode(server, NAME) == "NOERROR"
    assert rcode(server, "other.lab.test") == "NXDOMAIN"
    assert rcode(server, "ws.example.com") == "REFUSED"
    assert rcode(server, "lab.test.evil.com") == "REFUSED"
    reply = dns.query.udp(dns.message.make_query(NAME, "AAAA"), server.host, port=server.port, timeout=2)
    assert dns.rcode.to_text(reply.rcode()) == "NOERROR" and not reply.answer  # the name exists, no AAAA


def test_evaluate_target_health_skips_a_load_balancer_without_a_healthy_instance(two):
    zone, server, a, b = two
    health = server.health
    zone.weigh(**{"wsgate:lab:a": (a, 50), "wsgate:lab:b": (b, 50)})
    health["b"] = False
    time.sleep(CACHE)
    assert set(answers(server)) == {"127.0.0.11"}
    health["a"], health["b"] = False, True
    time.sleep(CACHE)
    assert set(answers(server)) == {"127.0.0.12"}
    health["b"] = False  # none healthy: Route 53 answers as if all were
    time.sleep(CACHE)
    assert set(answers(server)) == {"127.0.0.11", "127.0.0.12"}
    zone.weigh(**{"wsgate:lab:a": (a, 100), "wsgate:lab:b": (b, 0)})
    health["b"] = True  # the weighted one unhealthy: the record of weight 0 answers
    time.sleep(CACHE)
    assert set(answers(server)) == {"127.0.0.12"}


# --- with the lab's stand-ins: health from their checks, traffic through them ---------------------

@pytest.fixture
def stand_ins(aws, app, tmp_path):
    """Load balancers a and b (the environment's loadBalancer and its moveTo) in the endpoint, one
    instance each on the demo app, their stand-ins (the lab's StandIns, real HAProxy) on addresses
    of their own, and the lab's DNS server answering from the endpoint with the stand-ins' health."""
    app_host, app_port = app
    endpoints = [{s: aws.url for s in ("ec2", "elb", "elbv2", "route53", "ssm", "sts")}]
    lb = {"name": "wsgate-dnstest-a", "instances": ["i-00000000000000001"]}
    host = {"name": "h1", "address": app_host, "bind": app_host, "instanceId": "i-00000000000000001"}
    s = settings_from("lab", **{"aws:endpoints": endpoints}, load_balancer=lb, hosts=[host],
                      dns={"zoneId": "ZX", "name": NAME, "ttl": 1, "resolver": None},
                      move_to={"loadBalancer": {**s_lb(), **lb, "name": "wsgate-dnstest-b"},
                               "ports": {"http": 18090, "tls": 18091, "health": 18082}})
    a = elb(aws, "wsgate-dnstest-a", app_port, ("i-00000000000000001",))
    b = elb(aws, "wsgate-dnstest-b", app_port, ("i-00000000000000001",))
    zone = Zone(aws)
    state = tmp_path / "state.json"
    listen = {443: free_port()}
    followers = StandIns(lambda: s, tmp_path, tmp_path / "no-cert.pem", listen)
    followers.sync()
    resolver = Resolver(Route53(aws.url), lambda name: address_of(state, name), lambda name: healthy(tmp_path, name),
                        lambda: 1)
    server = Server(resolver, port=0).start()
    yield zone, server, followers, listen, a, b
    server.stop()
    followers.stop()


def s_lb() -> dict:
    from tests.conftest import stack_config

    return dict(stack_config("lab")["wsgate:loadBalancer"])


def wait_for(check, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_each_load_balancer_has_a_stand_in_of_its_own_and_its_health(stand_ins, tmp_path, aws):
    zone, server, followers, listen, a, b = stand_ins
    assert sorted(followers.running) == ["wsgate-dnstest-a", "wsgate-dnstest-b"]
    own = {name: f.addresses for name, f in followers.running.items()}
    assert own == {"wsgate-dnstest-a": ("127.0.0.11", "127.0.0.1"), "wsgate-dnstest-b": ("127.0.0.12",)}
    wait_for(lambda: healthy(tmp_path, "wsgate-dnstest-a") and healthy(tmp_path, "wsgate-dnstest-b"))
    # b's instance leaves it: no healthy instance, its record is skipped although it has all the weight
    Route53(aws.url).elb.deregister_instances_from_load_balancer(
        LoadBalancerName="wsgate-dnstest-b", Instances=[{"InstanceId": "i-00000000000000001"}])
    assert followers.sync()
    wait_for(lambda: not healthy(tmp_path, "wsgate-dnstest-b"))  # once the reload has taken
    zone.weigh(**{"wsgate:lab:a": (a, 1), "wsgate:lab:b": (b, 99)})
    assert set(answers(server, 20)) == {"127.0.0.11"}
    assert (standin_dir(tmp_path, "wsgate-dnstest-b") / "haproxy.cfg").exists()


def test_the_client_keeps_to_the_ttl_and_moves_and_a_deleted_load_balancer_cuts_its_sockets(stand_ins, aws):
    zone, server, followers, listen, a, b = stand_ins
    zone.weigh(**{"wsgate:lab:a": (a, 100), "wsgate:lab:b": (b, 0)})
    client = DnsClient(server.address, NAME, listen, NAME, None, kinds=("ws",), clients=2, hold=2, pause=0.05)
    client.start()
    wait_for(lambda: len(client.stats.held_open("127.0.0.11")) == 2 and client.stats.ok("127.0.0.11") > 5)
    zone.weigh(**{"wsgate:lab:a": (a, 0), "wsgate:lab:b": (b, 100)})
    moved = time.monotonic()
    time.sleep(1 + 1.5)  # the TTL (1 s), then some
    later = time.monotonic()
    time.sleep(1)
    # the old load balancer goes: its stand-in stops, the WebSockets it held are cut
    Route53(aws.url).elb.delete_load_balancer(LoadBalancerName="wsgate-dnstest-a")
    followers.sync()
    wait_for(lambda: not client.stats.held_open("127.0.0.11"))
    deleted = time.monotonic()
    wait_for(lambda: len(client.stats.held_open("127.0.0.12")) == 2)
    stats = client.stop()
    print("\n" + stats.table())
    assert "wsgate-dnstest-a" not in followers.running
    assert stats.failed() == 0, stats.table()
    assert stats.ok("127.0.0.11") > 0 and stats.ok("127.0.0.12", since=later) > 0
    assert not [r for r in stats.results if r.at >= later and r.address != "127.0.0.12"]
    # re-resolved no sooner than the TTL: no two answers within 1 s of each other
    times = [t for t, _, _ in stats.resolved]
    assert all(b - a >= 1 for a, b in zip(times, times[1:], strict=False)), times
    assert any(addr == "127.0.0.12" and t > moved for t, addr, _ in stats.resolved)
    dropped = stats.dropped("127.0.0.11")
    assert len(dropped) == 2 and all(h.closed and h.closed < deleted + 1 for h in dropped)
    assert all(h.reason == "stopped" for h in stats.held if h.address == "127.0.0.12")
