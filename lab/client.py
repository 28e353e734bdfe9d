"""The lab client: sockets from a chosen loopback source, raw HTTP, WebSockets (plain or TLS)."""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import ssl

from websockets.asyncio.client import connect as ws_connect


def dial(address: str, port: int, source: str = "127.0.0.1", preface: bytes = b"") -> socket.socket:
    """A TCP connection from `source`, with `preface` (a PROXY header) already sent."""
    sock = socket.create_connection((address, port), timeout=5, source_address=(source, 0))
    if preface:
        sock.sendall(preface)
    return sock


def http_get(sock: socket.socket, host: str, path: str = "/", headers: dict | None = None):
    """One HTTP/1.1 GET over `sock`; returns (status, headers, body) or raises on a closed socket."""
    conn = http.client.HTTPConnection(host, timeout=5)
    conn.sock = sock
    conn.request("GET", path, headers=headers or {})
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body


def raw_exchange(sock: socket.socket, data: bytes) -> bytes:
    """Send `data`, read until the peer closes (or 5 s): what came back."""
    sock.sendall(data)
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except (TimeoutError, ConnectionResetError):
        pass
    finally:
        sock.close()
    return b"".join(chunks)


def ws_hello(sock: socket.socket, host: str, headers: dict | None = None,
             tls: ssl.SSLContext | None = None) -> tuple[dict, str]:
    """Open a WebSocket over `sock` (TLS with `tls`), return the app's first message and one echo.

    The asyncio client: websockets' threaded client reads and writes one TLS socket from two
    threads, which now and then loses a handshake over TLS.
    """
    return asyncio.run(_hello(sock, host, headers or {}, tls))


async def _hello(sock: socket.socket, host: str, headers: dict, tls: ssl.SSLContext | None) -> tuple[dict, str]:
    sock.setblocking(False)
    scheme = "wss" if tls else "ws"
    async with ws_connect(f"{scheme}://{host}/ws", sock=sock, additional_headers=headers, ssl=tls,
                          open_timeout=5, close_timeout=2) as ws:
        hello = json.loads(await asyncio.wait_for(ws.recv(), 5))  # type: ignore[arg-type]
        await ws.send("ping-echo")
        return hello, await asyncio.wait_for(ws.recv(), 5)  # type: ignore[arg-type]
