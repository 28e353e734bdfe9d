"""Probe answers parsed as any HTTP/1.1 client would (h11), and judged as the load balancer needs."""

from __future__ import annotations

import pytest

from core.probe import PROBE_HEADER, PROBE_HEADER_V2, PROBE_LOCAL_V2, Exchange, Reply, checks, proven_ports
from tests.conftest import settings_from

HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 11\r\n\r\n"


def fed(*chunks: bytes) -> Exchange:
    ex = Exchange("h", "/")
    for chunk in chunks:
        if ex.feed(chunk):
            break
    return ex


def test_a_content_length_answer_is_whole_without_waiting_for_the_close():
    ex = fed(HEAD + b"ok 0123abcd")
    assert ex.done and ex.reply().status == 200 and ex.reply().body == b"ok 0123abcd"


@pytest.mark.parametrize("cut", [5, len(HEAD) - 1, len(HEAD) + 3])
def test_a_partial_answer_is_not_whole_and_is_no_answer_if_the_peer_closes(cut):
    ex = fed((HEAD + b"ok 0123abcd")[:cut])
    assert not ex.done
    assert ex.feed(b"") and ex.reply().status is None


def test_chunked_and_close_delimited_answers_are_read_as_a_client_would():
    chunked = fed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", b"5\r\nhello\r\n", b"0\r\n\r\n")
    assert chunked.done and chunked.reply().body == b"hello"
    closed = fed(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the end", b"")
    assert closed.reply().status == 200 and closed.reply().body == b"until the end"


def test_garbage_or_nothing_is_no_answer():
    assert fed(b"SSH-2.0-OpenSSH\r\n", b"").reply().status is None
    assert fed(b"").reply().status is None


def test_requests_carry_the_header_the_load_balancer_sends_and_the_other_way_round():
    on = {c.name: c for c in checks(settings_from("lab"))}
    assert on["redirect"].exchange().request.startswith(PROBE_HEADER)
    assert on["app"].exchange().request.startswith(PROBE_HEADER)
    assert on["reject app"].exchange().request.startswith(b"GET / HTTP/1.1\r\n")
    off = {c.name: c for c in checks(settings_from("lab", proxy_protocol=False))}
    assert off["app"].exchange().request.startswith(b"GET / HTTP/1.1\r\n")
    assert off["reject redirect"].exchange().request.startswith(PROBE_HEADER)


def network(**changes):
    return settings_from("staging", load_balancer={"type": "network"}, **changes)


def test_the_v2_headers_are_the_bytes_the_spec_gives():
    signature = bytes.fromhex("0d0a0d0a000d0a515549540a")
    # PROXY (0x21), TCP over IPv4 (0x11), 12 bytes: 192.0.2.10 -> 192.0.2.1, 40000 -> 443
    assert PROBE_HEADER_V2 == signature + bytes.fromhex("2111000c" "c000020a" "c0000201" "9c40" "01bb")
    assert PROBE_LOCAL_V2 == signature + bytes.fromhex("20000000")  # LOCAL, unspecified, no address


def test_classic_checks_are_as_they_were():
    s = settings_from("staging")
    assert [(c.name, c.port, c.preface, c.expect) for c in checks(s)] == [
        ("redirect", 80, PROBE_HEADER, "redirect"), ("app", 81, PROBE_HEADER, "app"),
        ("reject redirect", 80, b"", "reject"), ("reject app", 81, b"", "reject")]
    assert proven_ports(s) == [80, 81] and proven_ports(settings_from("staging", proxy_protocol=False)) == []


def test_network_checks_plain_ports_plain_and_proxy_ports_with_v2_and_a_health_check():
    on = {c.name: (c.port, c.preface, c.expect) for c in checks(network())}
    assert on == {
        "redirect": (80, b"", "redirect"), "reject redirect": (80, PROBE_HEADER_V2, "reject"),
        "app": (81, b"", "app"), "reject app": (81, PROBE_HEADER_V2, "reject"),
        "proxy redirect": (82, PROBE_HEADER_V2, "redirect"), "reject proxy redirect": (82, b"", "reject"),
        "proxy app": (83, PROBE_HEADER_V2, "app"), "reject proxy app": (83, b"", "reject"),
        "health check": (83, PROBE_LOCAL_V2, "app"),
    }
    assert proven_ports(network()) == [82, 83]  # what the readiness record names: the gate's ports
    off = checks(network(proxy_protocol=False))
    assert {c.port for c in off} == {80, 81} and proven_ports(network(proxy_protocol=False)) == []


def test_a_health_check_header_proves_nothing_and_says_what_it_was():
    s = network()
    (health,) = [c for c in checks(s) if c.name == "health check"]
    assert not health.proves_header
    assert health.judge(Reply(None, {}, b""), s, None) == (
        "port 83: a request after a PROXY v2 LOCAL header (as a health check sends it): expected the app, "
        "got closed without an answer")
    (plain,) = [c for c in checks(s) if c.name == "reject app"]
    assert plain.judge(Reply(200, {"x-upstream-status": "200"}, b""), s, None) == (
        "port 81: a request with a PROXY v2 header was answered (HTTP 200), not rejected")
