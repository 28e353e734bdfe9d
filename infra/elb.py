"""The Classic ELB in front of the WebSocket hosts, as one Pulumi component.

Listeners TCP:80 -> instance TCP:http and SSL:443 -> instance TCP:tls (the backend side of
the SSL listener must be TCP: over an SSL backend the PROXY line would travel inside TLS,
where nginx does not look). The ProxyProtocol policy and its per-port attachments exist
only when the gate says so; each port is managed by exactly one resource.
"""

from __future__ import annotations

from dataclasses import dataclass

import pulumi
import pulumi_aws as aws

from core.elb import health_check, listeners
from core.gate import Decision
from core.settings import Settings


@dataclass(frozen=True)
class LoadBalancerArgs:
    settings: Settings
    decision: Decision
    members: tuple[str, ...]  # the instances registered (new ones only once proven: core.gate.plan)


class WsGateLoadBalancer(pulumi.ComponentResource):
    """ELB, security groups, instance attachments, TLS policy and the gated ProxyProtocol policy."""

    def __init__(self, name: str, args: LoadBalancerArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("wsgate:index:LoadBalancer", name, None, opts)
        s, lb = args.settings, args.settings.load_balancer
        child = pulumi.ResourceOptions(parent=self)
        tags = {"wsgate:env": s.env, **lb.tags}

        self.lb_security_group = aws.ec2.SecurityGroup(
            f"{name}-lb", description=f"wsgate {s.env}: load balancer listeners",
            vpc_id=lb.vpc_id, tags={**tags, "Name": f"{lb.name}-lb"}, opts=child,
        )
        self.instance_security_group = aws.ec2.SecurityGroup(
            f"{name}-instances", description=f"wsgate {s.env}: instance ports, from the load balancer only",
            vpc_id=lb.vpc_id, tags={**tags, "Name": f"{lb.name}-instances"}, opts=child,
        )
        for family, everywhere in (("ipv4", "0.0.0.0/0"), ("ipv6", "::/0")):
            # Outbound as a default group allows it (the app's upstreams, packages, AWS APIs):
            # a group with no egress rule, used as an instance's only group, cuts all of it.
            aws.vpc.SecurityGroupEgressRule(
                f"{name}-instances-out-{family}", security_group_id=self.instance_security_group.id,
                ip_protocol="-1", cidr_ipv4=everywhere if family == "ipv4" else None,
                cidr_ipv6=everywhere if family == "ipv6" else None, description="outbound", opts=child,
            )
        for port in (80, 443):
            for i, cidr in enumerate(lb.allowed_cidrs):
                aws.vpc.SecurityGroupIngressRule(
                    f"{name}-lb-{port}-{i}", security_group_id=self.lb_security_group.id,
                    ip_protocol="tcp", from_port=port, to_port=port, cidr_ipv4=cidr if ":" not in cidr else None,
                    cidr_ipv6=cidr if ":" in cidr else None, description=f"listener {port}", opts=child,
                )
        for role, port in (("http", s.ports.http), ("tls", s.ports.tls), ("health", s.ports.health)):
            # Only the load balancer may reach these: anyone else could forge a PROXY header.
            aws.vpc.SecurityGroupIngressRule(
                f"{name}-instances-{role}", security_group_id=self.instance_security_group.id,
                ip_protocol="tcp", from_port=port, to_port=port,
                referenced_security_group_id=self.lb_security_group.id,
                description=f"{role} from the load balancer", opts=child,
            )
            aws.vpc.SecurityGroupEgressRule(
                f"{name}-lb-to-{role}", security_group_id=self.lb_security_group.id,
                ip_protocol="tcp", from_port=port, to_port=port,
                referenced_security_group_id=self.instance_security_group.id,
                description=f"to instance {role} port", opts=child,
            )

        check = health_check(s)
        self.elb = aws.elb.LoadBalancer(
            f"{name}-elb",
            name=lb.name,
            subnets=lb.subnets or None,
            availability_zones=lb.availability_zones or None,
            internal=lb.internal,
            security_groups=[self.lb_security_group.id],
            listeners=[
                aws.elb.LoadBalancerListenerArgs(
                    lb_port=x.lb_port, lb_protocol=x.protocol, instance_port=x.instance_port, instance_protocol="tcp",
                    ssl_certificate_id=lb.certificate_arn if x.protocol == "ssl" else None)
                for x in listeners(s)
            ],
            health_check=aws.elb.LoadBalancerHealthCheckArgs(
                target=check.target, interval=check.interval, timeout=check.timeout,
                healthy_threshold=check.healthy_threshold, unhealthy_threshold=check.unhealthy_threshold),
            idle_timeout=lb.idle_timeout,
            cross_zone_load_balancing=lb.cross_zone,
            connection_draining=lb.connection_draining > 0,
            connection_draining_timeout=lb.connection_draining or None,
            access_logs=aws.elb.LoadBalancerAccessLogsArgs(
                bucket=lb.access_logs.bucket, bucket_prefix=lb.access_logs.prefix,
                interval=lb.access_logs.interval, enabled=True) if lb.access_logs else None,
            tags=tags,
            opts=child,
        )

        for instance in args.members:  # one mechanism only: Attachment, never `instances=` too
            aws.elb.Attachment(f"{name}-{instance}", elb=self.elb.id, instance=instance, opts=child)

        tls_policy = aws.elb.LoadBalancerPolicy(
            f"{name}-tls-policy", load_balancer_name=self.elb.name,
            policy_name=f"{lb.name}-tls", policy_type_name="SSLNegotiationPolicyType",
            policy_attributes=[aws.elb.LoadBalancerPolicyPolicyAttributeArgs(
                name="Reference-Security-Policy", value=lb.ssl_policy)],
            opts=pulumi.ResourceOptions(parent=self, delete_before_replace=True),
        )
        # A certificate or instance-port change deletes and recreates the 443 listener, and its
        # policies go with it: the triggers make the listener policy follow (be reapplied).
        self.tls_listener_policy = aws.elb.ListenerPolicy(
            f"{name}-tls-443", load_balancer_name=self.elb.name, load_balancer_port=443,
            policy_names=[tls_policy.policy_name],
            triggers={"certificate": lb.certificate_arn, "instancePort": str(s.ports.tls)}, opts=child,
        )

        if args.decision.ports:
            # Name and type force replacement; the fixed name must be deleted before it is recreated.
            policy = aws.elb.LoadBalancerPolicy(
                f"{name}-proxy-protocol", load_balancer_name=self.elb.name,
                policy_name=f"{lb.name}-proxy-protocol", policy_type_name="ProxyProtocolPolicyType",
                policy_attributes=[aws.elb.LoadBalancerPolicyPolicyAttributeArgs(name="ProxyProtocol", value="true")],
                opts=pulumi.ResourceOptions(parent=self, delete_before_replace=True),
            )
            for port in args.decision.ports:  # one resource per port: AWS replaces a port's whole policy list
                aws.elb.LoadBalancerBackendServerPolicy(
                    f"{name}-proxy-protocol-{port}", load_balancer_name=self.elb.name, instance_port=port,
                    policy_names=[policy.policy_name], opts=child,
                )

        self.dns_name = self.elb.dns_name
        self.register_outputs({
            "dnsName": self.elb.dns_name,
            "lbSecurityGroupId": self.lb_security_group.id,
            "instanceSecurityGroupId": self.instance_security_group.id,
        })
