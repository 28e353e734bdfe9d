"""The gate: may the ProxyProtocol policy be on the backend ports? Pure and total.

Inputs: what the settings ask, the backends, the ports, the readiness record (or why it
could not be read), and whether the policy is attached now. Output: the decision and the
words an operator reads. The rule that matters most: once attached, a missing, stale or
incomplete record never detaches it, because that would turn every ready host into a
host that rejects every request.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from core.record import ReadinessRecord


class GateState(str, Enum):
    OFF = "off"  # not asked for: no policy (detached if it was attached)
    CLOSED = "closed"  # asked for, not every backend ready: no policy
    OPEN = "open"  # asked for, every backend ready: policy attached
    STICKY = "sticky"  # asked for, record no longer covers every backend, kept attached


@dataclass(frozen=True)
class Decision:
    attach: bool
    state: GateState
    missing: dict[str, str] = field(default_factory=dict)  # instance ID -> why it is not covered
    message: str = ""

    @property
    def warn(self) -> bool:
        return self.state is GateState.STICKY or (self.state is GateState.CLOSED and bool(self.missing))


def missing_backends(
    env: str, backends: list[str], ports: list[int], record: ReadinessRecord | None, record_problem: str | None
) -> dict[str, str]:
    """Every backend the record does not prove ready on every port, with the reason."""
    if record is None:
        why = record_problem or "no readiness record"
        return {b: why for b in backends} if backends else {"(none)": "no backend instances configured"}
    if not backends:
        return {"(none)": "no backend instances configured"}
    if record.env != env:
        return {b: f"record is for environment {record.env!r}" for b in backends}
    uncovered = sorted(set(ports) - set(record.proxy_protocol_ports))
    if uncovered:
        return {b: f"record lacks port(s) {', '.join(map(str, uncovered))}" for b in backends}
    served = record.instances
    return {b: "not in the readiness record" for b in backends if b not in served}


def decide(
    *,
    env: str,
    wanted: bool,
    backends: list[str],
    ports: list[int],
    record: ReadinessRecord | None,
    attached: bool,
    record_problem: str | None = None,
) -> Decision:
    if not wanted:
        msg = ("proxy protocol off: detaching the policy; turn nginx's proxy_protocol off only after this update"
               if attached else "proxy protocol off")
        return Decision(False, GateState.OFF, message=msg)
    missing = missing_backends(env, backends, ports, record, record_problem)
    if not missing:
        return Decision(True, GateState.OPEN, message=f"every backend ready: policy on ports {_ports(ports)}")
    listing = "; ".join(f"{i}: {why}" for i, why in sorted(missing.items()))
    if attached:
        return Decision(
            True, GateState.STICKY, missing,
            f"KEEPING the ProxyProtocol policy on ports {_ports(ports)} although the readiness record no longer "
            f"covers every backend ({listing}). Detaching would break every ready host. Run `fab rollout` "
            "to refresh the record, or turn proxyProtocol off to detach.",
        )
    return Decision(
        False, GateState.CLOSED, missing,
        f"ProxyProtocol policy NOT attached: not every backend is ready ({listing}). Run `fab rollout` first.",
    )


def _ports(ports: list[int]) -> str:
    return ", ".join(map(str, sorted(ports)))
