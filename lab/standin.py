"""HAProxy standing in for the load balancer, following the lab AWS endpoint's state.

One frontend per listener (TCP, and SSL/TLS terminated with the lab certificate), `mode tcp`:
- Classic ELB: backends = the instances registered with the ELB on each listener's instance
  port, `send-proxy` (v1) on exactly the ports whose ProxyProtocol policy is attached, the ELB's
  idle timeout and its HTTP health check.
- Network load balancer: each listener's backend = the targets registered in the target group
  the listener forwards to, on that group's port, `send-proxy-v2` exactly when the group has
  `proxy_protocol_v2` on, and the group's own health check (HTTP GET on the health port for a
  plain group, TCP on the traffic port for a proxy group), sent with a v2 LOCAL header
  (`check-send-proxy`) where the group sends the header, as the NLB's checks are.
It re-reads that state every 0.2 s and reloads HAProxy seamlessly (master-worker, SIGUSR2) when
it changes: established connections stay with the old worker and the old backend, new ones take
the new route. So attaching the policy, or switching a listener, is what moves the traffic, as on
AWS.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

from awsapi import classic, network
from awsapi.clients import client
from core.errors import KitError
from core.network import TargetGroupState
from core.settings import NLB_TLS_IDLE_TIMEOUT, Settings

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
LISTEN = {80: 18800, 443: 18443}  # load balancer listener port -> the stand-in's port on 127.0.0.1
CHECK_TIMING = "inter 1s fall 2 rise 2"  # faster than AWS's, so the lab notices within seconds


@dataclass(frozen=True)
class Check:
    """The load balancer's health check of a backend's servers."""

    path: str | None  # HTTP GET this path; None: a TCP connect
    port: int | None  # None: the traffic port
    send_proxy: bool = False  # the check starts with the server's PROXY header (v2: command LOCAL)


@dataclass(frozen=True)
class Server:
    name: str
    address: str
    port: int
    proxy: str  # "", "send-proxy" (v1) or "send-proxy-v2"


@dataclass(frozen=True)
class Route:
    """One listener: where the load balancer sends its new connections now."""

    lb_port: int
    tls: bool  # TLS ends at the load balancer
    idle_timeout: int
    backend: str
    servers: tuple[Server, ...]
    check: Check | None

    @property
    def header(self) -> bool:
        return any(s.proxy for s in self.servers)


@dataclass(frozen=True)
class LbState:
    routes: tuple[Route, ...]

    @property
    def header(self) -> bool | None:
        """Whether the load balancer sends the PROXY header: on every route that has servers (True),
        on none (False), or on some (None)."""
        seen = {r.header for r in self.routes if r.servers}
        return None if len(seen) > 1 else seen == {True}


def read_state(settings: Settings) -> LbState | None:
    """The load balancer as the AWS API describes it, or None when it does not exist."""
    return network_state(settings) if settings.load_balancer.type == "network" else classic_state(settings)


def _addresses(settings: Settings) -> dict[str, str]:
    """Instance ID -> the address its nginx listens on."""
    return {h.instance_id: settings.bind_of(h) or h.address for h in settings.hosts if h.instance_id}


def classic_state(settings: Settings) -> LbState | None:
    d = classic.describe(settings)
    if d is None:
        return None
    addresses = _addresses(settings)
    attrs = client(settings, "elb").describe_load_balancer_attributes(
        LoadBalancerName=settings.load_balancer.name)["LoadBalancerAttributes"]
    idle = attrs["ConnectionSettings"]["IdleTimeout"]
    check = elb_check(d.get("HealthCheck", {}).get("Target", ""))
    proxied = classic.header_ports(settings)
    members = sorted({(i["InstanceId"], addresses[i["InstanceId"]]) for i in d.get("Instances", [])
                      if i["InstanceId"] in addresses})
    routes = []
    for x in sorted(d.get("ListenerDescriptions", []), key=lambda x: x["Listener"]["LoadBalancerPort"]):
        listener, port = x["Listener"], x["Listener"]["InstancePort"]
        servers = tuple(Server(i, a, port, "send-proxy" if port in proxied else "") for i, a in members)
        routes.append(Route(listener["LoadBalancerPort"], listener["Protocol"].upper() in ("SSL", "HTTPS"), idle,
                            f"port_{port}", servers, check))
    return LbState(tuple(routes))


def elb_check(target: str) -> Check | None:
    """A Classic ELB health check target (`HTTP:8081/healthz`, `TCP:81`) as a Check."""
    protocol, _, rest = target.partition(":")
    port, slash, path = rest.partition("/")
    if protocol == "HTTP" and port.isdigit():
        return Check(slash + path, int(port))
    if protocol == "TCP" and port.isdigit():
        return Check(None, int(port))
    return None


def network_state(settings: Settings) -> LbState | None:
    state = network.network_state(settings)
    if state is None:
        return None
    addresses = _addresses(settings)
    return LbState(tuple(_network_route(settings, port, groups, state.protocols.get(port, "TCP"), addresses)
                         for port, groups in state.listeners.items()))


def _network_route(settings: Settings, port: int, groups: tuple[TargetGroupState, ...], protocol: str,
                   addresses: dict[str, str]) -> Route:
    tls = protocol == "TLS"
    idle = NLB_TLS_IDLE_TIMEOUT if tls else settings.load_balancer.idle_timeout  # TLS: fixed by AWS
    if not groups:
        return Route(port, tls, idle, f"listener_{port}", (), None)
    if len(groups) > 1:
        raise KitError(f"listener {port} forwards to {len(groups)} target groups; the stand-in follows one")
    (group,) = groups
    proxy = "send-proxy-v2" if group.proxy_protocol_v2 else ""
    servers = tuple(Server(i, addresses[i], group.port, proxy) for i in group.targets if i in addresses)
    return Route(port, tls, idle, group.name, servers, group_check(group))


def group_check(group: TargetGroupState) -> Check | None:
    """A target group's health check as a Check: with PROXY v2 on, every check carries a v2 LOCAL
    header, on whatever port it is made."""
    h = group.health
    if h is None:
        return None
    return Check(h.path if h.protocol in ("HTTP", "HTTPS") else None,
                 None if h.port == "traffic-port" else int(h.port), group.proxy_protocol_v2)


def config(state: LbState, cert: Path, listen: dict[int, int] = LISTEN, socket: Path | None = None) -> str:
    """haproxy.cfg for a state. Pure."""
    lines = ["global", "    log stderr local0 warning"]
    if socket:  # seamless reloads: the new worker takes the listening sockets over, nothing is dropped
        lines.append(f"    stats socket {socket} mode 600 level admin expose-fd listeners")
    lines += ["", "defaults", "    mode tcp", "    timeout connect 5s", ""]
    for r in state.routes:
        bind = f"    bind 127.0.0.1:{listen[r.lb_port]}" + (f" ssl crt {cert}" if r.tls else "")
        backend = f"{r.backend}_via_{r.lb_port}"  # one group behind two listeners still makes two backends
        lines += [f"frontend listener_{r.lb_port}", bind, f"    timeout client {r.idle_timeout}s",
                  f"    default_backend {backend}", "", f"backend {backend}", f"    timeout server {r.idle_timeout}s"]
        if r.check and r.check.path:
            lines.append(f"    option httpchk GET {r.check.path}")
        lines += [f"    server {s.name} {s.address}:{s.port}{_server_options(s, r.check)}" for s in r.servers]
        lines.append("")
    return "\n".join(lines)


def _server_options(server: Server, check: Check | None) -> str:
    options = f" {server.proxy}" if server.proxy else ""
    if check:
        options += " check" + (f" port {check.port}" if check.port else "") + f" {CHECK_TIMING}"
        options += " check-send-proxy" if check.send_proxy and server.proxy else ""
    return options


class StandIn:
    """HAProxy in master-worker mode, kept in line with the load balancer's state."""

    def __init__(self, settings: Settings, directory: Path, cert: Path, listen: dict[int, int] = LISTEN):
        self.settings, self.dir, self.cert, self.listen = settings, directory, cert, listen
        self.dir.mkdir(parents=True, exist_ok=True)
        self.cfg = self.dir / "haproxy.cfg"
        self.socket = self.dir / "haproxy.sock"
        self.state: LbState | None = None
        self.proc: subprocess.Popen | None = None
        self.reloads = 0

    def config_for(self, state: LbState) -> str:
        return config(state, self.cert, self.listen, self.socket)

    def follows(self) -> LbState | None:
        """The load balancer's state now when haproxy.cfg is written for it, else None."""
        state = read_state(self.settings)
        if state is None or not self.cfg.exists() or self.cfg.read_text() != self.config_for(state):
            return None
        return state

    def sync(self) -> bool:
        """Re-read the load balancer; rewrite and reload when it changed. True when something changed."""
        state = read_state(self.settings)
        if state is None or state == self.state:
            return False
        candidate = self.dir / "haproxy.cfg.new"
        candidate.write_text(self.config_for(state))
        check = subprocess.run([HAPROXY, "-c", "-f", str(candidate)], capture_output=True, text=True)
        if check.returncode != 0:
            alerts = [ln for ln in (check.stdout + check.stderr).splitlines() if "ALERT" in ln]
            raise KitError(f"haproxy rejected the stand-in config: {'; '.join(alerts)}")
        candidate.replace(self.cfg)
        if self.proc is None or self.proc.poll() is not None:
            log = (self.dir / "haproxy.log").open("ab")
            self.proc = subprocess.Popen([HAPROXY, "-W", "-db", "-f", str(self.cfg)],
                                         stdout=log, stderr=subprocess.STDOUT)
        else:
            self.proc.send_signal(signal.SIGUSR2)  # seamless: the master hands the listeners on
            self.reloads += 1
        self.state = state
        return True

    def follow(self, stop: threading.Event, interval: float = 0.2) -> None:
        while not stop.is_set():
            try:
                self.sync()
            except KitError as exc:
                print(f"stand-in: {exc}", flush=True)
            stop.wait(interval)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
