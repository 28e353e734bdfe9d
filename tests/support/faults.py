"""Faults injected where they really happen: an AWS endpoint that refuses or loses answers, and
an nginx binary whose reload hangs on one host.

`AwsFaults` sits between the kit and moto server on loopback. A rule matches a request by its
API action (the `X-Amz-Target` header of JSON APIs such as SSM, `Action=` of query APIs such
as ELB, or Route 53's REST operation named from its method and path) and either refuses it
(AccessDenied, as a missing IAM permission does) or forwards it to moto and then closes the
connection without an answer (the call took effect, its answer was lost). Each rule fires a
given number of times, then lets requests through.

moto reports every registered target `healthy`, used or not. `health_as_aws` makes ELBv2's
DescribeTargetHealth answer as AWS does: `unused` in a group no listener forwards to (AWS does
not health-check it), `initial` for the first reads after a listener starts forwarding to it.
"""

from __future__ import annotations

import http.client
import re
import shutil
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

from tests.support.procs import free_port


@dataclass
class Rule:
    action: str  # e.g. "PutParameter", "GetParameter", "DescribeLoadBalancers"
    fault: str  # "refuse" | "drop"
    times: int = 1_000_000

    def fires(self, action: str) -> bool:
        if action != self.action or self.times <= 0:
            return False
        self.times -= 1
        return True


class AwsFaults:
    def __init__(self, upstream: str):
        self.upstream = urlparse(upstream)
        self.rules: list[Rule] = []
        self.seen: list[str] = []  # every action, in order
        self.health: tuple[str, int] | None = None  # health_as_aws: (region, reads that say `initial`)
        self._reads: dict[str, int] = {}  # group ARN -> DescribeTargetHealth reads since a listener used it
        # health_as_aws: each listener change (port, group ARN, what its health said then), in order
        self.moves: list[tuple[int, str, str]] = []
        self._used: set[str] | None = None  # the groups some listener forwards to (None: read again)
        self._lock = threading.Lock()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), self._handler())
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def add(self, action: str, fault: str, times: int = 1_000_000) -> None:
        with self._lock:
            self.rules.append(Rule(action, fault, times))

    def clear(self) -> None:
        with self._lock:
            self.rules.clear()

    def health_as_aws(self, region: str, initial_reads: int = 0) -> None:
        """From now on DescribeTargetHealth says `unused` for every target of a group no listener of
        any load balancer forwards to, and `initial` for the first `initial_reads` reads of a group
        after a listener started forwarding to it (again); other answers as moto gives them."""
        with self._lock:
            self.health, self._used = (region, initial_reads), None
            self._reads.clear()

    def _used_groups(self) -> set[str]:
        """The target groups some listener forwards to, read once after each listener change that
        came through here (the kit's, and the tests' own)."""
        assert self.health is not None
        used = self._used
        if used is None:
            used = self._used = _used_groups(self.upstream.geturl(), self.health[0])
        return used

    def _said(self, arn: str) -> str:
        """What DescribeTargetHealth says of group `arn`'s targets now (health_as_aws), not counted as a read."""
        assert self.health is not None
        if arn not in self._used_groups():
            return "unused"
        with self._lock:
            return "initial" if self._reads.get(arn, 0) < self.health[1] else "healthy"

    def _moved(self, action: str, form: dict[str, list[str]]) -> None:
        """A listener change about to be made: recorded with what the group's health says now."""
        assert self.health is not None
        arn = (form.get("DefaultActions.member.1.TargetGroupArn") or [""])[0]
        if not arn:
            return
        if action == "CreateListener":
            port = int(form["Port"][0])
        else:
            import boto3

            elbv2 = boto3.client("elbv2", region_name=self.health[0], endpoint_url=self.upstream.geturl(),
                                 aws_access_key_id="testing", aws_secret_access_key="testing")
            port = elbv2.describe_listeners(ListenerArns=form["ListenerArn"])["Listeners"][0]["Port"]
        self.moves.append((port, arn, self._said(arn)))

    def _health(self, arn: str, data: bytes) -> bytes:
        """moto's DescribeTargetHealth answer for group `arn`, as AWS would give it (health_as_aws)."""
        assert self.health is not None
        initial = self.health[1]
        if arn in self._used_groups():
            with self._lock:
                self._reads[arn] = reads = self._reads.get(arn, 0) + 1
            if reads > initial:
                return data
            state = b"<State>initial</State><Reason>Elb.RegistrationInProgress</Reason>"
        else:
            with self._lock:
                self._reads.pop(arn, None)
            state = (b"<State>unused</State><Reason>Target.NotInUse</Reason><Description>Target group is not "
                     b"configured to receive traffic from the load balancer</Description>")
        return re.sub(rb"<State>healthy</State>", state, data)

    def _fault(self, action: str) -> str | None:
        with self._lock:
            self.seen.append(action)
            for rule in self.rules:
                if rule.fires(action):
                    return rule.fault
        return None

    def _handler(self):
        faults = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _forward(self, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
                conn = http.client.HTTPConnection(faults.upstream.hostname, faults.upstream.port, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                conn.request(self.command, self.path, body=body, headers=headers)
                r = conn.getresponse()
                data = r.read()
                conn.close()
                return r.status, r.getheaders(), data

            def _any(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                target = self.headers.get("X-Amz-Target", "")
                action = target.rsplit(".", 1)[-1] if target else \
                    (parse_qs(body.decode(errors="replace")).get("Action") or parse_qs(urlparse(self.path).query)
                     .get("Action") or [""])[0]
                action = action or _rest_action(self.command, urlparse(self.path).path)
                fault = faults._fault(action)
                if action in ("CreateListener", "ModifyListener") and faults.health:
                    faults._moved(action, parse_qs(body.decode()))
                if fault == "refuse":
                    text = (b'{"__type":"AccessDeniedException","message":"User is not authorized to perform: '
                            + action.encode() + b' (injected)"}') if target else (
                        b"<ErrorResponse><Error><Type>Sender</Type><Code>AccessDenied</Code><Message>not authorized"
                        b" (injected)</Message></Error><RequestId>x</RequestId></ErrorResponse>")
                    self.send_response(400)
                    self.send_header("Content-Type", "application/x-amz-json-1.1" if target else "text/xml")
                    self.send_header("Content-Length", str(len(text)))
                    self.end_headers()
                    self.wfile.write(text)
                    return
                status, headers, data = self._forward(body)
                if action in LISTENER_CHANGES:
                    faults._used = None
                if action == "DescribeTargetHealth" and faults.health and status == 200:
                    data = faults._health(parse_qs(body.decode())["TargetGroupArn"][0], data)
                if fault == "drop":  # it happened upstream; the answer never comes
                    self.close_connection = True
                    return
                self.send_response(status)
                for k, v in headers:
                    if k.lower() not in ("content-length", "connection", "transfer-encoding", "date", "server"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = _any

        return Handler

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


LISTENER_CHANGES = ("CreateListener", "ModifyListener", "DeleteListener", "DeleteLoadBalancer")


def _used_groups(url: str, region: str) -> set[str]:
    """The target groups some listener forwards to, as the endpoint at `url` has them."""
    import boto3

    elbv2 = boto3.client("elbv2", region_name=region, endpoint_url=url, aws_access_key_id="testing",
                         aws_secret_access_key="testing")
    used: set[str] = set()
    for lb in elbv2.describe_load_balancers()["LoadBalancers"]:
        for listener in elbv2.describe_listeners(LoadBalancerArn=lb["LoadBalancerArn"])["Listeners"]:
            for action in listener.get("DefaultActions", []):
                used |= {g["TargetGroupArn"] for g in (action.get("ForwardConfig") or {}).get("TargetGroups", [])}
                used |= {action["TargetGroupArn"]} if action.get("TargetGroupArn") else set()
    return used


def _rest_action(method: str, path: str) -> str:
    """Route 53's REST API names no action in the request: its operation from method and path."""
    if "/hostedzone/" in path and path.rstrip("/").endswith("/rrset"):
        return "ListResourceRecordSets" if method == "GET" else "ChangeResourceRecordSets"
    if "/hostedzone/" in path and method == "GET":
        return "GetHostedZone"
    return ""


HANGING_NGINX = """#!/bin/sh
# nginx, except that a reload sleeps first when PREFIX/hang-reload exists (it holds the seconds;
# the file is removed, so the next reload runs at once).
prefix=""; prev=""
for a in "$@"; do [ "$prev" = "-p" ] && prefix="$a"; prev="$a"; done
case " $* " in
  *" -s reload "*) if [ -e "${prefix}hang-reload" ]; then
                     secs=$(cat "${prefix}hang-reload"); rm -f "${prefix}hang-reload"; sleep "$secs"; fi ;;
esac
exec __NGINX__ "$@"
"""


def hanging_nginx(directory: Path) -> Path:
    """An nginx binary whose reload can be made to hang on one host (see HANGING_NGINX)."""
    path = directory / "nginx"
    path.write_text(HANGING_NGINX.replace("__NGINX__", shutil.which("nginx") or "/usr/sbin/nginx"))
    path.chmod(0o755)
    return path
