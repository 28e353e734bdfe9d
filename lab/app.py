"""Demo WebSocket app: says what it saw of the client, then echoes.

On a WebSocket connect it sends one JSON message (`client_ip`, `x_forwarded_for`,
`x_forwarded_proto`, `host`, `peer`) and then echoes every message. A plain HTTP request
gets the same JSON as its body. Run: python -m lab.app --listen 127.0.0.1:18000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
from http import HTTPStatus

from websockets.asyncio.server import ServerConnection, serve
from websockets.http11 import Request


def seen(headers, peer) -> dict:
    return {
        "client_ip": headers.get("X-Real-IP"),
        "x_forwarded_for": headers.get("X-Forwarded-For"),
        "x_forwarded_proto": headers.get("X-Forwarded-Proto"),
        "host": headers.get("Host"),
        "peer": peer[0] if peer else None,
    }


async def _plain_http(connection: ServerConnection, request: Request):
    if request.headers.get("Upgrade", "").lower() != "websocket":
        body = json.dumps(seen(request.headers, connection.remote_address)) + "\n"
        response = connection.respond(HTTPStatus.OK, body)
        response.headers["Content-Type"] = "application/json"
        return response
    return None


async def _session(ws: ServerConnection) -> None:
    assert ws.request is not None  # the handshake is done when the handler runs
    await ws.send(json.dumps(seen(ws.request.headers, ws.remote_address)))
    async for message in ws:
        await ws.send(message)


async def main(host: str, port: int) -> None:
    stop = asyncio.get_running_loop().create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set_result, None)
    async with serve(_session, host, port, process_request=_plain_http, ping_interval=20):
        print(f"demo app listening on {host}:{port}", flush=True)
        await stop


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1:18000", help="host:port")
    args = parser.parse_args()
    host, _, port = args.listen.rpartition(":")
    asyncio.run(main(host, int(port)))
