"""The readiness record: which instances serve which digest, with proxy_protocol on which ports.

`fab rollout` writes it only after every host passed its probe; the Pulumi program reads it
to decide whether the ProxyProtocol policy may be attached. One schema for both sides.
Compact on purpose: a Parameter Store value holds at most 8 KB (advanced tier).
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Literal

from pydantic import Field, ValidationError

from core.errors import KitError
from core.settings import InstanceId, Model, Port


class RecordError(KitError):
    """A readiness record cannot be read, or could not be put back after a failed run."""


class ReadinessRecord(Model):
    version: Literal[1] = 1
    env: str
    load_balancer: str | None = None  # the load balancer whose hosts it proves (absent in older records)
    written_at: datetime
    proxy_protocol_ports: list[Port]  # ports on which every listed instance reads the header
    # network: the plain ports every listed instance serves without the header (proven by the same
    # probe); None in records of kits that never retired a plain port (they served them always)
    plain_ports: list[Port] | None = None
    digests: dict[str, list[InstanceId]] = Field(min_length=1)  # digest -> instances serving it

    @property
    def instances(self) -> dict[str, str]:
        """instance ID -> digest."""
        return {i: d for d, ids in self.digests.items() for i in ids}

    def to_json(self) -> str:
        return self.model_dump_json(by_alias=True)

    @classmethod
    def from_json(cls, text: str) -> ReadinessRecord:
        try:
            return cls.model_validate(json.loads(text))
        except (ValueError, ValidationError) as exc:
            raise RecordError(f"readiness record is not valid: {exc}") from None

    def proves_plain(self, port: int, instances: list[str]) -> bool:
        """Whether every one of `instances` was proven serving `port` without the header."""
        return self.plain_ports is not None and port in self.plain_ports and all(
            i in self.instances for i in instances)

    def foreign(self, env: str, load_balancer: str | None) -> str | None:
        """Why this record is not the given environment's (None: it is)."""
        if self.env != env:
            return f"record is for environment {self.env!r}"
        if load_balancer and self.load_balancer and self.load_balancer != load_balancer:
            return f"record is for load balancer {self.load_balancer!r}"
        return None


def build(env: str, ports: list[int], served: dict[str, str], now: datetime | None = None,
          load_balancer: str | None = None, plain_ports: list[int] | None = None) -> ReadinessRecord:
    """A record from `served` (instance ID -> digest it serves, proven by a probe)."""
    digests: dict[str, list[str]] = {}
    for instance, digest in sorted(served.items()):
        digests.setdefault(digest, []).append(instance)
    return ReadinessRecord(
        env=env,
        load_balancer=load_balancer,
        written_at=now or datetime.now(timezone.utc),
        proxy_protocol_ports=sorted(ports),
        plain_ports=None if plain_ports is None else sorted(plain_ports),
        digests=digests,
    )
