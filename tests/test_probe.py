"""Probe answers parsed as any HTTP/1.1 client would (h11), and judged as the load balancer needs."""

from __future__ import annotations

import pytest

from core.probe import PROBE_HEADER, Exchange, checks
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
