"""The Pulumi program: settings from the stack config, the gate's inputs, the component, exports.

The readiness record is read with a provider invoke (`aws.ssm.get_parameters_by_path`), and
the ports that have the policy now straight from the ELB API (botocore, the read `fab status`
uses): both work in `pulumi preview` and `pulumi up`, locally and in CI. Nothing the program
stores marks the gate: the load balancer itself is the truth.
"""

from __future__ import annotations

import json
from typing import Any

import pulumi
import pulumi_aws as aws
from pulumi.runtime.config import CONFIG

from awsapi import balancer, classic, network
from core.errors import KitError
from core.gate import Plan, plan_for
from core.network import NetworkState, network_layout, network_plan
from core.record import ReadinessRecord, decode
from core.settings import Settings, check_neighbours, from_config
from infra.classic_component import LoadBalancerArgs, WsGateLoadBalancer
from infra.network_component import NetworkLoadBalancerArgs, WsGateNetworkLoadBalancer


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


def refuse_replacement(s: Settings) -> None:
    """Stop before anything is declared when the settings would replace the live load balancer."""
    balancer.refuse_replacement(s)


def gate_plan(s: Settings) -> Plan:
    found = parameters(s)
    record, problem = read_record(found, s)
    return plan_for(s, registered=registered_now(s), header_ports=header_ports_now(s), record=record,
                    record_problem=problem)


def check_certificate(s: Settings) -> None:
    """Stop before anything is declared when AWS would refuse loadBalancer.certificateArn (a Classic
    ELB would be left without its 443 listener), and say what a Classic rotation costs."""
    from awsapi import certificates

    try:
        problem = certificates.certificate_problem(s)
    except certificates.NotChecked as exc:
        if exc.lab:
            pulumi.log.info(str(exc))
        else:
            pulumi.log.warn(f"{exc} (the program needs acm:DescribeCertificate or iam:GetServerCertificate)")
        problem = None
    if problem:
        raise KitError(f"{problem}; nothing was declared (docs/troubleshooting.md#the-certificate-cannot-serve)")
    live = certificates.listener_certificate(s) if s.load_balancer.type == "classic" else None
    if live and live != s.load_balancer.certificate_arn:
        pulumi.log.warn(f"the 443 listener's certificate changes from {live} to {s.load_balancer.certificate_arn}: "
                        "a Classic ELB deletes and recreates the listener, so new connections on 443 are refused "
                        "in between and every open WebSocket through it is cut; run it when traffic is low "
                        "(docs/concepts.md#rotating-the-certificate)")


def main() -> WsGateLoadBalancer | WsGateNetworkLoadBalancer:
    s = settings()
    refuse_replacement(s)
    check_certificate(s)
    if s.load_balancer.type == "network":
        return network_main(s)
    gated = gate_plan(s)
    announce(gated)
    lb = WsGateLoadBalancer(s.load_balancer.name, LoadBalancerArgs(settings=s, decision=gated.decision,
                                                                   members=gated.join))
    export(lb, gated)
    return lb


def announce(gated: Plan, *extra: str) -> None:
    """The gate's words in the preview and the update: a warning when it holds something back."""
    decision = gated.decision
    (pulumi.log.warn if decision.warn else pulumi.log.info)(decision.message)
    for line in extra:
        pulumi.log.warn(line)
    for instance, why in sorted(gated.waiting.items()):
        pulumi.log.warn(f"{instance} {why}")


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


def network_gate_plan(s: Settings) -> tuple[Plan, dict[str, tuple[str, ...]], dict[int, str]]:
    """The same gate over the proxy ports: `header_ports` is the proxy ports a listener forwards to now
    with PROXY v2 on, `registered` the instances in the groups the listeners forward to, and every
    instance in any of the kit's groups must be proven before a listener moves to its proxy group.
    With it: who is registered in which group, and where each listener forwards. A listener whose
    plain group was retired goes back to it only once the record proves the plain port served again
    (else the program stops before declaring anything)."""
    found = parameters(s)
    record, problem = read_record(found, s)
    state = network_now(s)
    gated = network_plan(s, state, record, problem)
    return gated, *network_layout(s, gated, state.now(s) if state else {}, record, problem)


def network_main(s: Settings) -> WsGateNetworkLoadBalancer:
    gated, members, forwarding = network_gate_plan(s)
    stranded = sorted(set(gated.decision.ports) - set(s.proxy_ports))
    announce(gated, *([f"proxy port(s) {', '.join(map(str, stranded))} are no longer ports.proxyHttp/proxyTls: "
                       "their listeners forward to the plain groups until `fab rollout` proves the new ports"]
                      if stranded else []))
    lb = WsGateNetworkLoadBalancer(s.load_balancer.name, NetworkLoadBalancerArgs(
        settings=s, forwarding=forwarding, members=members))
    export(lb, gated)
    pulumi.export("listenerTargets", {str(port): kind for port, kind in forwarding.items()})
    pulumi.export("retiredPlainGroups", sorted(key for key, joined in members.items() if not joined and gated.join))
    return lb
