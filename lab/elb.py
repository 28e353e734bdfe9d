"""The lab's load balancer, made with boto3 where the `pulumi` CLI is not installed.

The same calls the Pulumi program's resources make, against the lab's own AWS endpoint only,
deciding the ProxyProtocol policy with the same gate code (core.gate). Never used for a real
AWS account: `apply` refuses any environment whose endpoints are not on loopback.
"""

from __future__ import annotations

from core.elb import health_check, listeners
from core.errors import KitError
from core.gate import Decision, plan_for
from core.settings import Settings


def apply(settings: Settings) -> Decision:
    """Create or update the lab's ELB and apply the gate's decision; returns the decision."""
    from remote import aws  # botocore: only when applying (a rollout starts without it)

    if not aws.is_lab(settings):
        raise KitError(f"{settings.env}: the boto3 fallback only runs against a loopback AWS endpoint (the lab); "
                       "install the pulumi CLI for a real account")
    lb, s = settings.load_balancer, settings
    elb = aws.client(settings, "elb")
    name = lb.name
    if aws.describe(settings) is None:
        elb.create_load_balancer(
            LoadBalancerName=name, AvailabilityZones=lb.availability_zones or ["us-east-1a"],
            Listeners=[{"Protocol": x.protocol.upper(), "LoadBalancerPort": x.lb_port, "InstanceProtocol": "TCP",
                        "InstancePort": x.instance_port,
                        **({"SSLCertificateId": lb.certificate_arn} if x.protocol == "ssl" else {})}
                       for x in listeners(s)],
            Tags=[{"Key": "wsgate:env", "Value": s.env}])
    check = health_check(s)
    elb.configure_health_check(LoadBalancerName=name, HealthCheck={
        "Target": check.target, "Interval": check.interval, "Timeout": check.timeout,
        "UnhealthyThreshold": check.unhealthy_threshold, "HealthyThreshold": check.healthy_threshold})
    elb.modify_load_balancer_attributes(LoadBalancerName=name, LoadBalancerAttributes={
        "ConnectionSettings": {"IdleTimeout": lb.idle_timeout},
        "CrossZoneLoadBalancing": {"Enabled": lb.cross_zone},
        "ConnectionDraining": {"Enabled": lb.connection_draining > 0, "Timeout": lb.connection_draining or 300}})
    registered = [i["InstanceId"] for i in (aws.describe(settings) or {}).get("Instances", [])]
    record = aws.read_record(settings)
    gated = plan_for(s, registered=registered, attached=aws.proxy_protocol_ports(settings), record=record)
    decision = gated.decision
    new = [i for i in gated.join if i not in registered]
    if new:
        elb.register_instances_with_load_balancer(LoadBalancerName=name, Instances=[{"InstanceId": i} for i in new])
    policy = f"{name}-proxy-protocol"
    if decision.attach:
        existing = {p["PolicyName"] for p in elb.describe_load_balancer_policies(LoadBalancerName=name)
                    ["PolicyDescriptions"]}
        if policy not in existing:
            elb.create_load_balancer_policy(
                LoadBalancerName=name, PolicyName=policy, PolicyTypeName="ProxyProtocolPolicyType",
                PolicyAttributes=[{"AttributeName": "ProxyProtocol", "AttributeValue": "true"}])
    for port in sorted(set(s.ports.proxied) | set(aws.proxy_protocol_ports(settings))):
        elb.set_load_balancer_policies_for_backend_server(
            LoadBalancerName=name, InstancePort=port, PolicyNames=[policy] if port in decision.ports else [])
    return decision


class LabBalancer:
    """The lab's load balancer side (remote.balancer.Balancer): `pulumi up` where the CLI is
    installed, else the boto3 calls above. Named by Pulumi.lab.yaml (`loadBalancer.applier`)."""

    def __init__(self, settings: Settings):
        self.settings = settings

    def proxy_ports(self) -> list[int]:
        from remote import aws

        return aws.proxy_protocol_ports(self.settings)

    def apply(self, note) -> dict:
        from infra import automation
        from remote.balancer import PulumiStack

        if automation.cli_available():
            return PulumiStack(self.settings).apply(note)
        note("pulumi CLI not installed: applying the lab's load balancer with boto3 (same gate code)")
        decision = apply(self.settings)
        return {"proxyProtocolGate": decision.state.value, "gateMessage": decision.message}
