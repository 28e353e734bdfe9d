"""The load balancer side of a cutover, behind one small interface.

`remote/cutover.py` asks a `Balancer` two things: which instance ports get the PROXY header now
(read from AWS, never from a marker of ours: the ports with the ProxyProtocol policy on a Classic
ELB, the proxy target groups' ports a network load balancer's listeners forward to), and to
apply the stack (`pulumi up`). The task layer chooses the implementation: `PulumiStack` for real
stacks (the Automation API); the lab brings its own.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, Protocol

from core.errors import KitError
from core.settings import Settings


class Balancer(Protocol):
    def proxy_ports(self) -> list[int]:
        """Instance ports the load balancer sends the PROXY header to now (AWS API)."""
        ...

    def apply(self, note: Callable[[str], None]) -> dict[str, Any]:
        """Bring the load balancer to what the settings and the readiness record allow; its outputs."""
        ...


class PulumiStack:
    """The environment's Pulumi stack, updated through the Automation API."""

    def __init__(self, settings: Settings):
        self.settings = settings

    def proxy_ports(self) -> list[int]:
        return header_ports(self.settings)

    def apply(self, note: Callable[[str], None]) -> dict[str, Any]:
        from infra import automation

        note(f"pulumi up -s {self.settings.env} (Automation API)")
        return automation.up(self.settings.env, on_output=lambda line: note(line.rstrip()))


def header_ports(settings: Settings) -> list[int]:
    """The instance ports the load balancer sends the PROXY header to now, as AWS says: classic, the
    ports with the ProxyProtocol policy; network, the ports of the `proxy_protocol_v2` target groups
    a listener forwards to."""
    from remote import aws

    conflict = aws.other_kind(settings)
    if conflict:
        raise KitError(conflict)
    if settings.load_balancer.type == "network":
        return aws.proxy_listener_ports(settings)
    return aws.proxy_protocol_ports(settings)


def chosen(settings: Settings) -> Balancer:
    """The environment's applier (`loadBalancer.applier`): the Pulumi stack, or one it names."""
    spec = settings.load_balancer.applier
    if spec == "pulumi":
        return PulumiStack(settings)
    module, _, name = spec.partition(":")
    try:
        return getattr(importlib.import_module(module), name)(settings)
    except (ImportError, AttributeError) as exc:
        raise KitError(f"loadBalancer.applier {spec!r} cannot be loaded: {exc}") from None
