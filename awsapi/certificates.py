"""The 443 listener's certificate as ACM or IAM describes it now, and the one the live listener has.

A Classic ELB takes a certificate only by deleting and recreating its 443 listener; an ARN AWS then
refuses (not issued, another region's, gone) leaves no 443 listener at all. So it is checked first.
"""

from __future__ import annotations

from botocore.exceptions import BotoCoreError, ClientError

from awsapi import classic
from awsapi.clients import AwsError, client, error_code, loopback
from core.settings import Settings

_MISSING = {"ResourceNotFoundException", "NoSuchEntity", "ValidationException", "InvalidArnException"}
_DENIED = {"AccessDenied", "AccessDeniedException", "UnauthorizedOperation"}


class NotChecked(AwsError):
    """The certificate could not be read (no permission; `lab`: no endpoint of that API here): not a verdict."""

    def __init__(self, message: str, lab: bool = False):
        super().__init__(message)
        self.lab = lab


def certificate_problem(settings: Settings) -> str | None:
    """Why loadBalancer.certificateArn cannot serve the 443 listener (None: ACM says it is ISSUED, in
    this region; IAM that the server certificate exists). NotChecked when ACM or IAM cannot be asked."""
    arn = settings.load_balancer.certificate_arn
    service, region = arn.split(":")[2], arn.split(":")[3]
    if service == "acm" and region != settings.aws.region:
        return (f"certificate {arn} is in region {region}, the load balancer in {settings.aws.region}: a load balancer "
                "takes only a certificate of its own region; import or request it there")
    api = _api(settings, service)
    try:
        if service == "acm":
            found = api.describe_certificate(CertificateArn=arn)["Certificate"]
            status = found.get("Status", "?")  # EXPIRED, REVOKED, PENDING_VALIDATION, ...
        else:
            name = arn.rsplit("/", 1)[-1]
            meta = api.get_server_certificate(ServerCertificateName=name)["ServerCertificate"][
                "ServerCertificateMetadata"]
            if meta.get("Arn") != arn:
                return f"certificate {arn} does not exist (IAM's server certificate {name} is {meta.get('Arn')})"
            status = "ISSUED"  # IAM keeps no status: it exists
    except ClientError as exc:
        code = error_code(exc)
        if code in _MISSING:
            return f"certificate {arn} does not exist ({code})"
        if code in _DENIED:
            raise NotChecked(f"certificate {arn} not checked: {exc}") from None
        raise AwsError(f"{service} reading certificate {arn}: {exc}") from None
    except BotoCoreError as exc:
        raise AwsError(f"{service} reading certificate {arn}: {exc}") from None
    if status != "ISSUED":
        return f"certificate {arn} is {status}, not ISSUED: AWS refuses it for a listener"
    return None


def _api(settings: Settings, service: str):
    """ACM or IAM, never a real one where every endpoint set is on this machine (the lab, the tests)."""
    endpoints = settings.aws.endpoints
    if service not in endpoints and any(loopback(url) for url in endpoints.values()):
        raise NotChecked(f"certificate not checked: no {service} endpoint beside the loopback ones", lab=True)
    return client(settings, service)


def listener_certificate(settings: Settings) -> str | None:
    """The certificate the live Classic ELB's 443 listener has (None: no such load balancer or listener)."""
    for x in (classic.describe(settings) or {}).get("ListenerDescriptions", []):
        if x["Listener"]["LoadBalancerPort"] == 443:
            return x["Listener"].get("SSLCertificateId")
    return None
