"""The lab's DNS server: the service's name answered from the lab endpoint's Route 53, as Route 53
answers it.

UDP on loopback (127.0.0.1:15353 for `make lab`), `dnslib`. For a name in one of the endpoint's
hosted zones it reads the record sets there (at most CACHE seconds old, so a weight change is seen
at once) and answers one record per query, chosen as Route 53 chooses:
- weighted records: each with the probability weight/sum; when every weight is 0, all equally;
- an alias to a load balancer (its DNS name, as the ELB APIs report it) answers that load
  balancer's address in the lab: its stand-in's own loopback address (lab/standin.py);
- `evaluateTargetHealth`: a record whose load balancer has no healthy instance is skipped while
  another has one (records of weight 0 only when no weighted one is healthy; when none is healthy,
  all count as healthy, as Route 53 does);
- the TTL is the environment's `dns.ttl` (AWS gives an alias the load balancer's 60 s; the lab's
  is short, so a client sees a move within seconds);
- NXDOMAIN for a name with no record in a zone it serves, REFUSED for a name outside its zones.
A load balancer's own DNS name (as the ELB APIs report it) answers its stand-in's address, TTL 60:
what `fab move` asks (dns.resolver) to reach a load balancer before DNS gives it weight.
"""

from __future__ import annotations

import functools
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from dnslib import QTYPE, RCODE, RR, A, DNSRecord
from dnslib.server import BaseResolver, DNSLogger, DNSServer

DNS_PORT = 15353  # make lab's DNS server: 127.0.0.1:15353 (UDP)
CACHE = 0.15  # seconds: how old the Route 53 records answered may be
STALE = 5.0  # seconds the last good read answers while the endpoint fails reads
LB_TTL = 60  # a load balancer's own DNS name, as AWS answers it


def plain(name: str) -> str:
    """A DNS name compared as the settings spell it: lower case, no final dot, no `dualstack.`."""
    name = name.replace("\\052", "*").rstrip(".").lower()
    return name.removeprefix("dualstack.")


def within(name: str, zone: str) -> bool:
    return name == zone or name.endswith("." + zone)


@dataclass(frozen=True)
class Choice:
    """One record set at the name asked, resolved to what the lab answers."""

    identifier: str | None  # SetIdentifier
    weight: int | None  # None: not a weighted record
    addresses: tuple[str, ...]  # the stand-in's address for an alias; the values of a plain A record
    ttl: int | None  # a plain record's own TTL; None: an alias (the environment's dns.ttl)
    healthy: bool = True  # the alias target has a healthy instance (True when not evaluated)


def pick(choices: list[Choice], rng: random.Random) -> Choice | None:
    """The record Route 53 answers with, from the record sets of one name and type. Pure but for `rng`."""
    live = [c for c in choices if c.addresses]
    if not live:
        return None
    weighted = [c for c in live if c.weight is None or c.weight > 0]
    for pool in ([c for c in weighted if c.healthy], [c for c in live if c.healthy], weighted, live):
        if pool:
            weights = [1 if c.weight is None else c.weight for c in pool]
            return rng.choices(pool, weights=weights)[0] if sum(weights) else rng.choice(pool)
    return None


@dataclass(frozen=True)
class Snapshot:
    """What the lab endpoint had, read at `at`."""

    at: float
    zones: dict[str, str]  # zone name -> zone id
    records: dict[str, list[dict]]  # zone id -> its record sets
    balancers: dict[str, str]  # a load balancer's DNS name -> its name


@functools.cache
def lab_client(service: str, endpoint: str, region: str = "us-east-1"):
    """A botocore client of the lab endpoint (the lab's own keys, never a real account's); one per
    service, endpoint and region, shared (botocore's clients are thread-safe; making one parses
    the service's model again, a tenth of a second)."""
    import botocore.session

    return botocore.session.get_session().create_client(
        service, endpoint_url=endpoint, region_name=region, aws_access_key_id="lab", aws_secret_access_key="lab")


class Route53:
    """The lab endpoint's hosted zones, their record sets and its load balancers' DNS names."""

    def __init__(self, endpoint: str, region: str = "us-east-1", elb: str | None = None, elbv2: str | None = None):
        self.route53 = lab_client("route53", endpoint, region)
        self.elb = lab_client("elb", elb or endpoint, region)
        self.elbv2 = lab_client("elbv2", elbv2 or endpoint, region)

    def read(self) -> Snapshot:
        zones = {plain(z["Name"]): z["Id"].removeprefix("/hostedzone/")
                 for page in self.route53.get_paginator("list_hosted_zones").paginate()
                 for z in page["HostedZones"]}
        records = {zone_id: self.route53.list_resource_record_sets(HostedZoneId=zone_id, MaxItems="300")
                   ["ResourceRecordSets"] for zone_id in zones.values()}
        balancers = {plain(d["DNSName"]): d["LoadBalancerName"]
                     for d in self.elb.describe_load_balancers()["LoadBalancerDescriptions"]}
        balancers.update({plain(d["DNSName"]): d["LoadBalancerName"]
                          for d in self.elbv2.describe_load_balancers()["LoadBalancers"]})
        return Snapshot(time.monotonic(), zones, records, balancers)


class Resolver(BaseResolver):
    """dnslib's resolver answering from the lab endpoint's Route 53.

    `address_of(lb name)`: the load balancer's address in the lab (None: it has none);
    `healthy(lb name)`: whether it has a healthy instance; `ttl()`: the TTL of an alias answer."""

    def __init__(self, route53: Route53, address_of: Callable[[str], str | None], healthy: Callable[[str], bool],
                 ttl: Callable[[], int], rng: random.Random | None = None):
        self.route53, self.address_of, self.healthy, self.ttl = route53, address_of, healthy, ttl
        self.rng = rng or random.Random()
        self._lock = threading.Lock()
        self._snapshot: Snapshot | None = None
        self._health: dict[str, bool] = {}
        self.queries = 0

    def snapshot(self) -> tuple[Snapshot, dict[str, bool]]:
        with self._lock:
            if self._snapshot is None or time.monotonic() - self._snapshot.at > CACHE:
                try:
                    self._snapshot = self.route53.read()
                except Exception:  # noqa: BLE001 - the endpoint failed one read (moto answers some reads
                    # racing a delete with a 500): Route 53 itself keeps answering, so the last good
                    # snapshot does, for a while
                    if self._snapshot is None or time.monotonic() - self._snapshot.at > STALE:
                        raise
                else:
                    self._health = {}
            return self._snapshot, self._health

    def _healthy(self, health: dict[str, bool], name: str) -> bool:
        if name not in health:
            health[name] = self.healthy(name)
        return health[name]

    def answer(self, qname: str, qtype: str) -> tuple[str, list[tuple[str, int]]]:
        """(rcode name, [(address, ttl)]) for a query: NOERROR, NXDOMAIN or REFUSED."""
        name = plain(qname)
        snap, health = self.snapshot()
        zones = [z for z in snap.zones if within(name, z)]
        if not zones and name in snap.balancers:  # a load balancer's own DNS name: its address
            address = self.address_of(snap.balancers[name])
            return "NOERROR", [(address, LB_TTL)] if address and qtype == "A" else []
        if not zones:
            return "REFUSED", []
        zone_id = snap.zones[max(zones, key=len)]
        here = [r for r in snap.records.get(zone_id, []) if plain(r["Name"]) == name]
        if not here:
            return "NXDOMAIN", []
        if qtype != "A":
            return "NOERROR", []
        choices = []
        for r in (r for r in here if r["Type"] == "A"):
            weight = r.get("Weight")
            alias = r.get("AliasTarget")
            if alias:
                lb = snap.balancers.get(plain(alias["DNSName"]))
                address = self.address_of(lb) if lb else None
                evaluate = alias.get("EvaluateTargetHealth", False)
                healthy = not evaluate or (lb is not None and self._healthy(health, lb))
                choices.append(Choice(r.get("SetIdentifier"), weight, (address,) if address else (), None, healthy))
            else:
                values = tuple(v["Value"] for v in r.get("ResourceRecords", []))
                choices.append(Choice(r.get("SetIdentifier"), weight, values, int(r.get("TTL", 300))))
        with self._lock:
            chosen = pick(choices, self.rng)
        if chosen is None:
            return "NOERROR", []
        ttl = self.ttl() if chosen.ttl is None else chosen.ttl
        return "NOERROR", [(a, ttl) for a in chosen.addresses]

    def resolve(self, request: DNSRecord, handler) -> DNSRecord:
        reply = request.reply()
        self.queries += 1
        qname = str(request.q.qname)
        try:
            rcode, answers = self.answer(qname, QTYPE[request.q.qtype])
        except Exception as exc:  # noqa: BLE001 - the endpoint down, say: SERVFAIL, as a resolver says
            print(f"lab dns: {qname}: {exc}", flush=True)
            reply.header.rcode = RCODE.SERVFAIL
            return reply
        reply.header.rcode = getattr(RCODE, rcode)
        reply.header.aa = 1 if rcode != "REFUSED" else 0
        for address, ttl in answers:
            reply.add_answer(RR(request.q.qname, QTYPE.A, rdata=A(address), ttl=ttl))
        return reply


class Server:
    """The DNS server on UDP `host`:`port` (0: a free port), in a thread of its own."""

    def __init__(self, resolver: Resolver, host: str = "127.0.0.1", port: int = DNS_PORT):
        self.resolver = resolver
        self._server = DNSServer(resolver, address=host, port=port,
                                 logger=DNSLogger("-recv,-send,-request,-reply,-truncated,-data", prefix=False))
        self.host, self.port = self._server.server.server_address[:2]

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> Server:
        self._server.start_thread()
        return self

    def stop(self) -> None:
        self._server.stop()
        self._server.server.server_close()


def resolver_for(server: str):
    """A dnspython resolver that asks only `server` (host:port), as the lab's clients do."""
    import dns.resolver

    host, _, port = server.rpartition(":")
    out = dns.resolver.Resolver(configure=False)
    out.nameservers = [host]
    out.port = int(port)
    out.lifetime = 2.0
    out.cache = None
    return out


def resolve(server: str, name: str) -> tuple[str, int]:
    """`name`'s address through `server` (host:port) and its TTL."""
    answer = resolver_for(server).resolve(name, "A")
    assert answer.rrset is not None
    return answer[0].address, answer.rrset.ttl
