"""Settings changes that would make Pulumi replace the live load balancer. Pure.

The load balancer's name is fixed, so a replacement fails as a duplicate name after the
fixed-name policies (Classic: the ProxyProtocol policy) were deleted first: the live load
balancer would stop sending the header its hosts expect. Such a change is refused, with the
safe way to make it: a second load balancer beside the live one, and `fab move` (docs/moving.md).
"""

from __future__ import annotations

from dataclasses import dataclass

from core.settings import Settings


@dataclass(frozen=True)
class Live:
    """What decides replacement, of the live load balancer as its API describes it."""

    internal: bool
    subnets: frozenset[str]
    vpc_id: str | None
    security_groups: bool = True  # an NLB created without one can never get one

    @classmethod
    def classic(cls, described: dict) -> Live:
        return cls(described.get("Scheme") == "internal", frozenset(described.get("Subnets") or []),
                   described.get("VPCId"))

    @classmethod
    def network(cls, described: dict) -> Live:
        return cls(described.get("Scheme") == "internal",
                   frozenset(z["SubnetId"] for z in described.get("AvailabilityZones", []) if z.get("SubnetId")),
                   described.get("VpcId"), bool(described.get("SecurityGroups")))


def replacing(s: Settings, live: Live | None) -> list[str]:
    """What in the settings forces a new load balancer (None: there is none yet)."""
    if live is None:
        return []
    lb, out = s.load_balancer, []
    if live.internal != lb.internal:
        out.append(f"loadBalancer.internal: {str(lb.internal).lower()}, the live load balancer is "
                   f"{'internal' if live.internal else 'internet-facing'}")
    wanted = set(lb.subnets)
    if lb.type == "network" and live.subnets - wanted:  # a network load balancer's subnets can only be added
        out.append(f"loadBalancer.subnets: {', '.join(sorted(live.subnets - wanted))} would be removed (a network "
                   "load balancer's subnets can only be added)")
    elif live.subnets and wanted and not live.subnets & wanted:
        out.append(f"loadBalancer.subnets: none of {', '.join(sorted(wanted))} is one of the live load "
                   f"balancer's ({', '.join(sorted(live.subnets))})")
    if live.vpc_id and lb.vpc_id and live.vpc_id != lb.vpc_id:
        out.append(f"loadBalancer.vpcId: {lb.vpc_id}, the live load balancer is in {live.vpc_id}")
    if lb.type == "network" and not live.security_groups:
        out.append("the live network load balancer has no security group, and one can only be given at creation")
    return out


def refusal(s: Settings, reasons: list[str]) -> str:
    """The error an operator reads, with the safe way (docs/moving.md)."""
    name = s.load_balancer.name
    steps = ("Subnets: add new ones only (`pulumi up`); " if s.load_balancer.type == "network" else
             "Subnets: change them in steps that keep one live subnet each time (add the new ones, `pulumi up`, "
             "then remove the old ones). ")
    return (f"these settings would replace the live load balancer {name}: {'; '.join(reasons)}. Replacing it "
            "deletes the live one's fixed-name parts first and then fails on the duplicate name, leaving "
            f"hosts that read the header without it. Nothing was changed. {steps}"
            f"Otherwise: {move_way(s)}")


def move_way(s: Settings) -> str:
    """How a change that needs a new load balancer is made without failing a request."""
    return ("keep loadBalancer as the live one is, set moveTo with the new load balancer (its own "
            "moveTo.loadBalancer.name, ports and proxyProtocol) and dns (the service's record in a Route 53 "
            f"zone), then run `fab move --env {s.env}`: the hosts serve both, the new one is created and "
            "proven, the weighted DNS records move the clients over, and the old one is retired once it "
            "drained (docs/moving.md)")


def other_kind_refusal(s: Settings) -> str:
    """Why a load balancer of the other kind under this name stands in the way: switching
    `loadBalancer.type` would delete it while its hosts may read (or not read) the header it sends."""
    other = "a Classic ELB" if s.load_balancer.type == "network" else "a network load balancer"
    return (f"{other} named {s.load_balancer.name} exists, and loadBalancer.type is "
            f"{s.load_balancer.type}: changing the kind would delete the live load balancer. Nothing was changed. "
            f"Put loadBalancer.type back; to change the kind, {move_way(s)}")


def renamed_refusal(s: Settings, others: list[str]) -> str:
    """Why settings naming a load balancer that does not exist, while this environment's live one
    exists under another name, are refused: `pulumi up` would create a new load balancer without
    the header (its gate starts closed) and delete the live one that DNS points at."""
    return (f"loadBalancer.name is {s.load_balancer.name}, but environment {s.env}'s load balancer in AWS is "
            f"{', '.join(others)} (tag wsgate:env={s.env}), and {s.load_balancer.name} does not exist: "
            "`pulumi up` would create a new load balancer without the PROXY header and delete the live one "
            "that DNS points at. Nothing was changed. Put loadBalancer.name back; to move to a new load balancer, "
            f"{move_way(s)}")
