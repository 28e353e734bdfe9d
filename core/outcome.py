"""What happened on each host: the step it reached and how it ended, for the table and `--json`.

Pure. `remote/rollout.py` fills one HostOutcome per host as the steps happen; `remote/report.py`
prints them; `remote/readiness.py` writes the record from them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum


class Step(str, Enum):
    """The steps of a host, in order; a failure names the one it happened at."""

    CONNECT = "connect"
    LOCK = "lock"
    UPLOAD = "upload"
    TEST = "test"
    SWAP = "swap"
    RELOAD = "reload"
    PROBE = "probe"
    DONE = "done"


@dataclass
class HostOutcome:
    """What happened on one host, for the table a person reads."""

    host: str
    instance: str | None
    address: str
    step: Step = Step.CONNECT
    ok: bool | None = None  # None: still running or never started
    changed: bool = False  # this run swapped the live config
    restored: bool = False  # put back after a failure
    restore_failed: bool = False  # could not be put back (or not proven back): needs a person
    planned: str = ""  # a dry run's verdict: "would change" or "unchanged"
    before: str | None = None  # live digest before the run
    after: str | None = None  # live digest proven by the probe
    target: str = ""
    error: str = ""
    started: float = field(default_factory=time.monotonic)
    elapsed: float = 0.0

    def fail(self, step: Step, error: str) -> None:
        self.step, self.ok, self.error = step, False, error
        self.elapsed = time.monotonic() - self.started

    def finish(self) -> None:
        self.step, self.ok = Step.DONE, True
        self.elapsed = time.monotonic() - self.started

    @property
    def result(self) -> str:
        if self.ok is None:
            return "not run" if self.step is Step.CONNECT else "stopped"
        if self.restore_failed:
            return "RESTORE FAILED"
        if not self.ok:
            return "FAILED, restored" if self.restored else "FAILED"
        if self.restored:
            return "restored"
        if self.planned:
            return self.planned
        return "changed" if self.changed else "unchanged"

    def as_dict(self) -> dict:
        return {"host": self.host, "instance": self.instance, "address": self.address, "step": self.step.value,
                "result": self.result, "ok": self.ok, "changed": self.changed, "restored": self.restored,
                "restore_failed": self.restore_failed,
                "before": self.before, "after": self.after, "target": self.target, "error": self.error,
                "seconds": round(self.elapsed, 3)}
