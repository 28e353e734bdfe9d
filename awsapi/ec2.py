"""EC2: the instances' private addresses, and the inbound rules of every security group on them."""

from __future__ import annotations

from awsapi.clients import IDS_PER_CALL, chunks, client, pages
from core.doctor import Ingress
from core.settings import Settings


def private_addresses(settings: Settings, instances: list[str]) -> dict[str, str]:
    """Instance ID -> private IP address (every ID must exist)."""
    if not instances:
        return {}
    ec2 = client(settings, "ec2")
    reservations = [r for batch in chunks(sorted(instances), IDS_PER_CALL)
                    for r in pages("ec2 describe-instances", ec2, "describe_instances", "Reservations",
                                   InstanceIds=batch)]
    return {i["InstanceId"]: i.get("PrivateIpAddress", "") for r in reservations for i in r["Instances"]}


def instance_ingress(settings: Settings, instances: list[str]) -> tuple[dict[str, list[Ingress]], list[str]]:
    """Each instance's inbound rules (from every security group on it, its interfaces' too), and
    the instances EC2 does not know."""
    if not instances:
        return {}, []
    ec2 = client(settings, "ec2")
    # A filter, not InstanceIds: an unknown ID is reported, not an error for all of them.
    found = [r for batch in chunks(sorted(instances), IDS_PER_CALL)
             for r in pages("ec2 describe-instances", ec2, "describe_instances", "Reservations",
                            Filters=[{"Name": "instance-id", "Values": batch}])]
    groups_of: dict[str, set[str]] = {}
    for reservation in found:
        for i in reservation["Instances"]:
            ids = {g["GroupId"] for g in i.get("SecurityGroups", [])}
            ids |= {g["GroupId"] for n in i.get("NetworkInterfaces", []) for g in n.get("Groups", [])}
            groups_of[i["InstanceId"]] = ids
    wanted = sorted(set().union(*groups_of.values())) if groups_of else []
    rules: dict[str, list[Ingress]] = {}
    for batch in chunks(wanted, IDS_PER_CALL):
        for g in pages("ec2 describe-security-groups", ec2, "describe_security_groups", "SecurityGroups",
                       GroupIds=batch):
            label = f"{g['GroupId']} ({g.get('GroupName', '')})"
            rules[g["GroupId"]] = [
                Ingress(label, str(p.get("IpProtocol", "-1")), p.get("FromPort"), p.get("ToPort"), source)
                for p in g.get("IpPermissions", [])
                for source in ([r["CidrIp"] for r in p.get("IpRanges", [])]
                               + [r["CidrIpv6"] for r in p.get("Ipv6Ranges", [])]
                               + [r["PrefixListId"] for r in p.get("PrefixListIds", [])]
                               + [r["GroupId"] for r in p.get("UserIdGroupPairs", [])])]
    ingress = {i: [r for g in sorted(ids) for r in rules.get(g, [])] for i, ids in groups_of.items()}
    return ingress, sorted(set(instances) - set(groups_of))
