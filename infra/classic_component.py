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

from core.gate import Decision
from core.listeners import health_check, listeners
from core.settings import Settings
from infra.security import security_groups


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

        self.lb_security_group, self.instance_security_group = security_groups(
            name, s, [80, 443], [("http", s.ports.http), ("tls", s.ports.tls), ("health", s.ports.health)], child)

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
        self.zone_id = self.elb.zone_id  # its canonical hosted zone: an alias record's target zone
        self.register_outputs({
            "dnsName": self.elb.dns_name,
            "lbSecurityGroupId": self.lb_security_group.id,
            "instanceSecurityGroupId": self.instance_security_group.id,
        })
