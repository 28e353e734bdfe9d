"""The gate: may the ProxyProtocol policy be on the backend ports? Pure and total.

Inputs: what the settings ask, the backends, the ports, the readiness record (or why it
could not be read), and the ports that have the policy now (read from the load balancer).
Output: the ports that carry the policy after the run, and the words an operator reads. The
rules that matter most: once attached, a missing, stale or incomplete record never detaches
a port (that would turn every ready host into one that rejects every request), and a port
is newly attached only when the record proves every backend reads the header on it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from core.record import ReadinessRecord
from core.settings import Settings


class GateState(str, Enum):
    OFF = "off"  # not asked for: no policy (detached if it was attached)
    CLOSED = "closed"  # asked for, not every backend proven: no policy on an unproven port
    OPEN = "open"  # asked for, every backend proven on every port: policy on every port
    STICKY = "sticky"  # asked for, an attached port is no longer proven: kept attached


@dataclass(frozen=True)
class Decision:
    ports: tuple[int, ...]  # the backend ports that carry the ProxyProtocol policy after this run
    state: GateState
    missing: dict[str, str] = field(default_factory=dict)  # instance ID -> why it is not covered
    message: str = ""

    @property
    def attach(self) -> bool:
        return bool(self.ports)

    @property
    def warn(self) -> bool:
        return self.state is GateState.STICKY or (self.state is GateState.CLOSED and bool(self.missing))


def missing_backends(
    env: str, backends: list[str], ports: list[int], record: ReadinessRecord | None, record_problem: str | None,
    load_balancer: str | None = None,
) -> dict[str, str]:
    """Every backend the record does not prove ready on every port, with the reason."""
    if record is None:
        why = record_problem or "no readiness record"
        return {b: why for b in backends} if backends else {"(none)": "no backend instances configured"}
    if not backends:
        return {"(none)": "no backend instances configured"}
    foreign = record.foreign(env, load_balancer)
    if foreign:
        return {b: foreign for b in backends}
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
    header_ports: list[int],
    record_problem: str | None = None,
    load_balancer: str | None = None,
) -> Decision:
    """`header_ports`: the ports that have the policy now, as the load balancer itself says (never a
    marker of ours). Once attached, a port keeps the policy until proxy protocol is turned off;
    a port is newly attached only when the record proves every backend reads the header on it."""
    if not wanted:
        msg = ("proxy protocol off: detaching the policy; turn nginx's proxy_protocol off only after this update"
               if header_ports else "proxy protocol off")
        return Decision((), GateState.OFF, message=msg)
    missing = missing_backends(env, backends, ports, record, record_problem, load_balancer)
    proven = [p for p in ports if not missing_backends(env, backends, [p], record, record_problem, load_balancer)]
    kept = sorted(set(header_ports) - set(proven))  # on now, not proven (any more): kept, loudly
    result = tuple(sorted(set(header_ports) | set(proven)))
    if not missing:
        return Decision(result, GateState.OPEN, message=f"every backend ready: policy on ports {_ports(result)}")
    listing = "; ".join(f"{i}: {why}" for i, why in sorted(missing.items()))
    if kept:
        return Decision(
            result, GateState.STICKY, missing,
            f"KEEPING the ProxyProtocol policy on ports {_ports(kept)} although the readiness record no longer "
            f"covers every backend there ({listing}). Detaching would break every ready host. Run `fab rollout` "
            "to refresh the record, or turn proxyProtocol off to detach."
            + (f" Policy also on proven ports {_ports(sorted(set(proven) - set(header_ports)))}."
               if set(proven) - set(header_ports) else ""),
        )
    on = f"; policy on the proven ports {_ports(result)} only" if result else ""
    return Decision(
        result, GateState.CLOSED, missing,
        f"ProxyProtocol policy NOT attached on every port: not every backend is ready ({listing}){on}. "
        "Run `fab rollout` first.",
    )


def _ports(ports) -> str:
    return ", ".join(map(str, sorted(ports))) or "none"


@dataclass(frozen=True)
class Plan:
    """The gate's decision and who is registered with the load balancer after the run."""

    decision: Decision
    join: tuple[str, ...]  # instances registered after this run
    waiting: dict[str, str]  # configured instances held back, and why


def plan(*, env: str, wanted: bool, instances: list[str], registered: list[str], ports: list[int],
         record: ReadinessRecord | None, header_ports: list[int], record_problem: str | None = None,
         load_balancer: str | None = None, present: list[str] | None = None) -> Plan:
    """Safe scale-out: while the policy is (or is being) attached, an instance joins the load
    balancer only once the record proves it reads the header on every proxied port (else it
    would pass the plain health check and reject every request); one already registered stays.
    While the policy is being detached, a newcomer waits for the next update (Pulumi does not order
    a registration after a deletion). With no policy anywhere, every instance joins. The gate
    decides over the instances that join and those still registered that leave."""
    proven = [i for i in instances if i in registered
              or not missing_backends(env, [i], ports, record, record_problem, load_balancer)]
    # One leaving (registered, no longer configured) gets the header until its deregistration,
    # which is not ordered before an attach: it must be proven too, or the attach waits for it.
    # `present`: wherever the load balancer may send once the gate opens (a network load balancer's
    # proxy groups hold instances before any listener forwards there); default: `registered`.
    leaving = [i for i in (registered if present is None else present) if i not in instances]
    decision = decide(env=env, wanted=wanted, backends=proven + leaving, ports=ports, record=record,
                      header_ports=header_ports, record_problem=record_problem, load_balancer=load_balancer)
    if not decision.ports and not header_ports:  # no header anywhere, now or while this update runs: nobody waits
        decision = decide(env=env, wanted=wanted, backends=list(instances) + leaving, ports=ports, record=record,
                          header_ports=header_ports, record_problem=record_problem, load_balancer=load_balancer)
        return Plan(decision, tuple(instances), {})
    if not decision.ports:  # being detached: a registration is not ordered after the detach, so it waits for it
        waiting = {i: "waits to join until the ProxyProtocol policy is detached: run `pulumi up` again after this "
                      "update" for i in instances if i not in proven}
        return Plan(decision, tuple(proven), waiting)
    waiting = {i: f"waits to join: {why} (run `fab rollout`, then `pulumi up`)"
               for i, why in missing_backends(env, [i for i in instances if i not in proven], ports, record,
                                              record_problem, load_balancer).items() if i in instances}
    return Plan(decision, tuple(proven), waiting)


def plan_for(s: Settings, *, registered: list[str], header_ports: list[int], record: ReadinessRecord | None,
             record_problem: str | None = None, present: list[str] | None = None) -> Plan:
    """The plan for an environment: what the Pulumi program, the lab's applier and `fab status`
    all compute, from the same settings and what AWS has."""
    return plan(env=s.env, wanted=s.proxy_protocol, instances=list(s.load_balancer.instances), registered=registered,
                ports=list(s.proxy_ports), record=record, header_ports=header_ports, load_balancer=s.load_balancer.name,
                present=present,
                record_problem=record_problem or (None if record else f"no readiness record at {s.parameter_path}"))


def follow_refusal(s: Settings, *, reached: set[str], registered: list[str], header_ports: list[int],
                   record: ReadinessRecord, present: list[str] | None = None) -> str | None:
    """Why the load balancer could not follow a rollout that turns the header on (or keeps it on),
    computed before any host goes live (None: it can). `reached`: the instances the rollout's hosts
    are; `record`: the readiness record that rollout would write. Two ways it cannot:
    - an instance the gate waits for (named in loadBalancer.instances, registered, or in one of a
      network load balancer's groups) is not one of the rollout's hosts: the gate would stay
      closed for it forever while every host reads the header;
    - the gate over the record about to be written would still not send the header to every
      proxy port."""
    if not s.proxy_protocol or set(s.proxy_ports) <= set(header_ports):
        return None  # off, or the header is on every proxy port already (the gate keeps it: sticky)
    if s.load_balancer.type == "network" and not s.retired:
        return None  # the hosts serve the plain ports beside the proxy ones: a closed gate breaks nothing
    waited = set(s.load_balancer.instances) | set(registered) | set(present or [])
    if not waited:
        return None  # no backend at all: the load balancer sends nobody anything
    unreached = sorted(waited - reached)
    if unreached:
        return (f"the gate would wait for instance(s) {', '.join(unreached)}, which no host of this rollout is "
                "(wsgate:hosts): every host would read the PROXY header while the load balancer never sends it. "
                "Add them to wsgate:hosts (or set wsgate:discover: true), or remove them from loadBalancer.instances "
                "and deregister them; nothing was changed")
    gated = plan_for(s, registered=registered, header_ports=header_ports, record=record, present=present)
    short = sorted(set(s.proxy_ports) - set(gated.decision.ports))
    if short:
        return (f"even with this rollout recorded, the gate would not send the PROXY header to port(s) "
                f"{_ports(short)}: {gated.decision.message}; nothing was changed")
    return None
