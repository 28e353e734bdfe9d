"""The benchmark's own parts (benchmarks/): big fleets' addresses, the 5,000-line known_hosts, the
measured process's peaks, and the figures' ratios. The benchmark itself runs with `make bench`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from benchmarks import knownhosts, measure, report
from benchmarks.measure import Sample
from core.knownhosts import KnownHosts
from tests.support.fleet import host_address


def test_host_addresses_spill_onto_the_next_network_past_254():
    addresses = [host_address(100, i) for i in range(1, 501)]
    assert addresses[0] == "127.0.100.1" and addresses[253] == "127.0.100.254"
    assert addresses[254] == "127.0.101.1" and addresses[-1] == "127.0.101.246"
    assert len(set(addresses)) == 500
    assert all(0 < int(a.rsplit(".", 1)[1]) < 255 for a in addresses)


def test_big_known_hosts_holds_the_fleets_lines_among_hashed_and_plain_fillers(tmp_path: Path):
    own = tmp_path / "own"
    key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl"
    own.write_text(f"[127.0.100.1]:2201 {key}\n[127.0.100.2]:2202 {key}\n")
    big = tmp_path / "big"
    assert knownhosts.write(big, own, 300, tmp_path / "keys") == 298
    text = big.read_text()
    index = KnownHosts.parse(text, str(big))  # every line well formed
    assert len(text.splitlines()) == 300
    assert len(index.keys("127.0.100.2", 2202)) == 1
    assert len(index.hashed) == 149 and len(index.keys("10.0.0.1", 2222)) == 1  # filler 1: hashed
    assert len(index.keys("srv0.example.internal")) == 1  # filler 0: plain
    assert len({line.split()[1] for line in text.splitlines()}) == 3  # a few real key types, reused


def test_a_run_reports_cpu_and_the_peak_threads_and_descriptors(tmp_path: Path):
    child = ("import threading, time\n"
             "files = [open(__import__('os').devnull) for _ in range(20)]\n"
             "for _ in range(6): threading.Thread(target=time.sleep, args=(3,)).start()\n"
             "sum(range(3_000_000))\n")
    sample, rc = measure.run([sys.executable, "-c", child], tmp_path / "log", tmp_path)
    assert rc == 0
    assert sample.threads >= 7 and sample.fds >= 23  # sampled while it ran: 6 threads + main; 20 files + stdio
    assert sample.cpu > 0 and sample.rss_mib > 1 and sample.wall >= 3


def _size(k: int, ours: float, floor: float, ours_cpu: float, floor_cpu: float) -> dict[str, dict]:
    return {"ours": report.summary([Sample(ours, ours_cpu * k, 90, 10, 10)], k),
            "no-op": report.summary([Sample(ours / 4, ours_cpu * k / 2, 90, 10, 10)], k),
            "floor": report.summary([Sample(floor, floor_cpu * k, 40, 5, 5)], k)}


def test_ratios_and_cpu_growth_per_host_from_k50_to_the_largest(tmp_path: Path):
    sizes = {10: _size(10, 3.0, 2.0, 0.1, 0.05), 50: _size(50, 11.0, 10.0, 0.1, 0.05),
             500: _size(500, 110.0, 100.0, 0.11, 0.05)}
    rat = report.ratios(sizes)
    assert rat["ours_over_floor"][10] == pytest.approx(1.5) and rat["noop_over_changing"][50] == pytest.approx(0.25)
    assert rat["cpu_per_host_growth"]["ours"] == pytest.approx(1.1)
    assert rat["cpu_per_host_growth"]["floor"] == pytest.approx(1.0)
    assert "CPU per host at K=500 vs K=50: ours 1.10x" in report.table(sizes, None, [200], "head")
    report.write_json(tmp_path / "bench.json", {"date": "d"}, sizes, None)
    assert json.loads((tmp_path / "bench.json").read_text())["sizes"]["500"]["ours"]["cpu_per_host_ms"] == 110.0


def test_plot_is_a_png(tmp_path: Path):
    sizes = {1: _size(1, 1.2, 0.8, 0.9, 0.3), 10: _size(10, 3.0, 2.0, 0.1, 0.05)}
    report.plot(tmp_path / "bench.png", sizes, "title")
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
