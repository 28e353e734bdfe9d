"""The Pulumi program: settings from the stack config, the gate's inputs, the component, exports.

The readiness record and the gate's own state are read with provider invokes
(`aws.ssm.get_parameter`), so they work in `pulumi preview` and `pulumi up`, locally and in CI.
"""

from __future__ import annotations

import json
from typing import Any

import pulumi
import pulumi_aws as aws
from pulumi.runtime.config import CONFIG

from core.gate import Decision, decide
from core.record import ReadinessRecord, RecordError
from core.settings import Settings, from_config
from infra.elb import LoadBalancerArgs, WsGateLoadBalancer


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
    return from_config(stack, engine_config(), f"Pulumi.{stack}.yaml")


def parameters(s: Settings) -> dict[str, str]:
    """Every parameter beside the readiness record (the record and the gate's state).

    One by-path read: it returns nothing, not an error, where nothing was written yet (a
    failed invoke would fail the whole program even when caught).
    """
    found = aws.ssm.get_parameters_by_path(path=s.parameter_dir, recursive=False)
    return dict(zip(found.names, found.values, strict=False))


def read_record(found: dict[str, str], s: Settings) -> tuple[ReadinessRecord | None, str | None]:
    """The readiness record, or None and why."""
    text = found.get(s.parameter_path)
    if text is None:
        return None, f"no readiness record at {s.parameter_path}"
    try:
        return ReadinessRecord.from_json(text), None
    except RecordError as exc:
        return None, str(exc)


def attached_now(found: dict[str, str], s: Settings) -> bool:
    """What the last `pulumi up` attached (it writes the gate parameter after the attachments)."""
    try:
        return bool(json.loads(found.get(s.gate_parameter_path) or "{}").get("attached"))
    except (ValueError, AttributeError):
        return False


def gate(s: Settings) -> Decision:
    found = parameters(s)
    record, problem = read_record(found, s)
    return decide(
        env=s.env, wanted=s.proxy_protocol, backends=list(s.load_balancer.instances),
        ports=list(s.ports.proxied), record=record, attached=attached_now(found, s), record_problem=problem,
    )


def main() -> WsGateLoadBalancer:
    s = settings()
    decision = gate(s)
    if decision.warn:
        pulumi.log.warn(decision.message)
    else:
        pulumi.log.info(decision.message)
    lb = WsGateLoadBalancer(s.load_balancer.name, LoadBalancerArgs(settings=s, decision=decision))
    pulumi.export("dnsName", lb.dns_name)
    pulumi.export("lbSecurityGroupId", lb.lb_security_group.id)
    pulumi.export("instanceSecurityGroupId", lb.instance_security_group.id)
    pulumi.export("proxyProtocolGate", decision.state.value)
    pulumi.export("proxyProtocolPorts", list(s.ports.proxied) if decision.attach else [])
    pulumi.export("notReady", decision.missing)
    pulumi.export("gateMessage", decision.message)
    return lb
