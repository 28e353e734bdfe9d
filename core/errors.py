"""Typed errors of the kit. Each carries what a person needs: where, which step, why."""

from __future__ import annotations


class KitError(Exception):
    """Base of every error the kit expects and reports without a traceback."""


class SettingsError(KitError):
    """An environment file is missing, unreadable or holds invalid values."""

    def __init__(self, source: str, problems: list[tuple[str, object, str]]):
        self.source = source
        self.problems = problems  # (key, value, reason)
        lines = [": ".join(filter(None, [source, key + ("" if value is None else f" = {value!r}"), reason]))
                 for key, value, reason in problems]
        super().__init__("\n".join(lines) if lines else source)


class RenderError(KitError):
    """A template could not be rendered (a bug in a template, not in the settings)."""


class PlanError(KitError):
    """The run cannot be planned: a bad --batch, no hosts, unknown hosts, hosts without instance IDs."""
