"""Route 53 as the kit reads it (awsapi/route53.py) and the lab's applier at each step of a move,
against a real AWS API endpoint on loopback (moto server): the records as Route 53 lists them,
the load balancers as their APIs describe them."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

import awsapi.parameters
from awsapi import classic, network, route53
from awsapi.clients import client
from core import record as records
from core.errors import KitError
from core.listeners import network_listeners
from core.move import MoveRecord, Step
from core.settings import Settings, from_config
from tests.conftest import stack_config

SERVICES = ("ec2", "elb", "elbv2", "ssm", "sts", "route53")
ZONE = "lab.test"
NAME = f"ws.{ZONE}"
NEW_PORTS = {"http": 18090, "tls": 18091, "health": 18082, "proxyHttp": 18093, "proxyTls": 18094}
CLASSIC, NLB, CLASSIC_B = "wsgate-lab", "wsgate-lab-nlb", "wsgate-lab-b"


def lab_settings(url: str, kind: str | None = "classic-to-network", zone_name: str = ZONE) -> Settings:
    """The lab environment against `url` with dns (a new hosted zone), and a move of `kind`
    (None: dns alone)."""
    from lab.applier import lab_network

    config = {**stack_config("lab"), "aws:endpoints": [{s: url for s in SERVICES}]}
    base = from_config("lab", config, "Pulumi.lab.yaml")
    zone = client(base, "route53").create_hosted_zone(Name=zone_name, CallerReference=zone_name)["HostedZone"]["Id"]
    vpc, subnets = lab_network(base)
    lab_classic = dict(config["wsgate:loadBalancer"])
    lab_network_lb = {k: v for k, v in lab_classic.items() if k not in ("availabilityZones", "connectionDraining")}
    lab_network_lb.update(type="network", subnets=subnets, vpcId=vpc, deregistrationDelay=1, switchDrain=1,
                          name=NLB)
    source, target = lab_classic, lab_network_lb
    if kind == "network-to-classic":
        source, target = lab_network_lb, {**lab_classic, "name": CLASSIC_B}
    config.update({"wsgate:loadBalancer": source,
                   "wsgate:dns": {"zoneId": zone.rsplit("/", 1)[-1], "name": NAME, "ttl": 1}})
    if kind:
        config["wsgate:moveTo"] = {"loadBalancer": target, "proxyProtocol": True, "ports": NEW_PORTS}
    return from_config("lab", config, "Pulumi.lab.yaml")


def move(s: Settings, **fields) -> None:
    assert s.move_to is not None
    awsapi.parameters.write_move(s, MoveRecord(env=s.env, source=s.load_balancer.name,
                                               target=s.move_to.load_balancer.name,
                                               updated_at=datetime.now(timezone.utc), **fields))


def prove(s: Settings) -> None:
    """The readiness record once every host serves both load balancers' ports."""
    ports = sorted({*s.proxy_ports, *(s.moving_to.proxy_ports if s.moving_to else ())})
    awsapi.parameters.write_record(s, records.build(s.env, ports, {i: "d" * 64 for i in s.load_balancer.instances}))


def upsert(s: Settings, record: dict) -> None:
    assert s.dns is not None
    client(s, "route53").change_resource_record_sets(HostedZoneId=s.dns.zone_id, ChangeBatch={"Changes": [
        {"Action": "UPSERT", "ResourceRecordSet": {"Name": NAME, **record}}]})


def exists(s: Settings, name: str) -> bool:
    """Whether a load balancer of that name exists, of either kind, as the APIs say."""
    lb = s.model_copy(update={"load_balancer": s.load_balancer.model_copy(update={"name": name})})
    return classic.describe(lb) is not None or network.describe_v2(lb) is not None


def of(s: Settings, name: str) -> Settings:
    return s if s.load_balancer.name == name else s.moving_to  # type: ignore[return-value]


# --- reading Route 53 -----------------------------------------------------------------------------

def test_records_at_the_name_are_every_type_that_answers_it_over_every_page(aws, monkeypatch):
    """Pages of one record: the listing follows the name over its types and stops at the next name.
    (moto pages without StartRecordIdentifier: records of one name and type past a page repeat
    there, so a page here never splits one type's weighted records.)"""
    monkeypatch.setattr(route53, "PAGE", "1")
    s = lab_settings(aws.url, None)
    upsert(s, {"Type": "A", "SetIdentifier": "wsgate:lab:lb-1", "Weight": 1, "TTL": 60,
               "ResourceRecords": [{"Value": "192.0.2.1"}]})
    upsert(s, {"Type": "AAAA", "TTL": 60, "ResourceRecords": [{"Value": "2001:db8::1"}]})
    upsert(s, {"Type": "TXT", "TTL": 60, "ResourceRecords": [{"Value": '"not an answer"'}]})
    client(s, "route53").change_resource_record_sets(HostedZoneId=s.dns.zone_id, ChangeBatch={"Changes": [
        {"Action": "UPSERT", "ResourceRecordSet": {"Name": f"wsx.{ZONE}", "Type": "A", "TTL": 60,
                                                   "ResourceRecords": [{"Value": "192.0.2.99"}]}}]})
    found = route53.records(s)
    assert [(r["Type"], r.get("SetIdentifier")) for r in found] == [("A", "wsgate:lab:lb-1"), ("AAAA", None)]
    assert route53.weights(s) == {}  # lb-1 is none of this environment's load balancers
    assert "AAAA (simple, no SetIdentifier)" in route53.refusal(s)
    assert "A (weighted, SetIdentifier 'wsgate:lab:lb-1')" in route53.refusal(s)


def test_weights_are_the_kits_records_only_as_route53_says(aws):
    s = lab_settings(aws.url)
    for name, weight in ((CLASSIC, 30), (NLB, 70)):
        upsert(s, {"Type": "A", "SetIdentifier": route53.identifier(s, name), "Weight": weight, "AliasTarget": {
            "HostedZoneId": route53.LAB_CLASSIC_ZONE, "DNSName": f"{name}.example.test", "EvaluateTargetHealth": True}})
    assert route53.weights(s) == {CLASSIC: 30, NLB: 70}
    assert route53.refusal(s) is None


def test_a_zone_that_does_not_hold_the_name_and_a_missing_zone(aws):
    s = lab_settings(aws.url, None, zone_name="elsewhere.test")
    assert route53.refusal(s) == (f"wsgate:dns.name {NAME} is not in hosted zone {s.dns.zone_id} (elsewhere.test): set "
                                  f"dns.name to a name in elsewhere.test, or dns.zoneId to the zone that holds {NAME}; "
                                  "nothing was changed")
    missing = s.model_copy(update={"dns": s.dns.model_copy(update={"zone_id": "Z0NOSUCHZONE"})})
    with pytest.raises(KitError, match="wsgate:dns.zoneId Z0NOSUCHZONE: no such Route 53 hosted zone"):
        route53.refusal(missing)


def test_a_name_under_a_zone_of_the_same_suffix_is_not_held(aws):
    assert route53.holds("lab.test", "ws.lab.test") and route53.holds("lab.test.", "LAB.TEST")
    assert not route53.holds("lab.test", "ws.otherlab.test")


def test_canonical_zone_of_each_kind(aws):
    s = lab_settings(aws.url)
    assert route53.canonical_zone(s, {"CanonicalHostedZoneNameID": None}) == route53.LAB_CLASSIC_ZONE  # moto
    assert route53.canonical_zone(s, {"CanonicalHostedZoneId": "Z2IFOLAFXWLO4F"}) == "Z2IFOLAFXWLO4F"
    real = s.model_copy(update={"aws": s.aws.model_copy(update={"endpoints": {}})})
    with pytest.raises(KitError, match="no canonical hosted zone"):
        route53.canonical_zone(real, {"LoadBalancerName": "x"})  # outside the lab: never a guess


# --- the lab's applier, step by step ----------------------------------------------------------------

class Calls:
    """The AWS operations the applier makes, in order, as botocore sends them (observed, not changed)."""

    def __init__(self, s: Settings, services=("elb", "elbv2", "route53")):
        self.seen: list[str] = []
        self.clients = [client(s, service) for service in services]
        for api in self.clients:
            api.meta.events.register("before-parameter-build", self._seen)

    def _seen(self, model, params, **_):
        batch = params.get("ChangeBatch")
        actions = ",".join(c["Action"] for c in batch["Changes"]) if batch else ""
        self.seen.append(f"{model.name}{':' + actions if actions else ''}")

    def close(self):
        for api in self.clients:
            api.meta.events.unregister("before-parameter-build", self._seen)


@pytest.fixture
def calls():
    made: list[Calls] = []

    def watch(s):
        made.append(Calls(s))
        return made[-1]

    yield watch
    for c in made:
        c.close()


def aliases(s: Settings) -> dict[str, tuple[int, str, str, bool]]:
    """lb name -> (weight, alias DNS name, alias zone, evaluate target health) as Route 53 lists them."""
    return {route53.ours(s, r): (int(r["Weight"]), route53.plain(r["AliasTarget"]["DNSName"]),
                                 r["AliasTarget"]["HostedZoneId"], r["AliasTarget"]["EvaluateTargetHealth"])
            for r in route53.records(s)}


def test_dns_alone_the_lab_applier_makes_one_record_of_weight_100(aws):
    from lab.applier import apply

    s = lab_settings(aws.url, None)
    out = apply(s)
    dns_name = classic.describe(s)["DNSName"]
    assert aliases(s) == {CLASSIC: (100, dns_name.lower(), route53.LAB_CLASSIC_ZONE, True)}
    assert out["dnsWeights"] == {CLASSIC: 100} and out["dnsName"] == dns_name
    assert apply(s)["dnsWeights"] == {CLASSIC: 100} and len(route53.records(s)) == 1  # again: the same one


@pytest.mark.parametrize("kind", ["classic-to-network", "network-to-classic"])
def test_the_lab_applier_at_each_step_of_a_move(aws, calls, kind):
    from lab.applier import apply

    s = lab_settings(aws.url, kind)
    source, target = s.load_balancer.name, s.move_to.load_balancer.name
    prove(s)

    out = apply(s)  # moveTo set, no move record: the serving one alone
    assert not exists(s, target) and route53.weights(s) == {source: 100}
    assert list(out["balancers"]) == [source]

    move(s, target_declared=True, weight=0, reached=Step.SERVE)
    out = apply(s)
    assert exists(s, target) and route53.weights(s) == {source: 100, target: 0}
    described = (network.describe_network(s.moving_to) if s.moving_to.load_balancer.type == "network"
                 else classic.describe(s.moving_to))
    assert aliases(s)[target] == (0, described["DNSName"].lower(), route53.canonical_zone(s, described), True)
    assert out["balancers"][target]["proxyProtocolGate"] == "open"  # the header from its first connection
    assert out["balancers"][target]["proxyProtocolPorts"] == list(s.moving_to.proxy_ports)
    assert out["dnsName"] == out["balancers"][source]["dnsName"]
    if s.moving_to.load_balancer.type == "classic":
        assert classic.header_ports(s.moving_to) == [18090, 18091]
    else:
        state = network.network_state(s.moving_to)
        assert state is not None and state.header_ports == [18093, 18094]

    for weight in (50, 100):
        move(s, target_declared=True, weight=weight, reached=Step.WEIGH)
        out = apply(s)
        assert route53.weights(s) == {source: 100 - weight, target: weight} == out["dnsWeights"]
        assert exists(s, source)

    move(s, target_declared=True, weight=100, reached=Step.DRAIN)  # drained: still both
    apply(s)
    assert exists(s, source) and route53.weights(s) == {source: 0, target: 100}

    groups = {g["TargetGroupName"] for g in client(s, "elbv2").describe_target_groups()["TargetGroups"]}
    source_groups = {g.name for x in network_listeners(s) for g in (x.plain, x.proxy)}
    assert (groups >= source_groups) == (s.load_balancer.type == "network")
    watched = calls(s)
    move(s, target_declared=True, weight=100, source_declared=False, reached=Step.DRAIN)
    out = apply(s)
    assert not exists(s, source) and exists(s, target)
    assert route53.weights(s) == {target: 100} == out["dnsWeights"] and list(out["balancers"]) == [target]
    assert out["dnsName"] == out["balancers"][target]["dnsName"]
    deleted = "DeleteLoadBalancer"
    assert "ChangeResourceRecordSets:DELETE" in watched.seen and deleted in watched.seen
    assert watched.seen.index("ChangeResourceRecordSets:DELETE") < watched.seen.index(deleted)  # its record first
    if of(s, source).load_balancer.type == "network":  # its listeners and the kit's target groups went with it
        elbv2 = client(s, "elbv2")
        names = {g["TargetGroupName"] for g in elbv2.describe_target_groups()["TargetGroups"]}
        assert not names & {g.name for x in network_listeners(s) for g in (x.plain, x.proxy)}
        assert not client(s, "elbv2").describe_load_balancers()["LoadBalancers"]

    apply(s)  # a rerun once retired: nothing else goes
    assert exists(s, target) and route53.weights(s) == {target: 100}


def test_the_lab_applier_refuses_a_record_it_did_not_make_before_anything(aws):
    from lab.applier import apply

    s = lab_settings(aws.url)
    upsert(s, {"Type": "CNAME", "TTL": 60, "ResourceRecords": [{"Value": "old.example.net"}]})
    with pytest.raises(KitError, match=r"CNAME \(simple, no SetIdentifier\).*never takes over"):
        apply(s)
    assert not exists(s, CLASSIC)  # nothing was made
    assert [r["Type"] for r in route53.records(s)] == ["CNAME"]


def test_the_lab_applier_never_sends_dns_changes_to_a_route53_off_the_machine(aws):
    from lab.applier import apply

    s = lab_settings(aws.url, None)
    endpoints = {k: v for k, v in s.aws.endpoints.items() if k != "route53"}
    off = s.model_copy(update={"aws": s.aws.model_copy(update={"endpoints": endpoints})})
    with pytest.raises(KitError, match="only runs against a loopback AWS endpoint"):  # route53 is one of them
        apply(off)
    assert not exists(s, CLASSIC)
