"""Canary batches: how `--batch` (such as `1,25%,100%`) cuts the hosts that go live.

Pure. `remote/tasks.py` checks the spec before any host is touched; `remote/rollout.py` goes
live one batch at a time and stops at the first batch with a failure.
"""

from __future__ import annotations

import math
import re

from core.errors import PlanError


def batches(spec: str | None, count: int) -> list[int]:
    """Cumulative batch sizes from a spec such as `1,25%,100%` (the last batch is always all)."""
    if count == 0:
        return []
    if not spec:
        return [count]
    sizes: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)(%?)", part)
        if not m or int(m[1]) == 0 or (m[2] and int(m[1]) > 100):
            raise PlanError(f"--batch {spec!r}: {part!r} is not a host count or a percentage (1-100%)")
        size = math.ceil(count * int(m[1]) / 100) if m[2] else int(m[1])
        size = min(size, count)
        if sizes and size < sizes[-1]:
            raise PlanError(f"--batch {spec!r}: batches must not shrink ({part!r} is fewer hosts than before)")
        if not sizes or size > sizes[-1]:
            sizes.append(size)
    if sizes[-1] < count:
        sizes.append(count)
    return sizes


def split(items: list, spec: str | None) -> list[list]:
    """Items cut into the batches a spec describes."""
    out, start = [], 0
    for end in batches(spec, len(items)):
        out.append(items[start:end])
        start = end
    return out
