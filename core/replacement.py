"""Settings changes that would make Pulumi replace the live load balancer. Pure.

The load balancer's name is fixed, so a replacement fails as a duplicate name after the
fixed-name ProxyProtocol policy was deleted first: the live load balancer would stop sending
the header its hosts expect. Such a change is refused, with the safe way to make it.
"""

from __future__ import annotations

from core.settings import Settings


def replacing(s: Settings, described: dict | None) -> list[str]:
    """What in the settings forces a new load balancer, given the live one's description
    (the Classic ELB API's shape; None: there is none yet, so nothing is replaced)."""
    if not described:
        return []
    lb, out = s.load_balancer, []
    live_internal = described.get("Scheme") == "internal"
    if live_internal != lb.internal:
        out.append(f"loadBalancer.internal: {str(lb.internal).lower()}, the live load balancer is "
                   f"{'internal' if live_internal else 'internet-facing'}")
    live_subnets = set(described.get("Subnets") or [])
    if live_subnets and lb.subnets and not live_subnets & set(lb.subnets):
        out.append(f"loadBalancer.subnets: none of {', '.join(sorted(lb.subnets))} is one of the live load "
                   f"balancer's ({', '.join(sorted(live_subnets))})")
    if described.get("VPCId") and lb.vpc_id and described["VPCId"] != lb.vpc_id:
        out.append(f"loadBalancer.vpcId: {lb.vpc_id}, the live load balancer is in {described['VPCId']}")
    return out


def refusal(s: Settings, reasons: list[str]) -> str:
    """The error an operator reads, with the safe procedure (README: "Changes that replace the
    load balancer")."""
    name = s.load_balancer.name
    return (f"these settings would replace the live load balancer {name}: {'; '.join(reasons)}. Replacing it "
            "deletes the live one's ProxyProtocol policy first and then fails on the duplicate name, leaving "
            "hosts that read the header without it. Nothing was changed. Subnets: change them in steps that "
            "keep one live subnet each time (add the new ones, `pulumi up`, then remove the old ones). "
            "Otherwise: put the new load balancer in a new environment (its own loadBalancer.name, the same "
            "hosts), `fab rollout` and `pulumi up` it, move DNS to its dnsName, then `pulumi destroy` this one "
            "(README: Changes that replace the load balancer)")
