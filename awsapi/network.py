"""A network load balancer as the ELBv2 API describes it now (`core.network.NetworkState`)."""

from __future__ import annotations

from botocore.exceptions import BotoCoreError, ClientError

from awsapi.clients import AwsError, by_name, call, chunks, client, error_code, pages
from core.listeners import NetworkHealthCheck, network_listeners
from core.network import SWITCHED_TAG, NetworkState, TargetGroupState, stamped
from core.settings import Settings


def describe_network(settings: Settings) -> dict | None:
    """The network load balancer's description (ELBv2 API), or None when it does not exist."""
    found = describe_v2(settings)
    if found is not None and found.get("Type") != "network":
        raise AwsError(f"elbv2 load balancer {settings.load_balancer.name} is of type {found.get('Type')!r}, "
                       "not network")
    return found


def describe_v2(settings: Settings) -> dict | None:
    """The ELBv2 load balancer of this name, of any type, or None."""
    return by_name(settings, "elbv2", "Names", "LoadBalancers")


def network_state(settings: Settings) -> NetworkState | None:
    """The network load balancer's listeners, the groups each forwards to, their port, PROXY v2
    attribute and registered instances; None when it does not exist (yet)."""
    name = settings.load_balancer.name
    elbv2 = client(settings, "elbv2")
    found = describe_network(settings)
    if found is None:
        return None
    arn = found["LoadBalancerArn"]
    described = pages(f"elbv2 describe-listeners {name}", elbv2, "describe_listeners", "Listeners",
                       LoadBalancerArn=arn)
    forwards = {int(x["Port"]): _forwarded(x.get("DefaultActions", [])) for x in described}
    groups = {a: _target_group(settings, a) for a in sorted({a for arns in forwards.values() for a in arns})}
    kit = [_target_group(settings, a) for a in _kit_group_arns(settings) if a not in groups]
    present = {i for g in [*groups.values(), *kit] for i in g.targets}
    warm = {x.warm_port for x in network_listeners(settings)}  # the warm listeners: nobody's traffic
    forwarded = {port: tuple(groups[a] for a in arns) for port, arns in sorted(forwards.items())}
    switched = _switched(settings, {int(x["Port"]): x["ListenerArn"] for x in described if int(x["Port"]) not in warm})
    return NetworkState(arn, {port: g for port, g in forwarded.items() if port not in warm},
                        {int(x["Port"]): x["Protocol"] for x in described if int(x["Port"]) not in warm},
                        tuple(sorted(present)), tuple(found.get("SecurityGroups", [])),
                        {g.name: g for g in [*groups.values(), *kit]},
                        {port: g for port, g in forwarded.items() if port in warm}, switched)


def _switched(settings: Settings, arns: dict[int, str]) -> dict[int, float]:
    """Listener port -> when it switched to its proxy group, by its SWITCHED_TAG (a listener
    without the tag, or with a value that is no time, is left out)."""
    elbv2 = client(settings, "elbv2")
    port_of = {arn: port for port, arn in arns.items()}
    out: dict[int, float] = {}
    for batch in chunks(sorted(port_of), 20):  # DescribeTags takes 20 resources a call
        tagged = call("elbv2 describe-tags", elbv2.describe_tags, ResourceArns=batch)["TagDescriptions"]
        for d in tagged:
            at = stamped(next((t.get("Value") for t in d.get("Tags", []) if t["Key"] == SWITCHED_TAG), None))
            if at is not None:
                out[port_of[d["ResourceArn"]]] = at
    return out


def _kit_group_arns(settings: Settings) -> list[str]:
    """The ARNs of the kit's four target groups that exist (by their names: core.listeners)."""
    elbv2 = client(settings, "elbv2")
    arns = []
    for group in (g for x in network_listeners(settings) for g in (x.plain, x.proxy)):
        try:
            arns += [g["TargetGroupArn"] for g in elbv2.describe_target_groups(Names=[group.name])["TargetGroups"]]
        except ClientError as exc:
            if error_code(exc) != "TargetGroupNotFound":
                raise AwsError(f"elbv2 describe-target-groups {group.name}: {exc}") from None
        except BotoCoreError as exc:
            raise AwsError(f"elbv2 describe-target-groups {group.name}: {exc}") from None
    return arns


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
    (group,) = pages(f"elbv2 describe-target-groups {arn}", elbv2, "describe_target_groups", "TargetGroups",
                      TargetGroupArns=[arn])
    attributes = call(f"elbv2 describe-target-group-attributes {arn}", elbv2.describe_target_group_attributes,
                       TargetGroupArn=arn)["Attributes"]
    health = call(f"elbv2 describe-target-health {arn}", elbv2.describe_target_health,
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


def names_tagged(settings: Settings, key: str, value: str) -> list[str]:
    """The names of the ELBv2 load balancers in the region whose tag `key` is `value`."""
    elbv2 = client(settings, "elbv2")
    found = {d["LoadBalancerArn"]: d["LoadBalancerName"]
             for d in pages("elbv2 describe-load-balancers", elbv2, "describe_load_balancers", "LoadBalancers")}
    out: list[str] = []
    for batch in chunks(sorted(found), 20):  # DescribeTags takes 20 resources a call
        tagged = call("elbv2 describe-tags", elbv2.describe_tags, ResourceArns=batch)["TagDescriptions"]
        out += [found[d["ResourceArn"]] for d in tagged
                if any(t["Key"] == key and t.get("Value") == value for t in d.get("Tags", []))]
    return sorted(out)
