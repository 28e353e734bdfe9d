"""The heartbeat: every idle session hears from the controller each third of ssh.idleTimeout, or
the host ends it (and with it the lock).

One scheduler thread and a few pingers, whatever the number of hosts. A ping in flight is never
sent again (its session is skipped until it answers), and a ping that takes longer than `stuck`
seconds (a host that stopped answering holds it up to ssh.commandTimeout) pins its pinger: the
scheduler starts another in its place, so a hung host never delays the others' pings. Threads
stay bounded by `workers`, plus one per host hanging at that moment, plus the scheduler.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable
from typing import Protocol


class Pingable(Protocol):
    def ping(self) -> None:
        """Tell the host the controller is there (skipped on a busy or broken session)."""


class Heartbeat:
    def __init__(self, sessions: Callable[[], Iterable[Pingable]], interval: float, workers: int = 4,
                 stuck: float = 1.0):
        """`sessions`: the open sessions now (asked at each beat); `interval`: seconds between beats."""
        self._sessions, self.interval, self.workers, self.stuck = sessions, interval, max(1, workers), stuck
        self._queue: queue.SimpleQueue[Pingable | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._pending: set[int] = set()  # id() of each session queued or being pinged
        self._started: dict[int, float] = {}  # pinger -> when its ping began
        self._pingers = 0
        self._ended = threading.Event()
        self._scheduler = threading.Thread(target=self._schedule, name="heartbeat", daemon=True)

    def start(self) -> Heartbeat:
        self._scheduler.start()
        return self

    def stop(self) -> None:
        """No more beats; idle pingers end now, pinned ones once their ping returns."""
        self._ended.set()
        with self._lock:
            for _ in range(self._pingers):
                self._queue.put(None)

    def _schedule(self) -> None:
        next_beat = time.monotonic() + self.interval
        while not self._ended.wait(min(self.stuck, max(0.0, next_beat - time.monotonic()))):
            self._staff()
            if time.monotonic() >= next_beat:
                next_beat += self.interval
                self._beat()

    def _beat(self) -> None:
        """Queue a ping for every session that has none queued or in flight."""
        for session in self._sessions():
            with self._lock:
                if id(session) in self._pending:
                    continue
                self._pending.add(id(session))
            self._queue.put(session)
        self._staff()

    def _free(self) -> int:
        """Pingers not pinned by a ping older than `stuck` (lock held)."""
        now = time.monotonic()
        return self._pingers - sum(1 for began in self._started.values() if now - began > self.stuck)

    def _staff(self) -> None:
        """Keep `workers` pingers free to ping."""
        with self._lock:
            while self._free() < self.workers and not self._ended.is_set():
                self._pingers += 1
                threading.Thread(target=self._pinger, name="heartbeat-ping", daemon=True).start()

    def _pinger(self) -> None:
        me = threading.get_ident()
        while (session := self._queue.get()) is not None:
            with self._lock:
                self._started[me] = time.monotonic()
            try:
                if not self._ended.is_set():
                    session.ping()
            except Exception:  # noqa: BLE001 - a ping that fails is reported by the next real request
                pass
            finally:
                with self._lock:
                    del self._started[me]
                    self._pending.discard(id(session))
                    surplus = self._free() > self.workers  # it was pinned; another took its place
                    if surplus:
                        self._pingers -= 1
            if surplus:
                return
        with self._lock:
            self._pingers -= 1
