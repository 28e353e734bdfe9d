"""The Pulumi program for a network load balancer, under Pulumi's mock runtime.

As in test_program.py: the readiness record is written by the code `fab rollout` uses into a
real AWS API endpoint on loopback (moto server), and what the load balancer does now (which
target group each listener forwards to, with PROXY v2 or not, who is registered) is made there
with the ELBv2 API, as a previous `pulumi up` would have left it. The program reads both.
"""

from __future__ import annotations

import time

import boto3
import pytest

import awsapi.balancer
import awsapi.clients
import awsapi.network
import awsapi.parameters
from core import record as records
from core.errors import KitError, SettingsError
from core.listeners import PLAIN, PROXY, network_listeners, target_group_name
from core.network import SWITCHED_TAG, network_forwarding, stamp, stamped
from tests.conftest import settings_from, stack_config
from tests.support.program import run_program
from tests.test_program import Recorder

NLB = "aws:lb/loadBalancer:LoadBalancer"
TARGET_GROUP = "aws:lb/targetGroup:TargetGroup"
TG_ATTACHMENT = "aws:lb/targetGroupAttachment:TargetGroupAttachment"
LISTENER = "aws:lb/listener:Listener"
INGRESS = "aws:vpc/securityGroupIngressRule:SecurityGroupIngressRule"
EGRESS = "aws:vpc/securityGroupEgressRule:SecurityGroupEgressRule"
INSTANCES = ["i-0123456789abcdef0", "i-0123456789abcdef1"]  # Pulumi.staging.yaml's
REGION = "eu-west-1"
BOTH_PROXY = {"80": PROXY, "443": PROXY}
BOTH_PLAIN = {"80": PLAIN, "443": PLAIN}


def endpoints(url: str) -> list[dict[str, str]]:
    return [{s: url for s in ("ec2", "elb", "elbv2", "ssm", "sts")}]


def network_lb(**changes) -> dict:
    return {**stack_config("staging")["wsgate:loadBalancer"], "type": "network", **changes}


def settings_for(url: str, **lb):
    return settings_from("staging", **{"aws:endpoints": endpoints(url), "wsgate:loadBalancer": network_lb(**lb)})


class NetworkRecorder(Recorder):
    """Test_program's recorder, with the outputs ELBv2 resources have: ARNs and a DNS name."""

    def new_resource(self, args):
        resource_id, outputs = super().new_resource(args)
        if args.typ == NLB:
            name = args.inputs["name"]
            outputs["arn"] = f"arn:aws:elasticloadbalancing:{REGION}:123456789012:loadbalancer/net/{name}/1"
            outputs["dnsName"] = f"{args.inputs['name']}-1.elb.{REGION}.amazonaws.com"
        elif args.typ == TARGET_GROUP:
            outputs["arn"] = f"arn:aws:elasticloadbalancing:{REGION}:123456789012:targetgroup/{args.inputs['name']}/1"
        return [resource_id, outputs]

    def group(self, port: int):
        (found,) = [r for r in self.of(TARGET_GROUP) if r.inputs["port"] == port]
        return found

    def listener(self, port: int):
        (found,) = [r for r in self.of(LISTENER) if r.inputs["port"] == port]
        return found

    def forwards_to(self, port: int) -> str:
        """The kind of target group listener `port` forwards to."""
        (action,) = self.listener(port).inputs["defaultActions"]
        assert action["type"] == "forward"
        (group,) = [r for r in self.of(TARGET_GROUP) if action["targetGroupArn"].endswith(f"/{r.inputs['name']}/1")]
        return PROXY if group.inputs["proxyProtocolV2"] else PLAIN

    def attached(self) -> dict[int, list[str]]:
        """Instance port -> instances attached to the group of that port."""
        out: dict[int, list[str]] = {}
        for a in self.of(TG_ATTACHMENT):
            out.setdefault(a.inputs["port"], []).append(a.inputs["targetId"])
        return {port: sorted(ids) for port, ids in sorted(out.items())}


def run(aws_url: str, monkeypatch, lb: dict | None = None, **changes):
    """Run the real program for staging with a network load balancer; return (mocks, exports, warnings)."""
    config = stack_config("staging")
    config["aws:endpoints"] = endpoints(aws_url)
    config["wsgate:loadBalancer"] = network_lb(**(lb or {}))
    config.update(changes)
    _live_placement(config, aws_url)
    mocks = NetworkRecorder(boto3.client("ssm", region_name=REGION, endpoint_url=aws_url))
    exports, warnings = run_program(mocks, config, lambda prog, exports: prog.main().dns_name.apply(
        lambda dns: exports.update(dns=dns)), monkeypatch=monkeypatch)
    return mocks, exports, warnings


def _live_placement(config: dict, aws_url: str) -> None:
    """Where a test made the live load balancer in the endpoint (in the endpoint's own VPC and
    subnets), the shipped placement stands for it: the settings describe that load balancer."""
    lb, shipped = config["wsgate:loadBalancer"], stack_config("staging")["wsgate:loadBalancer"]
    if (lb.get("subnets"), lb.get("vpcId")) != (shipped["subnets"], shipped["vpcId"]):
        return
    elbv2 = boto3.client("elbv2", region_name=REGION, endpoint_url=aws_url)
    try:
        (live,) = elbv2.describe_load_balancers(Names=[lb["name"]])["LoadBalancers"]
    except elbv2.exceptions.LoadBalancerNotFoundException:
        return
    config["wsgate:loadBalancer"] = {**lb, "vpcId": live["VpcId"],
                                     "subnets": [z["SubnetId"] for z in live["AvailabilityZones"]]}


def write_record(aws_url: str, instances: list[str], ports: list[int] | None = None,
                 plain: list[int] | None = None) -> None:

    s = settings_for(aws_url)
    awsapi.parameters.write_record(s, records.build("staging", ports or list(s.proxy_ports),
                                             {i: "d" * 64 for i in instances}, plain_ports=plain))


def nlb_in_aws(aws_url: str, forwarding: dict[int, str], registered: dict[str, list[str]] | None = None,
               proxy_v2: bool = True, switched_ago: float | None = 3600) -> None:
    """The network load balancer as an earlier `pulumi up` left it: its four groups (PROXY v2 on the
    proxy ones, unless `proxy_v2` is False), `registered` (group key -> instances; default: every
    configured instance in every group), each listener forwarding to the kind `forwarding` names; one
    on its proxy group tagged as switched `switched_ago` seconds ago (None: no tag)."""
    s = settings_for(aws_url)
    ec2 = boto3.client("ec2", region_name=REGION, endpoint_url=aws_url)
    elbv2 = boto3.client("elbv2", region_name=REGION, endpoint_url=aws_url)
    acm = boto3.client("acm", region_name=REGION, endpoint_url=aws_url)
    vpc = ec2.create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
    subnets = [ec2.create_subnet(VpcId=vpc, CidrBlock=f"10.0.{i}.0/24", AvailabilityZone=f"{REGION}{z}")
               ["Subnet"]["SubnetId"] for i, z in ((1, "a"), (2, "b"))]
    group = ec2.create_security_group(GroupName="lb", Description="lb", VpcId=vpc)["GroupId"]
    lb = elbv2.create_load_balancer(Name=s.load_balancer.name, Subnets=subnets, Type="network",
                                    SecurityGroups=[group])["LoadBalancers"][0]
    certificate = acm.request_certificate(DomainName=s.server_name)["CertificateArn"]
    for listener in network_listeners(s):
        arns = {}
        for group in (listener.plain, listener.proxy):
            arn = elbv2.create_target_group(Name=group.name, Protocol="TCP", Port=group.port, VpcId=vpc,
                                            TargetType="instance")["TargetGroups"][0]["TargetGroupArn"]
            if group.proxy_protocol_v2 and proxy_v2:
                elbv2.modify_target_group_attributes(
                    TargetGroupArn=arn, Attributes=[{"Key": "proxy_protocol_v2.enabled", "Value": "true"}])
            members = INSTANCES if registered is None else registered.get(group.key, [])
            if members:
                elbv2.register_targets(TargetGroupArn=arn, Targets=[{"Id": i, "Port": group.port} for i in members])
            arns[group.kind] = arn
        tls = {"Certificates": [{"CertificateArn": certificate}], "SslPolicy": s.load_balancer.ssl_policy,
               "AlpnPolicy": [s.load_balancer.alpn_policy]} if listener.protocol == "TLS" else {}
        made = elbv2.create_listener(
            LoadBalancerArn=lb["LoadBalancerArn"], Protocol=listener.protocol, Port=listener.port,
            DefaultActions=[{"Type": "forward", "TargetGroupArn": arns[forwarding[listener.port]]}], **tls)
        if forwarding[listener.port] == PROXY and switched_ago is not None:  # as the switching update tags it
            elbv2.add_tags(ResourceArns=[made["Listeners"][0]["ListenerArn"]],
                           Tags=[{"Key": SWITCHED_TAG, "Value": stamp(time.time() - switched_ago)}])


def switched_at(aws_url: str, port: int, at: float) -> None:
    """Listener `port`'s switch time tag set to `at` through the ELBv2 API: the clock a test moves."""
    s = settings_for(aws_url)
    elbv2 = boto3.client("elbv2", region_name=REGION, endpoint_url=aws_url)
    (lb,) = elbv2.describe_load_balancers(Names=[s.load_balancer.name])["LoadBalancers"]
    (arn,) = [x["ListenerArn"] for x in elbv2.describe_listeners(LoadBalancerArn=lb["LoadBalancerArn"])["Listeners"]
              if x["Port"] == port]
    elbv2.add_tags(ResourceArns=[arn], Tags=[{"Key": SWITCHED_TAG, "Value": stamp(at)}])


def switch_tags(aws_url: str) -> dict[int, str | None]:
    """Listener port -> its switch time tag as the ELBv2 API has it (None: no tag)."""
    s = settings_for(aws_url)
    elbv2 = boto3.client("elbv2", region_name=REGION, endpoint_url=aws_url)
    (lb,) = elbv2.describe_load_balancers(Names=[s.load_balancer.name])["LoadBalancers"]
    arns = {x["ListenerArn"]: x["Port"] for x in elbv2.describe_listeners(LoadBalancerArn=lb["LoadBalancerArn"])
            ["Listeners"] if x["Port"] in (80, 443)}
    tags = elbv2.describe_tags(ResourceArns=sorted(arns))["TagDescriptions"]
    return {arns[d["ResourceArn"]]: next((t["Value"] for t in d["Tags"] if t["Key"] == SWITCHED_TAG), None)
            for d in tags}


# --- the resource graph --------------------------------------------------------------------

def test_a_network_load_balancer_with_its_security_group(aws, monkeypatch):
    mocks, exports, _ = run(aws.url, monkeypatch)
    (nlb,) = mocks.of(NLB)
    assert nlb.inputs["loadBalancerType"] == "network" and nlb.inputs["name"] == "wsgate-staging"
    assert nlb.inputs["subnets"] == ["subnet-0123456789abcdef0", "subnet-0fedcba9876543210"]
    assert nlb.inputs["internal"] is False and nlb.inputs["enableCrossZoneLoadBalancing"] is True
    assert nlb.inputs["securityGroups"] == ["wsgate-staging-lb-id"]  # only at creation can an NLB get one
    assert mocks.of("aws:elb/loadBalancer:LoadBalancer") == []  # no Classic ELB beside it
    assert exports["dns"].endswith(".elb.eu-west-1.amazonaws.com")
    assert set(exports) >= {"dnsName", "lbSecurityGroupId", "instanceSecurityGroupId", "proxyProtocolGate",
                            "proxyProtocolPorts", "notReady", "waiting", "gateMessage", "listenerTargets"}


def test_four_target_groups_proxy_v2_exactly_on_the_proxy_ports(aws, monkeypatch):
    mocks, _, _ = run(aws.url, monkeypatch, lb={"deregistrationDelay": 45})
    groups = {g.inputs["port"]: g.inputs for g in mocks.of(TARGET_GROUP)}
    assert sorted(groups) == [80, 81, 82, 83]
    assert {port: g["proxyProtocolV2"] for port, g in groups.items()} == {80: False, 81: False, 82: True, 83: True}
    assert {port: g["name"] for port, g in groups.items()} == {
        80: "wsgate-staging-plain-80", 81: "wsgate-staging-plain-81",
        82: "wsgate-staging-proxy-82", 83: "wsgate-staging-proxy-83"}
    for g in groups.values():
        assert g["protocol"] == "TCP" and g["targetType"] == "instance" and g["vpcId"] == "vpc-0123456789abcdef0"
        assert g["preserveClientIp"] == "false"  # else the world reaches a proxy_protocol port and forges
        assert g["deregistrationDelay"] == 45


def test_health_checks_plain_groups_on_the_health_port_proxy_groups_on_their_own_port(aws, monkeypatch):
    mocks, _, _ = run(aws.url, monkeypatch)
    for port in (80, 81):  # no header: the plain health port, as the Classic ELB's check
        check = mocks.group(port).inputs["healthCheck"]
        got = (check["protocol"], check["port"], check["path"], check["matcher"])
        assert got == ("HTTP", "8081", "/healthz", "200")
    for port in (82, 83):  # a v2 LOCAL header comes with every check: the proxy_protocol port itself
        check = mocks.group(port).inputs["healthCheck"]
        assert (check["protocol"], check["port"]) == ("TCP", "traffic-port") and "path" not in check


def test_listeners_tcp_with_idle_timeout_and_tls_with_certificate_policy_and_http1_alpn(aws, monkeypatch):
    mocks, _, _ = run(aws.url, monkeypatch, lb={"idleTimeout": 900}, **{"wsgate:nginx": {"proxyReadTimeout": 960}})
    tcp, tls = mocks.listener(80).inputs, mocks.listener(443).inputs
    assert tcp["protocol"] == "TCP" and tcp["tcpIdleTimeoutSeconds"] == 900
    assert "certificateArn" not in tcp and "alpnPolicy" not in tcp
    cert = stack_config("staging")["wsgate:loadBalancer"]["certificateArn"]
    assert tls["protocol"] == "TLS" and tls["certificateArn"] == cert
    assert tls["sslPolicy"] == "ELBSecurityPolicy-TLS-1-2-2017-01" and tls["alpnPolicy"] == "HTTP1Only"
    assert "tcpIdleTimeoutSeconds" not in tls  # fixed at 350 on TLS listeners
    assert tcp["loadBalancerArn"] == tls["loadBalancerArn"] == (
        f"arn:aws:elasticloadbalancing:{REGION}:123456789012:loadbalancer/net/wsgate-staging/1")


def test_every_instance_port_is_reachable_only_from_the_load_balancer(aws, monkeypatch):
    mocks, _, _ = run(aws.url, monkeypatch)
    rules = mocks.of(INGRESS)
    instance_rules = [r for r in rules if r.name.startswith("wsgate-staging-instances-")]
    assert sorted(r.inputs["fromPort"] for r in instance_rules) == [80, 81, 82, 83, 8081]
    for r in instance_rules:
        assert "cidrIpv4" not in r.inputs and "cidrIpv6" not in r.inputs
        assert r.inputs["referencedSecurityGroupId"] == "wsgate-staging-lb-id"
    listener_rules = [r for r in rules if r.name.startswith("wsgate-staging-lb-")]
    assert sorted((r.inputs["fromPort"], r.inputs["cidrIpv4"]) for r in listener_rules) == [
        (80, "0.0.0.0/0"), (443, "0.0.0.0/0")]
    to_instances = [r for r in mocks.of(EGRESS) if r.name.startswith("wsgate-staging-lb-to-")]
    assert sorted(r.inputs["fromPort"] for r in to_instances) == [80, 81, 82, 83, 8081]
    assert all(r.inputs["referencedSecurityGroupId"] == "wsgate-staging-instances-id" for r in to_instances)


def test_every_member_is_in_all_four_groups_on_the_groups_port(aws, monkeypatch):
    mocks, _, _ = run(aws.url, monkeypatch)  # gate closed, nothing forwards to proxy: everyone joins
    assert mocks.attached() == {port: INSTANCES for port in (80, 81, 82, 83)}


def test_a_long_load_balancer_name_gives_distinct_target_group_names_of_32_characters_at_most(aws, monkeypatch):
    name = "wsgate-a-rather-long-name-of-32c"
    mocks, _, _ = run(aws.url, monkeypatch, lb={"name": name})
    names = [g.inputs["name"] for g in mocks.of(TARGET_GROUP)]
    assert len(set(names)) == 4 and all(len(n) <= 32 and not n.startswith("-") for n in names)
    assert len(target_group_name(name, PROXY, 65535)) == 32
    # shortened names keep apart load balancers that differ only past the cut
    assert target_group_name(name, PROXY, 82) != target_group_name(name[:-1] + "d", PROXY, 82)


# --- the gate: which group each listener forwards to ---------------------------------------

def test_no_record_both_listeners_forward_to_the_plain_groups(aws, monkeypatch):
    mocks, exports, warnings = run(aws.url, monkeypatch)
    assert (mocks.forwards_to(80), mocks.forwards_to(443)) == (PLAIN, PLAIN)
    assert exports["listenerTargets"] == BOTH_PLAIN and exports["proxyProtocolGate"] == "closed"
    assert set(exports["notReady"]) == set(INSTANCES)
    assert any("NOT attached" in w for w in warnings)


def test_a_record_proving_every_instance_on_the_proxy_ports_switches_both_listeners(aws, monkeypatch):
    nlb_in_aws(aws.url, {80: PLAIN, 443: PLAIN})
    write_record(aws.url, INSTANCES)  # on 82 and 83
    mocks, exports, warnings = run(aws.url, monkeypatch)
    assert (mocks.forwards_to(80), mocks.forwards_to(443)) == (PROXY, PROXY)
    assert exports["listenerTargets"] == BOTH_PROXY and exports["proxyProtocolGate"] == "open"
    assert exports["proxyProtocolPorts"] == [82, 83] and not warnings
    assert mocks.attached() == {port: INSTANCES for port in (80, 81, 82, 83)}  # the plain groups stay whole


def test_a_record_for_the_plain_ports_does_not_switch(aws, monkeypatch):
    """Proof of a header on 80 and 81 says nothing about the proxy ports the groups use."""
    write_record(aws.url, INSTANCES, ports=[80, 81])
    mocks, exports, _ = run(aws.url, monkeypatch)
    assert exports["listenerTargets"] == BOTH_PLAIN
    assert set(exports["notReady"].values()) == {"record lacks port(s) 82, 83"}


def test_a_record_proving_one_port_switches_only_its_listener(aws, monkeypatch):
    write_record(aws.url, INSTANCES, ports=[83])
    mocks, exports, _ = run(aws.url, monkeypatch)
    assert (mocks.forwards_to(80), mocks.forwards_to(443)) == (PLAIN, PROXY)
    assert exports["proxyProtocolGate"] == "closed" and exports["proxyProtocolPorts"] == [83]


@pytest.mark.parametrize("record", [None, INSTANCES[:1]], ids=["missing", "stale"])
def test_listeners_on_proxy_stay_on_proxy_with_a_missing_or_stale_record(aws, monkeypatch, record):
    nlb_in_aws(aws.url, {80: PROXY, 443: PROXY})
    if record:
        write_record(aws.url, record)
    mocks, exports, warnings = run(aws.url, monkeypatch)
    assert (mocks.forwards_to(80), mocks.forwards_to(443)) == (PROXY, PROXY)
    assert exports["proxyProtocolGate"] == "sticky" and exports["listenerTargets"] == BOTH_PROXY
    assert any(w.startswith("KEEPING") for w in warnings)
    # registered ones stay in the proxy groups; the plain groups of listeners that stay on proxy are retired
    assert mocks.attached() == {port: INSTANCES for port in (82, 83)}


def test_a_listener_left_on_proxy_by_a_cut_short_update_is_kept(aws, monkeypatch):
    nlb_in_aws(aws.url, {80: PROXY, 443: PLAIN})
    mocks, exports, _ = run(aws.url, monkeypatch)
    assert (mocks.forwards_to(80), mocks.forwards_to(443)) == (PROXY, PLAIN)
    assert exports["proxyProtocolGate"] == "sticky" and exports["proxyProtocolPorts"] == [82]


def test_a_proxy_port_group_without_proxy_v2_is_not_taken_for_one(aws, monkeypatch):
    """What counts is the attribute AWS reports on the group the listener uses, not its port or name."""
    nlb_in_aws(aws.url, {80: PROXY, 443: PROXY}, proxy_v2=False)
    mocks, exports, _ = run(aws.url, monkeypatch)
    assert exports["listenerTargets"] == BOTH_PLAIN and exports["proxyProtocolGate"] == "closed"


def test_proxy_protocol_off_moves_both_listeners_back_to_plain(aws, monkeypatch):
    nlb_in_aws(aws.url, {80: PROXY, 443: PROXY})
    write_record(aws.url, INSTANCES)
    mocks, exports, _ = run(aws.url, monkeypatch, **{"wsgate:proxyProtocol": "false"})
    assert (mocks.forwards_to(80), mocks.forwards_to(443)) == (PLAIN, PLAIN)
    assert exports["proxyProtocolGate"] == "off" and exports["proxyProtocolPorts"] == []


# --- safe scale-out ------------------------------------------------------------------------

def test_a_new_instance_waits_while_a_listener_forwards_to_proxy_and_joins_once_proven(aws, monkeypatch):
    new = "i-0123456789abcdef9"
    nlb_in_aws(aws.url, {80: PROXY, 443: PROXY})
    write_record(aws.url, INSTANCES)
    lb = {"instances": [*INSTANCES, new]}
    mocks, exports, warnings = run(aws.url, monkeypatch, lb=lb)
    assert mocks.attached() == {port: INSTANCES for port in (82, 83)}  # in no group at all (plain ones retired)
    assert exports["proxyProtocolGate"] == "open" and exports["listenerTargets"] == BOTH_PROXY
    assert any(w.startswith(f"{new} waits to join: not in the readiness record") for w in warnings)
    write_record(aws.url, [*INSTANCES, new])  # `fab rollout` proved it
    mocks, exports, _ = run(aws.url, monkeypatch, lb=lb)
    assert mocks.attached() == {port: sorted([*INSTANCES, new]) for port in (82, 83)}


def test_an_instance_only_in_an_unused_group_is_not_taken_as_registered(aws, monkeypatch):
    """The plain groups send nothing while the listeners forward to proxy: an instance that is only
    there has proven nothing and must not be added to the proxy groups."""
    other = "i-0123456789abcdef9"
    everyone = {key: INSTANCES for key in ("http-plain", "tls-plain", "http-proxy", "tls-proxy")}
    nlb_in_aws(aws.url, {80: PROXY, 443: PROXY},
               registered={**everyone, "http-plain": [*INSTANCES, other], "tls-plain": [*INSTANCES, other]})
    write_record(aws.url, INSTANCES)
    mocks, exports, _ = run(aws.url, monkeypatch, lb={"instances": [*INSTANCES, other]})
    assert mocks.attached() == {port: INSTANCES for port in (82, 83)}
    assert other in exports["waiting"]


def test_with_both_listeners_on_plain_every_instance_joins(aws, monkeypatch):
    new = "i-0123456789abcdef9"
    nlb_in_aws(aws.url, {80: PLAIN, 443: PLAIN})
    mocks, exports, _ = run(aws.url, monkeypatch, lb={"instances": [*INSTANCES, new]})
    assert mocks.attached() == {port: sorted([*INSTANCES, new]) for port in (80, 81, 82, 83)}
    assert exports["waiting"] == {} and exports["listenerTargets"] == BOTH_PLAIN


# --- the ELBv2 reads -----------------------------------------------------------------------

def test_the_elbv2_state_as_the_gate_reads_it(aws):
    s = settings_for(aws.url)
    assert awsapi.network.network_state(s) is None and awsapi.balancer.header_ports(s) == []
    nlb_in_aws(aws.url, {80: PLAIN, 443: PROXY}, registered={"tls-proxy": INSTANCES[:1], "http-plain": INSTANCES})
    state = awsapi.network.network_state(s)
    assert state is not None
    assert {port: [(g.name, g.port, g.proxy_protocol_v2, g.targets) for g in groups]
            for port, groups in state.listeners.items()} == {
        80: [("wsgate-staging-plain-80", 80, False, tuple(INSTANCES))],
        443: [("wsgate-staging-proxy-83", 83, True, tuple(INSTANCES[:1]))]}
    assert awsapi.balancer.header_ports(s) == [83] and state.serving == INSTANCES


def test_a_network_environment_is_the_lab_only_with_every_endpoint_on_loopback(aws):
    assert awsapi.clients.is_lab(settings_for(aws.url))
    without = [{s: aws.url for s in ("ec2", "elb", "ssm")}]
    assert not awsapi.clients.is_lab(settings_from("staging", **{"aws:endpoints": without,
                                                             "wsgate:loadBalancer": network_lb()}))
    real = [{**without[0], "elbv2": "https://elasticloadbalancing.eu-west-1.amazonaws.com"}]
    assert not awsapi.clients.is_lab(settings_from("staging", **{"aws:endpoints": real,
                                                             "wsgate:loadBalancer": network_lb()}))
    assert awsapi.clients.is_lab(settings_from("lab"))  # the shipped lab (classic) still is


# --- pure: forwarding ----------------------------------------------------------------------

@pytest.mark.parametrize("ports, expected", [
    ((), {80: PLAIN, 443: PLAIN}),
    ((82, 83), {80: PROXY, 443: PROXY}),
    ((83,), {80: PLAIN, 443: PROXY}),
    ((80, 81), {80: PLAIN, 443: PLAIN}),  # the plain ports are never the proxy groups'
    ((82, 83, 90), {80: PROXY, 443: PROXY}),
])
def test_network_forwarding(ports, expected):
    assert network_forwarding(ports, settings_from("staging", load_balancer=network_lb())) == expected


def test_a_proxy_port_changed_in_the_settings_forwards_plain_until_proven(aws, monkeypatch):
    nlb_in_aws(aws.url, {80: PROXY, 443: PROXY})  # on 82 and 83
    write_record(aws.url, INSTANCES, ports=[82, 83])
    ports = {**stack_config("staging")["wsgate:ports"], "proxyHttp": 84}
    mocks, exports, warnings = run(aws.url, monkeypatch, **{"wsgate:ports": ports})
    assert (mocks.forwards_to(80), mocks.forwards_to(443)) == (PLAIN, PROXY)
    assert any("no longer ports.proxyHttp/proxyTls" in w for w in warnings)


# --- settings ------------------------------------------------------------------------------

def refused(**lb_and_changes) -> str:
    changes = {k: v for k, v in lb_and_changes.items() if k != "lb"}
    with pytest.raises(SettingsError) as info:
        settings_from("staging", **{"wsgate:loadBalancer": network_lb(**lb_and_changes.get("lb", {}))}, **changes)
    return str(info.value)


@pytest.mark.parametrize("lb, changes, message", [
    ({"vpcId": None}, {},
     "Pulumi.staging.yaml: wsgate:loadBalancer: a network load balancer needs vpcId (the VPC of its target groups "
     "and security groups)"),
    ({"subnets": [], "availabilityZones": ["eu-west-1a"]}, {},
     "Pulumi.staging.yaml: wsgate:loadBalancer: a network load balancer is placed by subnets, not availabilityZones"),
    ({"subnets": []}, {},
     "Pulumi.staging.yaml: wsgate:loadBalancer: a network load balancer needs subnets (one per availability zone)"),
    ({"idleTimeout": 59}, {},
     "Pulumi.staging.yaml: wsgate:loadBalancer.idleTimeout = 59: a network load balancer's TCP listener takes "
     "60-6000 seconds (its TLS listener is fixed at 350)"),
    ({"idleTimeout": 6001}, {},
     "Pulumi.staging.yaml: wsgate:loadBalancer.idleTimeout = 6001: a network load balancer's TCP listener takes "
     "60-6000 seconds (its TLS listener is fixed at 350)"),
    ({"deregistrationDelay": 3601}, {},
     "Pulumi.staging.yaml: wsgate:loadBalancer.deregistrationDelay = 3601: Input should be less than or equal to 3600"),
    ({"alpnPolicy": "HTTP2Preferred"}, {},
     "Pulumi.staging.yaml: wsgate:loadBalancer.alpnPolicy = 'HTTP2Preferred': Input should be 'None' or 'HTTP1Only'"),
    ({}, {"ports": {"proxyHttp": 81}},
     "Pulumi.staging.yaml: wsgate:ports: port 81 is used by both ports.tls and ports.proxyHttp"),
    ({}, {"ports": {"proxyTls": 8081}},
     "Pulumi.staging.yaml: wsgate:ports: port 8081 is used by both ports.health and ports.proxyTls"),
    ({}, {"ports": {"proxyHttp": 90, "proxyTls": 90}},
     "Pulumi.staging.yaml: wsgate:ports: port 90 is used by both ports.proxyHttp and ports.proxyTls"),
    ({}, {"ports": {"tls": 82}},  # a default proxy port: checked because a network load balancer uses it
     "Pulumi.staging.yaml: port 82 is used by both ports.tls and ports.proxyHttp (a network load balancer uses "
     "ports.proxyHttp and ports.proxyTls too)"),
    ({"idleTimeout": 60}, {"nginx": {"proxyReadTimeout": 300}},
     "Pulumi.staging.yaml: nginx.proxyReadTimeout (300) must be >= the network load balancer's longest idle timeout "
     "(350: loadBalancer.idleTimeout for TCP, 350 fixed for TLS), or nginx closes idle WebSockets the load balancer "
     "still holds open"),
    ({"type": "application"}, {},
     "Pulumi.staging.yaml: wsgate:loadBalancer.type = 'application': Input should be 'classic' or 'network'"),
])
def test_network_settings_are_refused_with_the_key_named(lb, changes, message):
    assert refused(lb=lb, **changes) == message


def test_network_settings_defaults_and_timeouts():
    s = settings_from("staging", load_balancer=network_lb(idleTimeout=60))
    lb = s.load_balancer
    assert (lb.type, lb.deregistration_delay, lb.alpn_policy) == ("network", 30, "HTTP1Only")
    assert s.proxy_ports == (82, 83) and s.ports.proxied == (80, 81)
    assert s.lb_idle_timeout == 350 and s.read_timeout == s.send_timeout == 410  # TLS listener: 350 s
    assert settings_from("staging", load_balancer=network_lb(idleTimeout=6000)).read_timeout == 6060


def test_classic_is_the_default_and_keeps_its_ports_and_limits():
    s = settings_from("staging")
    assert s.load_balancer.type == "classic" and s.proxy_ports == s.ports.proxied == (80, 81)
    assert s.lb_idle_timeout == 300 and s.read_timeout == 360
    assert settings_from("staging", ports={"tls": 82}).ports.tls == 82  # classic never uses the proxy ports
    with pytest.raises(SettingsError, match=r"wsgate:loadBalancer.idleTimeout = 3601: Input should be less than or "
                                            r"equal to 3600$"):
        settings_from("staging", load_balancer={"idleTimeout": 3601})
    lab = settings_from("lab")
    assert (lab.ports.proxy_http, lab.ports.proxy_tls) == (18083, 18084)


def test_classic_environments_still_build_a_classic_elb(aws, monkeypatch):
    mocks, exports, _ = run(aws.url, monkeypatch, lb={"type": "classic"})
    assert len(mocks.of("aws:elb/loadBalancer:LoadBalancer")) == 1
    assert mocks.of(NLB) == mocks.of(TARGET_GROUP) == mocks.of(LISTENER) == []
    assert "listenerTargets" not in exports


@pytest.mark.parametrize("lb, reason", [
    ({"internal": True}, "loadBalancer.internal: true, the live load balancer is internet-facing"),
    ("one subnet", "would be removed (a network load balancer's subnets can only be added)"),
])
def test_a_change_that_would_replace_the_live_network_load_balancer_is_refused(aws, monkeypatch, lb, reason):
    from core.errors import KitError

    nlb_in_aws(aws.url, {80: PLAIN, 443: PLAIN})
    elbv2 = boto3.client("elbv2", region_name=REGION, endpoint_url=aws.url)
    (live,) = elbv2.describe_load_balancers(Names=["wsgate-staging"])["LoadBalancers"]
    subnets = [z["SubnetId"] for z in live["AvailabilityZones"]]
    placed = {"vpcId": live["VpcId"], "subnets": subnets[:1] if lb == "one subnet" else subnets,
              **(lb if isinstance(lb, dict) else {})}
    with pytest.raises(KitError) as caught:
        run(aws.url, monkeypatch, lb=placed)
    assert "would replace the live load balancer wsgate-staging" in str(caught.value) and reason in str(caught.value)
    assert "Subnets: add new ones only" in str(caught.value)


def test_an_instance_left_in_a_proxy_group_holds_the_switch_back_until_it_is_gone(aws, monkeypatch):
    """A cut-short update left an unconfigured instance in the proxy groups (its deregistration is
    not ordered before the listener switch): the listeners stay plain until it has left."""
    left = "i-0123456789abcdef9"
    everyone = {key: INSTANCES for key in ("http-plain", "tls-plain", "http-proxy", "tls-proxy")}
    nlb_in_aws(aws.url, {80: PLAIN, 443: PLAIN},
               registered={**everyone, "http-proxy": [*INSTANCES, left], "tls-proxy": [*INSTANCES, left]})
    write_record(aws.url, INSTANCES)
    mocks, exports, warnings = run(aws.url, monkeypatch)
    assert exports["listenerTargets"] == BOTH_PLAIN and exports["proxyProtocolGate"] == "closed"
    assert exports["notReady"] == {left: "not in the readiness record"}
    assert mocks.attached() == {port: INSTANCES for port in (80, 81, 82, 83)}  # and it is taken out


def test_switching_the_kind_of_a_live_load_balancer_is_refused(aws, monkeypatch):
    """A Classic ELB of this name would be deleted (and its hosts' header ports misread): refused
    by the program and by the read every `fab rollout` makes."""
    from awsapi.balancer import header_ports
    from core.errors import KitError

    elb = boto3.client("elb", region_name=REGION, endpoint_url=aws.url)
    elb.create_load_balancer(LoadBalancerName="wsgate-staging", AvailabilityZones=[f"{REGION}a"], Listeners=[
        {"Protocol": "TCP", "LoadBalancerPort": 80, "InstanceProtocol": "TCP", "InstancePort": 80}])
    with pytest.raises(KitError, match="a Classic ELB named wsgate-staging exists, and loadBalancer.type is network"):
        run(aws.url, monkeypatch)
    with pytest.raises(KitError, match="changing the kind would delete the live load balancer"):
        header_ports(settings_for(aws.url))


def test_a_classic_environment_is_refused_over_a_network_load_balancer_of_its_name_but_not_over_an_alb(aws):
    ec2 = boto3.client("ec2", region_name=REGION, endpoint_url=aws.url)
    elbv2 = boto3.client("elbv2", region_name=REGION, endpoint_url=aws.url)
    vpc = ec2.create_vpc(CidrBlock="10.7.0.0/16")["Vpc"]["VpcId"]
    subnets = [ec2.create_subnet(VpcId=vpc, CidrBlock=f"10.7.{i}.0/24", AvailabilityZone=f"{REGION}{z}")
               ["Subnet"]["SubnetId"] for i, z in ((1, "a"), (2, "b"))]
    elbv2.create_load_balancer(Name="web-alb", Subnets=subnets, Type="application")
    elbv2.create_load_balancer(Name="web-nlb", Subnets=subnets, Type="network")

    def classic(name):
        return settings_from("staging", **{"aws:endpoints": endpoints(aws.url),
                                           "wsgate:loadBalancer": {**stack_config("staging")["wsgate:loadBalancer"],
                                                                   "name": name}})

    assert not awsapi.balancer.other_kind(classic("web-alb"))
    awsapi.balancer.refuse_replacement(classic("web-alb"))  # an ALB of that name is not in the way
    assert awsapi.balancer.other_kind(classic("web-nlb"))
    refused = "a network load balancer named web-nlb exists, and loadBalancer.type is classic"
    with pytest.raises(KitError, match=refused):
        awsapi.balancer.refuse_replacement(classic("web-nlb"))


# --- retiring the plain groups, and coming back to them -------------------------------------------

def test_the_update_that_switches_to_proxy_keeps_the_plain_groups(aws, monkeypatch):
    """The switch and the retirement are never one update: until the listener is seen on its proxy
    group, established flows and nodes still behind may use the plain group."""
    nlb_in_aws(aws.url, {80: PLAIN, 443: PLAIN})
    write_record(aws.url, INSTANCES)
    mocks, exports, _ = run(aws.url, monkeypatch)
    assert exports["listenerTargets"] == BOTH_PROXY and exports["retiredPlainGroups"] == []
    assert mocks.attached() == {port: INSTANCES for port in (80, 81, 82, 83)}


def test_an_update_after_the_switch_retires_the_plain_groups(aws, monkeypatch):
    nlb_in_aws(aws.url, {80: PROXY, 443: PROXY})
    write_record(aws.url, INSTANCES)
    mocks, exports, _ = run(aws.url, monkeypatch)
    assert exports["listenerTargets"] == BOTH_PROXY
    assert exports["retiredPlainGroups"] == ["http-plain", "tls-plain"]
    assert mocks.attached() == {port: INSTANCES for port in (82, 83)}  # deregistered: AWS drains them


def as_declared(aws_url: str, mocks: NetworkRecorder) -> None:
    """The listeners 80 and 443 changed in AWS as the program declared them (what `pulumi up` does):
    their default action and their switch time tag."""
    s = settings_for(aws_url)
    elbv2 = boto3.client("elbv2", region_name=REGION, endpoint_url=aws_url)
    (lb,) = elbv2.describe_load_balancers(Names=[s.load_balancer.name])["LoadBalancers"]
    groups = {g["TargetGroupName"]: g["TargetGroupArn"] for g in elbv2.describe_target_groups()["TargetGroups"]}
    for live in elbv2.describe_listeners(LoadBalancerArn=lb["LoadBalancerArn"])["Listeners"]:
        if live["Port"] not in (80, 443):
            continue
        declared = mocks.listener(live["Port"]).inputs
        (action,) = declared["defaultActions"]
        elbv2.modify_listener(ListenerArn=live["ListenerArn"], DefaultActions=[
            {"Type": "forward", "TargetGroupArn": groups[action["targetGroupArn"].rsplit("/", 2)[-2]]}])
        if SWITCHED_TAG in declared["tags"]:
            elbv2.add_tags(ResourceArns=[live["ListenerArn"]],
                           Tags=[{"Key": SWITCHED_TAG, "Value": declared["tags"][SWITCHED_TAG]}])
        else:
            elbv2.remove_tags(ResourceArns=[live["ListenerArn"]], TagKeys=[SWITCHED_TAG])


def test_a_plain_group_is_retired_only_switch_drain_after_the_switch_by_the_listeners_tag(aws, monkeypatch):
    """A proxy group its warm listener kept checked reads `healthy` the moment its listener switches
    (moto says `healthy` throughout), while the load balancer's nodes may still send new connections
    to the plain group for `loadBalancer.switchDrain` seconds. The switching update tags each listener
    with the time; an update seconds later keeps the plain groups and that time; once the tag is
    switchDrain old (moved back here through the ELBv2 API, as a clock) the next update retires them."""
    nlb_in_aws(aws.url, {80: PLAIN, 443: PLAIN})
    write_record(aws.url, INSTANCES)
    drain = settings_for(aws.url).load_balancer.switch_drain
    before = time.time()
    mocks, exports, warnings = run(aws.url, monkeypatch)  # the switch
    assert exports["listenerTargets"] == BOTH_PROXY and exports["retiredPlainGroups"] == []
    assert set(exports["retireWaiting"]) == {"80", "443"} and not warnings  # said, not warned: the kit's pace
    as_declared(aws.url, mocks)
    tags = switch_tags(aws.url)
    assert all(before - 1 <= (stamped(tag) or 0) <= time.time() for tag in tags.values()), tags

    mocks, exports, _ = run(aws.url, monkeypatch)  # seconds later (CI, or a second `fab rollout --apply`)
    assert exports["listenerTargets"] == BOTH_PROXY and exports["retiredPlainGroups"] == []
    assert mocks.attached() == {port: INSTANCES for port in (80, 81, 82, 83)}  # nobody deregistered
    assert {port: mocks.listener(port).inputs["tags"][SWITCHED_TAG] for port in (80, 443)} == tags  # AWS's time
    until = stamp((stamped(tags[80]) or 0) + drain)
    assert f"kept (not retired) until {until}" in exports["retireWaiting"]["80"]
    as_declared(aws.url, mocks)
    assert switch_tags(aws.url) == tags

    for port in (80, 443):
        switched_at(aws.url, port, time.time() - drain - 1)
    aged = switch_tags(aws.url)
    mocks, exports, _ = run(aws.url, monkeypatch)
    assert exports["retiredPlainGroups"] == ["http-plain", "tls-plain"] and exports["retireWaiting"] == {}
    assert mocks.attached() == {port: INSTANCES for port in (82, 83)}  # deregistered: AWS drains them
    assert {port: mocks.listener(port).inputs["tags"][SWITCHED_TAG] for port in (80, 443)} == aged  # kept


def test_a_listener_on_proxy_without_the_switch_tag_counts_as_switched_now(aws, monkeypatch):
    """Switched by an older kit, or by hand: no proof from AWS when, so the update tags it with its
    own time and keeps the plain group for switchDrain from then."""
    nlb_in_aws(aws.url, {80: PROXY, 443: PROXY}, switched_ago=None)
    write_record(aws.url, INSTANCES)
    before = time.time()
    mocks, exports, _ = run(aws.url, monkeypatch)
    assert exports["listenerTargets"] == BOTH_PROXY and exports["retiredPlainGroups"] == []
    assert mocks.attached() == {port: INSTANCES for port in (80, 81, 82, 83)}
    at = {stamped(mocks.listener(port).inputs["tags"][SWITCHED_TAG]) or 0 for port in (80, 443)}
    assert all(before - 1 <= x <= time.time() for x in at)
    assert "loadBalancer.switchDrain (75 s)" in exports["retireWaiting"]["443"]


def test_a_listener_moving_back_to_its_plain_group_loses_its_switch_tag(aws, monkeypatch):
    nlb_in_aws(aws.url, {80: PROXY, 443: PROXY})
    write_record(aws.url, INSTANCES, plain=[80, 81])
    mocks, exports, _ = run(aws.url, monkeypatch, **{"wsgate:proxyProtocol": "false"})
    assert exports["listenerTargets"] == BOTH_PLAIN
    assert not any(SWITCHED_TAG in mocks.listener(port).inputs["tags"] for port in (80, 443))
    assert exports["retireWaiting"] == {}


def test_only_the_listener_on_proxy_retires_its_plain_group(aws, monkeypatch):
    nlb_in_aws(aws.url, {80: PROXY, 443: PLAIN})
    write_record(aws.url, INSTANCES, ports=[82])
    mocks, exports, _ = run(aws.url, monkeypatch)
    assert exports["retiredPlainGroups"] == ["http-plain"]
    assert mocks.attached() == {port: INSTANCES for port in (81, 82, 83)}


def test_a_retired_plain_group_is_not_used_again_without_proof_of_the_plain_port(aws, monkeypatch):
    """proxyProtocol turned off by hand while the hosts no longer serve the plain ports: the program
    stops before declaring anything (moving back would fail every request)."""
    retired = {"http-plain": [], "tls-plain": [], "http-proxy": INSTANCES, "tls-proxy": INSTANCES}
    nlb_in_aws(aws.url, {80: PROXY, 443: PROXY}, registered=retired)
    write_record(aws.url, INSTANCES, plain=[])  # the record of the rollout that dropped them
    with pytest.raises(Exception, match="plain target group, which was retired.*fab rollout --apply"):
        run(aws.url, monkeypatch, **{"wsgate:proxyProtocol": "false"})


def test_a_retired_plain_group_is_used_again_once_the_record_proves_the_plain_ports(aws, monkeypatch):
    """The first step of `fab rollout --apply` turning off: the hosts serve both port sets again and
    the record proves it; the members register in the plain groups, and the listeners move there
    only in a later update, once AWS says every one of them healthy (test_warm_listener.py)."""
    retired = {"http-plain": [], "tls-plain": [], "http-proxy": INSTANCES, "tls-proxy": INSTANCES}
    nlb_in_aws(aws.url, {80: PROXY, 443: PROXY}, registered=retired)
    write_record(aws.url, INSTANCES, plain=[80, 81])
    mocks, exports, _ = run(aws.url, monkeypatch, **{"wsgate:proxyProtocol": "false"})
    assert exports["listenerTargets"] == BOTH_PROXY and exports["retiredPlainGroups"] == []
    assert all("not registered yet" in why for why in exports["healthWaiting"].values())
    assert mocks.attached() == {port: INSTANCES for port in (80, 81, 82, 83)}


def test_a_changed_proxy_port_is_refused_while_its_plain_group_is_retired(aws, monkeypatch):
    """The gate cannot keep a listener on a proxy port that is no longer configured, and its plain
    group was retired: the program stops, and says to put the proxy port back."""
    retired = {"http-plain": [], "tls-plain": [], "http-proxy": INSTANCES, "tls-proxy": INSTANCES}
    nlb_in_aws(aws.url, {80: PROXY, 443: PROXY}, registered=retired)
    write_record(aws.url, INSTANCES, plain=[])
    with pytest.raises(Exception, match="listener 80 .*put the proxy ports back"):
        run(aws.url, monkeypatch, **{"wsgate:ports": {**stack_config("staging").get("wsgate:ports", {}),
                                                        "proxyHttp": 92}})


def test_a_missing_record_is_named_when_a_retired_plain_group_cannot_be_used_again(aws, monkeypatch):
    retired = {"http-plain": [], "tls-plain": [], "http-proxy": INSTANCES, "tls-proxy": INSTANCES}
    nlb_in_aws(aws.url, {80: PROXY, 443: PROXY}, registered=retired)
    with pytest.raises(Exception, match="no readiness record at /wsgate/staging/readiness"):
        run(aws.url, monkeypatch, **{"wsgate:proxyProtocol": "false"})


def test_a_withdrawn_plain_port_stays_withdrawn_when_a_host_could_not_be_put_back(aws):
    """The rollout that drops plain ports takes them out of the record before any host goes live.
    Every host put back after a failure: the record is as it was. With a host not put back (it
    may serve them no more): the record keeps the withdrawal."""
    from remote.readiness import ParameterRecord

    class Notes:
        def note(self, line):
            pass

    s = settings_for(aws.url)
    write_record(aws.url, INSTANCES, plain=[80, 81])
    original = awsapi.parameters.read_record_text(s)
    for all_back, plain in ((True, [80, 81]), (False, [81])):
        record = ParameterRecord(s, Notes())
        record.withdraw_plain({80})
        assert awsapi.parameters.read_record(s).plain_ports == [81]
        record.undo(all_back)
        assert awsapi.parameters.read_record(s).plain_ports == plain
        if all_back:
            assert awsapi.parameters.read_record_text(s) == original
        else:
            write_record(aws.url, INSTANCES, plain=[80, 81])


def test_an_empty_plain_group_of_a_listener_not_on_proxy_is_not_taken_for_a_retired_one(aws, monkeypatch):
    """A first update cut short before the plain registrations (or with the listeners on plain): the
    empty plain groups are filled, never refused as retired."""
    empty = {"http-plain": [], "tls-plain": [], "http-proxy": INSTANCES, "tls-proxy": INSTANCES}
    nlb_in_aws(aws.url, {80: PLAIN, 443: PLAIN}, registered=empty)
    mocks, exports, _ = run(aws.url, monkeypatch, **{"wsgate:proxyProtocol": "false"})
    assert exports["listenerTargets"] == BOTH_PLAIN
    assert mocks.attached() == {port: INSTANCES for port in (80, 81, 82, 83)}
