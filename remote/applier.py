"""The load balancer side of a cutover: what it does now, and who applies the stack.

`traffic` reads from AWS (never from a marker of ours) which instance ports get the PROXY header
now (the ports with the ProxyProtocol policy on a Classic ELB, the proxy target groups' ports a
network load balancer's listeners forward to) and where the listeners forward. A `Balancer`
applies the stack (`pulumi up`); the task layer chooses it: `PulumiStack` for real stacks (the
Automation API); the lab brings its own.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from core.errors import KitError
from core.settings import Settings

if TYPE_CHECKING:
    from remote.aws import NetworkState


class Balancer(Protocol):
    def apply(self, note: Callable[[str], None]) -> dict[str, Any]:
        """Bring the load balancer to what the settings and the readiness record allow; its outputs."""
        ...


class PulumiStack:
    """The environment's Pulumi stack, updated through the Automation API."""

    def __init__(self, settings: Settings):
        self.settings = settings

    def apply(self, note: Callable[[str], None]) -> dict[str, Any]:
        from infra import automation

        note(f"pulumi up -s {self.settings.env} (Automation API)")
        return automation.up(self.settings.env, on_output=lambda line: note(line.rstrip()))


@dataclass(frozen=True)
class Traffic:
    """What the load balancer does now, from one read."""

    header: list[int]  # instance ports it sends the PROXY header to
    # network: every instance port a listener forwards to. Classic: not read; a change of its
    # listeners' instance ports has the window the README describes.
    forwarded: list[int]
    # network: the plain ports the hosts may stop serving (remote.aws.NetworkState.retired)
    retired: list[int] = field(default_factory=list)
    # network: the read these came from (None: no such load balancer), for a task that needs more of it
    state: NetworkState | None = field(default=None, compare=False, repr=False)


def traffic(settings: Settings) -> Traffic:
    """Where the load balancer sends traffic now, as AWS says; a load balancer of the other kind
    under this name is refused."""
    from remote import aws

    conflict = aws.other_kind(settings)
    if conflict:
        raise KitError(conflict)
    if settings.load_balancer.type == "network":
        state = aws.network_state(settings)
        return Traffic(state.proxy_ports, state.forwarded_ports, state.retired(settings), state) if state else Traffic([], [])
    return Traffic(aws.proxy_protocol_ports(settings), [])


def header_ports(settings: Settings) -> list[int]:
    """The instance ports the load balancer sends the PROXY header to now (`traffic`)."""
    return traffic(settings).header


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
