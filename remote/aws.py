"""The AWS edge of the host half (botocore): the readiness record, registered instances, policies.

Clients are built from the environment's `aws:region` and `aws:endpoints` (the lab points
them at its loopback endpoint); credentials come from the usual boto3 chain.
"""

from __future__ import annotations

import ipaddress
from functools import cache
from urllib.parse import urlparse

import botocore.session
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from core.errors import KitError
from core.record import ReadinessRecord
from core.settings import Settings

_CONFIG = Config(connect_timeout=5, read_timeout=20, retries={"max_attempts": 3, "mode": "standard"})


class AwsError(KitError):
    """An AWS API call failed: names the call and the cause."""


@cache
def _client(service: str, region: str, endpoint: str | None):
    keys = {}
    if endpoint and _loopback(endpoint):  # the lab's endpoint: never hand it real credentials
        keys = {"aws_access_key_id": "lab", "aws_secret_access_key": "lab"}
    # botocore itself: boto3 would add nothing here but its import time.
    return botocore.session.get_session().create_client(service, region_name=region, endpoint_url=endpoint,
                                                         config=_CONFIG, **keys)


def _loopback(url: str) -> bool:
    host = urlparse(url).hostname or ""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def is_lab(settings: Settings) -> bool:
    """Every AWS endpoint the kit uses is on loopback: the lab, never a real account."""
    endpoints = settings.aws.endpoints
    return all(s in endpoints and _loopback(endpoints[s]) for s in ("elb", "ssm", "ec2"))


def client(settings: Settings, service: str):
    return _client(service, settings.aws.region, settings.aws.endpoints.get(service))


def _call(what: str, fn, **kwargs):
    try:
        return fn(**kwargs)
    except (ClientError, BotoCoreError) as exc:
        raise AwsError(f"{what}: {exc}") from None


def write_record(settings: Settings, record: ReadinessRecord) -> None:
    """Store the readiness record where `pulumi up` reads it (Parameter Store)."""
    put_record_text(settings, record.to_json())


def put_record_text(settings: Settings, text: str) -> None:
    ssm = client(settings, "ssm")
    _call(f"ssm put-parameter {settings.parameter_path}", ssm.put_parameter,
          Name=settings.parameter_path, Value=text, Type="String", Overwrite=True,
          Tier="Standard" if len(text) <= 4096 else "Advanced",
          Description=f"wsgate {settings.env}: hosts proven ready for the PROXY protocol (written by fab rollout)")


def read_record_text(settings: Settings) -> str | None:
    """The stored record as it is (None: there is none)."""
    ssm = client(settings, "ssm")
    try:
        return ssm.get_parameter(Name=settings.parameter_path)["Parameter"]["Value"]
    except ssm.exceptions.ParameterNotFound:
        return None
    except (ClientError, BotoCoreError) as exc:
        raise AwsError(f"ssm get-parameter {settings.parameter_path}: {exc}") from None


def read_record(settings: Settings) -> ReadinessRecord | None:
    text = read_record_text(settings)
    return None if text is None else ReadinessRecord.from_json(text)


def delete_record(settings: Settings) -> None:
    ssm = client(settings, "ssm")
    try:
        ssm.delete_parameter(Name=settings.parameter_path)
    except ssm.exceptions.ParameterNotFound:
        pass
    except (ClientError, BotoCoreError) as exc:
        raise AwsError(f"ssm delete-parameter {settings.parameter_path}: {exc}") from None


def registered_instances(settings: Settings) -> dict[str, str]:
    """The load balancer's instances: those registered, and those configured that wait to join
    (they must be rolled out to be proven): instance ID -> private IP address."""
    d = describe(settings)
    registered = [i["InstanceId"] for i in d.get("Instances", [])] if d else []
    ids = sorted(set(registered) | set(settings.load_balancer.instances))
    if not ids:
        return {}
    ec2 = client(settings, "ec2")
    reservations = _call("ec2 describe-instances", ec2.describe_instances, InstanceIds=ids)["Reservations"]
    return {i["InstanceId"]: i.get("PrivateIpAddress", "") for r in reservations for i in r["Instances"]}


def _not_found(exc: ClientError) -> bool:
    return exc.response.get("Error", {}).get("Code") in ("LoadBalancerNotFound", "AccessPointNotFound")


def describe(settings: Settings) -> dict | None:
    """The load balancer's description, or None when it does not exist (yet)."""
    name = settings.load_balancer.name
    elb = client(settings, "elb")
    try:
        found = elb.describe_load_balancers(LoadBalancerNames=[name])["LoadBalancerDescriptions"]
    except ClientError as exc:
        if _not_found(exc):
            return None
        raise AwsError(f"elb describe-load-balancers {name}: {exc}") from None
    except BotoCoreError as exc:
        raise AwsError(f"elb describe-load-balancers {name}: {exc}") from None
    return found[0] if found else None


def backend_policies(settings: Settings) -> dict[int, list[str]]:
    """Instance port -> policy names attached to it on the load balancer."""
    d = describe(settings) or {}
    return {int(b["InstancePort"]): list(b.get("PolicyNames", [])) for b in d.get("BackendServerDescriptions", [])}


def proxy_protocol_ports(settings: Settings) -> list[int]:
    """Backend ports whose policies include a ProxyProtocol policy with ProxyProtocol=true."""
    name = settings.load_balancer.name
    attached = backend_policies(settings)
    if not attached:
        return []
    elb = client(settings, "elb")
    policies = _call(f"elb describe-load-balancer-policies {name}", elb.describe_load_balancer_policies,
                     LoadBalancerName=name)["PolicyDescriptions"]
    proxy = {p["PolicyName"] for p in policies if p.get("PolicyTypeName") == "ProxyProtocolPolicyType"
             and any(a["AttributeName"] == "ProxyProtocol" and a["AttributeValue"].lower() == "true"
                     for a in p.get("PolicyAttributeDescriptions", []))}
    return sorted(port for port, names in attached.items() if proxy & set(names))


def instance_health(settings: Settings) -> dict[str, str]:
    """Instance ID -> InService / OutOfService (with the reason) as the load balancer sees it."""
    if describe(settings) is None:
        return {}
    elb = client(settings, "elb")
    states = _call("elb describe-instance-health", elb.describe_instance_health,
                   LoadBalancerName=settings.load_balancer.name)["InstanceStates"]
    return {s["InstanceId"]: s["State"] + (f" ({s['Description']})" if s.get("Description") not in (None, "N/A")
                                           else "") for s in states}
