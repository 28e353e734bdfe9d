"""PROXY protocol headers (v1 text, v2 binary), as a load balancer sends them.

Used by the probes that speak to nginx the way the load balancer will, and by the tests.
"""

from __future__ import annotations

import ipaddress
import struct

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def v1(src: str, dst: str, sport: int, dport: int) -> bytes:
    """`PROXY TCP4|TCP6 src dst sport dport\\r\\n`."""
    family = "TCP6" if ipaddress.ip_address(src).version == 6 else "TCP4"
    return f"PROXY {family} {src} {dst} {sport} {dport}\r\n".encode()


def v2(src: str, dst: str, sport: int, dport: int) -> bytes:
    """A v2 PROXY command over TCP4 or TCP6, no TLVs."""
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    family = 0x21 if s.version == 6 else 0x11
    body = s.packed + d.packed + struct.pack("!HH", sport, dport)
    return V2_SIGNATURE + bytes([0x21, family]) + struct.pack("!H", len(body)) + body


def v2_local() -> bytes:
    """A v2 LOCAL command (what an NLB's health check sends): no address."""
    return V2_SIGNATURE + bytes([0x20, 0x00]) + struct.pack("!H", 0)
