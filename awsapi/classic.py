"""The Classic ELB as its API describes it now: instances, backend policies, header ports, health."""

from __future__ import annotations

from awsapi.clients import by_name, call, chunks, client, pages
from core.settings import Settings


def describe(settings: Settings) -> dict | None:
    """The Classic ELB's description, or None when it does not exist (yet)."""
    return by_name(settings, "elb", "LoadBalancerNames", "LoadBalancerDescriptions")


def registered(settings: Settings) -> list[str]:
    """The instances registered with it now (none before it exists)."""
    return [i["InstanceId"] for i in (describe(settings) or {}).get("Instances", [])]


def backend_policies(settings: Settings) -> dict[int, list[str]]:
    """Instance port -> policy names attached to it on the load balancer."""
    d = describe(settings) or {}
    return {int(b["InstancePort"]): list(b.get("PolicyNames", [])) for b in d.get("BackendServerDescriptions", [])}


def header_ports(settings: Settings) -> list[int]:
    """The header ports: backend ports whose policies include a ProxyProtocol policy with
    ProxyProtocol=true."""
    name = settings.load_balancer.name
    attached = backend_policies(settings)
    if not attached:
        return []
    elb = client(settings, "elb")
    policies = call(f"elb describe-load-balancer-policies {name}", elb.describe_load_balancer_policies,
                    LoadBalancerName=name)["PolicyDescriptions"]
    proxy = {p["PolicyName"] for p in policies if p.get("PolicyTypeName") == "ProxyProtocolPolicyType"
             and any(a["AttributeName"] == "ProxyProtocol" and a["AttributeValue"].lower() == "true"
                     for a in p.get("PolicyAttributeDescriptions", []))}
    return sorted(port for port, names in attached.items() if proxy & set(names))


def instance_health(settings: Settings, described: dict | None = None) -> dict[str, str]:
    """Instance ID -> InService / OutOfService (with the reason) as the load balancer sees it
    (`described`: its description, when the caller has just read it)."""
    if described is None and describe(settings) is None:
        return {}
    elb = client(settings, "elb")
    states = call("elb describe-instance-health", elb.describe_instance_health,
                  LoadBalancerName=settings.load_balancer.name)["InstanceStates"]
    return {s["InstanceId"]: s["State"] + (f" ({s['Description']})" if s.get("Description") not in (None, "N/A")
                                           else "") for s in states}


def names_tagged(settings: Settings, key: str, value: str) -> list[str]:
    """The names of the Classic ELBs in the region whose tag `key` is `value`."""
    elb = client(settings, "elb")
    names = [d["LoadBalancerName"] for d in pages("elb describe-load-balancers", elb, "describe_load_balancers",
                                                   "LoadBalancerDescriptions")]
    out = []
    for batch in chunks(names, 20):  # DescribeTags takes 20 names a call
        found = call("elb describe-tags", elb.describe_tags, LoadBalancerNames=batch)["TagDescriptions"]
        out += [d["LoadBalancerName"] for d in found
                if any(t["Key"] == key and t.get("Value") == value for t in d.get("Tags", []))]
    return sorted(out)
