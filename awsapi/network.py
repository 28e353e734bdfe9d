"""A network load balancer as the ELBv2 API describes it now (`core.network.NetworkState`)."""

from __future__ import annotations

from awsapi.clients import AwsError, by_name, call, chunks, client, found_pages, pages
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
    arns = sorted({a for arns in forwards.values() for a in arns})
    kits = _kit_groups(settings)
    descriptions = {**kits, **_groups_of(settings, [a for a in arns if a not in kits])}
    groups = {a: _target_group(settings, descriptions[a]) for a in arns}
    kit = [_target_group(settings, d) for a, d in kits.items() if a not in groups]
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


def _kit_groups(settings: Settings) -> dict[str, dict]:
    """The kit's four target groups that exist (by their names: core.listeners), ARN -> description,
    in their order there. One call while all four exist; AWS refuses a call that names a missing
    one (TargetGroupNotFound), so then one call a name."""
    elbv2 = client(settings, "elbv2")
    names = [g.name for x in network_listeners(settings) for g in (x.plain, x.proxy)]

    def described(named: list[str]) -> list[dict] | None:
        return found_pages(f"elbv2 describe-target-groups {' '.join(named)}", elbv2, "describe_target_groups",
                           "TargetGroups", ("TargetGroupNotFound",), Names=named)

    found = described(names)
    if found is None:
        found = [g for name in names for g in described([name]) or []]
    rank = {name: n for n, name in enumerate(names)}
    return {g["TargetGroupArn"]: g for g in sorted(found, key=lambda g: rank.get(g["TargetGroupName"], len(rank)))}


def _groups_of(settings: Settings, arns: list[str]) -> dict[str, dict]:
    """The target groups of these ARNs, ARN -> description (a call per 20 ARNs)."""
    elbv2 = client(settings, "elbv2")
    out: dict[str, dict] = {}
    for batch in chunks(arns, 20):
        out.update((g["TargetGroupArn"], g) for g in pages(
            f"elbv2 describe-target-groups {' '.join(batch)}", elbv2, "describe_target_groups", "TargetGroups",
            TargetGroupArns=batch))
    missing = [a for a in arns if a not in out]
    if missing:
        raise AwsError(f"elbv2 describe-target-groups {' '.join(missing)}: not described")
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


def _target_group(settings: Settings, group: dict) -> TargetGroupState:
    """A described target group with its attributes and its targets' health (a call each: AWS
    takes one group a call for both)."""
    elbv2 = client(settings, "elbv2")
    arn = group["TargetGroupArn"]
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
