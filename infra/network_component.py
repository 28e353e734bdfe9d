"""The Network Load Balancer (ELBv2) in front of the WebSocket hosts, as one Pulumi component.

Listeners TCP:80 and TLS:443. Each has two target groups: plain (instance port ports.http /
ports.tls, no header) and proxy (ports.proxyHttp / ports.proxyTls, `proxy_protocol_v2` on). The
hosts serve both ports all along, so the cutover is a switch of the listener's default action,
never the PROXY attribute flipped on a group in use (which AWS does not apply atomically across
its nodes). Which group each listener forwards to is the gate's: core.network.network_forwarding.
"""

from __future__ import annotations

from dataclasses import dataclass

import pulumi
import pulumi_aws as aws

from core.listeners import TargetGroup, network_listeners
from core.network import SWITCHED_TAG, warm_group
from core.settings import Settings
from infra.security import security_groups


@dataclass(frozen=True)
class NetworkLoadBalancerArgs:
    settings: Settings
    forwarding: dict[int, str]  # listener port -> "plain" or "proxy" (core.network.network_forwarding)
    members: dict[str, tuple[str, ...]]  # group key -> the instances registered there (core.network.network_members)
    warm: tuple[int, ...] = ()  # the listeners whose warm listener exists (core.network.warm_listeners)
    holds: dict[int, str] | None = None  # listener port -> why it waits for its other group's health
    switched: dict[int, str | None] | None = None  # listener port -> its switch time tag (core.network.switch_stamps)
    retire_waits: dict[int, str] | None = None  # listener port -> why its plain group is kept, until when


class WsGateNetworkLoadBalancer(pulumi.ComponentResource):
    """NLB, security groups, four target groups with their attachments, two listeners, and a warm
    listener for each group a listener is to switch to (core.network.warm_listeners)."""

    def __init__(self, name: str, args: NetworkLoadBalancerArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("wsgate:index:NetworkLoadBalancer", name, None, opts)
        s, lb = args.settings, args.settings.load_balancer
        child = pulumi.ResourceOptions(parent=self)
        tags = {"wsgate:env": s.env, **lb.tags}
        listeners = network_listeners(s)

        # An NLB takes security groups only if it is created with one: it always gets this one. Only
        # the load balancer reaches the instance ports: that holds because client IP preservation
        # is off on every group (see _target_group).
        self.lb_security_group, self.instance_security_group = security_groups(
            name, s, [x.port for x in listeners],
            [("http", s.ports.http), ("tls", s.ports.tls), ("proxy-http", s.ports.proxy_http),
             ("proxy-tls", s.ports.proxy_tls), ("health", s.ports.health)], child)

        self.nlb = aws.lb.LoadBalancer(
            f"{name}-nlb",
            name=lb.name,
            load_balancer_type="network",
            subnets=lb.subnets,
            internal=lb.internal,
            security_groups=[self.lb_security_group.id],
            enable_cross_zone_load_balancing=lb.cross_zone,
            access_logs=aws.lb.LoadBalancerAccessLogsArgs(
                bucket=lb.access_logs.bucket, prefix=lb.access_logs.prefix, enabled=True) if lb.access_logs else None,
            tags=tags,
            opts=child,
        )

        self.target_groups: dict[str, aws.lb.TargetGroup] = {}
        self.members: dict[str, list[aws.lb.TargetGroupAttachment]] = {}
        for listener in listeners:
            for group in (listener.plain, listener.proxy):
                tg = self._target_group(name, s, group, tags, child)
                self.target_groups[group.key] = tg
                # every member in every group (a switch needs no registration), but a retired plain group
                self.members[group.key] = [aws.lb.TargetGroupAttachment(
                    f"{name}-{group.key}-{instance}", target_group_arn=tg.arn, target_id=instance,
                    port=group.port, opts=child,
                ) for instance in args.members[group.key]]

        self.listeners: dict[int, aws.lb.Listener] = {}
        for listener in listeners:
            target = listener.group(args.forwarding[listener.port])
            tls = listener.protocol == "TLS"
            self.listeners[listener.port] = aws.lb.Listener(
                f"{name}-{listener.port}",
                load_balancer_arn=self.nlb.arn,
                port=listener.port,
                protocol=listener.protocol,
                certificate_arn=lb.certificate_arn if tls else None,
                ssl_policy=lb.ssl_policy if tls else None,
                alpn_policy=lb.alpn_policy if tls else None,
                tcp_idle_timeout_seconds=None if tls else lb.idle_timeout,  # TLS listeners: fixed at 350 s
                default_actions=[aws.lb.ListenerDefaultActionArgs(
                    type="forward", target_group_arn=self.target_groups[target.key].arn)],
                # when it switched to its proxy group: AWS's clock for retiring its plain group
                tags={**tags, **({SWITCHED_TAG: at} if (at := (args.switched or {}).get(listener.port)) else {})},
                # never forward to a group before its members are registered (a new group after a port change)
                opts=pulumi.ResourceOptions(parent=self, depends_on=list(self.members[target.key])),
            )

        # A warm listener per group a listener is to move to (its proxy group, or back to its plain
        # group): AWS health-checks only a group a listener uses. No security group rule admits its
        # port: nobody connects, AWS checks anyway.
        self.warm: dict[int, aws.lb.Listener] = {}
        for listener in (x for x in listeners if x.port in args.warm):
            group = warm_group(listener, args.forwarding)
            self.warm[listener.port] = aws.lb.Listener(
                f"{name}-warm-{listener.role}",
                load_balancer_arn=self.nlb.arn,
                port=listener.warm_port,
                protocol="TCP",
                default_actions=[aws.lb.ListenerDefaultActionArgs(
                    type="forward", target_group_arn=self.target_groups[group.key].arn)],
                tags={**tags, "wsgate:warm": str(listener.port)},
                opts=pulumi.ResourceOptions(parent=self, depends_on=list(self.members[group.key])),
            )

        self.dns_name = self.nlb.dns_name
        self.zone_id = self.nlb.zone_id  # its canonical hosted zone: an alias record's target zone
        self.forwarding, self.group_members = args.forwarding, args.members  # the gate's layout, for the outputs
        self.settings, self.health_waiting, self.warm_for = s, dict(args.holds or {}), args.warm
        self.retire_waiting = dict(args.retire_waits or {})
        self.register_outputs({
            "dnsName": self.nlb.dns_name,
            "lbSecurityGroupId": self.lb_security_group.id,
            "instanceSecurityGroupId": self.instance_security_group.id,
        })

    def _target_group(self, name: str, s: Settings, group: TargetGroup, tags: dict[str, str],
                      opts: pulumi.ResourceOptions) -> aws.lb.TargetGroup:
        check = group.health
        return aws.lb.TargetGroup(
            f"{name}-{group.key}",
            name=group.name,
            port=group.port,
            protocol="TCP",
            target_type="instance",
            vpc_id=s.load_balancer.vpc_id,
            proxy_protocol_v2=group.proxy_protocol_v2,
            # On by default for instance targets: the instance would see the client as the TCP
            # source, so its security group would have to admit the world, and then anyone could
            # reach a proxy_protocol port directly and forge a header (and set_real_ip_from, the
            # load balancer's subnets, would not match). Off: only the load balancer connects.
            preserve_client_ip="false",
            deregistration_delay=s.load_balancer.deregistration_delay,
            health_check=aws.lb.TargetGroupHealthCheckArgs(
                enabled=True, protocol=check.protocol, port=check.port, path=check.path, matcher=check.matcher,
                interval=check.interval, timeout=check.timeout, healthy_threshold=check.healthy_threshold,
                unhealthy_threshold=check.unhealthy_threshold),
            tags={**tags, "wsgate:listener": str(group.listener_port), "wsgate:kind": group.kind},
            opts=opts,
        )
