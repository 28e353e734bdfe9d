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

import fcntl
import hashlib
import json
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from awsapi import classic, network
from awsapi.clients import client
from core.errors import KitError
from core.network import TargetGroupState
from core.settings import NLB_TLS_IDLE_TIMEOUT, Settings

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
LISTEN = {80: 18800, 443: 18443}  # load balancer listener port -> the stand-in's port on its addresses
# Each load balancer's stand-in listens on an address of its own, as each AWS load balancer has its
# own: 127.0.0.11 for the first name the lab meets, .12 for the next, kept per name in state.json.
FIRST_ADDRESS, LAST_ADDRESS = 11, 76  # 127.0.0.77 is the lab client's source
# The stand-in of the environment's loadBalancer also listens on 127.0.0.1: the lab's address for it
# before DNS (state.json's tcp_listener and ssl_listener). Its connections to the hosts come from
# 127.0.0.1 whatever address the client reached (loadBalancer.subnetCidrs of the lab).
FIXED_ADDRESS = "127.0.0.1"
# How often the stand-ins read the endpoint: every FOLLOW_FAST seconds while it changes, slowing to
# FOLLOW_SLOW while it does not (next_wait): a change is followed within FOLLOW_SLOW at most. A read
# of a network load balancer is a dozen calls: at 0.4 s idle the stand-ins' reads were two thirds of
# the endpoint's requests in a lab test, and moto a quarter of the suite's CPU.
FOLLOW_FAST, FOLLOW_SLOW = 0.2, 1.0
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


def config(state: LbState, cert: Path, listen: dict[int, int] = LISTEN, socket: Path | None = None,
           addresses: tuple[str, ...] = (FIXED_ADDRESS,)) -> str:
    """haproxy.cfg for a state, each listener on every one of `addresses`. Pure."""
    lines = ["global", "    log stderr local0 warning"]
    if socket:  # seamless reloads: the new worker takes the listening sockets over, nothing is dropped
        lines.append(f"    stats socket {socket} mode 600 level admin expose-fd listeners")
    lines += ["", "defaults", "    mode tcp", "    timeout connect 5s", ""]
    for r in state.routes:
        binds = [f"    bind {a}:{listen[r.lb_port]}" + (f" ssl crt {cert}" if r.tls else "") for a in addresses]
        backend = f"{r.backend}_via_{r.lb_port}"  # one group behind two listeners still makes two backends
        lines += [f"frontend listener_{r.lb_port}", *binds, f"    timeout client {r.idle_timeout}s",
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
    """HAProxy in master-worker mode, kept in line with the load balancer's state, listening on
    `addresses` (its own, and 127.0.0.1 for the environment's loadBalancer)."""

    def __init__(self, settings: Settings, directory: Path, cert: Path, listen: dict[int, int] = LISTEN,
                 addresses: tuple[str, ...] = (FIXED_ADDRESS,)):
        self.settings, self.dir, self.cert, self.listen = settings, directory, cert, listen
        self.addresses = addresses
        self.dir.mkdir(parents=True, exist_ok=True)
        self.cfg = self.dir / "haproxy.cfg"
        self.socket = socket_path(self.dir)
        self.state: LbState | None = None
        self.text: str | None = None  # the config HAProxy runs
        self.proc: subprocess.Popen | None = None
        self.reloads = 0

    @property
    def name(self) -> str:
        return self.settings.load_balancer.name

    def config_for(self, state: LbState) -> str:
        return config(state, self.cert, self.listen, self.socket, self.addresses)

    def follows(self) -> LbState | None:
        """The load balancer's state now when haproxy.cfg is written for it, else None."""
        state = read_state(self.settings)
        if state is None or not self.cfg.exists() or self.cfg.read_text() != self.config_for(state):
            return None
        return state

    def sync(self, state: LbState | None = None) -> bool:
        """Re-read the load balancer (or take `state`); rewrite and reload when it changed. True when
        something changed."""
        state = state or read_state(self.settings)
        if state is None:
            return False
        text = self.config_for(state)
        if text == self.text and self.running:
            return False
        candidate = self.dir / "haproxy.cfg.new"
        candidate.write_text(text)
        check = subprocess.run([HAPROXY, "-c", "-f", str(candidate)], capture_output=True, text=True)
        if check.returncode != 0:
            alerts = [ln for ln in (check.stdout + check.stderr).splitlines() if "ALERT" in ln]
            raise KitError(f"haproxy rejected the stand-in config: {'; '.join(alerts)}")
        candidate.replace(self.cfg)
        if not self.running:
            log = (self.dir / "haproxy.log").open("ab")
            self.proc = subprocess.Popen([HAPROXY, "-W", "-db", "-f", str(self.cfg)],
                                         stdout=log, stderr=subprocess.STDOUT)
        else:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGUSR2)  # seamless: the master hands the listeners on
            self.reloads += 1
        self.state, self.text = state, text
        return True

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        """Stop HAProxy at once, every worker with it: the connections it holds are cut, as when AWS
        deletes a load balancer."""
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.state, self.text = None, None


def next_wait(wait: float, changed: bool) -> float:
    """The stand-ins' next pause between reads of the endpoint: FOLLOW_FAST after a change (one
    change brings others: a rollout's steps), growing by half a quiet read up to FOLLOW_SLOW (a
    read of a network load balancer is a dozen calls: at FOLLOW_FAST an idle lab kept moto busy)."""
    return FOLLOW_FAST if changed else min(FOLLOW_SLOW, wait * 1.5)


# --- one stand-in per load balancer ---------------------------------------------------------------

def socket_path(standin: Path) -> Path:
    """The HAProxy admin socket of the stand-in whose files are in `standin`: a short path of its
    own (a unix socket's path is bounded: HAProxy takes 97 characters)."""
    digest = hashlib.sha1(str(standin.resolve()).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"wsgate-standin-{digest}.sock"


def standin_dir(directory: Path, name: str) -> Path:
    """Where the stand-in of load balancer `name` keeps its files (haproxy.cfg, its socket, its log)."""
    return directory / "standin" / name


def update_state(state_file: Path, change: Callable[[dict[str, Any]], Any]) -> dict[str, Any]:
    """Read the lab's state.json, apply `change` to it, write it back, under a lock (the lab, its
    stand-ins and its DNS server share the file); returns the state written."""
    state_file.parent.mkdir(parents=True, exist_ok=True)
    with (state_file.parent / "state.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            state = json.loads(state_file.read_text())
        except (FileNotFoundError, ValueError):
            state = {}
        change(state)
        new = state_file.with_suffix(".json.new")
        new.write_text(json.dumps(state, indent=2) + "\n")
        new.replace(state_file)
        return state


def address_of(state_file: Path, name: str) -> str:
    """The loopback address of load balancer `name`'s stand-in: assigned the first time the lab
    meets the name, then kept (state.json `addresses`)."""
    try:
        known = json.loads(state_file.read_text()).get("addresses", {})
        if name in known:
            return known[name]
    except (FileNotFoundError, ValueError):
        pass

    def assign(state: dict[str, Any]) -> None:
        addresses = state.setdefault("addresses", {})
        if name not in addresses:
            taken = set(addresses.values())
            free = [f"127.0.0.{n}" for n in range(FIRST_ADDRESS, LAST_ADDRESS + 1) if f"127.0.0.{n}" not in taken]
            if not free:
                raise KitError(f"the lab has no stand-in address left for {name}: remove `addresses` from {state_file}")
            addresses[name] = free[0]

    return update_state(state_file, assign)["addresses"][name]


def healthy(directory: Path, name: str) -> bool:
    """Whether load balancer `name` has a healthy instance now: some server of its stand-in passes
    the load balancer's health check (HAProxy's `show stat`). No stand-in, or no server: False."""
    path = socket_path(standin_dir(directory, name))
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(1)
            sock.connect(str(path))
            sock.sendall(b"show stat\n")
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
    except OSError:
        return False
    lines = data.decode(errors="replace").splitlines()
    if not lines or not lines[0].startswith("# "):
        return False
    header = lines[0][2:].split(",")
    sv, status = header.index("svname"), header.index("status")
    for line in lines[1:]:
        fields = line.split(",")
        if len(fields) > status and fields[sv] not in ("FRONTEND", "BACKEND") and \
                (fields[status].startswith("UP") or fields[status] == "no check"):
            return True
    return False


class StandIns:
    """One stand-in per load balancer of the environment (loadBalancer, and moveTo's while a move
    is set), each on its own address with the same listener ports; a stand-in starts once its load
    balancer exists in the lab endpoint and stops (its connections cut) once it was deleted there.

    `current` gives the environment's settings now (the file may change while the lab runs)."""

    def __init__(self, current: Callable[[], Settings], directory: Path, cert: Path, listen: dict[int, int] = LISTEN):
        self.current, self.dir, self.cert, self.listen = current, directory, cert, listen
        self.state_file = directory / "state.json"
        self.known: dict[str, Settings] = {}  # every load balancer the environment named, as last named
        self.running: dict[str, StandIn] = {}

    def addresses(self, s: Settings, name: str) -> tuple[str, ...]:
        own = address_of(self.state_file, name)
        return (own, FIXED_ADDRESS) if name == s.load_balancer.name else (own,)

    def sync(self) -> bool:
        s = self.current()
        for each in (s, s.moving_to):
            if each is not None:
                self.known[each.load_balancer.name] = each
        changed = False
        for name, each in self.known.items():
            try:
                state = read_state(each)
            except Exception as exc:  # noqa: BLE001 - the endpoint's answer to a read racing a delete
                # (moto answers some with a 500): read again at the next tick, never stop following
                print(f"stand-in {name}: {type(exc).__name__}: {exc}", flush=True)
                continue
            standin = self.running.get(name)
            if state is None:
                if standin is not None:
                    standin.stop()
                    del self.running[name]
                    print(f"stand-in {name}: the load balancer was deleted; stopped", flush=True)
                    changed = True
                continue
            addresses = self.addresses(s, name)
            if standin is None or standin.settings is not each or standin.addresses != addresses:
                old = standin
                standin = StandIn(each, standin_dir(self.dir, name), self.cert, self.listen, addresses)
                if old is not None:  # the same HAProxy: reloaded only if its config changes
                    standin.proc, standin.reloads, standin.state, standin.text = \
                        old.proc, old.reloads, old.state, old.text
                self.running[name] = standin
            try:
                changed = standin.sync(state) or changed
            except KitError as exc:
                print(f"stand-in {name}: {exc}", flush=True)
        if changed:
            self._publish()
        return changed

    def _publish(self) -> None:
        balancers = {name: standin.addresses[0] for name, standin in sorted(self.running.items())}

        def put(state: dict[str, Any]) -> None:
            if state.get("endpoints"):
                state["endpoints"]["balancers"] = balancers

        update_state(self.state_file, put)

    def follow(self, stop: threading.Event) -> None:
        wait = FOLLOW_FAST
        while not stop.is_set():
            changed = False
            try:
                changed = self.sync()
            except Exception as exc:  # noqa: BLE001 - a lab daemon: one bad tick must not end the stand-ins
                print(f"stand-ins: {type(exc).__name__}: {exc}", flush=True)
            wait = next_wait(wait, changed)
            stop.wait(wait)

    def stop(self) -> None:
        for standin in self.running.values():
            standin.stop()
        self.running.clear()
