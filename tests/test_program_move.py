"""The Pulumi program with DNS and a move between load balancers, under Pulumi's mock runtime.

The hosted zone, its records, the live load balancer, the readiness record and the move record
are real, in a loopback AWS endpoint (moto server), written by the code `fab` uses; the program
reads them as it does in `pulumi up`. What it declares at each step of a move is what a user
cares about: which load balancers exist, which DNS weight each record carries, and whether the
new load balancer sends the header from its first connection.
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone

import boto3
import pulumi
import pytest

import awsapi.parameters
from core import record as records
from core.errors import KitError
from core.listeners import PROXY
from core.move import MoveError, MoveRecord, Step
from tests.conftest import settings_from, stack_config
from tests.support.program import run_program
from tests.test_program import BACKEND_POLICY, LB
from tests.test_program_network import LISTENER, NLB, TARGET_GROUP, NetworkRecorder

RECORD = "aws:route53/record:Record"
REGION = "eu-west-1"
SOURCE, TARGET = "wsgate-staging", "wsgate-staging-nlb"
INSTANCES = ["i-0123456789abcdef0", "i-0123456789abcdef1"]  # Pulumi.staging.yaml's
ZONE_NAME, NAME = "staging.example.com", "ws.staging.example.com"
CLASSIC_ZONE, NLB_ZONE = "Z32O12XQLNTSW2", "Z2IFOLAFXWLO4F"  # what AWS reports in eu-west-1
TARGET_PORTS = {"http": 90, "tls": 91, "health": 8081, "proxyHttp": 92, "proxyTls": 93}


def endpoints(url: str) -> list[dict[str, str]]:
    return [{s: url for s in ("ec2", "elb", "elbv2", "ssm", "sts", "route53")}]


class MoveRecorder(NetworkRecorder):
    """The network recorder, with each load balancer's canonical hosted zone as AWS reports it."""

    def new_resource(self, args):
        resource_id, outputs = super().new_resource(args)
        if args.typ == LB:
            outputs["zoneId"] = CLASSIC_ZONE
        elif args.typ == NLB:
            outputs["zoneId"] = NLB_ZONE
        return [resource_id, outputs]

    def dns_records(self) -> dict[str, dict]:
        """SetIdentifier -> the weighted record's inputs."""
        return {r.inputs["setIdentifier"]: r.inputs for r in self.of(RECORD)}

    def weights(self) -> dict[str, int]:
        """load balancer name -> its record's weight."""
        return {ident.rsplit(":", 1)[1]: inputs["weightedRoutingPolicies"][0]["weight"]
                for ident, inputs in self.dns_records().items()}

    def balancers(self) -> list[str]:
        return sorted(r.inputs["name"] for r in [*self.of(LB), *self.of(NLB)])


def hosted_zone(aws_url: str, name: str = ZONE_NAME) -> str:
    r53 = boto3.client("route53", region_name="us-east-1", endpoint_url=aws_url)
    zone = r53.create_hosted_zone(Name=name, CallerReference=name)["HostedZone"]["Id"]
    return zone.removeprefix("/hostedzone/")


def target_lb(**changes) -> dict:
    return {**stack_config("staging")["wsgate:loadBalancer"], "type": "network", "name": TARGET, **changes}


def config_for(aws_url: str, zone: str, move: dict | None = None, **changes) -> dict:
    config = stack_config("staging")
    config["aws:endpoints"] = endpoints(aws_url)
    config["wsgate:dns"] = {"zoneId": zone, "name": NAME}
    if move is not None:
        config["wsgate:moveTo"] = move
    config.update(changes)
    return config


def to_nlb(**lb) -> dict:
    return {"loadBalancer": target_lb(**lb), "proxyProtocol": True, "ports": TARGET_PORTS}


def to_classic() -> dict:
    """A Classic ELB with the header on its own ports (the Classic off -> on move's target)."""
    lb = {**stack_config("staging")["wsgate:loadBalancer"], "name": "wsgate-staging-2"}
    return {"loadBalancer": lb, "proxyProtocol": True, "ports": {"http": 84, "tls": 85, "health": 8081}}


def settings_of(config: dict):
    from core.settings import from_config

    return from_config("staging", config, "Pulumi.staging.yaml")


def run(config: dict, monkeypatch):
    """Run the real program with `config`; return (mocks, exports, warnings and infos)."""
    mocks = MoveRecorder(boto3.client("ssm", region_name=REGION, endpoint_url=config["aws:endpoints"][0]["ssm"]))

    def body(prog, exports):
        lb = prog.main()
        outs = [lb.dns_name, *(b["dnsName"] for b in exports.get("balancers", {}).values())]
        return pulumi.Output.all(*outs).apply(lambda dns: exports.update(
            dns=dns[0], balancer_dns=dict(zip(exports.get("balancers", {}), dns[1:], strict=True))))

    exports, said = run_program(mocks, config, body, monkeypatch=monkeypatch, level=logging.INFO)
    return mocks, exports, said


def write_move(config: dict, **fields) -> None:
    s = settings_of(config)
    target = s.move_to.load_balancer.name if s.move_to else TARGET
    awsapi.parameters.write_move(s, MoveRecord(env="staging", source=SOURCE, target=target,
                                               updated_at=datetime.now(timezone.utc), **fields))


def prove(config: dict, instances=INSTANCES) -> None:
    """The readiness record `fab move` writes once every host serves both load balancers."""
    s = settings_of(config)
    ports = sorted({*s.proxy_ports, *(s.moving_to.proxy_ports if s.moving_to else ())})
    awsapi.parameters.write_record(s, records.build("staging", ports, {i: "d" * 64 for i in instances}))


def source_in_aws(aws_url: str, tagged: bool = True) -> None:
    """The live Classic ELB of the environment (the one a move leaves), tagged as the kit tags it."""
    elb = boto3.client("elb", region_name=REGION, endpoint_url=aws_url)
    elb.create_load_balancer(LoadBalancerName=SOURCE, AvailabilityZones=[f"{REGION}a"], Listeners=[
        {"Protocol": "TCP", "LoadBalancerPort": 80, "InstanceProtocol": "TCP", "InstancePort": 80}],
        Tags=[{"Key": "wsgate:env", "Value": "staging"}] if tagged else [])


def placed(config: dict, aws_url: str) -> dict:
    """The settings describing the live source where the test made it (moto's own subnets)."""
    elb = boto3.client("elb", region_name=REGION, endpoint_url=aws_url)
    live = elb.describe_load_balancers(LoadBalancerNames=[SOURCE])["LoadBalancerDescriptions"][0]
    lb = {**config["wsgate:loadBalancer"], "subnets": live["Subnets"] or None, "vpcId": live.get("VPCId")}
    if not live["Subnets"]:
        lb = {k: v for k, v in lb.items() if k not in ("subnets", "vpcId")}
        lb["availabilityZones"] = live["AvailabilityZones"]
    return {**config, "wsgate:loadBalancer": lb}


# --- dns alone --------------------------------------------------------------------------------

def test_dns_alone_gives_the_load_balancer_one_weighted_alias_record_of_weight_100(aws, monkeypatch):
    zone = hosted_zone(aws.url)
    mocks, exports, _ = run(config_for(aws.url, zone), monkeypatch)
    (record,) = mocks.of(RECORD)
    r = record.inputs
    assert (r["zoneId"], r["name"], r["type"], r["setIdentifier"]) == (zone, NAME, "A", f"wsgate:staging:{SOURCE}")
    assert r["weightedRoutingPolicies"] == [{"weight": 100}]
    assert r["aliases"] == [{"name": exports["dns"], "zoneId": CLASSIC_ZONE, "evaluateTargetHealth": True}]
    assert r["allowOverwrite"] is False  # never takes over a record it did not make
    assert record.name == f"{SOURCE}-dns"
    assert mocks.balancers() == [SOURCE]
    assert exports["dnsWeights"] == {SOURCE: 100}
    assert exports["balancers"][SOURCE]["kind"] == "classic"


def test_without_dns_no_record_is_declared(aws, monkeypatch):
    config = config_for(aws.url, "Z0")
    del config["wsgate:dns"]
    mocks, exports, _ = run(config, monkeypatch)
    assert mocks.of(RECORD) == [] and mocks.balancers() == [SOURCE] and exports["dnsWeights"] == {}


# --- a move, step by step -------------------------------------------------------------------

def test_move_set_without_a_move_record_declares_only_the_serving_load_balancer(aws, monkeypatch):
    zone = hosted_zone(aws.url)
    mocks, exports, said = run(config_for(aws.url, zone, to_nlb()), monkeypatch)
    assert mocks.balancers() == [SOURCE] and mocks.of(TARGET_GROUP) == []
    assert mocks.weights() == {SOURCE: 100}
    assert any("`fab move --env staging` creates it" in m and TARGET in m for m in said)


@pytest.mark.parametrize("fields, weights", [
    ({"target_declared": True, "weight": 0, "reached": Step.SERVE}, {SOURCE: 100, TARGET: 0}),
    ({"target_declared": True, "weight": 50, "reached": Step.WEIGH}, {SOURCE: 50, TARGET: 50}),
    ({"target_declared": True, "weight": 100, "reached": Step.WEIGH}, {SOURCE: 0, TARGET: 100}),
], ids=["create", "weigh-50", "weigh-100"])
def test_both_load_balancers_with_the_weights_the_move_record_gives(aws, monkeypatch, fields, weights):
    zone = hosted_zone(aws.url)
    source_in_aws(aws.url)  # the live one, tagged as the environment's: the new one is no rename of it
    config = placed(config_for(aws.url, zone, to_nlb()), aws.url)
    write_move(config, **fields)
    mocks, exports, _ = run(config, monkeypatch)
    assert mocks.balancers() == sorted([SOURCE, TARGET])
    assert mocks.weights() == weights and exports["dnsWeights"] == weights
    aliases = {ident.rsplit(":", 1)[1]: r["aliases"][0] for ident, r in mocks.dns_records().items()}
    assert aliases[SOURCE]["zoneId"] == CLASSIC_ZONE and aliases[TARGET]["zoneId"] == NLB_ZONE
    assert aliases[TARGET]["name"] == exports["balancer_dns"][TARGET]
    assert aliases[TARGET]["name"].startswith(TARGET) and aliases[SOURCE]["name"].startswith(SOURCE)
    assert exports["dns"] == exports["balancer_dns"][SOURCE]  # the outputs stay the serving one's
    assert {n: b["kind"] for n, b in exports["balancers"].items()} == {SOURCE: "classic", TARGET: "network"}


@pytest.mark.parametrize("before, weight, first", [(0, 50, TARGET), (100, 50, SOURCE)],
                         ids=["moving-on", "moving-back"])
def test_the_weight_that_rises_is_changed_before_the_one_that_falls(aws, monkeypatch, before, weight, first):
    """Never every record at 0 (Route 53 would answer both equally), not even halfway through an update:
    the falling record depends on the rising one, as Route 53 has them now."""
    from pulumi.runtime import mocks as pulumi_mocks

    zone = hosted_zone(aws.url)
    config = config_for(aws.url, zone, to_nlb())
    for name, w in ((SOURCE, 100 - before), (TARGET, before)):
        _upsert(aws.url, zone, {"Type": "A", "SetIdentifier": f"wsgate:staging:{name}", "Weight": w, "AliasTarget": {
            "HostedZoneId": CLASSIC_ZONE, "DNSName": f"{name}-1.eu-west-1.elb.amazonaws.com",
            "EvaluateTargetHealth": True}})
    write_move(config, target_declared=True, weight=weight, reached=Step.WEIGH)
    depends: dict[str, list[str]] = {}
    register = pulumi_mocks.MockMonitor.RegisterResource

    def observed(self, request):
        depends[request.name] = list(request.dependencies)
        return register(self, request)

    monkeypatch.setattr(pulumi_mocks.MockMonitor, "RegisterResource", observed)
    mocks, _, _ = run(config, monkeypatch)
    assert mocks.weights() == {SOURCE: 100 - weight, TARGET: weight}
    second = TARGET if first == SOURCE else SOURCE
    assert any(urn.endswith(f"::{first}-dns") for urn in depends[f"{second}-dns"])
    assert not any(urn.endswith("-dns") for urn in depends[f"{first}-dns"])


def test_once_the_source_is_retired_only_the_target_is_declared_with_all_the_weight(aws, monkeypatch):
    zone = hosted_zone(aws.url)
    source_in_aws(aws.url)
    config = placed(config_for(aws.url, zone, to_nlb()), aws.url)
    write_move(config, target_declared=True, weight=100, source_declared=False, reached=Step.DRAIN)
    mocks, exports, _ = run(config, monkeypatch)
    assert mocks.balancers() == [TARGET] and mocks.of(LB) == []
    assert mocks.weights() == {TARGET: 100} and exports["dnsWeights"] == {TARGET: 100}
    assert exports["dns"].startswith(TARGET) and list(exports["balancers"]) == [TARGET]


def test_promoting_move_to_keeps_every_resource_of_the_target_under_its_name(aws, monkeypatch):
    """After the move: moveTo becomes loadBalancer; Pulumi must see the same resources (the same
    URNs), not a new load balancer and record to create while the live ones are deleted."""
    zone = hosted_zone(aws.url)
    config = config_for(aws.url, zone, to_nlb())
    write_move(config, target_declared=True, weight=100, source_declared=False, reached=Step.RETIRE)
    moving, _, _ = run(config, monkeypatch)
    promoted = config_for(aws.url, zone, None, **{"wsgate:loadBalancer": target_lb(), "wsgate:proxyProtocol": True,
                                                 "wsgate:ports": TARGET_PORTS})
    write_move(config, target_declared=True, weight=100, source_declared=False, reached=Step.DONE)
    after, exports, _ = run(promoted, monkeypatch)
    assert {(r.typ, r.name) for r in after.resources} == {(r.typ, r.name) for r in moving.resources}
    assert after.weights() == {TARGET: 100}


def test_a_half_done_move_to_another_load_balancer_is_refused_naming_its_step(aws, monkeypatch):
    zone = hosted_zone(aws.url)
    config = config_for(aws.url, zone, to_nlb())
    s = settings_of(config)
    awsapi.parameters.write_move(s, MoveRecord(env="staging", source=SOURCE, target="wsgate-elsewhere",
                                               target_declared=True, weight=50, reached=Step.WEIGH,
                                               updated_at=datetime.now(timezone.utc)))
    with pytest.raises(MoveError) as caught:
        run(config, monkeypatch)
    message = str(caught.value)
    assert "'wsgate-elsewhere'" in message and "step weigh" in message and "nothing was declared" in message


# --- refusals before anything is declared -------------------------------------------------------

def _upsert(aws_url: str, zone: str, record: dict) -> None:
    r53 = boto3.client("route53", region_name="us-east-1", endpoint_url=aws_url)
    r53.change_resource_record_sets(HostedZoneId=zone, ChangeBatch={"Changes": [
        {"Action": "UPSERT", "ResourceRecordSet": {"Name": NAME, **record}}]})


@pytest.mark.parametrize("record, named", [
    ({"Type": "CNAME", "TTL": 300, "ResourceRecords": [{"Value": "old-lb.example.net"}]},
     "CNAME (simple, no SetIdentifier)"),
    ({"Type": "A", "SetIdentifier": "blue", "Weight": 10, "TTL": 60, "ResourceRecords": [{"Value": "192.0.2.1"}]},
     "A (weighted, SetIdentifier 'blue')"),
    ({"Type": "A", "SetIdentifier": "wsgate:prod:wsgate-staging", "Weight": 10, "TTL": 60,
      "ResourceRecords": [{"Value": "192.0.2.1"}]}, "SetIdentifier 'wsgate:prod:wsgate-staging'"),
], ids=["cname", "another-weighted", "another-environment"])
def test_a_record_at_the_name_the_kit_did_not_make_is_refused(aws, monkeypatch, record, named):
    zone = hosted_zone(aws.url)
    _upsert(aws.url, zone, record)
    with pytest.raises(KitError) as caught:
        run(config_for(aws.url, zone, to_nlb()), monkeypatch)
    message = str(caught.value)
    assert NAME in message and named in message and "never takes over" in message
    assert "nothing was changed" in message


def test_the_kits_own_record_at_the_name_is_not_refused(aws, monkeypatch):
    zone = hosted_zone(aws.url)
    _upsert(aws.url, zone, {"Type": "A", "SetIdentifier": f"wsgate:staging:{SOURCE}", "Weight": 100, "AliasTarget": {
        "HostedZoneId": CLASSIC_ZONE, "DNSName": "wsgate-staging-1.eu-west-1.elb.amazonaws.com",
        "EvaluateTargetHealth": True}})
    mocks, _, _ = run(config_for(aws.url, zone), monkeypatch)
    assert mocks.weights() == {SOURCE: 100}


def test_a_zone_that_does_not_hold_the_name_is_refused(aws, monkeypatch):
    zone = hosted_zone(aws.url, "other.example.org")
    with pytest.raises(KitError, match=rf"dns.name {NAME} is not in hosted zone {zone} \(other.example.org\)"):
        run(config_for(aws.url, zone), monkeypatch)


def test_a_zone_that_does_not_exist_is_refused_naming_dns_zone_id(aws, monkeypatch):
    with pytest.raises(KitError, match=r"wsgate:dns.zoneId Z0NOSUCHZONE: no such Route 53 hosted zone"):
        run(config_for(aws.url, "Z0NOSUCHZONE"), monkeypatch)


def test_a_lab_environment_without_a_route53_endpoint_never_asks_a_real_one(aws, monkeypatch):
    config = config_for(aws.url, "Z0LABZONE", **{"aws:endpoints": [{s: aws.url for s in ("ec2", "elb", "ssm")}]})
    with pytest.raises(KitError, match="never asks a real Route 53 for a lab environment"):
        run(config, monkeypatch)


# --- the new load balancer sends the header from its first connection ----------------------------

def test_a_new_network_load_balancer_forwards_to_its_proxy_groups_from_its_first_run(aws, monkeypatch):
    zone = hosted_zone(aws.url)
    config = config_for(aws.url, zone, to_nlb())
    prove(config)  # every host serves both: 80/81 with v1, 92/93 with v2
    write_move(config, target_declared=True, weight=0, reached=Step.SERVE)
    mocks, exports, _ = run(config, monkeypatch)
    listeners = {r.inputs["port"]: r for r in mocks.of(LISTENER)}
    assert sorted(listeners) == [80, 443]
    assert (mocks.forwards_to(80), mocks.forwards_to(443)) == (PROXY, PROXY)
    assert exports["balancers"][TARGET]["proxyProtocolGate"] == "open"
    assert exports["balancers"][TARGET]["proxyProtocolPorts"] == [92, 93]
    assert mocks.weights() == {SOURCE: 100, TARGET: 0}


def test_an_instance_not_proven_does_not_join_the_new_network_load_balancer(aws, monkeypatch):
    """Join only when proven: the new load balancer forwards to its proxy groups with the proven
    hosts only; the other waits outside every group until `fab rollout` proves it."""
    zone = hosted_zone(aws.url)
    config = config_for(aws.url, zone, to_nlb())
    prove(config, INSTANCES[:1])
    write_move(config, target_declared=True, weight=0, reached=Step.SERVE)
    mocks, exports, said = run(config, monkeypatch)
    assert (mocks.forwards_to(80), mocks.forwards_to(443)) == (PROXY, PROXY)
    assert mocks.attached() == {port: INSTANCES[:1] for port in (90, 91, 92, 93)}
    assert any(m.startswith(f"{TARGET}: {INSTANCES[1]} waits to join") for m in said)


def test_a_new_classic_elb_has_the_policy_on_its_ports_from_its_first_run(aws, monkeypatch):
    """Classic off -> on: the new ELB's own ports (84, 85) carry the policy in the update that
    creates it, before it has any DNS weight; the live one's ports stay as they are."""
    zone = hosted_zone(aws.url)
    config = config_for(aws.url, zone, to_classic(), **{"wsgate:proxyProtocol": False})
    prove(config)
    s = settings_of(config)
    awsapi.parameters.write_move(s, MoveRecord(env="staging", source=SOURCE, target="wsgate-staging-2",
                                               target_declared=True, weight=0, reached=Step.SERVE,
                                               updated_at=datetime.now(timezone.utc)))
    mocks, exports, _ = run(config, monkeypatch)
    by_lb: dict[str, list[int]] = {}
    for p in mocks.of(BACKEND_POLICY):
        by_lb.setdefault(p.name.split("-proxy-protocol-")[0], []).append(p.inputs["instancePort"])
    assert by_lb == {"wsgate-staging-2": [84, 85]}
    assert exports["balancers"]["wsgate-staging-2"]["proxyProtocolGate"] == "open"
    assert exports["balancers"][SOURCE]["proxyProtocolGate"] == "off"
    assert mocks.weights() == {SOURCE: 100, "wsgate-staging-2": 0}


def test_settings_for_the_move_are_what_the_program_reads(aws):
    """The helpers above build the settings the program validates (a guard for this module)."""
    zone = hosted_zone(aws.url)
    s = settings_from("staging", **{"aws:endpoints": endpoints(aws.url), "wsgate:dns": {"zoneId": zone, "name": NAME},
                                    "wsgate:moveTo": to_nlb()})
    assert s.balancer_names == (SOURCE, TARGET) and s.moving_to is not None
