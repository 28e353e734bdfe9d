"""The service's name in Route 53 as the API says it is now: the hosted zone, the record sets at
`dns.name`, the kit's weighted alias records and their weights, and why the kit must not act there
(a record it did not make). Every answer is read from Route 53, never from a marker of ours."""

from __future__ import annotations

from botocore.exceptions import BotoCoreError, ClientError

from awsapi.clients import AwsError, aws_error, call, client, error_code, is_lab, loopback
from core.errors import KitError
from core.settings import Settings

TYPES = ("A", "AAAA", "CNAME")  # the record types that answer for a name a client resolves
# AWS's canonical hosted zone of Classic ELBs in us-east-1: moto's Classic ELB reports none, so the
# lab's alias records point there (an ELBv2 load balancer reports its own, in moto too).
LAB_CLASSIC_ZONE = "Z35SXDOTRQ7X7K"
PAGE = "300"  # ListResourceRecordSets' largest page


def identifier(s: Settings, lb_name: str) -> str:
    """The SetIdentifier of the kit's weighted record for load balancer `lb_name` of this environment."""
    return f"wsgate:{s.env}:{lb_name}"


def _dns(s: Settings):
    if s.dns is None:
        raise KitError(f"{s.env}: no dns settings (wsgate:dns)")
    return s.dns


def api(s: Settings):
    """The environment's Route 53 client. An environment whose endpoints are on loopback (the lab)
    and name no route53 one is refused: never a real Route 53 from there."""
    endpoints = s.aws.endpoints
    if "route53" not in endpoints and any(loopback(url) for url in endpoints.values()):
        raise KitError(f"{s.env}: dns is set and aws:endpoints are on loopback but name no route53 endpoint: the kit "
                       "never asks a real Route 53 for a lab environment; add route53 to aws:endpoints")
    return client(s, "route53")


def plain(name: str) -> str:
    """A DNS name as Route 53 returns it (`www.example.com.`, `\\052` for `*`) compared as the settings
    spell it: lower case, no final dot."""
    return name.replace("\\052", "*").rstrip(".").lower()


def zone_name(s: Settings) -> str:
    """The name of the hosted zone `dns.zoneId` (no final dot); a zone that does not exist (or that
    these credentials cannot see) is a KitError naming dns.zoneId."""
    zone = _dns(s).zone_id
    try:
        found = api(s).get_hosted_zone(Id=zone)["HostedZone"]
    except ClientError as exc:
        if error_code(exc) in ("NoSuchHostedZone", "InvalidInput", "AccessDenied"):
            raise KitError(f"wsgate:dns.zoneId {zone}: no such Route 53 hosted zone, or these credentials cannot see "
                           f"it ({error_code(exc)}); set dns.zoneId to the zone that holds dns.name; nothing was "
                           "changed") from None
        raise aws_error(f"route53 get-hosted-zone {zone}", exc) from None
    except BotoCoreError as exc:
        raise aws_error(f"route53 get-hosted-zone {zone}", exc) from None
    return plain(found["Name"])


def holds(zone: str, name: str) -> bool:
    """Whether a zone of that name holds the record name (the name is the zone or under it)."""
    zone, name = plain(zone), plain(name)
    return name == zone or name.endswith("." + zone)


def records(s: Settings) -> list[dict]:
    """The record sets at `dns.name` of type A, AAAA or CNAME, as Route 53 lists them (every page;
    records of one name are listed together, so the listing stops at the next name)."""
    dns = _dns(s)
    r53 = api(s)
    name = plain(dns.name)
    start: dict[str, str] = {"StartRecordName": name + "."}
    out: dict[tuple[str, str | None], dict] = {}
    while True:
        page = call(f"route53 list-resource-record-sets {dns.zone_id} {name}", r53.list_resource_record_sets,
                    HostedZoneId=dns.zone_id, MaxItems=PAGE, **start)
        fresh = False
        for r in page.get("ResourceRecordSets", []):
            if plain(r["Name"]) != name:
                return _sorted(out)
            key = (r["Type"], r.get("SetIdentifier"))
            fresh = fresh or key not in out
            out.setdefault(key, r)
        # the next page starts at its first record; an endpoint that pages without the identifier
        # (moto) would repeat a page: nothing new, the listing is complete
        if not page.get("IsTruncated") or not fresh or plain(page.get("NextRecordName", "")) != name:
            return _sorted(out)
        start = {"StartRecordName": page["NextRecordName"], "StartRecordType": page["NextRecordType"],
                 **({"StartRecordIdentifier": page["NextRecordIdentifier"]} if page.get("NextRecordIdentifier")
                    else {})}


def _sorted(found: dict[tuple[str, str | None], dict]) -> list[dict]:
    return [found[k] for k in sorted(found, key=lambda k: (k[0], k[1] or "")) if k[0] in TYPES]


def ours(s: Settings, record: dict) -> str | None:
    """The load balancer (one of `settings.balancer_names`) whose weighted alias record this is, or
    None when the kit did not make it."""
    if record.get("Type") != "A" or "Weight" not in record or "AliasTarget" not in record:
        return None
    for lb in s.balancer_names:
        if record.get("SetIdentifier") == identifier(s, lb):
            return lb
    return None


def weights(s: Settings) -> dict[str, int]:
    """load balancer name -> the weight of the kit's record for it, as Route 53 says now."""
    out: dict[str, int] = {}
    for r in records(s):
        lb = ours(s, r)
        if lb is not None:
            out[lb] = int(r["Weight"])
    return out


def aliases(s: Settings) -> dict[str, str]:
    """load balancer name -> the DNS name its record aliases to (lower case, no final dot)."""
    return {lb: plain(r["AliasTarget"]["DNSName"]) for r in records(s) if (lb := ours(s, r)) is not None}


def describe(record: dict) -> str:
    """A record set as a person reads it: its type, and its identifier or that it has none."""
    kind = "weighted" if "Weight" in record else "alias" if "AliasTarget" in record else "simple"
    ident = record.get("SetIdentifier")
    return f"{record['Type']} ({kind}, {'SetIdentifier ' + repr(ident) if ident else 'no SetIdentifier'})"


def refusal(s: Settings) -> str | None:
    """Why the kit must not manage `dns.name` (None: it may): the zone does not hold the name, or a
    record there that the kit did not make (it never takes one over)."""
    dns = _dns(s)
    zone = zone_name(s)
    if not holds(zone, dns.name):
        return (f"wsgate:dns.name {dns.name} is not in hosted zone {dns.zone_id} ({zone}): set dns.name to a "
                f"name in {zone}, or dns.zoneId to the zone that holds {dns.name}; nothing was changed")
    foreign = [r for r in records(s) if ours(s, r) is None]
    if not foreign:
        return None
    names = ", ".join(repr(identifier(s, lb)) for lb in s.balancer_names)
    return (f"{dns.name} in hosted zone {dns.zone_id} has a record the kit did not make: "
            f"{'; '.join(describe(r) for r in foreign)}. The kit manages only weighted alias A records with "
            f"SetIdentifier {names} and never takes over another; nothing was changed. Move that record out of "
            "the way (delete it, or give the service another dns.name) once clients no longer need it, or point "
            "dns.name at a name of its own (docs/moving.md)")


def canonical_zone(s: Settings, described: dict) -> str:
    """The canonical hosted zone ID of a load balancer, for an alias record to it: a Classic ELB's
    `CanonicalHostedZoneNameID`, an ELBv2 one's `CanonicalHostedZoneId`. moto's Classic ELB reports
    none: in the lab only, AWS's us-east-1 Classic ELB zone stands for it."""
    zone = described.get("CanonicalHostedZoneId") or described.get("CanonicalHostedZoneNameID")
    if zone:
        return str(zone)
    if is_lab(s):
        return LAB_CLASSIC_ZONE
    raise AwsError(f"load balancer {described.get('LoadBalancerName')}: AWS reports no canonical hosted zone ID")
