"""The 443 listener's certificate as ACM or IAM describes it now, and the one the live listener has.

A Classic ELB takes a certificate only by deleting and recreating its 443 listener; an ARN AWS then
refuses (not issued, another region's, gone) leaves no 443 listener at all, and one AWS takes but
cannot serve (expired, a key the kind cannot use) leaves a listener every TLS client fails on. So
it is checked first; core.certificate judges what is read here.
"""

from __future__ import annotations

import datetime

from botocore.exceptions import BotoCoreError, ClientError

from awsapi import classic
from awsapi.clients import AwsError, aws_error, client, error_code, loopback, pages
from core import certificate
from core.settings import Settings

_MISSING = {"ResourceNotFoundException", "NoSuchEntity", "ValidationException", "InvalidArnException"}
_DENIED = {"AccessDenied", "AccessDeniedException", "UnauthorizedOperation"}


class NotChecked(AwsError):
    """The certificate could not be read (no permission; `lab`: no endpoint of that API here): not a verdict."""

    def __init__(self, message: str, lab: bool = False):
        super().__init__(message)
        self.lab = lab


def verdict(settings: Settings, arn: str | None = None, now: datetime.datetime | None = None,
            days: int = certificate.EXPIRY_NOTE_DAYS) -> tuple[str | None, str | None]:
    """(problem, note) of the certificate (`arn`, else loadBalancer.certificateArn), from one read
    of ACM or IAM. The problem: why it cannot serve the 443 listener (None: ACM says it is ISSUED,
    in this region, or IAM has it; it is valid at `now`, default the clock; it is for serverName and
    dns.name; its key is one the load balancer's kind takes). The note, only without a problem: when
    it expires, if within `days` of `now` ("certificate ARN expires in N days ..."). NotChecked when
    ACM or IAM cannot be asked."""
    arn = arn or settings.load_balancer.certificate_arn
    found = _described(settings, arn)
    if isinstance(found, str):
        return found, None
    now = now or _now()
    problem = certificate.problem(found, settings.load_balancer.type, now, _used(settings))
    return problem, None if problem else certificate.note(found, now, days)


def certificate_problem(settings: Settings, arn: str | None = None,
                        now: datetime.datetime | None = None) -> str | None:
    """Why the certificate cannot serve the 443 listener (verdict's problem; None: it can).
    NotChecked when ACM or IAM cannot be asked."""
    return verdict(settings, arn, now)[0]


def certificate_note(settings: Settings, arn: str | None = None, now: datetime.datetime | None = None,
                     days: int = certificate.EXPIRY_NOTE_DAYS) -> str | None:
    """When the certificate expires, if within `days` of `now` (verdict's note): for the preview,
    `fab status` and the rollout. None when it expires later, when it has a problem, and when ACM or
    IAM cannot be asked or read (that says why): a note never stops a run."""
    try:
        return verdict(settings, arn, now, days)[1]
    except AwsError:
        return None


def live_verdicts(settings: Settings, now: datetime.datetime | None = None) -> tuple[list[str], list[str]]:
    """`fab status`: (problems, notes) of the certificate the live 443 listener has, what every TLS
    client gets now (loadBalancer.certificateArn while no listener has one): a problem when it cannot
    serve, a note when it expires within EXPIRY_NOTE_DAYS or when ACM or IAM cannot be asked."""
    arn = listener_certificate(settings) or settings.load_balancer.certificate_arn
    try:
        problem, note = verdict(settings, arn, now)
    except NotChecked as exc:
        return [], ([] if exc.lab else [str(exc)])
    return ([problem] if problem else []), ([note] if note else [])


def _described(settings: Settings, arn: str) -> certificate.Described | str:
    """The certificate as ACM or IAM describes it, or why it cannot be one (another region's, gone)."""
    service, region = arn.split(":")[2], arn.split(":")[3]
    if service == "acm" and region != settings.aws.region:
        return (f"certificate {arn} is in region {region}, the load balancer in {settings.aws.region}: a load balancer "
                "takes only a certificate of its own region; import or request it there")
    api = _api(settings, service)
    try:
        if service == "acm":
            return _acm(arn, api.describe_certificate(CertificateArn=arn)["Certificate"])
        name = arn.rsplit("/", 1)[-1]
        found = api.get_server_certificate(ServerCertificateName=name)["ServerCertificate"]
    except ClientError as exc:
        code = error_code(exc)
        if code in _MISSING:
            return f"certificate {arn} does not exist ({code})"
        if code in _DENIED:
            raise NotChecked(f"certificate {arn} not checked: {exc}") from None
        raise aws_error(f"{service} reading certificate {arn}", exc) from None
    except BotoCoreError as exc:
        raise aws_error(f"{service} reading certificate {arn}", exc) from None
    meta = found["ServerCertificateMetadata"]
    if meta.get("Arn") != arn:
        return f"certificate {arn} does not exist (IAM's server certificate {name} is {meta.get('Arn')})"
    return _iam(arn, found.get("CertificateBody", ""), meta)


def _used(settings: Settings) -> dict[str, str]:
    """The names clients connect to: serverName (where port 80 redirects), and dns.name when set."""
    used = {"serverName": settings.server_name}
    if settings.dns and settings.dns.name.lower() != settings.server_name.lower():
        used["dns.name"] = settings.dns.name
    return used


def _acm(arn: str, found: dict) -> certificate.Described:
    renewal = (found.get("RenewalSummary") or {}).get("RenewalStatus") or found.get("RenewalEligibility")
    names = tuple(dict.fromkeys([*filter(None, [found.get("DomainName")]), *found.get("SubjectAlternativeNames", [])]))
    return certificate.Described(arn, "acm", found.get("Status", "?"), found.get("KeyAlgorithm"),
                                 found.get("NotBefore"), found.get("NotAfter"), found.get("Type"), renewal, names)


def _iam(arn: str, body: str, meta: dict) -> certificate.Described:
    """IAM keeps no status, key algorithm or names: they, and both dates, come from the certificate itself
    (what a TLS client judges), its metadata's Expiration only when the body does not parse."""
    try:
        algorithm, not_before, not_after, names = certificate.pem_fields(body)
    except ValueError:
        return certificate.Described(arn, "iam", "ISSUED", None, None, meta.get("Expiration"))
    return certificate.Described(arn, "iam", "ISSUED", algorithm, not_before, not_after, names=names)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _api(settings: Settings, service: str):
    """ACM or IAM, never a real one where every endpoint set is on this machine (the lab, the tests)."""
    endpoints = settings.aws.endpoints
    if service not in endpoints and any(loopback(url) for url in endpoints.values()):
        raise NotChecked(f"certificate not checked: no {service} endpoint beside the loopback ones", lab=True)
    return client(settings, service)


def listener_certificate(settings: Settings) -> str | None:
    """The certificate the live load balancer's 443 listener has: a Classic ELB's SSLCertificateId, a
    network load balancer's TLS listener's default certificate (None: no such load balancer or listener)."""
    if settings.load_balancer.type == "network":
        from awsapi import network

        found = network.describe_network(settings)
        if found is None:
            return None
        for x in pages(f"elbv2 describe-listeners {settings.load_balancer.name}", client(settings, "elbv2"),
                       "describe_listeners", "Listeners", LoadBalancerArn=found["LoadBalancerArn"]):
            if int(x["Port"]) == 443:
                return next((c["CertificateArn"] for c in x.get("Certificates", []) if c.get("IsDefault", True)), None)
        return None
    for x in (classic.describe(settings) or {}).get("ListenerDescriptions", []):
        if x["Listener"]["LoadBalancerPort"] == 443:
            return x["Listener"].get("SSLCertificateId")
    return None
