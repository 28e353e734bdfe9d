"""HAProxy standing in for the Classic ELB, following the lab AWS endpoint's state.

One frontend per ELB listener (TCP, and SSL terminated with the lab certificate), backends =
the instances registered with the ELB, `send-proxy` on exactly the backend ports whose
ProxyProtocol policy is attached, the ELB's idle timeout, and the ELB's HTTP health check.
It re-reads that state and reloads HAProxy seamlessly (master-worker, SIGUSR2) when it
changes, so attaching the policy is what turns the header on, as on AWS.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

from core.errors import KitError
from core.settings import Settings
from remote import aws

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
LISTEN = {80: 18800, 443: 18443}  # ELB listener port -> the stand-in's port on 127.0.0.1


@dataclass(frozen=True)
class ElbState:
    listeners: tuple[tuple[int, str, int], ...]  # (lb port, protocol, instance port)
    backends: tuple[tuple[str, str], ...]  # (instance ID, address)
    proxy_ports: tuple[int, ...]
    idle_timeout: int
    health: str  # "HTTP:18082/healthz"


def read_state(settings: Settings) -> ElbState | None:
    """The ELB as the AWS API describes it, or None when it does not exist."""
    d = aws.describe(settings)
    if d is None:
        return None
    addresses = {h.instance_id: settings.bind_of(h) or h.address for h in settings.hosts if h.instance_id}
    attrs = aws.client(settings, "elb").describe_load_balancer_attributes(
        LoadBalancerName=settings.load_balancer.name)["LoadBalancerAttributes"]
    return ElbState(
        listeners=tuple(sorted((x["Listener"]["LoadBalancerPort"], x["Listener"]["Protocol"].upper(),
                                x["Listener"]["InstancePort"]) for x in d.get("ListenerDescriptions", []))),
        backends=tuple(sorted({(i["InstanceId"], addresses[i["InstanceId"]]) for i in d.get("Instances", [])
                               if i["InstanceId"] in addresses})),
        proxy_ports=tuple(aws.proxy_protocol_ports(settings)),
        idle_timeout=attrs["ConnectionSettings"]["IdleTimeout"],
        health=d.get("HealthCheck", {}).get("Target", ""),
    )


def config(state: ElbState, cert: Path, listen: dict[int, int] = LISTEN, socket: Path | None = None) -> str:
    """haproxy.cfg for a state. Pure."""
    idle = state.idle_timeout
    lines = ["global", "    log stderr local0 warning"]
    if socket:  # seamless reloads: the new worker takes the listening sockets over, nothing is dropped
        lines.append(f"    stats socket {socket} mode 600 level admin expose-fd listeners")
    lines += ["", "defaults", "    mode tcp",
             "    timeout connect 5s", f"    timeout client {idle}s", f"    timeout server {idle}s", ""]
    check = ""
    if state.health.startswith("HTTP:"):
        port, _, path = state.health[5:].partition("/")
        check = f" check port {port} inter 1s fall 2 rise 2"
        health_line = f"    option httpchk GET /{path}"
    for lb_port, protocol, instance_port in state.listeners:
        bind = f"    bind 127.0.0.1:{listen[lb_port]}"
        if protocol in ("SSL", "HTTPS"):
            bind += f" ssl crt {cert}"
        lines += [f"frontend listener_{lb_port}", bind, f"    default_backend port_{instance_port}", "",
                  f"backend port_{instance_port}"]
        if check:
            lines.append(health_line)
        proxy = " send-proxy" if instance_port in state.proxy_ports else ""
        for instance, address in state.backends:
            lines.append(f"    server {instance} {address}:{instance_port}{proxy}{check}")
        lines.append("")
    return "\n".join(lines)


class StandIn:
    """HAProxy in master-worker mode, kept in line with the ELB's state."""

    def __init__(self, settings: Settings, directory: Path, cert: Path, listen: dict[int, int] = LISTEN):
        self.settings, self.dir, self.cert, self.listen = settings, directory, cert, listen
        self.dir.mkdir(parents=True, exist_ok=True)
        self.cfg = self.dir / "haproxy.cfg"
        self.state: ElbState | None = None
        self.proc: subprocess.Popen | None = None
        self.reloads = 0

    def sync(self) -> bool:
        """Re-read the ELB; rewrite and reload when it changed. True when something changed."""
        state = read_state(self.settings)
        if state is None or state == self.state:
            return False
        text = config(state, self.cert, self.listen, self.dir / "haproxy.sock")
        candidate = self.dir / "haproxy.cfg.new"
        candidate.write_text(text)
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
