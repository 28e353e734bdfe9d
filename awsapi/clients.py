"""botocore clients for one environment, and the one error every AWS call raises.

Clients are built from the environment's `aws:region` and `aws:endpoints` (the lab points
them at its loopback endpoint); credentials come from the usual chain.
"""

from __future__ import annotations

import ipaddress
import threading
from collections.abc import Callable, Iterator, Sequence
from functools import cache
from typing import Any, TypeVar
from urllib.parse import urlparse

import botocore.session
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from botocore.exceptions import ConnectionError as EndpointUnreachable
from botocore.retries.standard import RetryEventAdapter, ThrottlingErrorDetector

from core.errors import KitError
from core.settings import Settings

# Adaptive: botocore's exponential backoff with jitter, and a client-side rate that slows down
# once AWS throttles (a fleet's worth of describes shares the account's API rate with everyone
# else). 8 attempts in all (the first and 7 retries): a throttled call backs off up to about 70 s
# before it fails.
ATTEMPTS = 8
_CONFIG = Config(connect_timeout=5, read_timeout=20, retries={"total_max_attempts": ATTEMPTS, "mode": "adaptive"})
SERVICES = ("elb", "elbv2", "ssm", "ec2", "acm", "iam", "route53")  # every AWS API the kit calls
# IDs per describe call (EC2 InstanceIds, instance-id filter values, GroupIds): AWS documents no
# maximum for these lists; a bounded request stays small and quick to retry.
IDS_PER_CALL = 200
# Instances per register/deregister call (RegisterTargets, DeregisterTargets,
# RegisterInstancesWithLoadBalancer): AWS documents no maximum either, but rejects large ones
# at times; 100 is what Kubernetes' AWS cloud provider settled on.
REGISTER_PER_CALL = 100
_T = TypeVar("_T")


class AwsError(KitError):
    """An AWS API call failed: names the call and the cause."""


class AwsUnreachable(AwsError):
    """An AWS API call whose connection failed, after its tries (CONNECT_ATTEMPTS): a wait of
    minutes tries again (remote.report.reading), a single read fails."""


def aws_error(what: str, exc: Exception) -> AwsError:
    """The error for a failed call `what`: AwsUnreachable when its connection failed."""
    return (AwsUnreachable if isinstance(exc, EndpointUnreachable) else AwsError)(f"{what}: {exc}")


class _Throttled:
    """Counts the calls AWS throttled at least once in this process, as botocore's own retry logic
    tells a throttle from other errors (it retries them with backoff; one that still fails raises)."""

    _MARK = "wsgate_throttled"  # in a call's request context, shared by its attempts

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._calls = 0
        self._detector = ThrottlingErrorDetector(RetryEventAdapter())

    def __call__(self, **kwargs: Any) -> None:  # botocore's needs-retry event; None leaves the decision to it
        context = kwargs["request_dict"]["context"]
        if not context.get(self._MARK) and self._detector.is_throttling_error(**kwargs):
            context[self._MARK] = True
            with self._lock:
                self._calls += 1

    @property
    def calls(self) -> int:
        with self._lock:
            return self._calls


_throttled = _Throttled()

# A call whose connection failed (refused, timed out, a TLS error, a proxy) is tried CONNECT_ATTEMPTS
# times, not ATTEMPTS: a route to AWS that drops packets held each call for a minute (8 connect
# timeouts of 5 s and the backoff between them) and `fab status` makes a dozen.
CONNECT_ATTEMPTS = 3


class _Unreachable:
    """Stops the retries of a call whose connection failed after CONNECT_ATTEMPTS tries, and after
    one for a later call to an endpoint that failed so in this process (every call still tries:
    the first answer from the endpoint, any answer, gives the next failure its three tries again)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._hosts: set[str] = set()

    def __call__(self, *, attempts: int, caught_exception: Exception | None = None, endpoint: Any = None,
                 **_: Any) -> None:  # botocore's needs-retry event: raising ends the call with that error
        host = getattr(endpoint, "host", "")
        with self._lock:
            if caught_exception is None:
                self._hosts.discard(host)
            elif isinstance(caught_exception, EndpointUnreachable) and (
                    attempts >= CONNECT_ATTEMPTS or host in self._hosts):
                self._hosts.add(host)
                raise caught_exception


_unreachable = _Unreachable()


def throttled_calls() -> int:
    """How many AWS calls of this process were throttled (and retried with backoff) so far."""
    return _throttled.calls


@cache
def _client(service: str, region: str, endpoint: str | None):
    keys = {}
    if endpoint and loopback(endpoint):  # the lab's endpoint: never hand it real credentials
        keys = {"aws_access_key_id": "lab", "aws_secret_access_key": "lab"}
    # botocore itself: boto3 would add nothing here but its import time.
    try:
        api = botocore.session.get_session().create_client(service, region_name=region, endpoint_url=endpoint,
                                                            config=_CONFIG, **keys)
    except (BotoCoreError, ValueError) as exc:  # a profile that does not exist, a bad region or endpoint
        raise AwsError(f"{service} client for region {region}"
                       + (f" at {endpoint}" if endpoint else "") + f": {exc}") from None
    api.meta.events.register("needs-retry", _throttled)
    # first: ahead of botocore's own retry handler, which takes retry quota for a retry it decides
    api.meta.events.register_first(f"needs-retry.{api.meta.service_model.service_id.hyphenize()}", _unreachable)
    return api


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
    needed = ("elbv2" if settings.load_balancer.type == "network" else "elb", "ssm", "ec2",
              *(("route53",) if settings.dns else ()))
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
        raise aws_error(what, exc) from None


def pages(what: str, api, operation: str, key: str, **kwargs: Any) -> list[dict]:
    """Every item under `key` over all the pages of `operation`."""
    return found_pages(what, api, operation, key, (), **kwargs) or []


def found_pages(what: str, api, operation: str, key: str, missing: tuple[str, ...], **kwargs: Any) -> list[dict] | None:
    """As `pages`, or None when AWS answers with one of the `missing` error codes (what the call
    names does not exist)."""
    try:
        return [item for page in api.get_paginator(operation).paginate(**kwargs) for item in page[key]]
    except ClientError as exc:
        if error_code(exc) in missing:
            return None
        raise aws_error(what, exc) from None
    except BotoCoreError as exc:
        raise aws_error(what, exc) from None


def chunks(items: Sequence[_T], size: int) -> Iterator[list[_T]]:
    """`items` in consecutive lists of at most `size` (for APIs that bound a list per call)."""
    for start in range(0, len(items), size):
        yield list(items[start:start + size])


def error_code(exc: ClientError) -> str:
    return exc.response.get("Error", {}).get("Code", "")


def by_name(settings: Settings, service: str, names: str, key: str) -> dict | None:
    """The load balancer named `loadBalancer.name` as `service` (elb, elbv2) describes it, or None."""
    name = settings.load_balancer.name
    # the paginator: DescribeLoadBalancers pages (one name: one page, but never a lost marker)
    found = found_pages(f"{service} describe-load-balancers {name}", client(settings, service),
                        "describe_load_balancers", key, ("LoadBalancerNotFound", "AccessPointNotFound"),
                        **{names: [name]})
    return found[0] if found else None
