"""`pulumi up` for one stack through the Automation API, and `PulumiStack`, the applier that
`loadBalancer.applier: pulumi` names (remote.applier).

Used by `fab rollout --apply`. The Automation API drives the `pulumi` CLI, which must be
installed; without it `up` refuses with a clear message instead of failing late.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from core.errors import KitError
from core.settings import Settings

PROJECT_DIR = Path(__file__).resolve().parent.parent


class PulumiError(KitError):
    """The Pulumi CLI is missing, or a preview/update failed."""


def cli_available() -> bool:
    return shutil.which("pulumi") is not None


def _stack(env: str, work_dir: Path, env_vars: dict[str, str] | None):
    if not cli_available():
        raise PulumiError("the pulumi CLI is not installed (https://www.pulumi.com/docs/install/): "
                          "`fab rollout --apply` runs `pulumi up` through it")
    from pulumi import automation as auto  # the SDK is heavy: import it only here

    # Select, never create: a typo must not make an empty stack whose `up` would build a second
    # load balancer with the same name.
    try:
        return auto.select_stack(
            stack_name=env, work_dir=str(work_dir),
            opts=auto.LocalWorkspaceOptions(env_vars=env_vars) if env_vars else None,
        )
    except auto.errors.StackNotFoundError:
        raise PulumiError(f"stack {env!r} does not exist in this Pulumi backend: create it once with "
                          f"`pulumi stack init {env}` (or log in to the backend that has it)") from None
    except auto.errors.CommandError as exc:
        raise PulumiError(f"pulumi stack select {env}: {exc}") from None


def up(env: str, *, on_output: Callable[[str], Any] = print, work_dir: Path = PROJECT_DIR,
       env_vars: dict[str, str] | None = None) -> dict[str, Any]:
    """`pulumi up` for stack `env`; returns the stack outputs."""
    from pulumi import automation as auto

    stack = _stack(env, work_dir, env_vars)
    try:
        stack.refresh(on_output=on_output)  # decide from what AWS really has, not from the last state
        result = stack.up(on_output=on_output)
    except auto.errors.CommandError as exc:
        raise PulumiError(f"pulumi up -s {env} failed: {exc}") from None
    return {k: v.value for k, v in result.outputs.items()}


class PulumiStack:
    """The environment's Pulumi stack, updated through the Automation API (an applier)."""

    def __init__(self, settings: Settings):
        self.settings = settings

    def check(self) -> None:
        """The CLI is installed and the stack exists in the logged-in backend (selected, never created)."""
        _stack(self.settings.env, PROJECT_DIR, None)

    def apply(self, note: Callable[[str], None]) -> dict[str, Any]:
        note(f"pulumi up -s {self.settings.env} (Automation API)")
        return up(self.settings.env, on_output=lambda line: note(line.rstrip()))
