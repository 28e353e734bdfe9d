"""A move from one load balancer to another: its record, its steps, and what each side declares.

`fab move` changes a load balancer's identity (kind, name, placement, proxy protocol) without
failing a request: the hosts serve both load balancers, the new one is created sending the
header from its first connection with DNS weight 0, proven, given the weight (weighted alias
records), the old one drained, then retired. The move record (Parameter Store, beside the
readiness record) says what the Pulumi program declares (which load balancers, which weights)
and which step was proven last; `fab move` writes it before each `pulumi up` and after each
proof. Pure: the record in, decisions out.
"""

from __future__ import annotations

import json
from datetime import datetime
from enum import Enum
from typing import Literal

from pydantic import Field, ValidationError

from core.errors import KitError
from core.settings import LbName, Model, Settings


class MoveError(KitError):
    """A move cannot go on as asked (another one half done, a record that is not valid)."""


class Step(str, Enum):
    """The steps of a move, in order; the record names the last one proven."""

    SERVE = "serve"  # a. every host serves both load balancers' ports; proven (the readiness record)
    CREATE = "create"  # b. the new load balancer exists, sends as its hosts expect, DNS weight 0
    PROVE = "prove"  # c. every instance healthy in it; a request through each listener it has
    WEIGH = "weigh"  # d. the DNS weights moved (`weight` says how far)
    DRAIN = "drain"  # e. the TTL passed, then no connection on the old one's ports for dns.quiet
    RETIRE = "retire"  # f. the old load balancer and its record removed
    DONE = "done"  # the hosts no longer serve the old load balancer's ports

    @property
    def order(self) -> int:
        return list(Step).index(self)

    def __str__(self) -> str:
        return self.value


NEXT_COMMAND = {
    None: "fab move --env {env}",
    Step.DONE: "promote moveTo to loadBalancer (and ports, proxyProtocol) in Pulumi.{env}.yaml, drop moveTo",
}


class MoveRecord(Model):
    version: Literal[1] = 1
    env: str
    source: LbName  # the load balancer serving before the move (loadBalancer)
    target: LbName  # the one moved to (moveTo.loadBalancer)
    reached: Step | None = None  # the last step proven (None: none yet)
    # What the Pulumi program declares (written before each `pulumi up`):
    target_declared: bool = False  # from step b
    weight: int = Field(default=0, ge=0, le=100)  # percent of the DNS weight on the target
    source_declared: bool = True  # false from step f
    updated_at: datetime
    # connections still open on the source's ports when it was retired: host -> count (with --cut)
    held: dict[str, int] = {}
    held_at: datetime | None = None

    def to_json(self) -> str:
        return self.model_dump_json(by_alias=True)

    @classmethod
    def from_json(cls, text: str, where: str) -> MoveRecord:
        try:
            return cls.model_validate(json.loads(text))
        except (ValueError, ValidationError) as exc:
            raise MoveError(f"the move record {where} is not valid ({exc}); nothing was changed") from None

    @property
    def done(self) -> bool:
        return self.reached == Step.DONE

    def weights(self) -> dict[str, int]:
        """load balancer name -> its weighted record's weight (0-100), for those declared. Route 53
        answers every record of a set equally when all weigh 0: never both 0."""
        out: dict[str, int] = {}
        if self.source_declared:
            out[self.source] = 100 - self.weight if self.target_declared else 100
        if self.target_declared:
            out[self.target] = self.weight if self.source_declared else 100
        return out


def move_path(s: Settings) -> str:
    """Where the move record lives: beside the readiness record (the program's one by-path read
    returns both)."""
    return f"{s.parameter_path}-move"


def matches(s: Settings, record: MoveRecord) -> bool:
    """Whether the record is the move these settings describe (loadBalancer -> moveTo)."""
    return (s.move_to is not None and record.env == s.env and record.source == s.load_balancer.name
            and record.target == s.move_to.load_balancer.name)


def finished_here(s: Settings, record: MoveRecord) -> bool:
    """A finished move whose target these settings now name as loadBalancer (moveTo promoted)."""
    return record.done and record.target == s.load_balancer.name and record.env == s.env


def conflict(s: Settings, record: MoveRecord | None) -> str | None:
    """Why these settings cannot act while the move record says what it says (None: they can)."""
    if record is None or matches(s, record) or finished_here(s, record):
        return None
    if record.env != s.env:
        return f"the move record names environment {record.env!r}"
    step = f"step {record.reached}" if record.reached else "its first step"
    where = f"a move from {record.source!r} to {record.target!r} is at {step}"
    if record.done:
        return (f"{where} and done: promote moveTo to loadBalancer in Pulumi.{s.env}.yaml "
                f"(loadBalancer: {record.target!r}) before anything else")
    return (f"{where}: finish it first (moveTo.loadBalancer.name {record.target!r}, loadBalancer.name "
            f"{record.source!r}, then fab move --env {s.env}); or, before step {Step.CREATE}, delete the "
            "move record to start over")


def declared(s: Settings, record: MoveRecord | None) -> dict[str, int | None]:
    """What the Pulumi program declares: load balancer name -> its DNS weight (None: no dns settings).

    Without a move under way: loadBalancer alone, weight 100. During a move, the record decides.
    Raises MoveError when the settings and the record disagree (another move half done)."""
    problem = conflict(s, record)
    if problem:
        raise MoveError(f"{problem}; nothing was declared")
    if record is None or not matches(s, record):
        return {s.load_balancer.name: 100 if s.dns else None}
    return {name: weight for name, weight in record.weights().items()}


def served(s: Settings, record: MoveRecord | None) -> list[Settings]:
    """The load balancers whose ports the hosts serve: both while a move is set and its source is
    still declared or drains (from `fab move`'s first step), the target alone once the source
    was retired."""
    target = s.moving_to
    if target is None:
        return [s]
    if record is not None and matches(s, record) and record.reached and record.reached.order >= Step.RETIRE.order:
        return [target]
    return [s, target]


def next_step(record: MoveRecord | None) -> Step:
    """The step a (re)run of `fab move` starts with."""
    if record is None or record.reached is None:
        return Step.SERVE
    if record.reached == Step.WEIGH and record.weight < 100:
        return Step.WEIGH
    steps = list(Step)
    return steps[min(record.reached.order + 1, len(steps) - 1)]


def connections_command(ports: list[int], bind: str | None) -> str:
    """The host command that lists its established TCP connections on `ports` (local side), only
    those to `bind` when the host listens on one address: iproute2's `ss`, no root needed."""
    expr = " or ".join(f"sport = :{p}" for p in sorted(ports))
    where = f" and src {bind}" if bind else ""
    return f"ss -Htn state established '( {expr} ){where}'"


def parse_connections(text: str, ports: list[int]) -> dict[int, int]:
    """port -> established connections, from `ss -Htn state established` lines (Recv-Q Send-Q
    Local:Port Peer:Port ...)."""
    counts = dict.fromkeys(sorted(ports), 0)
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 4:
            continue
        _, _, port = fields[2].rpartition(":")
        if port.isdigit() and int(port) in counts:
            counts[int(port)] += 1
    return counts


def source_ports(s: Settings) -> list[int]:
    """The service ports of loadBalancer (the one a move leaves): those the drain watches."""
    return sorted(s.served())


class Drain:
    """The drain's clock: quiet once no host reported a connection on the old ports for `quiet`
    seconds in a row; over once `bound` seconds passed since it started (pure: times in)."""

    def __init__(self, started: float, quiet: float, bound: float):
        self.started, self.quiet, self.bound = started, quiet, bound
        self.silent_since: float | None = None

    def sample(self, at: float, open_connections: int) -> None:
        if open_connections:
            self.silent_since = None
        elif self.silent_since is None:
            self.silent_since = at

    def drained(self, at: float) -> bool:
        return self.silent_since is not None and at - self.silent_since >= self.quiet

    def over(self, at: float) -> bool:
        return at - self.started >= self.bound
