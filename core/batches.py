"""Canary batches: how `--batch` (such as `1,25%,100%`) cuts the hosts that go live, and how many
hosts are worked on at once (`--parallel`).

Pure. `remote/tasks.py` checks both before any host is touched; `remote/rollout.py` goes
live one batch at a time and stops at the first batch with a failure.
"""

from __future__ import annotations

import math
import re

from core.errors import PlanError

PARALLEL = 10  # hosts worked on at once when --parallel is not given


def at_once(value: str | int | None) -> int:
    """`--parallel` as a number of hosts (PARALLEL when not given); anything but a whole number from
    1 up is refused, naming what was given."""
    if value is None:
        return PARALLEL
    text = str(value).strip()
    if not re.fullmatch(r"[0-9]+", text) or int(text) == 0:
        raise PlanError(f"--parallel {value!r}: not a number of hosts (a whole number, 1 or more)")
    return int(text)


def batches(spec: str | None, count: int) -> list[int]:
    """Cumulative batch sizes from a spec such as `1,25%,100%` (the last batch is always all)."""
    if spec is not None and not spec.strip():  # `--batch=`: never taken for "all at once"
        raise PlanError(f"--batch {spec!r}: names no batch (e.g. 1,25%,100%)")
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
