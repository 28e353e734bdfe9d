"""Whether the 443 listener's certificate, as ACM or IAM describes it, can serve a load balancer kind
now, and how soon it stops: judged from the described fields and a clock (no AWS here).

A certificate past its NotAfter is refused by every TLS client, whatever its status says (ACM lists
one ISSUED until it marks it EXPIRED, and IAM keeps no status at all). A key the kind cannot take
is worse on a network load balancer: AWS accepts the listener, then leaves it unable to serve
(AWS's notice quoted in github.com/mattclay/aws-terminator/issues/309); one for other names than
the service's is refused by every client that checks the name. What each kind takes
(docs/aws.md#key-algorithms, with the sources):

- network load balancer, from ACM or IAM: RSA 1024, 2048 and 3072 bits, ECDSA P-256, P-384 and
  P-521 ("Supported key algorithms", Network Load Balancers guide, Server certificates:
  docs.aws.amazon.com/elasticloadbalancing/latest/network/tls-listener-certificates.html);
- Classic ELB, from ACM: RSA 1024 and 2048 bits only (its guide: "a certificate provided by ACM
  contains an RSA public key", elb-ssl-security-policy.html; ACM's RSA 4096 and EC certificates
  could be installed on a Classic or application load balancer only through IAM:
  github.com/awsdocs/aws-certificate-user-guide/issues/1; RSA 3072 is named nowhere for it);
- Classic ELB, from IAM: RSA up to 4096 bits and EC keys (its security policies carry ECDHE-ECDSA
  ciphers).
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

# Below this many days left, the preview, `fab status` and the rollout say when the certificate
# expires. 30: ACME clients (certbot) renew 30 days before expiry, and ACM starts renewing an
# Amazon-issued certificate 60 days before: one still not renewed at 30 days needs a person.
EXPIRY_NOTE_DAYS = 30

_RSA_UP_TO_3072 = frozenset({"RSA_1024", "RSA_2048", "RSA_3072"})
_EC = frozenset({"EC_prime256v1", "EC_secp384r1", "EC_secp521r1"})
ACCEPTS: dict[tuple[str, str], frozenset[str]] = {
    ("network", "acm"): _RSA_UP_TO_3072 | _EC,
    ("network", "iam"): _RSA_UP_TO_3072 | _EC,
    ("classic", "acm"): frozenset({"RSA_1024", "RSA_2048"}),
    ("classic", "iam"): _RSA_UP_TO_3072 | {"RSA_4096"} | _EC,
}
_KIND = {"classic": "a Classic ELB", "network": "a network load balancer"}
_SOURCE = {"acm": "ACM", "iam": "IAM"}
_CURVES = {"secp256r1": "EC_prime256v1", "secp384r1": "EC_secp384r1", "secp521r1": "EC_secp521r1"}


@dataclass(frozen=True)
class Described:
    """A certificate as ACM's DescribeCertificate or IAM's GetServerCertificate has it."""

    arn: str
    source: str  # "acm" or "iam"
    status: str  # ACM's Status (ISSUED, EXPIRED, PENDING_VALIDATION, ...); IAM keeps none: ISSUED
    key_algorithm: str | None  # ACM's names (RSA_2048, EC_prime256v1, ...); None: not known
    not_before: datetime.datetime | None = None
    not_after: datetime.datetime | None = None
    type: str | None = None  # ACM: AMAZON_ISSUED, IMPORTED or PRIVATE; IAM: None
    renewal: str | None = None  # ACM: RenewalSummary's RenewalStatus, else RenewalEligibility
    names: tuple[str, ...] = ()  # the DNS names it is for (subject alternative names); (): not known


def problem(cert: Described, kind: str, now: datetime.datetime, used: dict[str, str] | None = None) -> str | None:
    """Why `cert` cannot serve the 443 listener of a load balancer of `kind` at `now` (None: it can).
    `used`: the names clients connect to, by the setting that names them (serverName, dns.name)."""
    if cert.status != "ISSUED":
        return f"certificate {cert.arn} is {cert.status}, not ISSUED: AWS refuses it for a listener"
    if cert.not_after is not None and cert.not_after <= now:
        return (f"certificate {cert.arn} expired on {_day(cert.not_after)} ({_days(now - cert.not_after)} ago): every "
                f"TLS client refuses it; {_renew(cert)} (docs/aws.md#expiry)")
    if cert.not_before is not None and cert.not_before > now:
        return (f"certificate {cert.arn} is not valid before {_day(cert.not_before)}: every TLS client refuses it "
                "until then; use a certificate valid now (docs/aws.md#expiry)")
    takes = ACCEPTS[(kind, cert.source)]
    if cert.key_algorithm is not None and cert.key_algorithm not in takes:
        return (f"certificate {cert.arn} has a {cert.key_algorithm} key: {_KIND[kind]} takes from "
                f"{_SOURCE[cert.source]} only {', '.join(sorted(takes))}; {_other_key(kind, cert.source)} "
                "(docs/aws.md#key-algorithms)")
    for setting, name in (used or {}).items():
        if cert.names and not covers(cert.names, name):
            return (f"certificate {cert.arn} is for {', '.join(cert.names)}, not {setting} {name}: every TLS client "
                    f"connecting to {name} refuses it; use a certificate for {name} or a wildcard over it "
                    "(docs/aws.md#names)")
    return None


def covers(names: tuple[str, ...], host: str) -> bool:
    """Whether a certificate for `names` serves `host` as TLS clients match it (RFC 6125): the same
    name, or a wildcard `*.` over exactly its first label."""
    host = host.lower().rstrip(".")
    for name in (n.lower().rstrip(".") for n in names):
        if name == host or (name.startswith("*.") and host.partition(".")[2] == name[2:] and "." in host):
            return True
    return False


def note(cert: Described, now: datetime.datetime, days: int = EXPIRY_NOTE_DAYS) -> str | None:
    """When `cert` expires, if fewer than `days` days from `now` (None: later, or not known)."""
    if cert.not_after is None or cert.not_after - now >= datetime.timedelta(days=days):
        return None
    return (f"certificate {cert.arn} expires in {_days(cert.not_after - now)} (on {_day(cert.not_after)}), then every "
            f"TLS client refuses the 443 listener; {_renew(cert)} (docs/aws.md#expiry)")


def pem_fields(pem: str) -> tuple[str | None, datetime.datetime, datetime.datetime, tuple[str, ...]]:
    """(key algorithm in ACM's names, NotBefore, NotAfter, DNS names) of a PEM certificate (IAM keeps
    neither algorithm nor names). The names are its subject alternative names, else its common
    name. ValueError: not a certificate."""
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.x509.oid import NameOID

    cert = x509.load_pem_x509_certificate(pem.encode())
    try:
        names = tuple(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
                      .get_values_for_type(x509.DNSName))
    except x509.ExtensionNotFound:
        names = tuple(str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME))
    key = cert.public_key()
    if isinstance(key, rsa.RSAPublicKey):
        algorithm: str | None = f"RSA_{key.key_size}"
    elif isinstance(key, ec.EllipticCurvePublicKey):
        algorithm = _CURVES.get(key.curve.name, f"EC_{key.curve.name}")
    else:
        algorithm = type(key).__name__.removesuffix("PublicKey").removeprefix("_")  # Ed25519, DSA, ...
    return algorithm, cert.not_valid_before_utc, cert.not_valid_after_utc, names


def _renew(cert: Described) -> str:
    """What renews `cert`, by who issued it."""
    if cert.source == "iam":
        return ("IAM never renews a server certificate: upload a renewed one (or import it to ACM) and point "
                "loadBalancer.certificateArn at it")
    if cert.type == "IMPORTED":
        return ("ACM never renews an imported certificate: reimport the renewed one into this ARN "
                "(ImportCertificate with CertificateArn), which keeps the listener as it is")
    if cert.type == "AMAZON_ISSUED":
        return (f"ACM renews an Amazon-issued certificate from 60 days before expiry and has not (renewal: "
                f"{cert.renewal or 'unknown'}): check its validation records, or request a new one")
    return f"renew it in ACM (renewal: {cert.renewal or 'unknown'}) or point loadBalancer.certificateArn at another"


def _other_key(kind: str, source: str) -> str:
    if kind == "classic" and source == "acm":
        return "upload it to IAM instead (a Classic ELB takes RSA up to 4096 bits and EC keys from IAM), or use an " \
               "RSA 2048 certificate"
    return "reissue or import it with a key the load balancer takes"


def _day(when: datetime.datetime) -> str:
    return when.astimezone(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _days(span: datetime.timedelta) -> str:
    if span < datetime.timedelta(days=1):
        return "less than a day"
    return f"{span.days} day{'s' if span.days != 1 else ''}"
