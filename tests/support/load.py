"""A bounded client load through the load balancer stand-in, counted per phase, and WebSockets
held open across a change."""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from collections import Counter
from pathlib import Path

from websockets.asyncio.client import connect

from lab.client import dial, http_get, ws_hello

# What each kind of request does: `https` a GET through the TLS listener (the app answers with
# what it saw), `ws` a WebSocket through it (the app's first message, then one echo), `http` a
# GET through the TCP listener (nginx's 301; the client address is read from nginx's access log).
KINDS = ("https", "ws", "http")
TAGGED = re.compile(r'^(\S+) .*"wsgate-load/(\S+)" \d+ \S+$')  # elb_log: ... "agent" port peer


class Load:
    """Clients that cycle through `kinds` of requests (default: an HTTPS request and a WebSocket
    through the SSL/TLS listener, alternating).

    `clients` run at once, so one stuck request cannot blind a phase; each request is cut at
    6 s and counted in the phase it started in. Bounded: stops by itself after `max_seconds`
    (by default the suite's per-test timeout: a load outlives no test, and ends before none on a
    busy machine) or `max_requests` per client.
    """

    def __init__(self, lab, source: str = "127.0.0.77", max_seconds: float = 300, max_requests: int = 20000,
                 clients: int = 3, kinds: tuple[str, ...] = ("https", "ws"), pause: float = 0.05):
        """`pause`: each client's rest between two requests (as the moves' clients, lab/client.py):
        a few dozen requests a second still cross every window a switch opens, while unpaced
        clients kept a core of a two-core machine busy and slowed what they load."""
        assert set(kinds) <= set(KINDS), kinds
        self.lab, self.source, self.kinds, self.pause = lab, source, kinds, pause
        self.max_seconds, self.max_requests = max_seconds, max_requests
        self.phase = "before"
        self.marks: list[tuple[str, float]] = [("before", time.monotonic())]
        self.ok: Counter = Counter()
        self.failed: Counter = Counter()
        self.errors: dict[str, set] = {}
        self.client_ips: dict[str, Counter] = {}
        self.logged: dict[str, list[str]] = {}  # phase -> tags of requests whose address nginx logged
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(c,), daemon=True) for c in range(clients)]

    def start(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def mark(self, phase: str) -> None:
        self.phase = phase
        self.marks.append((phase, time.monotonic()))

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)
        self.marks.append(("", time.monotonic()))

    def made(self, phases: list[str]) -> tuple[int, int]:
        """(requests made, failed) over `phases`."""
        return sum(self.ok[p] + self.failed[p] for p in phases), sum(self.failed[p] for p in phases)

    def _one(self, n: int, tag: str) -> str:
        """One request; the client address the far end saw, or `@tag` when nginx's log has it."""
        lab, s = self.lab, self.lab.settings
        kind = self.kinds[n % len(self.kinds)]
        if kind == "http":
            status, headers, _ = http_get(dial("127.0.0.1", lab.listen[80], source=self.source), s.server_name, "/",
                                          headers={"User-Agent": f"wsgate-load/{tag}"})
            if status != 301 or headers.get("location") != f"https://{s.server_name}/":
                raise RuntimeError(f"HTTP {status} {headers.get('location')}")
            return f"@{tag}"
        sock = dial("127.0.0.1", lab.listen[443], source=self.source)
        if kind == "ws":
            hello, echo = ws_hello(sock, s.server_name, tls=lab.tls_context())
            if echo != "ping-echo":
                raise RuntimeError(f"echo {echo!r}")
            return hello["client_ip"]
        tls_sock = lab.tls_context().wrap_socket(sock, server_hostname=s.server_name)
        status, _, body = http_get(tls_sock, s.server_name, "/")
        if status != 200:
            raise RuntimeError(f"HTTP {status}")
        return json.loads(body)["client_ip"]

    def _bounded(self, n: int, tag: str) -> str:
        """One request in a thread of its own, abandoned after 6 s (a client library can hang)."""
        result: dict = {}

        def go():
            try:
                result["ip"] = self._one(n, tag)
            except Exception as exc:  # every failure counts, whatever its kind
                result["error"] = exc

        worker = threading.Thread(target=go, daemon=True)
        worker.start()
        worker.join(6)
        if "ip" in result:
            return result["ip"]
        raise result.get("error") or TimeoutError("no answer in 6 s")

    def _run(self, client: int) -> None:
        started = time.monotonic()
        for n in range(self.max_requests):
            if self._stop.is_set() or time.monotonic() - started > self.max_seconds:
                return
            phase = self.phase
            try:
                ip = self._bounded(n, f"{client}-{n}")
            except Exception as exc:
                with self._lock:
                    self.failed[phase] += 1
                    self.errors.setdefault(phase, set()).add(type(exc).__name__)
                self._stop.wait(self.pause)
                continue
            with self._lock:
                self.ok[phase] += 1
                if ip.startswith("@"):
                    self.logged.setdefault(phase, []).append(ip[1:])
                else:
                    self.client_ips.setdefault(phase, Counter())[ip] += 1
            self._stop.wait(self.pause)

    def read_logs(self, logs: list[Path]) -> None:
        """Count the addresses nginx logged for the `http` requests (after `stop`)."""
        seen = {}
        for log in logs:
            for line in log.read_text().splitlines() if log.exists() else []:
                m = TAGGED.match(line)
                if m:
                    seen[m[2]] = m[1]
        for phase, tags in self.logged.items():
            for tag in tags:
                self.client_ips.setdefault(phase, Counter())[seen.get(tag, "not logged")] += 1

    def table(self) -> str:
        rows = [f"{'phase':<34}{'seconds':>8}{'ok':>7}{'failed':>8}  client_ip seen / errors"]
        for (phase, start), (_, end) in zip(self.marks, self.marks[1:], strict=False):
            ips = dict(self.client_ips.get(phase, {}))
            rows.append(f"{phase:<34}{end - start:>8.2f}{self.ok[phase]:>7}{self.failed[phase]:>8}  {ips} "
                        f"{sorted(self.errors.get(phase, []))}")
        return "\n".join(rows)


class Held:
    """WebSockets opened through the SSL/TLS listener before a change and kept across it: each sends
    a message every `every` s and must get it echoed within 5 s. One that fails to, or closes,
    before `close()` is dropped."""

    def __init__(self, lab, count: int = 6, source: str = "127.0.0.77", every: float = 0.3):
        self.lab, self.count, self.source, self.every = lab, count, source, every
        self.dropped: list[str] = []
        self.echoes = 0
        self.client_ips: Counter = Counter()
        self._settled = 0  # sockets open, or failed to open
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._all()), daemon=True)

    def open(self) -> Held:
        self._thread.start()
        self._ready.wait(15)  # every socket open (or failed): the change may start
        return self

    def close(self) -> None:
        self._stop.set()
        self._thread.join(15)

    async def _all(self) -> None:
        await asyncio.gather(*(self._keep(i) for i in range(self.count)))

    async def _keep(self, i: int) -> None:
        lab, s = self.lab, self.lab.settings
        opened = False
        try:
            sock = dial("127.0.0.1", lab.listen[443], source=self.source)
            sock.setblocking(False)
            async with connect(f"wss://{s.server_name}/ws", sock=sock, ssl=lab.tls_context(), open_timeout=5,
                               close_timeout=2) as ws:
                self.client_ips[json.loads(await asyncio.wait_for(ws.recv(), 5))["client_ip"]] += 1
                opened = True
                self._settle()
                k = 0
                while not self._stop.is_set():
                    message = f"held-{i}-{k}"
                    await ws.send(message)
                    if await asyncio.wait_for(ws.recv(), 5) != message:
                        raise RuntimeError("a wrong echo")
                    self.echoes, k = self.echoes + 1, k + 1
                    await asyncio.sleep(self.every)
        except Exception as exc:  # noqa: BLE001 - whatever ended it early is a drop
            self.dropped.append(f"socket {i}: {type(exc).__name__}: {exc}")
        finally:
            if not opened:
                self._settle()

    def _settle(self) -> None:
        self._settled += 1
        if self._settled == self.count:
            self._ready.set()
