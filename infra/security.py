"""The two security groups every kind of load balancer gets: its own (listeners from
`allowedCidrs`) and the instances' (their ports from the load balancer's group only)."""

from __future__ import annotations

import pulumi
import pulumi_aws as aws

from core.settings import Settings


def security_groups(name: str, s: Settings, listener_ports: list[int], instance_ports: list[tuple[str, int]],
                    opts: pulumi.ResourceOptions) -> tuple[aws.ec2.SecurityGroup, aws.ec2.SecurityGroup]:
    """(the load balancer's group, the instances' group)."""
    lb = s.load_balancer
    tags = {"wsgate:env": s.env, **lb.tags}
    lb_group = aws.ec2.SecurityGroup(
        f"{name}-lb", description=f"wsgate {s.env}: load balancer listeners",
        vpc_id=lb.vpc_id, tags={**tags, "Name": f"{lb.name}-lb"}, opts=opts,
    )
    instance_group = aws.ec2.SecurityGroup(
        f"{name}-instances", description=f"wsgate {s.env}: instance ports, from the load balancer only",
        vpc_id=lb.vpc_id, tags={**tags, "Name": f"{lb.name}-instances"}, opts=opts,
    )
    for family, everywhere in (("ipv4", "0.0.0.0/0"), ("ipv6", "::/0")):
        # Outbound as a default group allows it (the app's upstreams, packages, AWS APIs): a
        # group with no egress rule, used as an instance's only group, cuts all of it.
        aws.vpc.SecurityGroupEgressRule(
            f"{name}-instances-out-{family}", security_group_id=instance_group.id,
            ip_protocol="-1", cidr_ipv4=everywhere if family == "ipv4" else None,
            cidr_ipv6=everywhere if family == "ipv6" else None, description="outbound", opts=opts,
        )
    for port in listener_ports:
        for i, cidr in enumerate(lb.allowed_cidrs):
            aws.vpc.SecurityGroupIngressRule(
                f"{name}-lb-{port}-{i}", security_group_id=lb_group.id,
                ip_protocol="tcp", from_port=port, to_port=port, cidr_ipv4=cidr if ":" not in cidr else None,
                cidr_ipv6=cidr if ":" in cidr else None, description=f"listener {port}", opts=opts,
            )
    for role, port in instance_ports:
        # Only the load balancer may reach these: anyone else could forge a PROXY header.
        aws.vpc.SecurityGroupIngressRule(
            f"{name}-instances-{role}", security_group_id=instance_group.id,
            ip_protocol="tcp", from_port=port, to_port=port, referenced_security_group_id=lb_group.id,
            description=f"{role} from the load balancer", opts=opts,
        )
        aws.vpc.SecurityGroupEgressRule(
            f"{name}-lb-to-{role}", security_group_id=lb_group.id,
            ip_protocol="tcp", from_port=port, to_port=port, referenced_security_group_id=instance_group.id,
            description=f"to instance {role} port", opts=opts,
        )
    return lb_group, instance_group
