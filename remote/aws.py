"""The AWS edge of the host half (botocore): the readiness record, registered instances, policies.

Clients are built from the environment's `aws:region` and `aws:endpoints` (the lab points
them at its loopback endpoint); credentials come from the usual boto3 chain.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from functools import cache
from urllib.parse import urlparse

import botocore.session
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from core.elb import PLAIN, PROXY, ListenerNow, NetworkHealthCheck, network_listeners
from core.errors import KitError
from core.gate import Plan, plan_for
from core.record import ReadinessRecord
from core.settings import Settings

_CONFIG = Config(connect_timeout=5, read_timeout=20, retries={"max_attempts": 3, "mode": "standard"})


class AwsError(KitError):
    """An AWS API call failed: names the call and the cause."""


@cache
def _client(service: str, region: str, endpoint: str | None):
    keys = {}
    if endpoint and _loopback(endpoint):  # the lab's endpoint: never hand it real credentials
        keys = {"aws_access_key_id": "lab", "aws_secret_access_key": "lab"}
    # botocore itself: boto3 would add nothing here but its import time.
    return botocore.session.get_session().create_client(service, region_name=region, endpoint_url=endpoint,
                                                         config=_CONFIG, **keys)


def _loopback(url: str) -> bool:
    host = urlparse(url).hostname or ""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


_SERVICES = ("elb", "elbv2", "ssm", "ec2")  # every AWS API the kit calls


def is_lab(settings: Settings) -> bool:
    """Every AWS endpoint the kit uses is on loopback: the lab, never a real account. The load
    balancer's API must be set (elb for classic, elbv2 for network); any other of ours that is set
    must be on loopback too."""
    endpoints = settings.aws.endpoints
    needed = ("elbv2" if settings.load_balancer.type == "network" else "elb", "ssm", "ec2")
    return (all(s in endpoints for s in needed)
            and all(_loopback(url) for s, url in endpoints.items() if s in _SERVICES))


def client(settings: Settings, service: str):
    return _client(service, settings.aws.region, settings.aws.endpoints.get(service))


def _call(what: str, fn, **kwargs):
    try:
        return fn(**kwargs)
    except (ClientError, BotoCoreError) as exc:
        raise AwsError(f"{what}: {exc}") from None


def write_record(settings: Settings, record: ReadinessRecord) -> None:
    """Store the readiness record where `pulumi up` reads it (Parameter Store)."""
    put_record_text(settings, record.to_json())


def put_record_text(settings: Settings, text: str) -> None:
    ssm = client(settings, "ssm")
    _call(f"ssm put-parameter {settings.parameter_path}", ssm.put_parameter,
          Name=settings.parameter_path, Value=text, Type="String", Overwrite=True,
          Tier="Standard" if len(text) <= 4096 else "Advanced",
          Description=f"wsgate {settings.env}: hosts proven ready for the PROXY protocol (written by fab rollout)")


def read_record_text(settings: Settings) -> str | None:
    """The stored record as it is (None: there is none)."""
    ssm = client(settings, "ssm")
    try:
        return ssm.get_parameter(Name=settings.parameter_path)["Parameter"]["Value"]
    except ssm.exceptions.ParameterNotFound:
        return None
    except (ClientError, BotoCoreError) as exc:
        raise AwsError(f"ssm get-parameter {settings.parameter_path}: {exc}") from None


def read_record(settings: Settings) -> ReadinessRecord | None:
    text = read_record_text(settings)
    return None if text is None else ReadinessRecord.from_json(text)


def delete_record(settings: Settings) -> None:
    ssm = client(settings, "ssm")
    try:
        ssm.delete_parameter(Name=settings.parameter_path)
    except ssm.exceptions.ParameterNotFound:
        pass
    except (ClientError, BotoCoreError) as exc:
        raise AwsError(f"ssm delete-parameter {settings.parameter_path}: {exc}") from None


def other_kind(settings: Settings) -> str | None:
    """Why a load balancer of the other kind under this name stands in the way (None: none does).
    Switching `loadBalancer.type` would delete it while its hosts may read (or not read) the header
    it sends; it is refused. Asked only where that API has an endpoint (the lab may have none)."""
    network = settings.load_balancer.type == "network"
    service = "elb" if network else "elbv2"
    endpoints = settings.aws.endpoints
    if service not in endpoints and any(_loopback(url) for url in endpoints.values()):
        return None  # a loopback endpoint without that API: never ask a real one from here
    if network:
        if describe(settings) is None:
            return None
    elif (_describe_v2(settings) or {}).get("Type") != "network":  # an ALB of this name is not ours
        return None
    other = "a Classic ELB" if network else "a network load balancer"
    return (f"{other} named {settings.load_balancer.name} exists, and loadBalancer.type is "
            f"{settings.load_balancer.type}: changing the kind would delete the live load balancer; create the new "
            "kind as a new environment (its own loadBalancer.name), move DNS to it, then destroy the old one")


def registered_instances(settings: Settings) -> dict[str, str]:
    """The load balancer's instances: those registered, and those configured that wait to join
    (they must be rolled out to be proven): instance ID -> private IP address."""
    if settings.load_balancer.type == "network":
        state = network_state(settings)
        registered = list(state.present) if state else []
    else:
        d = describe(settings)
        registered = [i["InstanceId"] for i in d.get("Instances", [])] if d else []
    ids = sorted(set(registered) | set(settings.load_balancer.instances))
    if not ids:
        return {}
    ec2 = client(settings, "ec2")
    reservations = _call("ec2 describe-instances", ec2.describe_instances, InstanceIds=ids)["Reservations"]
    return {i["InstanceId"]: i.get("PrivateIpAddress", "") for r in reservations for i in r["Instances"]}


def instance_ingress(settings: Settings, instances: list[str]) -> tuple[dict[str, list], list[str]]:
    """Each instance's inbound rules (from every security group on it, its interfaces' too) as
    `core.doctor.Ingress`, and the instances EC2 does not know."""
    from core.doctor import Ingress

    if not instances:
        return {}, []
    ec2 = client(settings, "ec2")
    # A filter, not InstanceIds: an unknown ID is reported, not an error for all of them.
    found = _call("ec2 describe-instances", ec2.describe_instances,
                  Filters=[{"Name": "instance-id", "Values": sorted(instances)}])["Reservations"]
    groups_of: dict[str, set[str]] = {}
    for reservation in found:
        for i in reservation["Instances"]:
            ids = {g["GroupId"] for g in i.get("SecurityGroups", [])}
            ids |= {g["GroupId"] for n in i.get("NetworkInterfaces", []) for g in n.get("Groups", [])}
            groups_of[i["InstanceId"]] = ids
    wanted = sorted(set().union(*groups_of.values())) if groups_of else []
    rules: dict[str, list] = {}
    if wanted:
        for g in _call("ec2 describe-security-groups", ec2.describe_security_groups,
                       GroupIds=wanted)["SecurityGroups"]:
            label = f"{g['GroupId']} ({g.get('GroupName', '')})"
            rules[g["GroupId"]] = [
                Ingress(label, str(p.get("IpProtocol", "-1")), p.get("FromPort"), p.get("ToPort"), source)
                for p in g.get("IpPermissions", [])
                for source in ([r["CidrIp"] for r in p.get("IpRanges", [])]
                               + [r["CidrIpv6"] for r in p.get("Ipv6Ranges", [])]
                               + [r["PrefixListId"] for r in p.get("PrefixListIds", [])]
                               + [r["GroupId"] for r in p.get("UserIdGroupPairs", [])])]
    ingress = {i: [r for g in sorted(ids) for r in rules.get(g, [])] for i, ids in groups_of.items()}
    return ingress, sorted(set(instances) - set(groups_of))


def _not_found(exc: ClientError) -> bool:
    return exc.response.get("Error", {}).get("Code") in ("LoadBalancerNotFound", "AccessPointNotFound")


def describe(settings: Settings) -> dict | None:
    """The Classic ELB's description, or None when it does not exist (yet)."""
    return _named(settings, "elb", "LoadBalancerNames", "LoadBalancerDescriptions")


def _named(settings: Settings, service: str, names: str, key: str) -> dict | None:
    """The load balancer of this name as `service` (elb, elbv2) describes it, or None."""
    name = settings.load_balancer.name
    api = client(settings, service)
    try:
        found = api.describe_load_balancers(**{names: [name]})[key]
    except ClientError as exc:
        if _not_found(exc):
            return None
        raise AwsError(f"{service} describe-load-balancers {name}: {exc}") from None
    except BotoCoreError as exc:
        raise AwsError(f"{service} describe-load-balancers {name}: {exc}") from None
    return found[0] if found else None


def backend_policies(settings: Settings) -> dict[int, list[str]]:
    """Instance port -> policy names attached to it on the load balancer."""
    d = describe(settings) or {}
    return {int(b["InstancePort"]): list(b.get("PolicyNames", [])) for b in d.get("BackendServerDescriptions", [])}


def proxy_protocol_ports(settings: Settings) -> list[int]:
    """Backend ports whose policies include a ProxyProtocol policy with ProxyProtocol=true."""
    name = settings.load_balancer.name
    attached = backend_policies(settings)
    if not attached:
        return []
    elb = client(settings, "elb")
    policies = _call(f"elb describe-load-balancer-policies {name}", elb.describe_load_balancer_policies,
                     LoadBalancerName=name)["PolicyDescriptions"]
    proxy = {p["PolicyName"] for p in policies if p.get("PolicyTypeName") == "ProxyProtocolPolicyType"
             and any(a["AttributeName"] == "ProxyProtocol" and a["AttributeValue"].lower() == "true"
                     for a in p.get("PolicyAttributeDescriptions", []))}
    return sorted(port for port, names in attached.items() if proxy & set(names))


def instance_health(settings: Settings) -> dict[str, str]:
    """Instance ID -> InService / OutOfService (with the reason) as the load balancer sees it."""
    if describe(settings) is None:
        return {}
    elb = client(settings, "elb")
    states = _call("elb describe-instance-health", elb.describe_instance_health,
                   LoadBalancerName=settings.load_balancer.name)["InstanceStates"]
    return {s["InstanceId"]: s["State"] + (f" ({s['Description']})" if s.get("Description") not in (None, "N/A")
                                           else "") for s in states}


# --- network load balancer (ELBv2) -----------------------------------------------------------

@dataclass(frozen=True)
class TargetGroupState:
    arn: str
    name: str
    port: int  # the instance port
    proxy_protocol_v2: bool
    targets: tuple[str, ...]  # instances registered in it (draining ones are leaving: not counted)
    health: NetworkHealthCheck | None = None  # its health check (None: off)
    protocol: str = "TCP"  # to the instances: TCP, or TLS (where the header would travel inside TLS)
    states: dict[str, str] = field(default_factory=dict)  # instance -> `healthy`, or its state and why
    draining: tuple[str, ...] = ()  # instances deregistered, still within the deregistration delay


@dataclass(frozen=True)
class NetworkState:
    """A network load balancer as the ELBv2 API describes it now."""

    arn: str
    listeners: dict[int, tuple[TargetGroupState, ...]]  # listener port -> the groups it forwards to
    protocols: dict[int, str] = field(default_factory=dict)  # listener port -> "TCP" or "TLS"
    present: tuple[str, ...] = ()  # instances in any of the kit's groups, forwarded to or not
    security_groups: tuple[str, ...] = ()  # the load balancer's own
    groups: dict[str, TargetGroupState] = field(default_factory=dict)  # the kit's groups that exist, by name

    def now(self, settings: Settings) -> dict[int, ListenerNow]:
        """Per listener of the kit: which of its groups it forwards to, whether every target of its
        proxy group is healthy, and whether its plain group is retired (core.elb.ListenerNow)."""
        out = {}
        for x in network_listeners(settings):
            forwarded = self.listeners.get(x.port, ())
            # PROXY: the header goes out there, whichever proxy port (an old one after a setting change)
            forwards = (PLAIN if [g.name for g in forwarded] == [x.plain.name]
                        else PROXY if forwarded and all(g.proxy_protocol_v2 for g in forwarded) else None)
            proxy, plain = self.groups.get(x.proxy.name), self.groups.get(x.plain.name)
            out[x.port] = ListenerNow(
                forwards=forwards,
                proxy_healthy=proxy is not None and bool(proxy.targets) and all(
                    proxy.states.get(i) == "healthy" for i in proxy.targets),
                # only ever retired from the proxy side: an empty plain group of a listener not on its
                # proxy group (a first update cut short, say) is just not filled yet
                plain_retired=forwards == PROXY and plain is not None and not plain.targets,
                plain_drained=forwards == PROXY and plain is not None and not (plain.targets or plain.draining))
        return out

    def retired(self, settings: Settings) -> list[int]:
        """The plain instance ports the hosts may stop serving: their listener forwards to its proxy
        group and their plain group holds no target, not even a draining one (so the load balancer
        forwarded there last at least `deregistrationDelay` ago, by AWS's own clock)."""
        now = self.now(settings)
        return sorted(x.plain.port for x in network_listeners(settings)
                      if now[x.port].forwards == PROXY and now[x.port].plain_drained)

    @property
    def proxy_ports(self) -> list[int]:
        """Instance ports that get the PROXY header now: those of a `proxy_protocol_v2` group that a
        listener forwards to."""
        return sorted({g.port for groups in self.listeners.values() for g in groups if g.proxy_protocol_v2})

    @property
    def forwarded_ports(self) -> list[int]:
        """Instance ports the listeners send traffic to now, with the header or without."""
        return sorted({g.port for groups in self.listeners.values() for g in groups})

    @property
    def serving(self) -> list[str]:
        """Instances registered in a group a listener forwards to. A group no listener uses is not
        the load balancer's (the API does not list it with it) and sends nothing to anyone."""
        return sorted({i for groups in self.listeners.values() for g in groups for i in g.targets})


def describe_network(settings: Settings) -> dict | None:
    """The network load balancer's description (ELBv2 API), or None when it does not exist."""
    found = _describe_v2(settings)
    if found is not None and found.get("Type") != "network":
        raise AwsError(f"elbv2 load balancer {settings.load_balancer.name} is of type {found.get('Type')!r}, "
                       "not network")
    return found


def _describe_v2(settings: Settings) -> dict | None:
    """The ELBv2 load balancer of this name, of any type, or None."""
    return _named(settings, "elbv2", "Names", "LoadBalancers")


def refuse_replacement(settings: Settings) -> None:
    """Stop before any change when the settings would replace the live load balancer (the Pulumi
    program and the lab's applier both ask, before they decide anything)."""
    from core.replacement import Live, refusal, replacing

    conflict = other_kind(settings)
    if conflict:
        raise KitError(conflict)
    if settings.load_balancer.type == "network":
        described = describe_network(settings)
        live = Live.network(described) if described else None
    else:
        described = describe(settings)
        live = Live.classic(described) if described else None
    reasons = replacing(settings, live)
    if reasons:
        raise KitError(refusal(settings, reasons))


def network_state(settings: Settings) -> NetworkState | None:
    """The network load balancer's listeners, the groups each forwards to, their port, PROXY v2
    attribute and registered instances; None when it does not exist (yet)."""
    name = settings.load_balancer.name
    elbv2 = client(settings, "elbv2")
    found = describe_network(settings)
    if found is None:
        return None
    arn = found["LoadBalancerArn"]
    described = _pages(f"elbv2 describe-listeners {name}", elbv2, "describe_listeners", "Listeners",
                       LoadBalancerArn=arn)
    forwards = {int(x["Port"]): _forwarded(x.get("DefaultActions", [])) for x in described}
    groups = {a: _target_group(settings, a) for a in sorted({a for arns in forwards.values() for a in arns})}
    kit = [_target_group(settings, a) for a in _kit_group_arns(settings) if a not in groups]
    present = {i for g in [*groups.values(), *kit] for i in g.targets}
    return NetworkState(arn, {port: tuple(groups[a] for a in arns) for port, arns in sorted(forwards.items())},
                        {int(x["Port"]): x["Protocol"] for x in described}, tuple(sorted(present)),
                        tuple(found.get("SecurityGroups", [])), {g.name: g for g in [*groups.values(), *kit]})


def _kit_group_arns(settings: Settings) -> list[str]:
    """The ARNs of the kit's four target groups that exist (by their names: core.elb)."""
    elbv2 = client(settings, "elbv2")
    arns = []
    for group in (g for x in network_listeners(settings) for g in (x.plain, x.proxy)):
        try:
            arns += [g["TargetGroupArn"] for g in elbv2.describe_target_groups(Names=[group.name])["TargetGroups"]]
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "TargetGroupNotFound":
                raise AwsError(f"elbv2 describe-target-groups {group.name}: {exc}") from None
        except BotoCoreError as exc:
            raise AwsError(f"elbv2 describe-target-groups {group.name}: {exc}") from None
    return arns


def network_plan(settings: Settings, state: NetworkState | None, record: ReadinessRecord | None,
                 record_problem: str | None) -> Plan:
    """The gate for a network load balancer as it is now: the Pulumi program's and the lab's."""
    return plan_for(settings, registered=state.serving if state else [], attached=state.proxy_ports if state else [],
                    present=list(state.present) if state else [], record=record, record_problem=record_problem)


def proxy_listener_ports(settings: Settings) -> list[int]:
    """The instance ports a network load balancer's listeners send the PROXY header to now."""
    state = network_state(settings)
    return state.proxy_ports if state else []


def group_health(state: NetworkState) -> dict[str, dict[str, str]]:
    """Target group name -> instance ID -> its state there (`healthy`, or the state and why), over
    the groups the listeners forward to now (as `network_state` read them)."""
    return {g.name: dict(g.states) for forwarded in state.listeners.values() for g in forwarded}


def target_health(groups: dict[str, dict[str, str]]) -> dict[str, str]:
    """Instance ID -> InService, or OutOfService (group: why), healthy only when healthy in every
    group (`group_health`): what `instance_health` says of a Classic ELB."""
    out: dict[str, str] = {}
    for name, targets in sorted(groups.items()):
        for instance, word in sorted(targets.items()):
            if word == "healthy":
                out.setdefault(instance, "InService")
            elif not out.get(instance, "").startswith("OutOfService"):
                out[instance] = f"OutOfService ({name}: {word})"
    return out


def _forwarded(actions: list[dict]) -> list[str]:
    """The target groups a listener's default actions forward to (weight 0 sends nothing)."""
    arns: list[str] = []
    for action in actions:
        if action.get("Type") != "forward":
            continue
        weighted = (action.get("ForwardConfig") or {}).get("TargetGroups")
        if weighted:
            arns += [g["TargetGroupArn"] for g in weighted if g.get("Weight", 1) != 0]
        elif action.get("TargetGroupArn"):
            arns.append(action["TargetGroupArn"])
    return sorted(set(arns))


def _target_group(settings: Settings, arn: str) -> TargetGroupState:
    elbv2 = client(settings, "elbv2")
    (group,) = _call(f"elbv2 describe-target-groups {arn}", elbv2.describe_target_groups,
                     TargetGroupArns=[arn])["TargetGroups"]
    attributes = _call(f"elbv2 describe-target-group-attributes {arn}", elbv2.describe_target_group_attributes,
                       TargetGroupArn=arn)["Attributes"]
    health = _call(f"elbv2 describe-target-health {arn}", elbv2.describe_target_health,
                   TargetGroupArn=arn)["TargetHealthDescriptions"]
    states, draining = {}, []
    for t in health:
        h = t.get("TargetHealth", {})
        word = h.get("State", "unknown")
        if word == "draining":  # leaving the group: neither a target nor a health of it
            draining.append(t["Target"]["Id"])
        else:
            states[t["Target"]["Id"]] = ": ".join(x for x in (word, h.get("Description")) if x)
    return TargetGroupState(
        arn=arn, name=group["TargetGroupName"], port=int(group["Port"]),
        proxy_protocol_v2=any(a["Key"] == "proxy_protocol_v2.enabled" and a["Value"].lower() == "true"
                              for a in attributes),
        targets=tuple(sorted(states)), health=_health_check(group), protocol=group.get("Protocol", "TCP"),
        states=states, draining=tuple(sorted(draining)))


def _health_check(group: dict) -> NetworkHealthCheck | None:
    """A target group's health check as described (None: disabled)."""
    if not group.get("HealthCheckEnabled", True):
        return None
    protocol = group.get("HealthCheckProtocol", "TCP")
    http = protocol in ("HTTP", "HTTPS")
    timing = {name: int(group[key]) for name, key in (
        ("interval", "HealthCheckIntervalSeconds"), ("timeout", "HealthCheckTimeoutSeconds"),
        ("healthy_threshold", "HealthyThresholdCount"), ("unhealthy_threshold", "UnhealthyThresholdCount"))
        if key in group}
    return NetworkHealthCheck(protocol=protocol, port=str(group.get("HealthCheckPort", "traffic-port")),
                              path=group.get("HealthCheckPath") if http else None,
                              matcher=(group.get("Matcher") or {}).get("HttpCode") if http else None, **timing)


def _pages(what: str, api, operation: str, key: str, **kwargs) -> list[dict]:
    try:
        return [item for page in api.get_paginator(operation).paginate(**kwargs) for item in page[key]]
    except (ClientError, BotoCoreError) as exc:
        raise AwsError(f"{what}: {exc}") from None
