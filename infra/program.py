"""The Pulumi program: settings from the stack config, the gate's inputs, the component, exports.

The readiness record is read with a provider invoke (`aws.ssm.get_parameters_by_path`), and
the ports that have the policy now straight from the ELB API (botocore, the read `fab status`
uses): both work in `pulumi preview` and `pulumi up`, locally and in CI. Nothing the program
stores marks the gate: the load balancer itself is the truth.

With `dns`, each declared load balancer gets its weighted alias record (infra/dns_record.py),
after Route 53 was read: a record at the name the kit did not make stops the program before it
declares anything. With `moveTo`, the move record (beside the readiness record, in the same read)
says which load balancers are declared and each one's weight (core.move.declared); each goes
through its own kind's gate, so a new one sends the header from its first connection when the
readiness record proves its ports.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pulumi
import pulumi_aws as aws
from pulumi.runtime.config import CONFIG

from awsapi import balancer, classic, network, route53
from awsapi.clients import is_lab
from core.errors import KitError
from core.gate import Plan, plan_for
from core.move import MoveRecord, declared, matches, move_path
from core.network import NetworkLayout, NetworkState, network_layout, network_plan, warm_listeners, warm_outputs
from core.record import ReadinessRecord, decode
from core.settings import Settings, check_neighbours, from_config
from infra.classic_component import LoadBalancerArgs, WsGateLoadBalancer
from infra.dns_record import weighted_record
from infra.network_component import NetworkLoadBalancerArgs, WsGateNetworkLoadBalancer

Balancer = WsGateLoadBalancer | WsGateNetworkLoadBalancer


def engine_config() -> dict[str, Any]:
    """The stack's config as the engine passed it: structured values arrive as JSON text."""
    out: dict[str, Any] = {}
    for key, raw in CONFIG.get().items():
        try:
            out[key] = json.loads(raw) if isinstance(raw, str) else raw
        except ValueError:
            out[key] = raw
    return out


def settings() -> Settings:
    stack = pulumi.get_stack()
    s = from_config(stack, engine_config(), f"Pulumi.{stack}.yaml")
    check_neighbours(s, ".", f"Pulumi.{stack}.yaml")  # the engine runs the program in the project directory
    return s


def parameters(s: Settings) -> dict[str, str]:
    """Every parameter beside the readiness record (a sharded record's shards are beside it too),
    read without decryption (a SecureString a neighbour keeps there must not need kms:Decrypt).
    One by-path read (the provider reads every page): it returns nothing, not an error, where
    nothing was written yet (a failed invoke would fail the whole program)."""
    found = aws.ssm.get_parameters_by_path(path=s.parameter_dir, recursive=False, with_decryption=False)
    return dict(zip(found.names or [], found.values or [], strict=False))


def read_record(found: dict[str, str], s: Settings) -> tuple[ReadinessRecord | None, str | None]:
    """The readiness record, or None and why (core.record.decode: the reader `fab` uses too)."""
    return decode(found, s.parameter_path)


def header_ports_now(s: Settings) -> list[int]:
    """The header ports: those that carry the ProxyProtocol policy now, as the load balancer itself
    says (the same read `fab status` and `fab rollout` use), in `pulumi up` and in `pulumi preview`."""
    try:
        return classic.header_ports(s)
    except KitError as exc:
        raise KitError(f"cannot read which ports have the ProxyProtocol policy now ({exc}); the gate will not "
                       "decide blind: the program needs elasticloadbalancing:Describe* on the load balancer") from None


def registered_now(s: Settings) -> list[str]:
    """The instances registered with the load balancer now (none before it exists)."""
    return classic.registered(s)


def read_move(found: dict[str, str], s: Settings) -> MoveRecord | None:
    """The move record (core.move) from the same by-path read, or None when no move was started."""
    path = move_path(s)
    return MoveRecord.from_json(found[path], path) if path in found else None


def refuse_replacement(s: Settings, ours: tuple[str, ...] = ()) -> None:
    """Stop before anything is declared when the settings would replace the live load balancer
    (`ours`: the environment's load balancer names, none of them a rename of the other)."""
    balancer.refuse_replacement(s, ours=ours)


def refuse_foreign_dns(s: Settings) -> None:
    """Stop before anything is declared when the hosted zone does not hold dns.name, or a record
    there is not the kit's (it never takes one over)."""
    problem = route53.refusal(s)
    if problem:
        raise KitError(problem)


def gate_plan(s: Settings, found: dict[str, str] | None = None) -> Plan:
    found = parameters(s) if found is None else found
    record, problem = read_record(found, s)
    return plan_for(s, registered=registered_now(s), header_ports=header_ports_now(s), record=record,
                    record_problem=problem)


def check_certificate(s: Settings) -> None:
    """Stop before anything is declared when AWS would refuse loadBalancer.certificateArn (a Classic
    ELB would be left without its 443 listener), and say what a Classic rotation costs."""
    from awsapi import certificates

    try:
        problem, soon = certificates.verdict(s)
    except certificates.NotChecked as exc:
        if exc.lab:
            pulumi.log.info(str(exc))
        else:
            pulumi.log.warn(f"{exc} (the program needs acm:DescribeCertificate or iam:GetServerCertificate)")
        problem, soon = None, None
    if problem:
        raise KitError(f"{problem}; nothing was declared (docs/troubleshooting.md#the-certificate-cannot-serve)")
    if soon:
        pulumi.log.warn(soon)
    live = certificates.listener_certificate(s) if s.load_balancer.type == "classic" else None
    if live and live != s.load_balancer.certificate_arn:
        pulumi.log.warn(f"the 443 listener's certificate changes from {live} to {s.load_balancer.certificate_arn}: "
                        "a Classic ELB deletes and recreates the listener, so new connections on 443 are refused "
                        "in between and every open WebSocket through it is cut; run it when traffic is low "
                        "(docs/concepts.md#rotating-the-certificate)")


def main() -> Balancer:
    """Every load balancer the environment declares now (core.move.declared: loadBalancer, and
    during a move the one moved to), each through its kind's gate, with its weighted DNS record
    when dns is set. Every refusal comes before anything is declared."""
    s = settings()
    found = parameters(s)
    move = read_move(found, s)
    if s.dns:
        refuse_foreign_dns(s)
    weights = declared(s, move)
    target = s.moving_to
    if target is not None and (move is None or not matches(s, move)):
        pulumi.log.info(f"moveTo names load balancer {target.load_balancer.name}: `fab move --env {s.env}` creates "
                        f"it; this update declares only loadBalancer {s.load_balancer.name}")
    each: dict[str, Settings] = {}
    for name in weights:
        lb_s = s if name == s.load_balancer.name else target
        if lb_s is None or lb_s.load_balancer.name != name:
            raise KitError(f"the move record declares load balancer {name}, which these settings do not name")
        each[name] = lb_s
    for lb_s in each.values():
        refuse_replacement(lb_s, ours=s.balancer_names)
        check_certificate(lb_s)
    primary = s.load_balancer.name if s.load_balancer.name in each else next(iter(each))
    made: dict[str, tuple[Balancer, Plan]] = {}
    for name, lb_s in each.items():
        who = "" if name == primary else f"{name}: "
        made[name] = (network_declare(lb_s, found, who) if lb_s.load_balancer.type == "network"
                      else classic_declare(lb_s, found, who))
    if s.dns:
        declare_records(s, each, weights, {name: b for name, (b, _) in made.items()})
    lb, gated = made[primary]
    export(lb, gated)
    if isinstance(lb, WsGateNetworkLoadBalancer):
        export_network(lb, gated)
    pulumi.export("balancers", {name: {
        "dnsName": b.dns_name, "kind": each[name].load_balancer.type,
        "proxyProtocolGate": g.decision.state.value, "proxyProtocolPorts": list(g.decision.ports)}
        for name, (b, g) in made.items()})
    pulumi.export("dnsWeights", {name: weight for name, weight in weights.items() if weight is not None})
    return lb


def declare_records(s: Settings, each: dict[str, Settings], weights: dict[str, int | None],
                    made: dict[str, Balancer]) -> None:
    """The weighted alias record of every declared load balancer: those whose weight rises (as
    Route 53 has them now) are changed first, those whose weight falls after them."""
    now = route53.weights(s)
    rising: list[pulumi.Resource] = []
    order = sorted(each, key=lambda name: (weights[name] or 0) < now.get(name, 0))  # rising (or equal) first
    for name in order:
        weight, lb = weights[name], made[name]
        assert weight is not None
        falls = weight < now.get(name, 0)
        record = weighted_record(each[name], weight, lb.dns_name, lb.zone_id, parent=lb, lab=is_lab(each[name]),
                                 after=rising if falls else None)
        if not falls:
            rising.append(record)


def classic_declare(s: Settings, found: dict[str, str], who: str = "") -> tuple[WsGateLoadBalancer, Plan]:
    """One Classic ELB and its gate."""
    gated = gate_plan(s, found)
    announce(gated, who=who)
    lb = WsGateLoadBalancer(s.load_balancer.name, LoadBalancerArgs(settings=s, decision=gated.decision,
                                                                   members=gated.join))
    return lb, gated


def announce(gated: Plan, *extra: str, who: str = "") -> None:
    """The gate's words in the preview and the update: a warning when it holds something back
    (`who`: the load balancer's name and a colon, for a second one)."""
    decision = gated.decision
    (pulumi.log.warn if decision.warn else pulumi.log.info)(who + decision.message)
    for line in extra:
        pulumi.log.warn(who + line)
    for instance, why in sorted(gated.waiting.items()):
        pulumi.log.warn(f"{who}{instance} {why}")


def export(lb: WsGateLoadBalancer | WsGateNetworkLoadBalancer, gated: Plan) -> None:
    """The stack outputs both kinds share."""
    decision = gated.decision
    pulumi.export("dnsName", lb.dns_name)
    pulumi.export("lbSecurityGroupId", lb.lb_security_group.id)
    pulumi.export("instanceSecurityGroupId", lb.instance_security_group.id)
    pulumi.export("proxyProtocolGate", decision.state.value)
    pulumi.export("proxyProtocolPorts", list(decision.ports))
    pulumi.export("notReady", decision.missing)
    pulumi.export("waiting", gated.waiting)
    pulumi.export("gateMessage", decision.message)


# --- network load balancer -------------------------------------------------------------------

def network_now(s: Settings) -> NetworkState | None:
    """The network load balancer as the ELBv2 API says it is now (None before it exists)."""
    try:
        return network.network_state(s)
    except KitError as exc:
        raise KitError(f"cannot read where the network load balancer's listeners forward now ({exc}); the gate "
                       "will not decide blind: the program needs elasticloadbalancing:Describe* on it") from None


def network_gate_plan(s: Settings, found: dict[str, str] | None = None) -> tuple[Plan, NetworkLayout]:
    """The same gate over the proxy ports: `header_ports` is the proxy ports a listener forwards to now
    with PROXY v2 on, `registered` the instances in the groups the listeners forward to, and every
    instance in any of the kit's groups must be proven before a listener moves to its proxy group.
    With it: who is registered in which group, where each listener forwards, which listener waits
    for AWS to say the group it moves to healthy (its proxy group, or its plain group on the way
    back), and which plain group waits to retire (core.network.NetworkLayout).
    A listener whose plain group was retired goes back to it only once the record proves the plain
    port served again (else the program stops before declaring anything)."""
    found = parameters(s) if found is None else found
    record, problem = read_record(found, s)
    state = network_now(s)
    gated = network_plan(s, state, record, problem)
    return gated, network_layout(s, gated, state.now(s) if state else {}, record, problem, clock=time.time())


def network_declare(s: Settings, found: dict[str, str] | None = None, who: str = ""
                    ) -> tuple[WsGateNetworkLoadBalancer, Plan]:
    """One network load balancer and its gate."""
    gated, layout = network_gate_plan(s, found)
    holds, waits = layout.holds, layout.retire_waits
    stranded = sorted(set(gated.decision.ports) - set(s.proxy_ports))
    announce(gated, *([f"proxy port(s) {', '.join(map(str, stranded))} are no longer ports.proxyHttp/proxyTls: "
                       "their listeners forward to the plain groups until `fab rollout` proves the new ports"]
                      if stranded else []), *[holds[port] for port in sorted(holds)], who=who)
    for port in sorted(waits):  # no problem, the kit's own pace: said, not warned
        pulumi.log.info(who + waits[port])
    lb = WsGateNetworkLoadBalancer(s.load_balancer.name, NetworkLoadBalancerArgs(
        settings=s, forwarding=layout.forwarding, members=layout.members,
        warm=tuple(x.port for x in warm_listeners(s, layout.forwarding)), holds=holds, switched=layout.switched,
        retire_waits=waits))
    return lb, gated


def export_network(lb: WsGateNetworkLoadBalancer, gated: Plan) -> None:
    """The stack outputs of a network load balancer: where each listener forwards, the retired plain groups."""
    forwarding, members = lb.forwarding, lb.group_members
    pulumi.export("listenerTargets", {str(port): kind for port, kind in forwarding.items()})
    pulumi.export("retiredPlainGroups", sorted(key for key, joined in members.items() if not joined and gated.join))
    pulumi.export("healthWaiting", {str(port): why for port, why in sorted(lb.health_waiting.items())})
    pulumi.export("retireWaiting", {str(port): why for port, why in sorted(lb.retire_waiting.items())})
    pulumi.export("warmListeners", warm_outputs(lb.settings, forwarding, lb.warm_for))


def network_main(s: Settings) -> WsGateNetworkLoadBalancer:
    """A network load balancer alone, with its stack outputs."""
    lb, gated = network_declare(s)
    export(lb, gated)
    export_network(lb, gated)
    return lb
