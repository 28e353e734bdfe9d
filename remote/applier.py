"""The applier: what brings the load balancer to what the settings and the readiness record allow
(`pulumi up`), chosen by name with `loadBalancer.applier`.

`pulumi` names the environment's Pulumi stack through the Automation API
(`infra.automation:PulumiStack`); the lab names its own (`lab.applier:LabApplier`). Loaded by
name, so the host half never imports the Pulumi half.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, Protocol

from core.errors import KitError
from core.settings import Settings

PULUMI = "infra.automation:PulumiStack"  # what `loadBalancer.applier: pulumi` names


class Applier(Protocol):
    def check(self) -> None:
        """Raise a KitError if `apply` cannot run now (no CLI, no such stack, not the lab): asked
        before any host changes, so a rollout never switches hosts the load balancer cannot follow."""
        ...

    def apply(self, note: Callable[[str], None]) -> dict[str, Any]:
        """Bring the load balancer to what the settings and the readiness record allow; its outputs."""
        ...


def ready(applier: Applier) -> None:
    """The applier's own pre-flight (`check`), where it has one (an applier written before it may not)."""
    check = getattr(applier, "check", None)
    if callable(check):
        check()


def chosen(settings: Settings) -> Applier:
    """The environment's applier (`loadBalancer.applier`): the Pulumi stack, or one it names."""
    spec = settings.load_balancer.applier
    module, _, name = (PULUMI if spec == "pulumi" else spec).partition(":")
    try:
        return getattr(importlib.import_module(module), name)(settings)
    except (ImportError, AttributeError) as exc:
        raise KitError(f"loadBalancer.applier {spec!r} cannot be loaded: {exc}") from None
