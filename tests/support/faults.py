"""Faults injected where they really happen: an AWS endpoint that refuses or loses answers, and
an nginx binary whose reload hangs on one host.

`AwsFaults` sits between the kit and moto server on loopback. A rule matches a request by its
API action (the `X-Amz-Target` header of JSON APIs such as SSM, `Action=` of query APIs such
as ELB, or Route 53's REST operation named from its method and path) and either refuses it
(AccessDenied, as a missing IAM permission does) or forwards it to moto and then closes the
connection without an answer (the call took effect, its answer was lost). Each rule fires a
given number of times, then lets requests through.
"""

from __future__ import annotations

import http.client
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
