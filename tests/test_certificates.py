"""The 443 listener's certificate is checked before anything is declared (a Classic ELB given an ARN
AWS refuses is left without its 443 listener), and a rotation is announced in the preview: the
program under Pulumi's mock runtime, ACM, IAM and the ELB in moto."""

from __future__ import annotations

import datetime

import boto3
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from core.errors import KitError
from tests.conftest import settings_from, stack_config
from tests.test_program import LB, run

SERVICES = ("ec2", "elb", "ssm", "sts", "acm", "iam")


def self_signed(name: str = "ws.staging.example") -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30)).sign(key, hashes.SHA256()))
    return (cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))


def imported(aws_url: str, region: str = "eu-west-1") -> str:
    """An ISSUED ACM certificate (imported) in `region`."""
    cert, key = self_signed()
    acm = boto3.client("acm", region_name=region, endpoint_url=aws_url)
    return acm.import_certificate(Certificate=cert, PrivateKey=key)["CertificateArn"]


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
    cert, key = self_signed()
    iam = boto3.client("iam", region_name="us-east-1", endpoint_url=aws.url)
    arn = iam.upload_server_certificate(ServerCertificateName="wsgate-staging", CertificateBody=cert.decode(),
                                        PrivateKey=key.decode())["ServerCertificateMetadata"]["Arn"]
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
