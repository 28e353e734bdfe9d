"""botocore clients for one environment, and the one error every AWS call raises.

Clients are built from the environment's `aws:region` and `aws:endpoints` (the lab points
them at its loopback endpoint); credentials come from the usual chain.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from functools import cache
from typing import Any
from urllib.parse import urlparse

import botocore.session
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from core.errors import KitError
from core.settings import Settings

_CONFIG = Config(connect_timeout=5, read_timeout=20, retries={"max_attempts": 3, "mode": "standard"})
SERVICES = ("elb", "elbv2", "ssm", "ec2")  # every AWS API the kit calls


class AwsError(KitError):
    """An AWS API call failed: names the call and the cause."""


@cache
def _client(service: str, region: str, endpoint: str | None):
    keys = {}
    if endpoint and loopback(endpoint):  # the lab's endpoint: never hand it real credentials
        keys = {"aws_access_key_id": "lab", "aws_secret_access_key": "lab"}
    # botocore itself: boto3 would add nothing here but its import time.
    return botocore.session.get_session().create_client(service, region_name=region, endpoint_url=endpoint,
                                                         config=_CONFIG, **keys)


def loopback(url: str) -> bool:
    """The URL's host is on this machine."""
    host = urlparse(url).hostname or ""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def is_lab(settings: Settings) -> bool:
    """Every AWS endpoint the kit uses is on loopback: the lab, never a real account. The load
    balancer's API must be set (elb for classic, elbv2 for network); any other of ours that is set
    must be on loopback too."""
    endpoints = settings.aws.endpoints
    needed = ("elbv2" if settings.load_balancer.type == "network" else "elb", "ssm", "ec2")
    return (all(s in endpoints for s in needed)
            and all(loopback(url) for s, url in endpoints.items() if s in SERVICES))


def client(settings: Settings, service: str):
    """The environment's client for `service` (one per region and endpoint, shared)."""
    return _client(service, settings.aws.region, settings.aws.endpoints.get(service))


def call(what: str, fn: Callable[..., Any], **kwargs: Any) -> Any:
    """`fn(**kwargs)`, its failure an AwsError naming `what`."""
    try:
        return fn(**kwargs)
    except (ClientError, BotoCoreError) as exc:
        raise AwsError(f"{what}: {exc}") from None


def pages(what: str, api, operation: str, key: str, **kwargs: Any) -> list[dict]:
    """Every item under `key` over all the pages of `operation`."""
    try:
        return [item for page in api.get_paginator(operation).paginate(**kwargs) for item in page[key]]
    except (ClientError, BotoCoreError) as exc:
        raise AwsError(f"{what}: {exc}") from None


def error_code(exc: ClientError) -> str:
    return exc.response.get("Error", {}).get("Code", "")


def by_name(settings: Settings, service: str, names: str, key: str) -> dict | None:
    """The load balancer named `loadBalancer.name` as `service` (elb, elbv2) describes it, or None."""
    name = settings.load_balancer.name
    api = client(settings, service)
    try:
        found = api.describe_load_balancers(**{names: [name]})[key]
    except ClientError as exc:
        if error_code(exc) in ("LoadBalancerNotFound", "AccessPointNotFound"):
            return None
        raise AwsError(f"{service} describe-load-balancers {name}: {exc}") from None
    except BotoCoreError as exc:
        raise AwsError(f"{service} describe-load-balancers {name}: {exc}") from None
    return found[0] if found else None
