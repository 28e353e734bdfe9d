"""The probe's reading of a reply: it stops at a whole answer instead of waiting for the close
(the host's sshd forwards a close late), and never stops early on a partial one."""

from core.probe import Reply

HEAD = b"HTTP/1.1 200 OK\r\nServer: nginx\r\nContent-Length: 11\r\n\r\n"


def test_a_whole_answer_is_complete_and_parses():
    raw = HEAD + b"ok 0123abcd"
    assert Reply.complete(raw)
    reply = Reply.parse(raw)
    assert (reply.status, reply.body) == (200, b"ok 0123abcd")


def test_partial_answers_are_not_complete():
    for cut in (0, 10, len(HEAD) - 2, len(HEAD), len(HEAD) + 10):
        assert not Reply.complete((HEAD + b"ok 0123abcd")[:cut])


def test_without_a_length_only_the_close_ends_the_answer():
    assert not Reply.complete(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
    assert not Reply.complete(b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\nbody")
