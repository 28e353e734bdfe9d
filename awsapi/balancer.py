"""The environment's load balancer, of either kind: where it sends traffic and the PROXY header
now, which instances it has, and whether the settings would replace it or another kind stands
under its name. Every answer is read from AWS, never from a marker of ours."""

from __future__ import annotations

from dataclasses import dataclass, field

from awsapi import classic, ec2, network
from awsapi.clients import loopback
from core.errors import KitError
from core.network import NetworkState, group_health, target_health
from core.replacement import Live, other_kind_refusal, refusal, renamed_refusal, replacing
from core.settings import Settings


@dataclass(frozen=True)
class Traffic:
    """What the load balancer does now, from one read."""

    header_ports: list[int]  # instance ports it sends the PROXY header to
    # every instance port a listener forwards to now (classic: its listeners' instance ports)
    forwarded: list[int]
    # network: the plain ports the hosts may stop serving (core.network.NetworkState.retired)
    retired: list[int] = field(default_factory=list)
    # network: the read these came from (None: no such load balancer), for a task that needs more of it
    state: NetworkState | None = field(default=None, compare=False, repr=False)
    # the instances it sends traffic to now (network: in a group a listener forwards to)
    registered: list[str] = field(default_factory=list)
    # network: the instances in any of the kit's groups, forwarded to or not (None: `registered`)
    present: list[str] | None = None


def traffic(settings: Settings) -> Traffic:
    """Where the load balancer sends traffic now, as AWS says; a load balancer of the other kind
    under this name is refused."""
    if other_kind(settings):
        raise KitError(other_kind_refusal(settings))
    if settings.load_balancer.type == "network":
        state = network.network_state(settings)
        if state is None:
            return Traffic([], [])
        return Traffic(state.header_ports, state.forwarded_ports, state.retired(settings), state,
                       registered=state.serving, present=list(state.present))
    listeners = (classic.describe(settings) or {}).get("ListenerDescriptions", [])
    forwarded = sorted({int(x["Listener"]["InstancePort"]) for x in listeners})
    return Traffic(classic.header_ports(settings), forwarded, registered=classic.registered(settings))


@dataclass(frozen=True)
class Health:
    """The instances the load balancer sends traffic to, and their health, from one read."""

    registered: list[str]  # network: the instances in a group a listener forwards to
    states: dict[str, str]  # instance -> InService, or OutOfService (why): core.health's words


def health(settings: Settings) -> Health | None:
    """The load balancer's instances and their health as its API says (None: it does not exist);
    a network load balancer's instance is healthy only where healthy in every group it is in."""
    if settings.load_balancer.type == "network":
        state = network.network_state(settings)
        return Health(state.serving, target_health(group_health(state))) if state else None
    found = classic.describe(settings)
    if found is None:
        return None
    return Health([i["InstanceId"] for i in found.get("Instances", [])], classic.instance_health(settings, found))


def header_ports(settings: Settings) -> list[int]:
    """The header ports: where the load balancer sends the PROXY header now (`traffic`)."""
    return traffic(settings).header_ports


def other_kind(settings: Settings) -> bool:
    """A load balancer of the other kind stands under this name. Asked only where that API has an
    endpoint (the lab may have none)."""
    is_network = settings.load_balancer.type == "network"
    service = "elb" if is_network else "elbv2"
    endpoints = settings.aws.endpoints
    if service not in endpoints and any(loopback(url) for url in endpoints.values()):
        return False  # a loopback endpoint without that API: never ask a real one from here
    if is_network:
        return classic.describe(settings) is not None
    return (network.describe_v2(settings) or {}).get("Type") == "network"  # an ALB of this name is not ours


def refuse_replacement(settings: Settings, ours: tuple[str, ...] | list[str] = ()) -> None:
    """Stop before any change when the settings would replace the live load balancer (the Pulumi
    program and the lab's applier both ask, before they decide anything). `ours`: the names of the
    environment's load balancers (`Settings.balancer_names`: loadBalancer and moveTo's during a
    move): another of them is no rename of this one."""
    if other_kind(settings):
        raise KitError(other_kind_refusal(settings))
    if settings.load_balancer.type == "network":
        described = network.describe_network(settings)
        live = Live.network(described) if described else None
    else:
        described = classic.describe(settings)
        live = Live.classic(described) if described else None
    reasons = replacing(settings, live)
    if reasons:
        raise KitError(refusal(settings, reasons))
    if live is None:
        others = [n for n in renamed_from(settings) if n not in (*ours, *settings.balancer_names)]
        if others:
            raise KitError(renamed_refusal(settings, others))


def renamed_from(settings: Settings) -> list[str]:
    """The load balancers of this environment (tag `wsgate:env`, which both kinds and the lab's
    applier set) under another name than `loadBalancer.name`: what a rename would replace. Each
    API is asked only where it has an endpoint (the lab may have only one of them)."""
    endpoints, out = settings.aws.endpoints, []
    lab = any(loopback(url) for url in endpoints.values())
    for service, api in (("elb", classic), ("elbv2", network)):
        if lab and service not in endpoints:
            continue
        out += [n for n in api.names_tagged(settings, "wsgate:env", settings.env) if n != settings.load_balancer.name]
    return sorted(out)


def registered_instances(settings: Settings) -> dict[str, str]:
    """The load balancer's instances: those registered, and those configured that wait to join
    (they must be rolled out to be proven): instance ID -> private IP address."""
    if settings.load_balancer.type == "network":
        state = network.network_state(settings)
        registered = list(state.present) if state else []
    else:
        registered = classic.registered(settings)
    return ec2.private_addresses(settings, sorted(set(registered) | set(settings.load_balancer.instances)))
