"""What the load balancer looks like, decided once for the Pulumi program and the lab's
boto3 stand-in: listeners and health check (classic), listeners, target groups, their health
checks and where each listener forwards (network). Pure."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from core.errors import KitError
from core.gate import Plan
from core.record import ReadinessRecord
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
    (ports.proxyHttp / ports.proxyTls, `proxy_protocol_v2` on)."""
    out = []
    for port, protocol, role, plain, proxy in ((80, "TCP", "http", s.ports.http, s.ports.proxy_http),
                                               (443, "TLS", "tls", s.ports.tls, s.ports.proxy_tls)):
        groups = {kind: TargetGroup(key=f"{role}-{kind}", listener_port=port, kind=kind, port=instance_port,
                                    proxy_protocol_v2=kind == PROXY, health=network_health_check(s, kind),
                                    name=target_group_name(s.load_balancer.name, kind, instance_port))
                  for kind, instance_port in ((PLAIN, plain), (PROXY, proxy))}
        out.append(NetworkListener(port, protocol, role, groups[PLAIN], groups[PROXY]))
    return out


def network_forwarding(decision_ports: tuple[int, ...] | list[int], s: Settings) -> dict[int, str]:
    """Listener port -> PLAIN or PROXY: a listener forwards to its proxy group exactly when the
    gate's decision covers that group's port. Switching is one listener change; the hosts serve
    both ports all along. A proxy port the gate keeps that is no longer the configured one (the
    setting changed) does not keep its listener on proxy: the new group's port is unproven, and
    the plain group is always safe (client addresses are lost until it is proven, no request)."""
    return {x.port: PROXY if x.proxy.port in decision_ports else PLAIN for x in network_listeners(s)}


@dataclass(frozen=True)
class ListenerNow:
    """One network listener as the ELBv2 API says it is now (remote.aws.NetworkState.now)."""

    forwards: str | None  # PLAIN or PROXY: the kit's group of that kind it forwards to; None: elsewhere or absent
    proxy_healthy: bool  # its proxy group has targets and every one is `healthy`
    plain_retired: bool  # it forwards to its proxy group, and its plain group exists with no target registered
    plain_drained: bool = False  # retired, and not even a draining target left: the hosts may drop its port


UNSEEN = ListenerNow(None, False, False)  # a listener the load balancer does not have (yet)


def network_members(s: Settings, forwarding: dict[int, str], now: dict[int, ListenerNow],
                    join: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    """Group key -> the instances registered in it. Every member in every group, except the plain
    group of a listener that stays on its proxy group: that one is retired (its members
    deregistered, so AWS drains them for `deregistrationDelay` and then lists none; only then do
    the hosts stop serving its port, remote.aws.NetworkState.retired). Retiring starts only in an
    update after the one that switched (the listener forwards to the proxy group already, every
    target healthy there: the switch is in use), and a retired group stays empty while its listener
    stays on proxy."""
    out: dict[str, tuple[str, ...]] = {}
    for x in network_listeners(s):
        was = now.get(x.port, UNSEEN)
        retire = forwarding[x.port] == PROXY and was.forwards == PROXY and (was.plain_retired or was.proxy_healthy)
        out[x.plain.key] = () if retire else join
        out[x.proxy.key] = join
    return out


def back_refusal(s: Settings, forwarding: dict[int, str], now: dict[int, ListenerNow],
                 record: ReadinessRecord | None, members: tuple[str, ...], record_problem: str | None = None
                 ) -> str | None:
    """Why a listener must not move back to its plain group now (None: it may): its plain group was
    retired (no target registered), so the hosts may no longer serve its port, and the readiness
    record does not prove every member serving it again (`fab rollout --apply` does that before it
    switches back). `record`: this environment's record (None: none, or not this environment's,
    `record_problem` says why)."""
    stuck = [x for x in network_listeners(s)
             if forwarding[x.port] == PLAIN and now.get(x.port, UNSEEN).plain_retired
             and now[x.port].forwards != PLAIN and not (record and record.proves_plain(x.plain.port, list(members)))]
    if not stuck:
        return None
    names = ", ".join(f"listener {x.port} (plain port {x.plain.port})" for x in stuck)
    proof = ("the readiness record does not prove every instance serving the plain port"
             + (f" ({record_problem})" if record_problem and not record else ""))
    if s.proxy_protocol:  # not a turn-off: a proxy port the gate cannot keep (changed, or not proven)
        what = ("its proxy port is not proven (ports.proxyHttp/proxyTls changed, or the record does not cover "
                "it): put the proxy ports back and change them only while proxy protocol is off")
    else:
        what = "run `fab rollout --apply`: it serves and proves the plain ports again, then switches back"
    return (f"{names} would move back to its plain target group, which was retired: the hosts may no longer "
            f"serve the plain port and {proof}, so every request through it would fail. Nothing was changed; {what}")


def network_layout(s: Settings, gated: Plan, now: dict[int, ListenerNow], record: ReadinessRecord | None,
                   record_problem: str | None = None) -> tuple[dict[str, tuple[str, ...]], dict[int, str]]:
    """(group key -> members, listener port -> PLAIN or PROXY) for the gate's plan and what AWS has
    now (remote.aws.NetworkState.now); refuses a move back to a retired plain group not proven."""
    forwarding = network_forwarding(gated.decision.ports, s)
    foreign = record.foreign(s.env, s.load_balancer.name) if record else None
    own = None if foreign else record
    refused = back_refusal(s, forwarding, now, own, gated.join, foreign or (None if record else record_problem))
    if refused:
        raise KitError(refused)
    return network_members(s, forwarding, now, gated.join), forwarding


def drain_seconds(s: Settings) -> int:
    """How long, once the load balancer stopped sending the PROXY header, the hosts keep reading it
    before a turn-off takes it away. Network: `loadBalancer.deregistrationDelay`, as for a target
    leaving a group: a listener change reaches the load balancer's nodes over time (AWS states no
    bound), and until it has, new connections still go to the proxy groups' ports. Classic: none,
    the policy goes off in place (the cutover window the README measures)."""
    return s.load_balancer.deregistration_delay if s.load_balancer.type == "network" else 0
