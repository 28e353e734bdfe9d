"""The nginx layer on the wire: real nginx, real PROXY headers, real HAProxy, real WebSockets.

nginx listens on 127.0.2.1; the load balancer stand-in (HAProxy) and trusted direct senders
connect from 127.0.0.1 (the environment's load balancer subnet); clients come from
127.0.0.77, so the client's address can never be confused with the proxy's.
"""

from __future__ import annotations

import json
import re

import pytest

from core import proxyproto
from core.render import render
from lab.client import dial, http_get, raw_exchange, ws_hello
from tests.conftest import settings_from
from tests.support.haproxy import HAProxy
from tests.support.nginx import Nginx
from tests.support.procs import free_port, wait_port

pytestmark = pytest.mark.integration

BIND = "127.0.2.1"
CLIENT = "127.0.0.77"
NAME = "ws.lab.test"
ELB_LOG = re.compile(
    r'^(?P<client>\S+) - (?P<user>\S+) \[[^\]]+\] "(?P<request>[^"]*)" (?P<status>\d{3}) \d+ "[^"]*" "[^"]*"$'
)


@pytest.fixture(scope="module")
def edge(app, tmp_path_factory):
    """nginx from the rendered lab tree, with HAProxy in front of each port."""
    root = tmp_path_factory.mktemp("nginx")
    ports = {"http": free_port(BIND), "tls": free_port(BIND), "health": free_port(BIND)}
    settings = settings_from(
        "lab", ports=ports, app={"upstreams": [f"{app[0]}:{app[1]}"]},
        nginx={"root": str(root), "workerShutdownTimeout": 5},
    )
    tree = render(settings, BIND)
    nginx = Nginx(root)
    nginx.install(tree)
    check = nginx.test()
    assert check.returncode == 0, check.stderr
    nginx.start()
    for port in ports.values():
        wait_port(BIND, port)
    lb = {mode: {name: free_port() for name in ("http", "tls")} for mode in ("send-proxy", "send-proxy-v2")}
    haproxy = HAProxy(tmp_path_factory.mktemp("haproxy"), [
        (lb[mode][name], BIND, ports[name], mode) for mode in lb for name in ("http", "tls")
    ])
    haproxy.start()
    yield {"nginx": nginx, "ports": ports, "lb": lb, "digest": tree.digest, "settings": settings}
    haproxy.stop()
    nginx.stop()


def header(version: str, src: str = "203.0.113.9", sport: int = 40000, dport: int = 443) -> bytes:
    make = proxyproto.v1 if version == "v1" else proxyproto.v2
    return make(src, BIND, sport, dport)


@pytest.mark.parametrize("env", ["lab", "staging"])
def test_rendered_tree_passes_nginx_t(tmp_path, env):
    settings = settings_from(env)
    nginx = Nginx(tmp_path)
    nginx.install(render(settings, settings.nginx.bind))
    result = nginx.test()
    assert result.returncode == 0, result.stderr
    assert "test is successful" in result.stderr


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_tcp_port_redirects_to_https(edge, version):
    sock = dial(BIND, edge["ports"]["http"], preface=header(version, dport=80))
    status, headers, _ = http_get(sock, NAME, "/chat/room?x=1")
    assert status == 301
    assert headers["location"] == f"https://{NAME}/chat/room?x=1"
    assert headers["x-config-digest"] == edge["digest"]


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_ssl_port_serves_the_app_with_the_client_address_from_the_header(edge, version):
    sock = dial(BIND, edge["ports"]["tls"], preface=header(version))
    status, headers, body = http_get(sock, NAME, "/", {"X-Forwarded-For": "6.6.6.6"})
    assert status == 200
    seen = json.loads(body)
    assert seen["client_ip"] == "203.0.113.9"
    assert seen["x_forwarded_for"] == "203.0.113.9"
    assert seen["x_forwarded_proto"] == "https"
    assert seen["host"] == NAME


def test_ipv6_client_in_a_v1_header(edge):
    preface = proxyproto.v1("2001:db8::7", "2001:db8::1", 40000, 443)
    status, _, body = http_get(dial(BIND, edge["ports"]["tls"], preface=preface), NAME)
    assert status == 200 and json.loads(body)["client_ip"] == "2001:db8::7"


@pytest.mark.parametrize("mode", ["send-proxy", "send-proxy-v2"])
def test_websocket_through_haproxy_sees_the_clients_own_address(edge, mode):
    sock = dial("127.0.0.1", edge["lb"][mode]["tls"], source=CLIENT)
    hello, echo = ws_hello(sock, NAME, {"X-Forwarded-For": "6.6.6.6"})
    assert hello["client_ip"] == CLIENT
    assert hello["x_forwarded_for"] == CLIENT
    assert hello["x_forwarded_proto"] == "https"
    assert echo == "ping-echo"


@pytest.mark.parametrize("mode", ["send-proxy", "send-proxy-v2"])
def test_tcp_listener_through_haproxy_redirects(edge, mode):
    sock = dial("127.0.0.1", edge["lb"][mode]["http"], source=CLIENT)
    status, headers, _ = http_get(sock, NAME, "/x")
    assert (status, headers["location"]) == (301, f"https://{NAME}/x")


def test_access_log_is_elb_log_and_starts_with_the_client(edge):
    sock = dial("127.0.0.1", edge["lb"]["send-proxy"]["tls"], source=CLIENT)
    ws_hello(sock, NAME)
    lines = edge["nginx"].log("lab-app.access.log").splitlines()
    ws_lines = [m for m in map(ELB_LOG.match, lines) if m and m["request"] == "GET /ws HTTP/1.1"]
    assert ws_lines, lines
    assert ws_lines[-1]["client"] == CLIENT
    assert ws_lines[-1]["status"] == "101"


@pytest.mark.parametrize("port", ["http", "tls"])
@pytest.mark.parametrize("preface", [b"", b"PROXY TCP4 not-an-address\r\n", b"PROXY garbage that never ends"])
def test_missing_or_broken_header_gets_no_answer_and_is_logged(edge, port, preface):
    logged = len(edge["nginx"].log("error.log"))
    sock = dial(BIND, edge["ports"][port])
    request = f"GET / HTTP/1.1\r\nHost: {NAME}\r\nConnection: close\r\n\r\n".encode()
    reply = raw_exchange(sock, preface + request)
    assert b"client_ip" not in reply
    assert reply == b"" or reply.startswith(b"HTTP/1.1 400")
    assert "while reading PROXY protocol" in edge["nginx"].log("error.log")[logged:]


def test_forged_header_from_outside_the_load_balancer_subnet_is_not_believed(edge):
    sock = dial(BIND, edge["ports"]["tls"], source="127.0.0.66", preface=header("v1", src="6.6.6.6"))
    status, _, body = http_get(sock, NAME)
    assert status == 200
    assert json.loads(body)["client_ip"] == "127.0.0.66"


def test_unknown_proxy_source_keeps_the_peer_address(edge):
    sock = dial(BIND, edge["ports"]["tls"], preface=proxyproto.v1_unknown())
    status, _, body = http_get(sock, NAME)
    assert status == 200 and json.loads(body)["client_ip"] == "127.0.0.1"


@pytest.mark.parametrize("port", ["http", "tls"])
def test_unknown_host_goes_to_the_default_server_and_gets_no_app_content(edge, port):
    sock = dial(BIND, edge["ports"][port], preface=header("v1"))
    reply = raw_exchange(sock, b"GET / HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n")
    assert reply == b""  # 444: closed without an answer


def test_health_endpoint_answers_without_a_header_and_names_the_live_digest(edge):
    status, headers, body = http_get(dial(BIND, edge["ports"]["health"]), "anything", "/healthz")
    assert status == 200
    assert body.decode().startswith(f"ok {edge['digest']} ")  # then the release `current` names
    assert headers["x-config-digest"] == edge["digest"]


def test_health_port_ignores_proxy_headers(edge):
    reply = raw_exchange(dial(BIND, edge["ports"]["health"]),
                         header("v1") + b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 400")
