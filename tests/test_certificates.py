"""The 443 listener's certificate is checked before anything is declared (a Classic ELB given an ARN
AWS refuses is left without its 443 listener; one AWS takes but cannot serve, expired or with a key
the kind cannot use, leaves a listener every TLS client fails on), one that expires soon is noted,
and a rotation is announced in the preview: the judgement alone (core.certificate), then the
program under Pulumi's mock runtime, ACM, IAM and the ELB in moto."""

from __future__ import annotations

import datetime
import functools

import boto3
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from awsapi import certificates
from core import certificate
from core.errors import KitError
from tests.conftest import settings_from, stack_config
from tests.test_program import LB, run
from tests.test_program_network import network_lb

SERVICES = ("ec2", "elb", "ssm", "sts", "acm", "iam")


def self_signed(name: str = "ws.staging.example.com", key=None, days: float = 30,
                since: float = 1) -> tuple[bytes, bytes]:
    """A self-signed certificate valid from `since` days ago for `days` days from now (EC P-256 by default)."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=since))
            .not_valid_after(now + datetime.timedelta(days=days)).sign(key, hashes.SHA256()))
    return (cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))


@functools.cache
def rsa_key(bits: int = 2048):
    """One RSA key per size for the module (an RSA 4096 key takes a second or more to make)."""
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def imported(aws_url: str, region: str = "eu-west-1", key=None, days: float = 90, name: str = "ws.staging.example.com",
             ) -> str:
    """An ISSUED ACM certificate (imported) in `region`: RSA 2048 unless `key` says otherwise (what ACM
    issues by default, and all a Classic ELB takes from ACM)."""
    cert, key_pem = self_signed(name, key=key or rsa_key(), days=days)
    acm = boto3.client("acm", region_name=region, endpoint_url=aws_url)
    return acm.import_certificate(Certificate=cert, PrivateKey=key_pem)["CertificateArn"]


def uploaded(aws_url: str, name: str, key=None, days: float = 90, since: float = 1,
             host: str = "ws.staging.example.com") -> str:
    """An IAM server certificate."""
    cert, key_pem = self_signed(host, key=key, days=days, since=since)
    iam = boto3.client("iam", region_name="us-east-1", endpoint_url=aws_url)
    return iam.upload_server_certificate(ServerCertificateName=name, CertificateBody=cert.decode(),
                                         PrivateKey=key_pem.decode())["ServerCertificateMetadata"]["Arn"]


def program(aws_url: str, arn: str):
    lb = {**stack_config("staging")["wsgate:loadBalancer"], "certificateArn": arn}
    return run("staging", aws_url, **{"aws:endpoints": [{s: aws_url for s in SERVICES}], "wsgate:loadBalancer": lb})


def test_a_missing_or_unissued_certificate_stops_the_program_before_anything_is_declared(aws):
    gone = "arn:aws:acm:eu-west-1:123456789012:certificate/0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"
    with pytest.raises(KitError, match=rf"certificate {gone} does not exist .*nothing was declared"):
        program(aws.url, gone)
    acm = boto3.client("acm", region_name="eu-west-1", endpoint_url=aws.url)
    pending = acm.request_certificate(DomainName="ws.staging.example", ValidationMethod="DNS")["CertificateArn"]
    with pytest.raises(KitError, match=rf"certificate {pending} is PENDING_VALIDATION, not ISSUED"):
        program(aws.url, pending)
    iam = "arn:aws:iam::123456789012:server-certificate/nobody"
    with pytest.raises(KitError, match=rf"certificate {iam} does not exist"):
        program(aws.url, iam)


def test_a_certificate_of_another_region_stops_the_program(aws):
    elsewhere = imported(aws.url, "us-east-1")
    with pytest.raises(KitError) as caught:
        program(aws.url, elsewhere)
    assert (f"certificate {elsewhere} is in region us-east-1, the load balancer in eu-west-1: a load balancer takes "
            "only a certificate of its own region") in str(caught.value)


def test_an_iam_server_certificate_is_checked_through_iam(aws):
    arn = uploaded(aws.url, "wsgate-staging")
    mocks, _, warnings = program(aws.url, arn)
    assert len(mocks.of(LB)) == 1 and not any("certificate" in w for w in warnings)


def test_a_rotation_on_a_classic_elb_is_announced_with_what_it_costs(aws):
    old, new = imported(aws.url), imported(aws.url)
    s = settings_from("staging")
    elb = boto3.client("elb", region_name="eu-west-1", endpoint_url=aws.url)
    elb.create_load_balancer(LoadBalancerName=s.load_balancer.name, AvailabilityZones=["eu-west-1a"], Listeners=[
        {"Protocol": "TCP", "LoadBalancerPort": 80, "InstanceProtocol": "TCP", "InstancePort": s.ports.http},
        {"Protocol": "SSL", "LoadBalancerPort": 443, "InstanceProtocol": "TCP", "InstancePort": s.ports.tls,
         "SSLCertificateId": old}])
    mocks, _, warnings = program(aws.url, old)  # issued, of the region, the live one: nothing to say
    (lb,) = mocks.of(LB)
    assert [x["sslCertificateId"] for x in lb.inputs["listeners"] if x["lbPort"] == 443] == [old]
    assert not any("certificate" in w for w in warnings), warnings
    _, _, warnings = program(aws.url, new)
    assert [w for w in warnings if w.startswith(f"the 443 listener's certificate changes from {old} to {new}: a "
                                                "Classic ELB deletes and recreates the listener, so new connections "
                                                "on 443 are refused in between and every open WebSocket through it "
                                                "is cut")], warnings


# What the certificate itself says: its dates and its key, judged without AWS (core.certificate).

NOW = datetime.datetime(2026, 6, 1, 12, 0, tzinfo=datetime.timezone.utc)
ACM_ARN = "arn:aws:acm:eu-west-1:123456789012:certificate/0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"
IAM_ARN = "arn:aws:iam::123456789012:server-certificate/wsgate-staging"


def described(source: str = "acm", key: str = "RSA_2048", left: float = 90, **fields) -> certificate.Described:
    return certificate.Described(ACM_ARN if source == "acm" else IAM_ARN, source, fields.pop("status", "ISSUED"), key,
                                 NOW - datetime.timedelta(days=300), NOW + datetime.timedelta(days=left), **fields)


def test_a_certificate_past_its_not_after_is_refused_even_while_acm_still_says_issued():
    gone = described(left=-2, type="IMPORTED")
    assert certificate.problem(gone, "classic", NOW) == (
        f"certificate {ACM_ARN} expired on 2026-05-30 12:00 UTC (2 days ago): every TLS client refuses it; ACM never "
        "renews an imported certificate: reimport the renewed one into this ARN (ImportCertificate with "
        "CertificateArn), which keeps the listener as it is (docs/aws.md#expiry)")
    assert "IAM never renews a server certificate" in certificate.problem(described("iam", left=-0.5), "network", NOW)
    early = certificate.Described(ACM_ARN, "acm", "ISSUED", "RSA_2048", NOW + datetime.timedelta(days=3),
                                  NOW + datetime.timedelta(days=90))
    assert certificate.problem(early, "network", NOW).startswith(
        f"certificate {ACM_ARN} is not valid before 2026-06-04 12:00 UTC: every TLS client refuses it until then")
    assert certificate.problem(described(left=0.01), "classic", NOW) is None  # valid for a few minutes more


@pytest.mark.parametrize("kind, source, key, refused", [
    ("network", "acm", "RSA_4096", True), ("network", "iam", "RSA_4096", True),
    ("network", "acm", "RSA_3072", False), ("network", "iam", "EC_secp521r1", False),
    ("network", "acm", "EC_prime256v1", False),
    ("classic", "acm", "EC_prime256v1", True), ("classic", "acm", "RSA_4096", True),
    ("classic", "acm", "RSA_3072", True), ("classic", "acm", "RSA_2048", False),
    ("classic", "iam", "RSA_4096", False), ("classic", "iam", "EC_prime256v1", False),
    ("classic", "iam", "Ed25519", True), ("network", "iam", "Ed25519", True),
])
def test_a_key_the_kind_cannot_take_is_refused_naming_what_it_takes(kind, source, key, refused):
    found = certificate.problem(described(source, key), kind, NOW)
    assert (found is not None) == refused, found
    if refused:
        takes = ", ".join(sorted(certificate.ACCEPTS[(kind, source)]))
        assert found.startswith(f"certificate {described(source).arn} has a {key} key: ")
        assert f"takes from {source.upper()} only {takes}" in found and found.endswith("(docs/aws.md#key-algorithms)")


def test_the_classic_refusal_of_an_acm_ec_key_says_to_upload_it_to_iam():
    assert certificate.problem(described(key="EC_prime256v1"), "classic", NOW) == (
        f"certificate {ACM_ARN} has a EC_prime256v1 key: a Classic ELB takes from ACM only RSA_1024, RSA_2048; upload "
        "it to IAM instead (a Classic ELB takes RSA up to 4096 bits and EC keys from IAM), or use an RSA 2048 "
        "certificate (docs/aws.md#key-algorithms)")


def test_a_certificate_expiring_within_30_days_is_noted_with_what_renews_it():
    assert certificate.EXPIRY_NOTE_DAYS == 30
    assert certificate.note(described(left=30), NOW) is None
    assert certificate.note(described(left=29.5, type="AMAZON_ISSUED", renewal="PENDING_VALIDATION"), NOW) == (
        f"certificate {ACM_ARN} expires in 29 days (on 2026-07-01 00:00 UTC), then every TLS client refuses the 443 "
        "listener; ACM renews an Amazon-issued certificate from 60 days before expiry and has not (renewal: "
        "PENDING_VALIDATION): check its validation records, or request a new one (docs/aws.md#expiry)")
    assert "expires in less than a day" in certificate.note(described("iam", left=0.2), NOW)
    assert "expires in 1 day " in certificate.note(described(left=1.5, type="IMPORTED"), NOW)


def test_the_key_and_dates_of_a_pem_certificate_are_read_in_acm_names():
    for key, name in ((ec.generate_private_key(ec.SECP384R1()), "EC_secp384r1"), (rsa_key(3072), "RSA_3072")):
        pem, _ = self_signed(key=key, days=10, since=2)
        algorithm, not_before, not_after, names = certificate.pem_fields(pem.decode())
        now = datetime.datetime.now(datetime.timezone.utc)
        assert algorithm == name and names == ("ws.staging.example.com",)  # no SAN here: the common name
        assert abs((now - not_before) - datetime.timedelta(days=2)) < datetime.timedelta(minutes=5)
        assert abs((not_after - now) - datetime.timedelta(days=10)) < datetime.timedelta(minutes=5)
    with pytest.raises(ValueError):
        certificate.pem_fields("not a certificate")


# The same through ACM and IAM (moto), and the program.

def test_an_expired_iam_server_certificate_stops_the_program_before_anything_is_declared(aws):
    arn = uploaded(aws.url, "wsgate-staging-old", days=-3, since=400)  # IAM takes it: it keeps no status
    with pytest.raises(KitError, match=rf"certificate {arn} expired on .* \(3 days ago\): every TLS client refuses it; "
                                       r"IAM never renews .*nothing was declared"):
        program(aws.url, arn)


def test_the_preview_warns_of_a_certificate_that_expires_within_30_days_and_still_declares(aws):
    arn = uploaded(aws.url, "wsgate-staging-soon", days=12.5)
    mocks, _, warnings = program(aws.url, arn)
    assert any(w.startswith(f"certificate {arn} expires in 12 days (on ") and "IAM never renews" in w
               for w in warnings), warnings
    assert mocks.of("aws:elb/loadBalancer:LoadBalancer")  # a note, not a refusal
    _, _, warnings = program(aws.url, uploaded(aws.url, "wsgate-staging-later", days=90))
    assert not any("expires in" in w for w in warnings)


def test_an_acm_ec_key_stops_a_classic_program_and_the_same_key_from_iam_does_not(aws):
    key = ec.generate_private_key(ec.SECP256R1())
    arn = imported(aws.url, key=key)
    with pytest.raises(KitError, match=rf"certificate {arn} has a EC_prime256v1 key: a Classic ELB takes from ACM only "
                                       "RSA_1024, RSA_2048; upload it to IAM instead"):
        program(aws.url, arn)
    mocks, _, _ = program(aws.url, uploaded(aws.url, "wsgate-staging-ec", key=key))
    assert len(mocks.of(LB)) == 1


def network(aws_url: str):
    return settings_from("staging", **{"aws:endpoints": [{s: aws_url for s in (*SERVICES, "elbv2")}],
                                       "wsgate:loadBalancer": network_lb()})


def test_a_network_load_balancer_refuses_an_rsa_4096_key_from_acm_and_iam(aws):
    key = rsa_key(4096)
    s = network(aws.url)
    for arn in (imported(aws.url, key=key), uploaded(aws.url, "wsgate-staging-4096", key=key)):
        assert certificates.certificate_problem(s, arn) == (
            f"certificate {arn} has a RSA_4096 key: a network load balancer takes from {arn.split(':')[2].upper()} "
            "only EC_prime256v1, EC_secp384r1, EC_secp521r1, RSA_1024, RSA_2048, RSA_3072; reissue or import it with "
            "a key the load balancer takes (docs/aws.md#key-algorithms)")
    assert certificates.certificate_problem(s, imported(aws.url)) is None


def test_an_acm_certificate_still_issued_past_its_not_after_is_refused(aws):
    arn = imported(aws.url, days=2)  # ACM refuses to import an expired one: the clock moves instead
    s = network(aws.url)
    later = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=3)
    assert boto3.client("acm", region_name="eu-west-1", endpoint_url=aws.url).describe_certificate(
        CertificateArn=arn)["Certificate"]["Status"] == "ISSUED"
    assert certificates.certificate_problem(s, arn, now=later).startswith(
        f"certificate {arn} expired on ")
    assert certificates.certificate_problem(s, arn) is None


def test_a_certificate_that_expires_soon_is_noted_and_one_that_does_not_is_not(aws):
    s = network(aws.url)
    soon, later = imported(aws.url, days=10), imported(aws.url, days=60)
    assert certificates.certificate_note(s, soon).startswith(f"certificate {soon} expires in 9 days (on ")
    assert "reimport the renewed one into this ARN" in certificates.certificate_note(s, soon)
    assert certificates.certificate_note(s, later) is None
    iam = uploaded(aws.url, "wsgate-staging-soon", days=5.5)
    assert certificates.certificate_note(s, iam).startswith(f"certificate {iam} expires in 5 days (on ")
    gone = uploaded(aws.url, "wsgate-staging-gone", days=-1, since=90)
    assert certificates.certificate_note(s, gone) is None  # refused: certificate_problem says why
    assert certificates.certificate_problem(s, gone).startswith(f"certificate {gone} expired on ")


def test_the_live_tls_listener_certificate_of_a_network_load_balancer_is_read_and_judged(aws):
    s = network(aws.url)
    assert certificates.listener_certificate(s) is None  # no load balancer yet
    live = imported(aws.url, key=rsa_key(4096))  # the one an earlier run or the console left
    ec2 = boto3.client("ec2", region_name="eu-west-1", endpoint_url=aws.url)
    elbv2 = boto3.client("elbv2", region_name="eu-west-1", endpoint_url=aws.url)
    vpc = ec2.create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.0.1.0/24", AvailabilityZone="eu-west-1a")["Subnet"]["SubnetId"]
    lb = elbv2.create_load_balancer(Name=s.load_balancer.name, Subnets=[subnet], Type="network")["LoadBalancers"][0]
    group = elbv2.create_target_group(Name="tls", Protocol="TCP", Port=s.ports.tls, VpcId=vpc,
                                      TargetType="instance")["TargetGroups"][0]["TargetGroupArn"]
    elbv2.create_listener(LoadBalancerArn=lb["LoadBalancerArn"], Protocol="TLS", Port=443,
                          Certificates=[{"CertificateArn": live}], SslPolicy=s.load_balancer.ssl_policy,
                          DefaultActions=[{"Type": "forward", "TargetGroupArn": group}])
    assert certificates.listener_certificate(s) == live
    assert certificates.certificate_problem(s, live).startswith(f"certificate {live} has a RSA_4096 key: ")


def test_fab_status_judges_the_certificate_the_live_listener_has(aws):
    s = settings_from("staging", **{"aws:endpoints": [{s: aws.url for s in SERVICES}]})
    assert certificates.live_verdicts(s)[0] == [  # no listener yet: the configured one (gone)
        f"certificate {s.load_balancer.certificate_arn} does not exist (ResourceNotFoundException)"]
    gone = uploaded(aws.url, "wsgate-staging-live", days=-1, since=90)  # what clients get now
    elb = boto3.client("elb", region_name="eu-west-1", endpoint_url=aws.url)
    elb.create_load_balancer(LoadBalancerName=s.load_balancer.name, AvailabilityZones=["eu-west-1a"], Listeners=[
        {"Protocol": "SSL", "LoadBalancerPort": 443, "InstanceProtocol": "TCP", "InstancePort": s.ports.tls,
         "SSLCertificateId": gone}])
    problems, notes = certificates.live_verdicts(s)
    assert len(problems) == 1 and problems[0].startswith(f"certificate {gone} expired on 20") and notes == []
    soon = uploaded(aws.url, "wsgate-staging-soon", days=3.5)
    elb.set_load_balancer_listener_ssl_certificate(LoadBalancerName=s.load_balancer.name, LoadBalancerPort=443,
                                                   SSLCertificateId=soon)
    problems, notes = certificates.live_verdicts(s)
    assert problems == [] and len(notes) == 1 and notes[0].startswith(f"certificate {soon} expires in 3 days (on ")
    from remote.ssh import Ssh
    from remote.status import gather

    view = gather(s, [], {}, Ssh(s))  # `fab status` says it under the load balancer, and it is not a problem
    assert any(n.startswith(f"certificate {soon} expires in 3 days") for n in view["loadBalancer"]["notes"])
    assert not any("certificate" in p for p in view["loadBalancer"]["problems"])
    elb.set_load_balancer_listener_ssl_certificate(LoadBalancerName=s.load_balancer.name, LoadBalancerPort=443,
                                                   SSLCertificateId=gone)
    view = gather(s, [], {}, Ssh(s))
    assert any(p.startswith(f"certificate {gone} expired on 20") for p in view["loadBalancer"]["problems"])
    assert not view["ok"]


@pytest.mark.parametrize("names, host, covered", [
    (("ws.example.com",), "WS.example.com", True), (("*.example.com",), "ws.example.com", True),
    (("*.example.com",), "example.com", False), (("*.example.com",), "a.ws.example.com", False),
    (("example.com", "other.example.com"), "ws.example.com", False), (("ws.example.com.",), "ws.example.com", True),
])
def test_a_certificate_covers_a_name_as_tls_clients_match_it(names, host, covered):
    assert certificate.covers(names, host) == covered


def test_a_certificate_for_other_names_than_the_service_is_refused_naming_the_setting():
    other = described(names=("ws.example.org", "*.example.org"))
    assert certificate.problem(other, "network", NOW, {"serverName": "ws.example.com"}) == (
        f"certificate {ACM_ARN} is for ws.example.org, *.example.org, not serverName ws.example.com: every TLS client "
        "connecting to ws.example.com refuses it; use a certificate for ws.example.com or a wildcard over it "
        "(docs/aws.md#names)")
    both = {"serverName": "ws.example.org", "dns.name": "api.example.net"}
    assert "not dns.name api.example.net" in certificate.problem(other, "classic", NOW, both)
    assert certificate.problem(described(), "classic", NOW, both) is None  # names not known: not judged


def test_a_certificate_for_another_name_stops_the_program(aws):
    arn = uploaded(aws.url, "wsgate-elsewhere", host="ws.elsewhere.example.com")
    with pytest.raises(KitError, match=rf"certificate {arn} is for ws.elsewhere.example.com, not serverName "
                                       r"ws.staging.example.com: .*nothing was declared"):
        program(aws.url, arn)
    wildcard = imported(aws.url, name="*.staging.example.com")
    assert len(program(aws.url, wildcard)[0].of(LB)) == 1
