"""The service's weighted alias record for one load balancer, as a Pulumi resource.

One record per declared load balancer at `dns.name`: type A, SetIdentifier `wsgate:<env>:<lb>`,
the weight `core.move.declared` gives it, an alias to the load balancer's DNS name and canonical
hosted zone with `evaluateTargetHealth` on. Its resource name derives from the load balancer's
name, and it is the load balancer component's child, so its URN stays put when moveTo is promoted
to loadBalancer. `allow_overwrite` is off: the kit never takes over a record it did not make.
"""

from __future__ import annotations

import pulumi
import pulumi_aws as aws

from awsapi.route53 import LAB_CLASSIC_ZONE, identifier
from core.settings import Settings


def resource_name(lb_name: str) -> str:
    """The record's Pulumi resource name: the load balancer's name and `-dns`."""
    return f"{lb_name}-dns"


def alias_zone(zone_id: pulumi.Input[str] | None, lab: bool) -> pulumi.Output[str]:
    """The load balancer's canonical hosted zone; in the lab, where moto's Classic ELB reports none,
    AWS's us-east-1 Classic ELB zone (awsapi.route53.LAB_CLASSIC_ZONE)."""
    def chosen(zone: str | None) -> str:
        return zone or (LAB_CLASSIC_ZONE if lab else "")

    return pulumi.Output.from_input(zone_id).apply(chosen)


def weighted_record(s: Settings, weight: int, dns_name: pulumi.Input[str], zone_id: pulumi.Input[str],
                    parent: pulumi.Resource, lab: bool = False,
                    after: list[pulumi.Resource] | None = None) -> aws.route53.Record:
    """The weighted alias record of load balancer `s.load_balancer` (settings `s`, whose dns is set);
    `after`: records whose change must be made first (a weight that rises before one that falls, so
    no update leaves every record at 0, which Route 53 would answer as all equal)."""
    dns = s.dns
    assert dns is not None
    lb = s.load_balancer.name
    return aws.route53.Record(
        resource_name(lb),
        zone_id=dns.zone_id,
        name=dns.name,
        type="A",
        set_identifier=identifier(s, lb),
        weighted_routing_policies=[aws.route53.RecordWeightedRoutingPolicyArgs(weight=weight)],
        aliases=[aws.route53.RecordAliasArgs(name=dns_name, zone_id=alias_zone(zone_id, lab),
                                             evaluate_target_health=True)],
        allow_overwrite=False,
        opts=pulumi.ResourceOptions(parent=parent, depends_on=after or None),
    )
