"""What each kind of load balancer should have, decided once for the Pulumi program and the
lab's applier: listeners and health check (classic); listeners, target groups and their health
checks (network). Pure. Where a network listener forwards is `core.network`'s."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from core.settings import Settings

HEALTH_PATH = "/healthz"  # served on ports.health by nginx/http.d/30-health.conf.j2


@dataclass(frozen=True)
class Listener:
    lb_port: int
    protocol: str  # "tcp" or "ssl" (TLS ends at the load balancer)
    instance_port: int  # always plain TCP on the instance: the PROXY line must not travel inside TLS


@dataclass(frozen=True)
class HealthCheck:
    target: str
    interval: int = 10
    timeout: int = 5
    healthy_threshold: int = 2
    unhealthy_threshold: int = 2


def listeners(s: Settings) -> list[Listener]:
    return [Listener(80, "tcp", s.ports.http), Listener(443, "ssl", s.ports.tls)]


def health_check(s: Settings) -> HealthCheck:
    """A plain HTTP port: never a PROXY header, healthy before, during and after the cutover."""
    return HealthCheck(target=f"HTTP:{s.ports.health}{HEALTH_PATH}")


# --- network load balancer (ELBv2) ---------------------------------------------------------

PLAIN, PROXY = "plain", "proxy"
TARGET_GROUP_NAME_MAX = 32


@dataclass(frozen=True)
class NetworkHealthCheck:
    protocol: str  # "HTTP" or "TCP"
    port: str  # "traffic-port" or an instance port
    path: str | None = None  # HTTP only
    matcher: str | None = None  # HTTP only
    interval: int = 10
    timeout: int = 5
    healthy_threshold: int = 2
    unhealthy_threshold: int = 2


@dataclass(frozen=True)
class TargetGroup:
    """One target group of a network listener: `plain` (no header) or `proxy` (PROXY v2)."""

    key: str  # "http-plain", "http-proxy", "tls-plain", "tls-proxy": stable resource names
    listener_port: int
    kind: str  # PLAIN or PROXY
    port: int  # the instance port
    proxy_protocol_v2: bool
    health: NetworkHealthCheck
    name: str  # the AWS name (32 characters at most)


@dataclass(frozen=True)
class NetworkListener:
    port: int
    protocol: str  # "TCP" or "TLS" (TLS ends at the load balancer; the instance side is plain TCP)
    role: str  # "http" or "tls"
    plain: TargetGroup
    proxy: TargetGroup
    # A TCP listener on this port forwards to the proxy group while proxy protocol is wanted and
    # this listener is not on it yet: AWS health-checks only a group a listener uses, so the proxy
    # group is proven healthy before the switch. No security group rule admits the port: nobody
    # connects to it, AWS checks the group all the same (docs/concepts.md#the-warm-listener).
    warm_port: int = 0

    def group(self, kind: str) -> TargetGroup:
        return self.proxy if kind == PROXY else self.plain


def target_group_name(lb_name: str, kind: str, port: int) -> str:
    """`<lb>-<kind>-<port>`, shortened with a digest of the load balancer's name when it would pass
    32 characters. The port is in the name because it cannot change on a target group: a new port
    is a new group, created before the old one is deleted, so two names must not collide."""
    suffix = f"-{kind}-{port}"
    full = lb_name + suffix
    if len(full) <= TARGET_GROUP_NAME_MAX:
        return full
    digest = hashlib.sha256(lb_name.encode()).hexdigest()[:6]
    keep = TARGET_GROUP_NAME_MAX - len(suffix) - len(digest) - 1
    return f"{lb_name[:keep].rstrip('-')}-{digest}{suffix}"


def network_health_check(s: Settings, kind: str) -> NetworkHealthCheck:
    """Plain groups: HTTP `GET /healthz` on `ports.health`, as the Classic ELB's check. Proxy groups:
    TCP on the group's own traffic port. With `proxy_protocol_v2` on, the load balancer's health
    checks carry a v2 header (command LOCAL) even on an overridden port, so the plain health port
    would see a header it does not read and fail; nginx skips LOCAL headers on a `proxy_protocol`
    port, so a check on the traffic port itself works. It proves that nginx listens there; that it
    reads the header is proven by `fab rollout` before the gate lets a listener forward there."""
    if kind == PROXY:
        return NetworkHealthCheck(protocol="TCP", port="traffic-port")
    return NetworkHealthCheck(protocol="HTTP", port=str(s.ports.health), path=HEALTH_PATH, matcher="200")


def network_listeners(s: Settings) -> list[NetworkListener]:
    """TCP:80 and TLS:443, each with a plain group (ports.http / ports.tls) and a proxy group
    (ports.proxyHttp / ports.proxyTls, `proxy_protocol_v2` on), and the port of its warm listener
    (loadBalancer.warmPort, and the next one)."""
    out = []
    for n, (port, protocol, role, plain, proxy) in enumerate(((80, "TCP", "http", s.ports.http, s.ports.proxy_http),
                                                              (443, "TLS", "tls", s.ports.tls, s.ports.proxy_tls))):
        groups = {kind: TargetGroup(key=f"{role}-{kind}", listener_port=port, kind=kind, port=instance_port,
                                    proxy_protocol_v2=kind == PROXY, health=network_health_check(s, kind),
                                    name=target_group_name(s.load_balancer.name, kind, instance_port))
                  for kind, instance_port in ((PLAIN, plain), (PROXY, proxy))}
        out.append(NetworkListener(port, protocol, role, groups[PLAIN], groups[PROXY], s.load_balancer.warm_port + n))
    return out


def drain_seconds(s: Settings) -> int:
    """How long, once the load balancer stopped sending the PROXY header, the hosts keep reading it
    before a turn-off takes it away. Network: `loadBalancer.deregistrationDelay`, as for a target
    leaving a group, and never less than `loadBalancer.switchDrain` (a delay of 0 must not make it
    0): a listener change reaches the load balancer's nodes over time (AWS states no bound; users
    report about 75 s), and until it has, new connections still go to the proxy groups' ports. Classic: none,
    the policy goes off in place (the cutover window: docs/concepts.md#the-cutover-window)."""
    lb = s.load_balancer
    return max(lb.deregistration_delay, lb.switch_drain) if lb.type == "network" else 0
