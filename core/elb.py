"""What the load balancer looks like, decided once for the Pulumi program and the lab's
boto3 stand-in: listeners and health check. Pure."""

from __future__ import annotations

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
