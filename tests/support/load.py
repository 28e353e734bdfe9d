"""A bounded client load through the load balancer stand-in, counted per phase."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter

from lab.client import dial, http_get, ws_hello


class Load:
    """Clients that alternate an HTTPS request and a WebSocket through the SSL listener.

    `clients` run at once, so one stuck request cannot blind a phase; each request is cut at
    6 s and counted in the phase it started in. Bounded: stops by itself after `max_seconds`
    or `max_requests` per client.
    """

    def __init__(self, lab, source: str = "127.0.0.77", max_seconds: float = 120, max_requests: int = 20000,
                 clients: int = 3):
        self.lab, self.source = lab, source
        self.max_seconds, self.max_requests = max_seconds, max_requests
        self.phase = "before"
        self.marks: list[tuple[str, float]] = [("before", time.monotonic())]
        self.ok: Counter = Counter()
        self.failed: Counter = Counter()
        self.errors: dict[str, set] = {}
        self.client_ips: dict[str, Counter] = {}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]

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

    def _one(self, n: int) -> str:
        lab, s = self.lab, self.lab.settings
        sock = dial("127.0.0.1", lab.listen[443], source=self.source)
        if n % 2:
            hello, _ = ws_hello(sock, s.server_name, tls=lab.tls_context())
            return hello["client_ip"]
        tls_sock = lab.tls_context().wrap_socket(sock, server_hostname=s.server_name)
        status, _, body = http_get(tls_sock, s.server_name, "/")
        if status != 200:
            raise RuntimeError(f"HTTP {status}")
        return json.loads(body)["client_ip"]

    def _bounded(self, n: int) -> str:
        """One request in a thread of its own, abandoned after 6 s (a client library can hang)."""
        result: dict = {}

        def go():
            try:
                result["ip"] = self._one(n)
            except Exception as exc:  # every failure counts, whatever its kind
                result["error"] = exc

        worker = threading.Thread(target=go, daemon=True)
        worker.start()
        worker.join(6)
        if "ip" in result:
            return result["ip"]
        raise result.get("error") or TimeoutError("no answer in 6 s")

    def _run(self) -> None:
        started = time.monotonic()
        for n in range(self.max_requests):
            if self._stop.is_set() or time.monotonic() - started > self.max_seconds:
                return
            phase = self.phase
            try:
                ip = self._bounded(n)
            except Exception as exc:
                with self._lock:
                    self.failed[phase] += 1
                    self.errors.setdefault(phase, set()).add(type(exc).__name__)
                continue
            with self._lock:
                self.ok[phase] += 1
                self.client_ips.setdefault(phase, Counter())[ip] += 1

    def table(self) -> str:
        rows = [f"{'phase':<28}{'seconds':>8}{'ok':>7}{'failed':>8}  client_ip seen / errors"]
        for (phase, start), (_, end) in zip(self.marks, self.marks[1:], strict=False):
            ips = dict(self.client_ips.get(phase, {}))
            rows.append(f"{phase:<28}{end - start:>8.2f}{self.ok[phase]:>7}{self.failed[phase]:>8}  {ips} "
                        f"{sorted(self.errors.get(phase, []))}")
        return "\n".join(rows)
