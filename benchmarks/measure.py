"""One timed process: wall, CPU (the kernel's rusage of the reaped child), peak RSS, and the peak
threads and open descriptors seen by a sampler thread while it runs."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

SAMPLE_EVERY = 0.05  # seconds between two reads of /proc/<pid>


@dataclass(frozen=True)
class Sample:
    """What one run of a tool cost. `cpu` is user + system seconds of the process (and any children it reaped)."""

    wall: float
    cpu: float
    rss_mib: float
    threads: int
    fds: int

    def as_dict(self) -> dict:
        return asdict(self)


def _threads(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    return 0


class Peaks:
    """Polls a running process's thread count and descriptor count, keeping the largest of each."""

    def __init__(self, pid: int):
        self.pid, self.threads, self.fds = pid, 0, 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._done.is_set():
            try:
                self.threads = max(self.threads, _threads(self.pid))
                self.fds = max(self.fds, len(os.listdir(f"/proc/{self.pid}/fd")))
            except (OSError, ValueError):
                return  # the process is gone (or a zombie whose fd table is closed)
            self._done.wait(SAMPLE_EVERY)

    def stop(self) -> None:
        self._done.set()
        self._thread.join()


def run(argv: list[str], log: Path, cwd: Path, env: dict | None = None) -> tuple[Sample, int]:
    """Run `argv` to its end, its output appended to `log`; returns what it cost and its exit code."""
    with log.open("ab") as out:
        started = time.perf_counter()
        proc = subprocess.Popen(argv, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env=env)
        peaks = Peaks(proc.pid)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
        peaks.stop()
    proc.returncode = os.waitstatus_to_exitcode(status)
    sample = Sample(wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, peaks.threads, peaks.fds)
    return sample, proc.returncode
