"""The Pulumi program under Pulumi's mock runtime, with the gate fed by a real record.

The readiness record is written by the same code `fab rollout` uses (awsapi/parameters.py) into a
real AWS API endpoint on loopback (moto server); the program's Parameter Store invokes are
answered from that endpoint. So the two halves cannot drift apart.
"""

from __future__ import annotations

import boto3
import pulumi
import pytest

import awsapi.parameters
from core import record as records
from tests.conftest import settings_from, stack_config
from tests.support.program import run_program

LB = "aws:elb/loadBalancer:LoadBalancer"
BACKEND_POLICY = "aws:elb/loadBalancerBackendServerPolicy:LoadBalancerBackendServerPolicy"
POLICY = "aws:elb/loadBalancerPolicy:LoadBalancerPolicy"
INGRESS = "aws:vpc/securityGroupIngressRule:SecurityGroupIngressRule"
ATTACHMENT = "aws:elb/attachment:Attachment"
PARAMETER = "aws:ssm/parameter:Parameter"
STAGING_INSTANCES = ["i-0123456789abcdef0", "i-0123456789abcdef1"]


class Recorder(pulumi.runtime.Mocks):
    """Records every resource; answers Parameter Store invokes from the loopback AWS endpoint."""

    def __init__(self, ssm):
        self.resources: list[pulumi.runtime.MockResourceArgs] = []
        self.ssm = ssm
        self.decrypted: list[bool] = []

    def new_resource(self, args):
        self.resources.append(args)
        outputs = dict(args.inputs)
        if args.typ == LB:
            outputs["dnsName"] = f"{args.inputs['name']}-123.eu-west-1.elb.amazonaws.com"
        return [f"{args.name}-id", outputs]

    def call(self, args):
        if args.token == "aws:ssm/getParametersByPath:getParametersByPath":
            decrypt = args.args.get("withDecryption", True)
            self.decrypted.append(decrypt)
            # every page, as the provider reads them (10 a page by default)
            found = [p for page in self.ssm.get_paginator("get_parameters_by_path").paginate(
                Path=args.args["path"], Recursive=False, WithDecryption=decrypt) for p in page["Parameters"]]
            return {"path": args.args["path"], "id": args.args["path"], "names": [p["Name"] for p in found],
                    "values": [p["Value"] for p in found], "types": [p["Type"] for p in found],
                    "arns": [p["ARN"] for p in found], "withDecryption": decrypt, "recursive": False}
        raise NotImplementedError(args.token)

    def of(self, typ):
        return [r for r in self.resources if r.typ == typ]


def run(env: str, aws_url: str, **changes):
    """Run the real program for `env` (with config changes); return (recorder, exports, warnings)."""
    config = stack_config(env)
    config["aws:endpoints"] = [{s: aws_url for s in ("ec2", "elb", "ssm", "sts")}]
    config.pop("wsgate:dns", None)  # the service's DNS records: tests/test_program_move.py
    for key, value in changes.items():
        config[key] = value
    _live_placement(config, aws_url)
    mocks = Recorder(boto3.client("ssm", region_name=config["aws:region"], endpoint_url=aws_url))

    def body(prog, exports):
        lb = prog.main()
        decision = prog.gate_plan(prog.settings()).decision
        exports.update(state=decision.state.value, missing=decision.missing, message=decision.message)
        return lb.dns_name.apply(lambda dns: exports.update(dns=dns))

    exports, warnings = run_program(mocks, config, body, stack=env)
    return mocks, exports, warnings


def _live_placement(config: dict, aws_url: str) -> None:
    """Where a test made the live load balancer in the endpoint (its subnets are the endpoint's
    own), the shipped placement stands for it: the settings describe that load balancer."""
    lb = config.get("wsgate:loadBalancer") or {}
    shipped = stack_config("staging")["wsgate:loadBalancer"]
    if lb.get("subnets") != shipped["subnets"] or lb.get("vpcId") != shipped["vpcId"]:
        return
    elb = boto3.client("elb", region_name=config["aws:region"], endpoint_url=aws_url)
    try:
        live = elb.describe_load_balancers(LoadBalancerNames=[lb["name"]])["LoadBalancerDescriptions"][0]
    except elb.exceptions.AccessPointNotFoundException:
        return
    config["wsgate:loadBalancer"] = {**lb, "subnets": live["Subnets"], "vpcId": live["VPCId"]}


def settings_for(env, aws_url):
    return settings_from(env, **{"aws:endpoints": [{s: aws_url for s in ("ec2", "elb", "ssm", "sts")}]})


def write_record(env, aws_url, instances, ports=None, digest="d" * 64):
    s = settings_for(env, aws_url)
    served = {i: digest for i in instances}
    awsapi.parameters.write_record(s, records.build(env, ports or list(s.ports.proxied), served))


def mark_attached(env, aws_url, ports=None, registered=None):
    """The load balancer as a previous `pulumi up` (complete, or cut short) left it in AWS: the
    ProxyProtocol policy on `ports` (default: both proxied ports), `registered` instances
    (default: the environment's)."""
    s = settings_for(env, aws_url)
    name = s.load_balancer.name
    elb = boto3.client("elb", region_name=s.aws.region, endpoint_url=aws_url)
    elb.create_load_balancer(LoadBalancerName=name, AvailabilityZones=[f"{s.aws.region}a"], Listeners=[
        {"Protocol": "TCP", "LoadBalancerPort": 80, "InstanceProtocol": "TCP", "InstancePort": s.ports.http},
        {"Protocol": "TCP", "LoadBalancerPort": 443, "InstanceProtocol": "TCP", "InstancePort": s.ports.tls}])
    elb.create_load_balancer_policy(LoadBalancerName=name, PolicyName=f"{name}-proxy-protocol",
                                    PolicyTypeName="ProxyProtocolPolicyType",
                                    PolicyAttributes=[{"AttributeName": "ProxyProtocol", "AttributeValue": "true"}])
    for port in list(s.ports.proxied) if ports is None else ports:
        elb.set_load_balancer_policies_for_backend_server(LoadBalancerName=name, InstancePort=port,
                                                          PolicyNames=[f"{name}-proxy-protocol"])
    members = list(s.load_balancer.instances) if registered is None else registered
    if members:
        elb.register_instances_with_load_balancer(LoadBalancerName=name,
                                                  Instances=[{"InstanceId": i} for i in members])


def proxy_ports(mocks) -> list[int]:
    return sorted(r.inputs["instancePort"] for r in mocks.of(BACKEND_POLICY))


# --- the resource graph a user cares about -------------------------------------------------

@pytest.mark.parametrize("env,http,tls,health", [("staging", 80, 81, 8081), ("lab", 18080, 18081, 18082)])
def test_listeners_health_check_and_idle_timeout(aws, env, http, tls, health):
    mocks, exports, _ = run(env, aws.url)
    (lb,) = mocks.of(LB)
    listeners = sorted(lb.inputs["listeners"], key=lambda x: x["lbPort"])
    assert [(x["lbPort"], x["lbProtocol"], x["instancePort"], x["instanceProtocol"]) for x in listeners] == [
        (80, "tcp", http, "tcp"), (443, "ssl", tls, "tcp")]
    assert listeners[1]["sslCertificateId"].startswith("arn:aws:")
    assert lb.inputs["healthCheck"]["target"] == f"HTTP:{health}/healthz"
    assert lb.inputs["idleTimeout"] == settings_from(env).load_balancer.idle_timeout
    assert exports["dns"].endswith(".elb.amazonaws.com")


def test_staging_places_the_elb_in_subnets_with_draining_and_cross_zone(aws):
    mocks, _, _ = run("staging", aws.url)
    (lb,) = mocks.of(LB)
    assert lb.inputs["subnets"] == ["subnet-0123456789abcdef0", "subnet-0fedcba9876543210"]
    assert lb.inputs["internal"] is False
    assert lb.inputs["crossZoneLoadBalancing"] is True
    assert lb.inputs["connectionDraining"] is True and lb.inputs["connectionDrainingTimeout"] == 300
    assert sorted(a.inputs["instance"] for a in mocks.of(ATTACHMENT)) == STAGING_INSTANCES
    assert "instances" not in lb.inputs  # one attachment mechanism only


def test_tls_listener_uses_the_configured_security_policy(aws):
    mocks, _, _ = run("staging", aws.url)
    tls = [p for p in mocks.of(POLICY) if p.inputs["policyTypeName"] == "SSLNegotiationPolicyType"]
    assert tls[0].inputs["policyAttributes"] == [
        {"name": "Reference-Security-Policy", "value": "ELBSecurityPolicy-TLS-1-2-2017-01"}]


def test_instance_ports_are_reachable_only_from_the_load_balancer(aws):
    mocks, _, _ = run("staging", aws.url)
    rules = mocks.of(INGRESS)
    instance_rules = [r for r in rules if r.name.startswith("wsgate-staging-instances-")]
    assert sorted(r.inputs["fromPort"] for r in instance_rules) == [80, 81, 8081]
    for r in instance_rules:
        assert "cidrIpv4" not in r.inputs and "cidrIpv6" not in r.inputs
        assert r.inputs["referencedSecurityGroupId"] == "wsgate-staging-lb-id"
    listener_rules = [r for r in rules if r.name.startswith("wsgate-staging-lb-")]
    assert sorted(r.inputs["fromPort"] for r in listener_rules) == [80, 443]
    assert not any(r.inputs.get("cidrIpv4") == "0.0.0.0/0" and r.inputs["fromPort"] in (80, 81, 8081)
                   and r in instance_rules for r in rules)


# --- the gate, per state -------------------------------------------------------------------

def test_gate_closed_without_a_record(aws):
    mocks, exports, warnings = run("staging", aws.url)
    assert exports["state"] == "closed"
    assert proxy_ports(mocks) == [] and not [p for p in mocks.of(POLICY)
                                             if p.inputs["policyTypeName"] == "ProxyProtocolPolicyType"]
    assert set(exports["missing"]) == set(STAGING_INSTANCES)
    assert any("NOT attached" in w and STAGING_INSTANCES[0] in w for w in warnings)


def test_gate_closed_with_a_partial_record(aws):
    mark_attached("staging", aws.url, ports=[])  # every instance registered, nothing attached yet
    write_record("staging", aws.url, STAGING_INSTANCES[:1])
    mocks, exports, warnings = run("staging", aws.url)
    assert exports["state"] == "closed" and proxy_ports(mocks) == []
    assert exports["missing"] == {STAGING_INSTANCES[1]: "not in the readiness record"}
    assert any(STAGING_INSTANCES[1] in w for w in warnings)


def test_gate_attaches_only_the_proven_port_when_the_record_lacks_one(aws):
    mark_attached("staging", aws.url, ports=[])
    write_record("staging", aws.url, STAGING_INSTANCES, ports=[80])
    mocks, exports, _ = run("staging", aws.url)
    assert exports["state"] == "closed" and proxy_ports(mocks) == [80]
    assert set(exports["missing"].values()) == {"record lacks port(s) 81"}


@pytest.mark.parametrize("left", [[80], [81], [80, 81]])
def test_a_policy_left_on_any_port_by_a_cut_short_update_is_kept_with_a_stale_record(aws, left):
    """Whatever a previous update managed to attach before it failed (the policy, one port, both),
    a later run with a stale or missing record keeps exactly that: AWS is read, not a marker."""
    mark_attached("staging", aws.url, ports=left)
    write_record("staging", aws.url, STAGING_INSTANCES[:1])  # stale: one backend missing
    mocks, exports, warnings = run("staging", aws.url)
    assert exports["state"] == "sticky" and proxy_ports(mocks) == left
    assert any(w.startswith("KEEPING the ProxyProtocol policy") for w in warnings)


def test_a_changed_tls_port_is_attached_only_once_proven(aws):
    mark_attached("staging", aws.url)  # on 80 and 81
    write_record("staging", aws.url, STAGING_INSTANCES, ports=[80, 81])
    mocks, exports, _ = run("staging", aws.url, **{"wsgate:ports": {"http": 80, "tls": 82, "health": 8081}})
    assert proxy_ports(mocks) == [80, 81] and exports["state"] == "sticky"  # 82 not proven: not attached


def test_the_tls_listener_policy_follows_a_recreated_listener(aws):
    mocks, _, _ = run("staging", aws.url)
    (policy,) = mocks.of("aws:elb/listenerPolicy:ListenerPolicy")
    cert = stack_config("staging")["wsgate:loadBalancer"]["certificateArn"]
    assert policy.inputs["triggers"] == {"certificate": cert, "instancePort": "81"}


def test_the_record_is_read_without_decryption(aws):
    write_record("staging", aws.url, STAGING_INSTANCES)
    mocks, exports, _ = run("staging", aws.url)
    assert mocks.decrypted and not any(mocks.decrypted) and exports["state"] == "open"


def test_instances_may_reach_out(aws):
    mocks, _, _ = run("staging", aws.url)
    egress = [r for r in mocks.of("aws:vpc/securityGroupEgressRule:SecurityGroupEgressRule")
              if r.name.startswith("wsgate-staging-instances-out")]
    assert sorted(r.inputs.get("cidrIpv4") or r.inputs.get("cidrIpv6") for r in egress) == ["0.0.0.0/0", "::/0"]


def test_gate_open_attaches_one_policy_resource_per_port(aws):
    write_record("staging", aws.url, STAGING_INSTANCES)
    mocks, exports, warnings = run("staging", aws.url)
    assert exports["state"] == "open" and not warnings
    assert proxy_ports(mocks) == [80, 81]
    (policy,) = [p for p in mocks.of(POLICY) if p.inputs["policyTypeName"] == "ProxyProtocolPolicyType"]
    assert policy.inputs["policyAttributes"] == [{"name": "ProxyProtocol", "value": "true"}]
    assert all(b.inputs["policyNames"] == [policy.inputs["policyName"]] for b in mocks.of(BACKEND_POLICY))
    assert mocks.of(PARAMETER) == []  # nothing of the gate is stored: the load balancer is the truth


def test_gate_sticky_keeps_the_policy_when_the_record_becomes_partial(aws):
    write_record("staging", aws.url, STAGING_INSTANCES[:1])
    mark_attached("staging", aws.url)
    mocks, exports, warnings = run("staging", aws.url)
    assert exports["state"] == "sticky"
    assert proxy_ports(mocks) == [80, 81]
    assert any(w.startswith("KEEPING the ProxyProtocol policy") and STAGING_INSTANCES[1] in w for w in warnings)


def test_gate_sticky_when_the_record_disappears(aws):
    mark_attached("staging", aws.url)
    mocks, exports, warnings = run("staging", aws.url)
    assert exports["state"] == "sticky" and proxy_ports(mocks) == [80, 81]
    assert any("no readiness record" in w for w in warnings)


def test_explicit_off_detaches_even_when_attached_and_ready(aws):
    write_record("staging", aws.url, STAGING_INSTANCES)
    mark_attached("staging", aws.url)
    mocks, exports, _ = run("staging", aws.url, **{"wsgate:proxyProtocol": "false"})
    assert exports["state"] == "off" and proxy_ports(mocks) == []
    assert "turn nginx's proxy_protocol off only after this update" in exports["message"]


def test_record_for_another_environment_does_not_open_the_gate(aws):
    s = settings_for("staging", aws.url)
    awsapi.parameters.write_record(s, records.build("prod", [80, 81], {i: "d" * 64 for i in STAGING_INSTANCES}))
    _, exports, _ = run("staging", aws.url)
    assert exports["state"] == "closed"
    assert set(exports["missing"].values()) == {"record is for environment 'prod'"}


def test_bad_config_fails_before_any_resource_is_declared(aws):
    from core.errors import SettingsError

    with pytest.raises(SettingsError, match=r"wsgate:loadBalancer.idleTimeout = 0"):
        run("staging", aws.url, **{"wsgate:loadBalancer": {**stack_config("staging")["wsgate:loadBalancer"],
                                                           "idleTimeout": 0}})


def test_hosts_are_discovered_from_the_load_balancer_and_the_instances_waiting_to_join(aws):
    """`discover: true`: the instances registered with the ELB, and those configured that wait to
    join (a new instance must be rolled out to be proven), by private address (AWS API)."""
    from remote.hosts import resolve

    endpoints = [{s: aws.url for s in ("ec2", "elb", "ssm", "sts")}]
    ec2 = boto3.client("ec2", region_name="us-east-1", endpoint_url=aws.url)
    image = ec2.describe_images()["Images"][0]["ImageId"]
    instances = ec2.run_instances(ImageId=image, MinCount=3, MaxCount=3)["Instances"]
    elb = boto3.client("elb", region_name="us-east-1", endpoint_url=aws.url)
    elb.create_load_balancer(LoadBalancerName="wsgate-lab", AvailabilityZones=["us-east-1a"], Listeners=[
        {"Protocol": "TCP", "LoadBalancerPort": 80, "InstanceProtocol": "TCP", "InstancePort": 18080}])
    elb.register_instances_with_load_balancer(
        LoadBalancerName="wsgate-lab", Instances=[{"InstanceId": i["InstanceId"]} for i in instances[:2]])
    lb = {**stack_config("lab")["wsgate:loadBalancer"], "instances": [i["InstanceId"] for i in instances]}
    s = settings_from("lab", **{"aws:endpoints": endpoints, "wsgate:hosts": [], "wsgate:discover": True,
                                "wsgate:loadBalancer": lb})
    hosts = resolve(s)
    assert {(h.name, h.instance_id, h.address) for h in hosts} == {
        (i["InstanceId"], i["InstanceId"], i["PrivateIpAddress"]) for i in instances}


def test_a_new_instance_waits_to_join_while_the_policy_is_on_and_joins_once_proven(aws):
    new = "i-0123456789abcdef9"
    mark_attached("staging", aws.url, registered=[])  # the policy is on 80 and 81
    elb = boto3.client("elb", region_name="eu-west-1", endpoint_url=aws.url)
    ec2 = boto3.client("ec2", region_name="eu-west-1", endpoint_url=aws.url)
    image = ec2.describe_images()["Images"][0]["ImageId"]
    running = [i["InstanceId"] for i in ec2.run_instances(ImageId=image, MinCount=2, MaxCount=2)["Instances"]]
    elb.register_instances_with_load_balancer(LoadBalancerName="wsgate-staging",
                                              Instances=[{"InstanceId": i} for i in running])
    lb = {**stack_config("staging")["wsgate:loadBalancer"], "instances": [*running, new]}
    write_record("staging", aws.url, running)
    mocks, exports, warnings = run("staging", aws.url, **{"wsgate:loadBalancer": lb})
    assert sorted(a.inputs["instance"] for a in mocks.of(ATTACHMENT)) == sorted(running)  # the new one waits
    assert exports["state"] == "open" and proxy_ports(mocks) == [80, 81]
    assert any(w.startswith(f"{new} waits to join: not in the readiness record") for w in warnings)
    write_record("staging", aws.url, [*running, new])  # `fab rollout` proved it
    mocks, _, _ = run("staging", aws.url, **{"wsgate:loadBalancer": lb})
    assert sorted(a.inputs["instance"] for a in mocks.of(ATTACHMENT)) == sorted([*running, new])


def test_a_new_instance_waits_while_the_policy_is_being_detached_and_joins_after(aws):
    """Pulumi does not order a registration after a deletion: had the newcomer (plain nginx) been
    registered in the update that detaches, a cut-short detach would send it the header."""
    first, new = STAGING_INSTANCES
    mark_attached("staging", aws.url, registered=[first])
    write_record("staging", aws.url, [first])
    off = {"wsgate:proxyProtocol": "false"}
    mocks, exports, warnings = run("staging", aws.url, **off)
    assert exports["state"] == "off" and proxy_ports(mocks) == []
    assert [a.inputs["instance"] for a in mocks.of(ATTACHMENT)] == [first]
    assert f"{new} waits to join until the ProxyProtocol policy is detached: run `pulumi up` again after this " \
           "update" in warnings
    elb = boto3.client("elb", region_name="eu-west-1", endpoint_url=aws.url)
    for port in (80, 81):  # the update detached it
        elb.set_load_balancer_policies_for_backend_server(LoadBalancerName="wsgate-staging", InstancePort=port,
                                                          PolicyNames=[])
    mocks, _, _ = run("staging", aws.url, **off)
    assert sorted(a.inputs["instance"] for a in mocks.of(ATTACHMENT)) == STAGING_INSTANCES


def test_with_the_policy_off_every_instance_joins(aws):
    mocks, exports, _ = run("staging", aws.url)  # no record, nothing attached
    assert exports["state"] == "closed"
    assert sorted(a.inputs["instance"] for a in mocks.of(ATTACHMENT)) == STAGING_INSTANCES


def _elb_in_subnets(aws_url, internal=False):
    """The live load balancer of `staging` in two real (moto) subnets; returns (vpc, [subnets], spare)."""
    s = settings_for("staging", aws_url)
    ec2 = boto3.client("ec2", region_name=s.aws.region, endpoint_url=aws_url)
    vpc = ec2.create_vpc(CidrBlock="10.8.0.0/16")["Vpc"]["VpcId"]
    subnets = [ec2.create_subnet(VpcId=vpc, CidrBlock=f"10.8.{i}.0/24", AvailabilityZone=f"{s.aws.region}{z}")
               ["Subnet"]["SubnetId"] for i, z in ((1, "a"), (2, "b"), (3, "c"))]
    elb = boto3.client("elb", region_name=s.aws.region, endpoint_url=aws_url)
    elb.create_load_balancer(LoadBalancerName=s.load_balancer.name, Subnets=subnets[:2],
                             Scheme="internal" if internal else "internet-facing", Listeners=[
                                 {"Protocol": "TCP", "LoadBalancerPort": 80, "InstanceProtocol": "TCP",
                                  "InstancePort": s.ports.http}])
    return vpc, subnets[:2], subnets[2]


def _placed(vpc, subnets, **extra):
    return {"wsgate:loadBalancer": {**stack_config("staging")["wsgate:loadBalancer"], "vpcId": vpc,
                                    "subnets": subnets, **extra}}


@pytest.mark.parametrize("change, reason", [
    (lambda vpc, live, spare: _placed(vpc, live, internal=True),
     "loadBalancer.internal: true, the live load balancer is internet-facing"),
    (lambda vpc, live, spare: _placed(vpc, [spare]), "loadBalancer.subnets: none of "),
    (lambda vpc, live, spare: _placed("vpc-0123456789abcdef0", live), "loadBalancer.vpcId: vpc-0123456789abcdef0"),
])
def test_a_change_that_would_replace_the_live_load_balancer_is_refused_before_anything_is_declared(aws, change,
                                                                                                    reason):
    from core.errors import KitError

    vpc, live, spare = _elb_in_subnets(aws.url)
    with pytest.raises(KitError) as caught:
        run("staging", aws.url, **change(vpc, live, spare))
    message = str(caught.value)
    assert "would replace the live load balancer wsgate-staging" in message and reason in message
    assert "Nothing was changed" in message and "keep one live subnet" in message


def test_subnets_changed_in_steps_and_a_new_load_balancer_are_not_replacements(aws):
    mocks, _, _ = run("staging", aws.url)  # nothing live yet: any placement
    assert len(mocks.of(LB)) == 1
    vpc, live, spare = _elb_in_subnets(aws.url)
    mocks, _, _ = run("staging", aws.url, **_placed(vpc, [live[0], spare]))  # one live subnet kept
    assert mocks.of(LB)[0].inputs["subnets"] == [live[0], spare]


def test_a_renamed_load_balancer_is_refused_while_the_environments_live_one_exists(aws):
    """loadBalancer.name changed: the live one is found by its environment's tag, not its name, and
    `pulumi up` (which would create a new one without the header and delete the live one) stops."""
    from core.errors import KitError

    mark_attached("staging", aws.url)  # the live wsgate-staging, the policy on both ports
    elb = boto3.client("elb", region_name="eu-west-1", endpoint_url=aws.url)
    lb = {**stack_config("staging")["wsgate:loadBalancer"], "name": "wsgate-staging-2"}
    mocks, _, _ = run("staging", aws.url, **{"wsgate:loadBalancer": lb})  # untagged: not the environment's
    assert len(mocks.of(LB)) == 1
    elb.add_tags(LoadBalancerNames=["wsgate-staging"], Tags=[{"Key": "wsgate:env", "Value": "staging"}])
    with pytest.raises(KitError) as caught:
        run("staging", aws.url, **{"wsgate:loadBalancer": lb})
    message = str(caught.value)
    assert "loadBalancer.name is wsgate-staging-2, but environment staging's load balancer in AWS is " \
           "wsgate-staging" in message and "Nothing was changed" in message
    assert elb.describe_load_balancers(LoadBalancerNames=["wsgate-staging"])["LoadBalancerDescriptions"]
