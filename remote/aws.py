"""The AWS edge of the host half (boto3): the readiness record, registered instances, policies.

Clients are built from the environment's `aws:region` and `aws:endpoints` (the lab points
them at its loopback endpoint); credentials come from the usual boto3 chain.
"""

from __future__ import annotations

from functools import lru_cache

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from core.errors import KitError
from core.record import ReadinessRecord
from core.settings import Settings

_CONFIG = Config(connect_timeout=5, read_timeout=20, retries={"max_attempts": 3, "mode": "standard"})


class AwsError(KitError):
    """An AWS API call failed: names the call and the cause."""


@lru_cache(maxsize=None)
def _client(service: str, region: str, endpoint: str | None):
    return boto3.client(service, region_name=region, endpoint_url=endpoint, config=_CONFIG)


def client(settings: Settings, service: str):
    return _client(service, settings.aws.region, settings.aws.endpoints.get(service))


def _call(what: str, fn, **kwargs):
    try:
        return fn(**kwargs)
    except (ClientError, BotoCoreError) as exc:
        raise AwsError(f"{what}: {exc}") from None


def write_record(settings: Settings, record: ReadinessRecord) -> None:
    """Store the readiness record where `pulumi up` reads it (Parameter Store)."""
    text = record.to_json()
    ssm = client(settings, "ssm")
    _call(f"ssm put-parameter {settings.parameter_path}", ssm.put_parameter,
          Name=settings.parameter_path, Value=text, Type="String", Overwrite=True,
          Tier="Standard" if len(text) <= 4096 else "Advanced",
          Description=f"wsgate {settings.env}: hosts proven ready for the PROXY protocol (written by fab rollout)")


def read_record(settings: Settings) -> ReadinessRecord | None:
    ssm = client(settings, "ssm")
    try:
        text = ssm.get_parameter(Name=settings.parameter_path)["Parameter"]["Value"]
    except ssm.exceptions.ParameterNotFound:
        return None
    except (ClientError, BotoCoreError) as exc:
        raise AwsError(f"ssm get-parameter {settings.parameter_path}: {exc}") from None
    return ReadinessRecord.from_json(text)


def delete_record(settings: Settings) -> None:
    ssm = client(settings, "ssm")
    try:
        ssm.delete_parameter(Name=settings.parameter_path)
    except ssm.exceptions.ParameterNotFound:
        pass
    except (ClientError, BotoCoreError) as exc:
        raise AwsError(f"ssm delete-parameter {settings.parameter_path}: {exc}") from None


def registered_instances(settings: Settings) -> dict[str, str]:
    """Instances registered with the load balancer: instance ID -> private IP address."""
    name = settings.load_balancer.name
    elb = client(settings, "elb")
    found = _call(f"elb describe-load-balancers {name}", elb.describe_load_balancers, LoadBalancerNames=[name])
    ids = [i["InstanceId"] for d in found["LoadBalancerDescriptions"] for i in d.get("Instances", [])]
    if not ids:
        return {}
    ec2 = client(settings, "ec2")
    reservations = _call("ec2 describe-instances", ec2.describe_instances, InstanceIds=ids)["Reservations"]
    return {i["InstanceId"]: i.get("PrivateIpAddress", "") for r in reservations for i in r["Instances"]}


def backend_policies(settings: Settings) -> dict[int, list[str]]:
    """Instance port -> policy names attached to it on the load balancer."""
    name = settings.load_balancer.name
    elb = client(settings, "elb")
    found = _call(f"elb describe-load-balancers {name}", elb.describe_load_balancers, LoadBalancerNames=[name])
    out: dict[int, list[str]] = {}
    for d in found["LoadBalancerDescriptions"]:
        for b in d.get("BackendServerDescriptions", []):
            out[int(b["InstancePort"])] = list(b.get("PolicyNames", []))
    return out


def proxy_protocol_ports(settings: Settings) -> list[int]:
    """Backend ports whose policies include a ProxyProtocol policy with ProxyProtocol=true."""
    name = settings.load_balancer.name
    elb = client(settings, "elb")
    policies = _call(f"elb describe-load-balancer-policies {name}", elb.describe_load_balancer_policies,
                     LoadBalancerName=name)["PolicyDescriptions"]
    proxy = {p["PolicyName"] for p in policies if p.get("PolicyTypeName") == "ProxyProtocolPolicyType"
             and any(a["AttributeName"] == "ProxyProtocol" and a["AttributeValue"].lower() == "true"
                     for a in p.get("PolicyAttributeDescriptions", []))}
    return sorted(port for port, names in backend_policies(settings).items() if proxy & set(names))
