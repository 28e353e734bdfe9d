"""`fab status` judged: facts in (what each host runs and reads, what the load balancer has),
every disagreement out, each with what to do. Pure: `remote/status.py` gathers the facts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from core.gate import plan_for
from core.plan import digest_of_link
from core.record import ReadinessRecord
from core.settings import Settings

PROXY, PLAIN, NEITHER = "proxy", "plain", "neither"  # how a port answers: with the header, without, or not at all


@dataclass
class HostFacts:
    host: str
    instance: str | None
    rendered: str
    error: str | None = None  # could not be reached or inspected
    nginx: str = "no"  # no | ours | foreign
    pid: str = ""
    cmdline: str = ""
    current: str = ""  # the `current` link (releases/<digest>)
    live: str | None = None  # the digest nginx answers with
    locked_by: str | None = None  # the run holding the rollout lock, if any
    ports: dict[int, str] = field(default_factory=dict)  # proxied port -> PROXY | PLAIN | NEITHER


@dataclass(frozen=True)
class Ingress:
    """One inbound rule of a security group on a backend instance."""

    group: str  # sg-... (name)
    protocol: str  # tcp, udp, -1 (all)
    from_port: int | None
    to_port: int | None
    source: str  # a CIDR, a prefix list, or sg-...

    def opens(self, port: int) -> bool:
        if self.protocol == "-1":
            return True
        return self.protocol == "tcp" and (self.from_port or 0) <= port <= (self.to_port or 65535)


@dataclass
class BalancerFacts:
    exists: bool
    listeners: list[tuple[str, int, str, int]] = field(default_factory=list)  # protocol, port, instance protocol, port
    policy_ports: list[int] = field(default_factory=list)  # backend ports with the ProxyProtocol policy
    registered: list[str] = field(default_factory=list)
    health: dict[str, str] = field(default_factory=dict)  # instance -> InService / OutOfService (why)
    lab_endpoint: bool = False  # the lab's AWS endpoint (moto): keeps no listener instance protocol, knows no health
    security_groups: list[str] = field(default_factory=list)  # the load balancer's own
    ingress: dict[str, list[Ingress]] = field(default_factory=dict)  # backend instance -> its inbound rules
    unknown: list[str] = field(default_factory=list)  # backend instances EC2 does not know


def host_problems(s: Settings, h: HostFacts, policy_ports: list[int] | None) -> list[str]:
    """What is wrong with one host, each with what to do; [] when it agrees with everything."""
    if h.error:
        return [f"cannot inspect: {h.error}"]
    out = []
    if h.nginx == "foreign":
        out.append(f"the pid file names an nginx wsgate did not start (pid {h.pid}: {h.cmdline}): hand the host over")
    elif h.nginx == "no":
        out.append("nginx is not running: run `fab rollout`")
    current = digest_of_link(h.current)
    if h.live and h.live != h.rendered:
        out.append(f"serves {h.live[:12]}, rendered {h.rendered[:12]}: run `fab rollout`")
    if h.live and current != h.live:
        out.append(f"`current` names {(current or 'nothing')[:12]} but nginx runs {h.live[:12]}: "
                   "a restart would load another config; run `fab rollout`")
    if h.nginx == "ours" and not h.live:
        out.append("the health port does not answer")
    if h.locked_by:
        out.append(f"a run holds the rollout lock ({h.locked_by})")
    want = PROXY if s.proxy_protocol else PLAIN
    for port, mode in sorted(h.ports.items()):
        if mode == NEITHER:
            out.append(f"port {port} answers neither with nor without a PROXY header")
        elif policy_ports is not None and (mode == PROXY) != (port in policy_ports):
            lb = "sends" if port in policy_ports else "does not send"
            out.append(f"port {port} {'reads' if mode == PROXY else 'does not read'} the PROXY header but the "
                       f"load balancer {lb} it: every request through it fails "
                       + ("(attach the policy: `pulumi up` once every host is ready)" if mode == PROXY
                          else "(run `fab rollout` with proxyProtocol: true)"))
        elif mode != want and policy_ports is None:
            out.append(f"port {port} {'reads' if mode == PROXY else 'does not read'} the PROXY header; the "
                       f"settings ask for {'it' if s.proxy_protocol else 'none'}: run `fab rollout`")
    return out


def balancer_problems(s: Settings, lb: BalancerFacts | None, record: ReadinessRecord | None,
                      record_problem: str | None) -> tuple[list[str], list[str], dict]:
    """(problems, notes, the gate's view) for the load balancer, the gate computed exactly as
    the Pulumi program computes it (backends: loadBalancer.instances)."""
    backends = list(s.load_balancer.instances)
    attached = list(lb.policy_ports) if lb else []
    gated = plan_for(s, registered=lb.registered if lb else [], attached=attached, record=record,
                     record_problem=record_problem)
    decision = gated.decision
    gate = {"state": decision.state.value, "ports": list(decision.ports), "missing": decision.missing,
            "waiting": gated.waiting, "message": decision.message}
    problems: list[str] = []
    notes: list[str] = []
    if lb is None or not lb.exists:
        return [f"load balancer {s.load_balancer.name} does not exist: run `pulumi up`"], notes, gate
    if decision.warn or (not s.proxy_protocol and attached):
        problems.append(f"gate {decision.state.value}: {decision.message}")
    want_ports = list(decision.ports)
    if sorted(lb.policy_ports) != want_ports:
        problems.append(f"the ProxyProtocol policy is on ports {lb.policy_ports or 'none'}, the gate wants "
                        f"{want_ports or 'none'}: run `pulumi up`")
    for protocol, port, instance_protocol, instance_port in lb.listeners:
        if instance_protocol.upper() != "TCP":
            if lb.lab_endpoint:
                notes.append(f"listener {protocol}:{port}: instance protocol not checked (this AWS endpoint "
                             f"reports {instance_protocol} whatever was set)")
            elif s.proxy_protocol:
                problems.append(f"listener {protocol}:{port} -> {instance_protocol}:{instance_port}: the instance "
                                "protocol must be TCP for the PROXY header to reach nginx")
    problems += exposure_problems(list(s.proxy_ports), lb.security_groups, lb.ingress)
    for instance in lb.unknown:
        if lb.lab_endpoint:
            notes.append(f"{instance}: security groups not checked (this AWS endpoint runs no instances)")
        else:
            problems.append(f"{instance}: EC2 does not know this instance (its security groups cannot be checked)")
    for instance in backends:
        if instance in gated.waiting:
            problems.append(f"{instance} {gated.waiting[instance]}")
        elif instance not in lb.registered:
            problems.append(f"{instance} is not registered with the load balancer: run `pulumi up`")
        elif instance not in lb.health and lb.lab_endpoint:
            notes.append(f"{instance}: health not reported by this AWS endpoint (it runs no instances)")
        elif not lb.health.get(instance, "").startswith("InService"):
            problems.append(f"{instance} is {lb.health.get(instance) or 'of unknown health'}")
    return problems, notes, gate


def exposure_problems(ports: list[int], lb_groups: list[str], ingress: dict[str, list[Ingress]]) -> list[str]:
    """Every rule on a backend instance that lets anything but the load balancer reach a port
    that reads the PROXY header: whoever reaches it can claim any client address."""
    out = []
    for instance, rules in sorted(ingress.items()):
        for rule in rules:
            opened = [p for p in ports if rule.opens(p)]
            if opened and rule.source not in lb_groups:
                out.append(f"{instance}: security group {rule.group} opens port(s) {', '.join(map(str, opened))} to "
                           f"{rule.source}, beyond the load balancer: anyone there can forge a PROXY header "
                           "(remove the rule; the kit's instance group admits the load balancer only)")
    return out
