"""The lab's load balancer, made with boto3 where the `pulumi` CLI is not installed.

The same calls the Pulumi program's resources make, against the lab's own AWS endpoint only,
with the same gate code deciding (core.gate.plan_for from what the endpoint has now): the
ProxyProtocol policy on a Classic ELB; on a network load balancer, which target group each
listener forwards to (core.network.network_forwarding). Never used for a real AWS account: `apply`
refuses any environment whose endpoints are not on loopback.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from typing import Any

from core.errors import KitError
from core.gate import Plan, plan_for
from core.listeners import (
    NetworkHealthCheck,
    NetworkListener,
    TargetGroup,
    health_check,
    listeners,
    network_listeners,
)
from core.network import SWITCHED_TAG, network_layout, network_plan, warm_group, warm_listeners, warm_outputs
from core.record import ReadinessRecord
from core.settings import Settings, stack_file

LAB_VPC_CIDR, LAB_SUBNET_CIDR, LAB_ZONE = "10.99.0.0/16", "10.99.1.0/24", "a"  # the lab account's network


def apply(settings: Settings) -> dict[str, Any]:
    """Create or update the lab's load balancers (loadBalancer, and during a move the one moved to,
    as core.move.declared says) and apply each one's gate, their weighted DNS records when dns is
    set, and retire the one a move record no longer declares (its record first); returns the
    outputs the Pulumi program exports."""
    from botocore.exceptions import BotoCoreError, ClientError

    # botocore: only when applying (a rollout starts without it)
    from awsapi.balancer import refuse_replacement
    from awsapi.clients import is_lab, loopback

    if not is_lab(settings):
        raise KitError(f"{settings.env}: the boto3 fallback only runs against a loopback AWS endpoint (the lab); "
                       "install the pulumi CLI for a real account")
    if settings.dns and not loopback(settings.aws.endpoints.get("route53", "")):
        raise KitError(f"{settings.env}: dns is set but aws:endpoints names no loopback route53 endpoint: the boto3 "
                       "fallback only changes the lab's Route 53")
    try:
        return _apply(settings, refuse_replacement)
    except (ClientError, BotoCoreError) as exc:
        raise KitError(f"the lab's load balancer: {exc}") from None


def _apply(s: Settings, refuse_replacement: Callable[..., None]) -> dict[str, Any]:
    from awsapi import parameters, route53
    from core.move import declared, matches

    move = parameters.read_move(s)
    if s.dns:  # as the program: before anything is decided
        problem = route53.refusal(s)
        if problem:
            raise KitError(problem)
    weights = declared(s, move)
    each = {name: _settings_of(s, name) for name in weights}
    for lb_s in each.values():
        refuse_replacement(lb_s, ours=s.balancer_names)
    outs = {name: apply_network(lb_s) if lb_s.load_balancer.type == "network" else apply_classic(lb_s)
            for name, lb_s in each.items()}
    found = {name: _described(lb_s) for name, lb_s in each.items()}
    for name, out in outs.items():
        out["dnsName"] = found[name]["DNSName"]
    leaving = ([name for name in (move.source, move.target) if name not in weights]
               if move is not None and matches(s, move) else [])
    if s.dns:
        _records(s, {name: (weights[name], found[name]) for name in each}, leaving)
    for name in leaving:
        _retire(_settings_of(s, name))
    primary = s.load_balancer.name if s.load_balancer.name in outs else next(iter(outs))
    return {**outs[primary],
            "balancers": {name: {"dnsName": out["dnsName"], "kind": each[name].load_balancer.type,
                                 "proxyProtocolGate": out["proxyProtocolGate"],
                                 "proxyProtocolPorts": out["proxyProtocolPorts"]} for name, out in outs.items()},
            "dnsWeights": {name: weight for name, weight in weights.items() if weight is not None}}


def _settings_of(s: Settings, name: str) -> Settings:
    """The whole settings of the environment's load balancer `name` (loadBalancer or moveTo's)."""
    if name == s.load_balancer.name:
        return s
    if s.moving_to is not None and s.moving_to.load_balancer.name == name:
        return s.moving_to
    raise KitError(f"the move record names load balancer {name}, which these settings do not name")


def _described(s: Settings) -> dict:
    """The load balancer as its API describes it (it was just created or updated)."""
    from awsapi import classic, network

    found = network.describe_network(s) if s.load_balancer.type == "network" else classic.describe(s)
    if found is None:
        raise KitError(f"the lab's load balancer {s.load_balancer.name} is not there after it was applied")
    return found


def _records(s: Settings, declared: dict[str, tuple[int | None, dict]], leaving: list[str]) -> None:
    """The weighted alias record of every declared load balancer (UPSERT), then the deletion of the
    record of each one that leaves (before the load balancer itself goes)."""
    from awsapi import route53
    from awsapi.clients import call

    dns = s.dns
    assert dns is not None
    api = route53.api(s)
    changes = []
    for name, (weight, described) in declared.items():
        assert weight is not None
        changes.append({"Action": "UPSERT", "ResourceRecordSet": {
            "Name": dns.name, "Type": "A", "SetIdentifier": route53.identifier(s, name), "Weight": weight,
            "AliasTarget": {"HostedZoneId": route53.canonical_zone(s, described), "DNSName": described["DNSName"],
                            "EvaluateTargetHealth": True}}})
    if changes:
        call(f"route53 change-resource-record-sets {dns.name}", api.change_resource_record_sets,
             HostedZoneId=dns.zone_id, ChangeBatch={"Changes": changes})
    gone = [r for r in route53.records(s) if route53.ours(s, r) in leaving]
    if gone:
        call(f"route53 change-resource-record-sets {dns.name} (delete)", api.change_resource_record_sets,
             HostedZoneId=dns.zone_id, ChangeBatch={"Changes": [{"Action": "DELETE", "ResourceRecordSet": r}
                                                                for r in gone]})


def _retire(s: Settings) -> None:
    """Delete the load balancer `s` names, as `pulumi up` deletes one no longer declared: a Classic
    ELB; a network load balancer's listeners, the load balancer, the kit's target groups and its
    security group. One already gone is fine."""
    from awsapi import classic, network
    from awsapi.clients import client, pages

    name = s.load_balancer.name
    if s.load_balancer.type == "classic":
        if classic.describe(s) is not None:
            client(s, "elb").delete_load_balancer(LoadBalancerName=name)
        return
    elbv2, ec2 = client(s, "elbv2"), client(s, "ec2")
    found = network.describe_network(s)
    if found is not None:
        arn = found["LoadBalancerArn"]
        for x in pages(f"elbv2 describe-listeners {name}", elbv2, "describe_listeners", "Listeners",
                       LoadBalancerArn=arn):
            elbv2.delete_listener(ListenerArn=x["ListenerArn"])
        elbv2.delete_load_balancer(LoadBalancerArn=arn)
    for group in (g for x in network_listeners(s) for g in (x.plain, x.proxy)):
        try:
            arns = [g["TargetGroupArn"] for g in elbv2.describe_target_groups(Names=[group.name])["TargetGroups"]]
        except elbv2.exceptions.TargetGroupNotFoundException:
            continue
        for arn in arns:
            elbv2.delete_target_group(TargetGroupArn=arn)
    own = [{"Name": "group-name", "Values": [f"{name}-lb"]},
           {"Name": "vpc-id", "Values": [s.load_balancer.vpc_id or ""]}]
    for sg in ec2.describe_security_groups(Filters=own)["SecurityGroups"]:  # made with it (_create_network_lb)
        ec2.delete_security_group(GroupId=sg["GroupId"])


def outputs(gated: Plan) -> dict[str, Any]:
    d = gated.decision
    return {"proxyProtocolGate": d.state.value, "proxyProtocolPorts": list(d.ports), "notReady": d.missing,
            "waiting": gated.waiting, "gateMessage": d.message}


def read_record(settings: Settings) -> tuple[ReadinessRecord | None, str | None]:
    """The readiness record, or None and why (a record that does not parse, or a write cut short,
    proves nothing): core.record.decode, the reader the program uses too."""
    from awsapi import parameters

    return parameters.read_checked(settings)


# --- Classic ELB ---------------------------------------------------------------------------------

def apply_classic(settings: Settings) -> dict[str, Any]:
    from awsapi import classic
    from awsapi.clients import REGISTER_PER_CALL, chunks, client

    lb, s = settings.load_balancer, settings
    elb = client(settings, "elb")
    name = lb.name
    if classic.describe(settings) is None:
        elb.create_load_balancer(
            LoadBalancerName=name, AvailabilityZones=lb.availability_zones or ["us-east-1a"],
            Listeners=[{"Protocol": x.protocol.upper(), "LoadBalancerPort": x.lb_port, "InstanceProtocol": "TCP",
                        "InstancePort": x.instance_port,
                        **({"SSLCertificateId": lb.certificate_arn} if x.protocol == "ssl" else {})}
                       for x in listeners(s)],
            Tags=[{"Key": "wsgate:env", "Value": s.env}])
    check = health_check(s)
    elb.configure_health_check(LoadBalancerName=name, HealthCheck={
        "Target": check.target, "Interval": check.interval, "Timeout": check.timeout,
        "UnhealthyThreshold": check.unhealthy_threshold, "HealthyThreshold": check.healthy_threshold})
    elb.modify_load_balancer_attributes(LoadBalancerName=name, LoadBalancerAttributes={
        "ConnectionSettings": {"IdleTimeout": lb.idle_timeout},
        "CrossZoneLoadBalancing": {"Enabled": lb.cross_zone},
        "ConnectionDraining": {"Enabled": lb.connection_draining > 0, "Timeout": lb.connection_draining or 300}})
    registered = classic.registered(settings)
    record, problem = read_record(settings)
    gated = plan_for(s, registered=registered, header_ports=classic.header_ports(settings), record=record,
                     record_problem=problem)
    decision = gated.decision
    new = [i for i in gated.join if i not in registered]
    for batch in chunks(new, REGISTER_PER_CALL):
        elb.register_instances_with_load_balancer(LoadBalancerName=name, Instances=[{"InstanceId": i} for i in batch])
    policy = f"{name}-proxy-protocol"
    if decision.attach:
        existing = {p["PolicyName"] for p in elb.describe_load_balancer_policies(LoadBalancerName=name)
                    ["PolicyDescriptions"]}
        if policy not in existing:
            elb.create_load_balancer_policy(
                LoadBalancerName=name, PolicyName=policy, PolicyTypeName="ProxyProtocolPolicyType",
                PolicyAttributes=[{"AttributeName": "ProxyProtocol", "AttributeValue": "true"}])
    for port in sorted(set(s.ports.proxied) | set(classic.header_ports(settings))):
        elb.set_load_balancer_policies_for_backend_server(
            LoadBalancerName=name, InstancePort=port, PolicyNames=[policy] if port in decision.ports else [])
    return outputs(gated)


# --- network load balancer -----------------------------------------------------------------------

def apply_network(settings: Settings) -> dict[str, Any]:
    """As infra/program.py's network path: the gate over what the load balancer does now (the proxy
    ports a listener forwards to, the instances in the groups it forwards to), then the load
    balancer, its four target groups with every member registered, and the listeners forwarding to
    the group the gate chose."""
    from awsapi.network import network_state

    s = settings
    state = network_state(s)  # before any change, as the program reads it
    record, problem = read_record(s)
    gated = network_plan(s, state, record, problem)
    layout = network_layout(s, gated, state.now(s) if state else {}, record, problem, clock=time.time())
    members, forwarding, holds = layout.members, layout.forwarding, layout.holds
    arn = state.arn if state else _create_network_lb(s)
    nlb_listeners = network_listeners(s)
    warm = [x.port for x in warm_listeners(s, forwarding)]
    groups = {g.key: _target_group(s, g) for x in nlb_listeners for g in (x.plain, x.proxy)}
    for x in nlb_listeners:  # registrations first: a listener never forwards to a group before them
        for g in (x.plain, x.proxy):
            _members(s, groups[g.key], g.port, members[g.key])
    for x in nlb_listeners:  # the warm listeners before the listeners, their removal after (Pulumi's order)
        if x.port in warm:
            _warm(s, arn, x, groups[warm_group(x, forwarding).key])
    for x in nlb_listeners:
        _listener(s, arn, x, groups[x.group(forwarding[x.port]).key], layout.switched[x.port])
    for x in nlb_listeners:
        if x.port not in warm:
            _warm(s, arn, x, None)
    return {**outputs(gated), "listenerTargets": {str(port): kind for port, kind in forwarding.items()},
            "retiredPlainGroups": sorted(key for key, joined in members.items() if not joined and gated.join),
            "healthWaiting": {str(port): why for port, why in sorted(holds.items())},
            "retireWaiting": {str(port): why for port, why in sorted(layout.retire_waits.items())},
            "warmListeners": warm_outputs(s, forwarding, warm)}


def _create_network_lb(s: Settings) -> str:
    """The NLB, created with its security group (an NLB gets one only at creation)."""
    from awsapi.clients import client

    lb = s.load_balancer
    ec2, elbv2 = client(s, "ec2"), client(s, "elbv2")
    # one made by an earlier run whose load balancer creation failed is used, as Pulumi's state would
    found = ec2.describe_security_groups(Filters=[{"Name": "group-name", "Values": [f"{lb.name}-lb"]},
                                                  {"Name": "vpc-id", "Values": [lb.vpc_id]}])["SecurityGroups"]
    group = found[0]["GroupId"] if found else ec2.create_security_group(
        GroupName=f"{lb.name}-lb", VpcId=lb.vpc_id, Description=f"wsgate {s.env}: load balancer listeners")["GroupId"]
    created = elbv2.create_load_balancer(
        Name=lb.name, Type="network", Subnets=lb.subnets, SecurityGroups=[group],
        Scheme="internal" if lb.internal else "internet-facing", Tags=[{"Key": "wsgate:env", "Value": s.env}])
    arn = created["LoadBalancers"][0]["LoadBalancerArn"]
    elbv2.modify_load_balancer_attributes(LoadBalancerArn=arn, Attributes=[
        {"Key": "load_balancing.cross_zone.enabled", "Value": str(lb.cross_zone).lower()}])
    return arn


def _target_group(s: Settings, g: TargetGroup) -> str:
    """The group's ARN, created if missing, with its attributes: PROXY v2 as its kind says (a group
    never changes its mind), client IP preservation off, the deregistration delay."""
    from awsapi.clients import client

    elbv2 = client(s, "elbv2")
    try:
        arn = elbv2.describe_target_groups(Names=[g.name])["TargetGroups"][0]["TargetGroupArn"]
    except elbv2.exceptions.TargetGroupNotFoundException:
        arn = elbv2.create_target_group(
            Name=g.name, Protocol="TCP", Port=g.port, VpcId=s.load_balancer.vpc_id, TargetType="instance",
            Tags=[{"Key": "wsgate:env", "Value": s.env}, {"Key": "wsgate:listener", "Value": str(g.listener_port)},
                  {"Key": "wsgate:kind", "Value": g.kind}],
            **_health_args(g.health))["TargetGroups"][0]["TargetGroupArn"]
    elbv2.modify_target_group_attributes(TargetGroupArn=arn, Attributes=[
        {"Key": "proxy_protocol_v2.enabled", "Value": str(g.proxy_protocol_v2).lower()},
        {"Key": "preserve_client_ip.enabled", "Value": "false"},
        {"Key": "deregistration_delay.timeout_seconds", "Value": str(s.load_balancer.deregistration_delay)}])
    return arn


def _health_args(h: NetworkHealthCheck) -> dict[str, Any]:
    """CreateTargetGroup's health check arguments for `h`."""
    return {"HealthCheckProtocol": h.protocol, "HealthCheckPort": h.port, "HealthCheckEnabled": True,
            "HealthCheckIntervalSeconds": h.interval, "HealthCheckTimeoutSeconds": h.timeout,
            "HealthyThresholdCount": h.healthy_threshold, "UnhealthyThresholdCount": h.unhealthy_threshold,
            **({"HealthCheckPath": h.path} if h.path else {}),
            **({"Matcher": {"HttpCode": h.matcher}} if h.matcher else {})}


def _members(s: Settings, arn: str, port: int, members: tuple[str, ...]) -> None:
    """Exactly `members` registered in the group, on its port (one port per group: moto keeps one
    registration per instance and group)."""
    from awsapi.clients import REGISTER_PER_CALL, chunks, client

    elbv2 = client(s, "elbv2")
    now = {t["Target"]["Id"] for t in elbv2.describe_target_health(TargetGroupArn=arn)["TargetHealthDescriptions"]
           if t.get("TargetHealth", {}).get("State") != "draining"}
    joining, leaving = sorted(set(members) - now), sorted(now - set(members))
    for batch in chunks(joining, REGISTER_PER_CALL):
        elbv2.register_targets(TargetGroupArn=arn, Targets=[{"Id": i, "Port": port} for i in batch])
    for batch in chunks(leaving, REGISTER_PER_CALL):
        elbv2.deregister_targets(TargetGroupArn=arn, Targets=[{"Id": i, "Port": port} for i in batch])


def _listener(s: Settings, lb_arn: str, x: NetworkListener, target: str, switched: str | None) -> None:
    """The listener, created if missing, forwarding to `target`, its SWITCHED_TAG `switched` (None:
    none). A switch sends only the default action (the other fields are unchanged; moto's
    modify_listener also refuses Protocol=TLS)."""
    from awsapi.clients import client, pages

    lb, elbv2 = s.load_balancer, client(s, "elbv2")
    forward = [{"Type": "forward", "TargetGroupArn": target}]
    found = [ln for ln in pages(f"elbv2 describe-listeners {lb.name}", elbv2, "describe_listeners", "Listeners",
                                LoadBalancerArn=lb_arn) if ln["Port"] == x.port]
    if not found:
        tls = {"Certificates": [{"CertificateArn": lb.certificate_arn}], "SslPolicy": lb.ssl_policy,
               "AlpnPolicy": [lb.alpn_policy]} if x.protocol == "TLS" else {}
        arn = elbv2.create_listener(LoadBalancerArn=lb_arn, Protocol=x.protocol, Port=x.port, DefaultActions=forward,
                                    Tags=[{"Key": "wsgate:env", "Value": s.env}], **tls)["Listeners"][0]["ListenerArn"]
    else:
        arn = found[0]["ListenerArn"]
        if [a.get("TargetGroupArn") for a in found[0].get("DefaultActions", [])] != [target]:
            elbv2.modify_listener(ListenerArn=arn, DefaultActions=forward)
    if switched:
        elbv2.add_tags(ResourceArns=[arn], Tags=[{"Key": SWITCHED_TAG, "Value": switched}])
    else:
        elbv2.remove_tags(ResourceArns=[arn], TagKeys=[SWITCHED_TAG])
    if x.protocol == "TCP":  # a TLS listener's idle timeout is fixed
        elbv2.modify_listener_attributes(ListenerArn=arn, Attributes=[
            {"Key": "tcp.idle_timeout.seconds", "Value": str(lb.idle_timeout)}])


def _warm(s: Settings, lb_arn: str, x: NetworkListener, target: str | None) -> None:
    """The warm listener of `x` (TCP on its warm port) forwarding to `target`, the group `x` is to
    move to (core.network.warm_group); None: no warm listener there."""
    from awsapi.clients import client, pages

    elbv2 = client(s, "elbv2")
    forward = [{"Type": "forward", "TargetGroupArn": target}] if target else []
    found = [ln for ln in pages(f"elbv2 describe-listeners {s.load_balancer.name}", elbv2, "describe_listeners",
                                "Listeners", LoadBalancerArn=lb_arn) if ln["Port"] == x.warm_port]
    if found and not target:
        elbv2.delete_listener(ListenerArn=found[0]["ListenerArn"])
    elif target and not found:
        tags = [{"Key": "wsgate:env", "Value": s.env}, {"Key": "wsgate:warm", "Value": str(x.port)}]
        elbv2.create_listener(LoadBalancerArn=lb_arn, Protocol="TCP", Port=x.warm_port, DefaultActions=forward,
                              Tags=tags)
    elif target and [a.get("TargetGroupArn") for a in found[0].get("DefaultActions", [])] != [target]:
        elbv2.modify_listener(ListenerArn=found[0]["ListenerArn"], DefaultActions=forward)


# --- the lab's environments ----------------------------------------------------------------------

def lab_network(settings: Settings) -> tuple[str, list[str]]:
    """The lab account's VPC and its subnet in the lab endpoint (found by tag, else created), as
    an account has them before a network load balancer is placed there: (VPC ID, subnet IDs)."""
    from awsapi.clients import client

    ec2 = client(settings, "ec2")
    tag = {"Name": "tag:wsgate:lab", "Values": ["network"]}
    vpcs = ec2.describe_vpcs(Filters=[tag])["Vpcs"]
    if vpcs:
        vpc = vpcs[0]["VpcId"]
    else:
        vpc = ec2.create_vpc(CidrBlock=LAB_VPC_CIDR, TagSpecifications=[
            {"ResourceType": "vpc", "Tags": [{"Key": "wsgate:lab", "Value": "network"}]}])["Vpc"]["VpcId"]
    subnets = [x["SubnetId"] for x in ec2.describe_subnets(
        Filters=[{"Name": "vpc-id", "Values": [vpc]}])["Subnets"]]
    if not subnets:
        subnets = [ec2.create_subnet(VpcId=vpc, CidrBlock=LAB_SUBNET_CIDR,
                                     AvailabilityZone=settings.aws.region + LAB_ZONE)["Subnet"]["SubnetId"]]
    return vpc, sorted(subnets)


def network_config(config: dict[str, Any], vpc: str, subnets: list[str]) -> dict[str, Any]:
    """A lab environment's stack config with a network load balancer in place of its Classic ELB:
    its own name (so its own target group names), placed in `subnets` of `vpc`, draining as the
    Classic ELB drained. Pure."""
    out = copy.deepcopy(config)
    classic = out["wsgate:loadBalancer"]
    out["wsgate:loadBalancer"] = {
        **{k: v for k, v in classic.items() if k not in ("availabilityZones", "connectionDraining")},
        "type": "network", "name": f"{classic['name']}-nlb", "subnets": subnets, "vpcId": vpc,
        "idleTimeout": max(classic.get("idleTimeout", 300), 60),  # a network TCP listener takes 60-6000
        "deregistrationDelay": classic.get("connectionDraining", 30),
        # the stand-in follows a listener change within a fraction of a second; AWS's nodes take longer
        "switchDrain": max(1, classic.get("connectionDraining", 30))}
    return out


class LabApplier:
    """The lab's applier (remote.applier.Applier): `pulumi up` where the CLI is
    installed and the environment is one of the project's stacks, else the boto3 calls above.
    Named by Pulumi.lab.yaml (`loadBalancer.applier`)."""

    def __init__(self, settings: Settings):
        self.settings = settings

    def check(self) -> None:
        from awsapi.clients import is_lab
        from infra.automation import PulumiStack

        if pulumi_stack(self.settings):
            PulumiStack(self.settings).check()
        elif not is_lab(self.settings):
            raise KitError(f"{self.settings.env}: the lab's applier only runs against a loopback AWS endpoint (the "
                           "lab); install the pulumi CLI for a real account")

    def apply(self, note: Callable[[str], None]) -> dict[str, Any]:
        from infra.automation import PulumiStack

        if pulumi_stack(self.settings):
            return PulumiStack(self.settings).apply(note)
        note("pulumi CLI not installed (or not a stack of this project): applying the lab's load balancer with "
             "boto3 (same gate code)")
        out = apply(self.settings)
        if "listenerTargets" in out:
            note("listeners: " + ", ".join(f"{port} -> {kind}" for port, kind in out["listenerTargets"].items()))
        for why in [*out.get("healthWaiting", {}).values(), *out.get("retireWaiting", {}).values()]:
            note(why)
        return out


def pulumi_stack(settings: Settings) -> bool:
    """Whether `pulumi up` can apply this environment: the CLI is installed and the environment is a
    stack file of this project (a lab environment written elsewhere is applied with boto3)."""
    from infra import automation

    return automation.cli_available() and stack_file(settings.env, automation.PROJECT_DIR).exists()
