"""The nginx layer on the wire: real nginx, real PROXY headers, real HAProxy, real WebSockets.

nginx listens on 127.0.2.1; the load balancer stand-in (HAProxy) and trusted direct senders
connect from 127.0.0.1 (the environment's load balancer subnet); clients come from
127.0.0.77, so the client's address can never be confused with the proxy's.
"""

from __future__ import annotations

import json
import re
import time

import pytest

from core import proxyproto
from core.probe import Check, checks
from core.render import render
from lab.client import dial, http_get, raw_exchange, ws_hello
from tests.conftest import settings_from
from tests.support.haproxy import HAProxy
from tests.support.nginx import Nginx
from tests.support.procs import free_port, free_ports, wait_port

pytestmark = pytest.mark.integration

BIND = "127.0.2.1"
CLIENT = "127.0.0.77"
NAME = "ws.lab.test"
ELB_LOG = re.compile(
    r'^(?P<client>\S+) - (?P<user>\S+) \[[^\]]+\] "(?P<request>[^"]*)" (?P<status>\d{3}) \d+ "[^"]*" "[^"]*"'
    r' (?P<port>\d+) (?P<peer>\S+)$'
)


def served(settings, root, ports):
    """nginx running the tree rendered for `settings`, once it listens on every one of `ports`."""
    tree = render(settings, BIND)
    nginx = Nginx(root)
    nginx.install(tree)
    check = nginx.test()
    assert check.returncode == 0, check.stderr
    nginx.start()
    for port in ports:
        wait_port(BIND, port)
    return nginx, tree


@pytest.fixture(scope="module")
def edge(app, tmp_path_factory):
    """nginx from the rendered lab tree, with HAProxy in front of each port."""
    root = tmp_path_factory.mktemp("nginx")
    ports = {"http": free_port(BIND), "tls": free_port(BIND), "health": free_port(BIND)}
    settings = settings_from(
        "lab", ports=ports, app={"upstreams": [f"{app[0]}:{app[1]}"]},
        nginx={"root": str(root), "workerShutdownTimeout": 5},
    )
    nginx, tree = served(settings, root, ports.values())
    distinct = iter(free_ports(4, ["127.0.0.1"]))
    lb = {mode: {name: next(distinct) for name in ("http", "tls")} for mode in ("send-proxy", "send-proxy-v2")}
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
    sock = dial(BIND, edge["ports"]["tls"], preface=b"PROXY UNKNOWN\r\n")
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


# --- a network load balancer's hosts: plain ports and proxy ports, served at once ------------

CHECK_INTERVAL = "inter 100ms fall 1 rise 1"
HTTP_CHECK = ("option httpchk", f"http-check send meth GET uri / ver HTTP/1.1 hdr Host {NAME}",
              "http-check expect status 200")


@pytest.fixture(scope="module")
def nlb(app, tmp_path_factory):
    """nginx rendered for a network load balancer with proxy protocol on, HAProxy in front as its
    target groups: plain routes to the plain ports, `send-proxy-v2` routes to the proxy ports; the
    proxy app route health-checked as the proxy group is (the header on checks: v2 LOCAL), and one
    route health-checking the proxy app port without the header."""
    root = tmp_path_factory.mktemp("nginx-network")
    ports = dict(zip(("http", "tls", "health", "proxyHttp", "proxyTls"), free_ports(5, [BIND]), strict=True))
    settings = settings_from(
        "lab", ports=ports, app={"upstreams": [f"{app[0]}:{app[1]}"]},
        nginx={"root": str(root), "workerShutdownTimeout": 5},
        load_balancer={"type": "network", "availabilityZones": [], "subnets": ["subnet-0123456789abcdef0"],
                       "vpcId": "vpc-0123456789abcdef0"},
    )
    nginx, tree = served(settings, root, ports.values())
    lb = dict(zip(("http", "tls", "proxyHttp", "proxyTls", "unframed check"), free_ports(5, ["127.0.0.1"]),
                  strict=True))  # distinct: the stand-in's frontends are named by port
    haproxy = HAProxy(tmp_path_factory.mktemp("haproxy-network"), [
        (lb["http"], BIND, ports["http"], ""),
        (lb["tls"], BIND, ports["tls"], ""),
        (lb["proxyHttp"], BIND, ports["proxyHttp"], "send-proxy-v2"),
        (lb["proxyTls"], BIND, ports["proxyTls"], f"send-proxy-v2 check check-send-proxy {CHECK_INTERVAL}",
         HTTP_CHECK),
        (lb["unframed check"], BIND, ports["proxyTls"], f"check {CHECK_INTERVAL}", HTTP_CHECK),
    ], stats=True)
    haproxy.start()
    yield {"nginx": nginx, "ports": ports, "lb": lb, "digest": tree.digest, "settings": settings,
           "haproxy": haproxy}
    haproxy.stop()
    nginx.stop()


def test_network_proxy_ports_through_haproxy_v2_see_the_clients_own_address(nlb):
    hello, echo = ws_hello(dial("127.0.0.1", nlb["lb"]["proxyTls"], source=CLIENT), NAME,
                           {"X-Forwarded-For": "6.6.6.6"})
    assert (hello["client_ip"], hello["x_forwarded_for"], echo) == (CLIENT, CLIENT, "ping-echo")
    status, headers, _ = http_get(dial("127.0.0.1", nlb["lb"]["proxyHttp"], source=CLIENT), NAME, "/x")
    assert (status, headers["location"], headers["x-config-digest"]) == (301, f"https://{NAME}/x", nlb["digest"])
    assert wait_for_log(nlb["nginx"], "lab-app.access.log", "GET /ws HTTP/1.1", CLIENT)


def wait_for_log(nginx: Nginx, name: str, request: str, client: str, timeout: float = 5.0) -> bool:
    """An elb_log line for `request` whose first field is `client` (a WebSocket is logged once closed)."""
    deadline = time.monotonic() + timeout
    while True:
        found = [m for m in map(ELB_LOG.match, nginx.log(name).splitlines()) if m and m["request"] == request]
        if any(m["client"] == client for m in found) or time.monotonic() > deadline:
            return any(m["client"] == client for m in found)
        time.sleep(0.05)


def test_network_plain_ports_serve_plain_requests_at_the_same_time(nlb):
    """The same nginx, the plain target group's way: no header, so the peer (the load balancer) is
    all there is; nothing is rejected, so a listener can switch groups either way."""
    held = dial("127.0.0.1", nlb["lb"]["proxyTls"], source=CLIENT)  # a proxy-side connection stays open
    try:
        hello, echo = ws_hello(dial("127.0.0.1", nlb["lb"]["tls"], source=CLIENT), NAME)
        assert (hello["client_ip"], echo) == ("127.0.0.1", "ping-echo")
        status, headers, _ = http_get(dial("127.0.0.1", nlb["lb"]["http"], source=CLIENT), NAME, "/y")
        assert (status, headers["location"]) == (301, f"https://{NAME}/y")
        status, _, body = http_get(held, NAME)
        assert status == 200 and json.loads(body)["client_ip"] == CLIENT
    finally:
        held.close()


def test_proxy_group_health_checks_with_a_v2_local_header_keep_the_server_up(nlb):
    """HAProxy's checks on a send-proxy-v2 server carry a v2 LOCAL header, as an NLB's on a PROXY v2
    group do: nginx skips it and answers. The same check without the header fails on that port."""
    deadline, seen = time.monotonic() + 10, {}
    while time.monotonic() < deadline:
        seen = nlb["haproxy"].servers()
        if seen[nlb["lb"]["proxyTls"]] == ("UP", "L7OK") and seen[nlb["lb"]["unframed check"]][0] == "DOWN":
            break
        time.sleep(0.1)
    assert seen[nlb["lb"]["proxyTls"]] == ("UP", "L7OK"), seen
    assert seen[nlb["lb"]["unframed check"]][0] == "DOWN", seen


def run_check(check: Check, address: str = BIND):
    """One probe check over a plain socket (as `fab rollout` sends it over SSH): the reply."""
    sock, ex = dial(address, check.port), check.exchange()
    try:
        sock.sendall(ex.request)
        while not ex.feed(sock.recv(65536)):
            pass
    except OSError:
        pass
    finally:
        sock.close()
    return ex.reply()


def test_the_network_probe_checks_pass_on_the_network_tree_and_fail_on_a_classic_one(nlb, edge):
    s = nlb["settings"]
    assert [c.name for c in checks(s) if c.judge(run_check(c), s, nlb["digest"])] == []
    # the classic tree reads the header on its plain ports: the network checks of those ports fail
    classic = settings_from("lab", ports={**edge["ports"], "proxyHttp": nlb["ports"]["proxyHttp"],
                                          "proxyTls": nlb["ports"]["proxyTls"]},
                            load_balancer={"type": "network", "availabilityZones": [],
                                           "subnets": ["subnet-0123456789abcdef0"], "vpcId": "vpc-0123456789abcdef0"})
    failed = [c.name for c in checks(classic) if c.judge(run_check(c), classic, None)]
    assert failed == ["redirect", "reject redirect", "app", "reject app"]


class LoopbackChannels:
    """Stands in for the SSH session of `fab status`: a "channel" to a port is a plain socket."""

    def channel(self, conn, address: str, port: int, timeout: float = 5.0):
        from remote.ssh import PortClosed, SshError

        try:
            return dial(address, port)
        except ConnectionRefusedError:  # what the host's sshd reports as "connect failed"
            raise PortClosed(f"nothing listens on {address}:{port} on the host") from None
        except OSError as exc:
            raise SshError(f"cannot reach {address}:{port} from the host: {exc}") from None


class LostSession:
    def channel(self, conn, address: str, port: int, timeout: float = 5.0):
        from remote.ssh import SshError

        raise SshError("connection lost: EOF")


def test_fab_status_reads_how_every_port_answers(nlb, edge):
    from core.doctor import probed_ports
    from remote.status import _port_mode

    s = nlb["settings"]
    modes = {p: _port_mode(LoopbackChannels(), None, s, BIND, p, expect) for p, expect in probed_ports(s).items()}
    p = nlb["ports"]
    assert modes == {p["http"]: "plain", p["tls"]: "plain", p["proxyHttp"]: "proxy", p["proxyTls"]: "proxy"}
    unserved = s.model_copy(update={"ports": s.ports.model_copy(update={"proxy_tls": free_port(BIND)})})
    assert _port_mode(LoopbackChannels(), None, unserved, BIND, unserved.ports.proxy_tls, "app") == "closed"
    from remote.ssh import SshError

    with pytest.raises(SshError, match="connection lost"):  # a lost session is not a closed port
        _port_mode(LostSession(), None, s, BIND, p["proxyTls"], "app")
    classic = edge["settings"]
    assert {p: _port_mode(LoopbackChannels(), None, classic, BIND, p, expect)
            for p, expect in probed_ports(classic).items()} == {port: "proxy" for port in classic.ports.proxied}
