"""The readiness record: which instances serve which digest, with proxy_protocol on which ports.

`fab rollout` writes it only after every host passed its probe; the Pulumi program reads it
to decide whether the ProxyProtocol policy may be attached. One schema for both sides, and one
wire form, encoded and decoded here (pure: parameters in, record or why not out).

On the wire: a record that fits one standard parameter (4 KB) is that parameter's value, the
version 1 JSON. A larger one is sharded: its `digests` (JSON, zlib, base64) cut into standard
parameters beside it, `<path>.<first 16 hex of the shard's sha256>`, and a manifest at the
path itself (version 2: everything else of the record, the shards in order and the sha256 of
their text). Several parameters are not written atomically, so the manifest is written last
and deleted first, and a reader believes shards only through a manifest whose digests they
match: a write or a delete cut short is no valid record, never a half one.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import zlib
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Literal

from pydantic import Field, ValidationError

from core.errors import KitError
from core.settings import InstanceId, Model, Port


class RecordError(KitError):
    """A readiness record cannot be read, or could not be put back after a failed run."""


PARAMETER_LIMIT = 4096  # a standard parameter's value (an advanced one holds 8 KB, at a price)
NAME_LIMIT = 1011  # a parameter name's length
SHARD_KEY = 16  # hex digits of a shard's sha256 in its name


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
    # every load balancer whose ports it proves (during a move, both: the hosts serve both; None in
    # records of kits that knew one); `load_balancer` is the first, for older readers
    load_balancers: list[str] | None = None

    @property
    def balancers(self) -> list[str]:
        """The load balancers whose ports it proves ([] when it names none)."""
        return list(self.load_balancers or ([self.load_balancer] if self.load_balancer else []))

    @property
    def instances(self) -> dict[str, str]:
        """instance ID -> digest."""
        return {i: d for d, ids in self.digests.items() for i in ids}

    def to_json(self) -> str:
        # without a move the wire form is the one older kits read (they refuse keys they do not know)
        return self.model_dump_json(by_alias=True, exclude=None if self.load_balancers else {"load_balancers"})

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
        named = self.balancers
        if load_balancer and named and load_balancer not in named:
            return ("record is for load balancer " + " and ".join(map(repr, named)))
        return None


def build(env: str, ports: list[int], served: dict[str, str], now: datetime | None = None,
          load_balancer: str | None = None, plain_ports: list[int] | None = None,
          load_balancers: list[str] | None = None) -> ReadinessRecord:
    """A record from `served` (instance ID -> digest it serves, proven by a probe). `load_balancers`:
    every load balancer whose ports it proves, when more than one (`load_balancer` is then the first)."""
    if load_balancers:
        load_balancer = load_balancers[0]
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
        load_balancers=list(load_balancers) if load_balancers else None,
    )


class Manifest(Model):
    """A sharded record's manifest: the record without its `digests`, and where they are."""

    version: Literal[2] = 2
    env: str
    load_balancer: str | None = None
    written_at: datetime
    proxy_protocol_ports: list[Port]
    plain_ports: list[Port] | None = None
    load_balancers: list[str] | None = None
    instances: int  # how many instances the shards name (for a person reading it, and checked)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")  # of the shards' text, joined in order
    shards: list[str] = Field(min_length=1)  # each shard's key: `<path>.<key>` holds it


def shard_name(path: str, key: str) -> str:
    return f"{path}.{key}"


def _shard_pattern(path: str) -> re.Pattern[str]:
    return re.compile(re.escape(path) + rf"\.([0-9a-f]{{{SHARD_KEY}}})$")


def own(found: Mapping[str, str], path: str) -> dict[str, str]:
    """The parameters of `found` that belong to the record at `path` (its value and any shard)."""
    pattern = _shard_pattern(path)
    return {n: v for n, v in found.items() if n == path or pattern.match(n)}


def shards_named(text: str | None, path: str) -> list[str]:
    """The shard parameters a stored value names (none: it is not a readable manifest)."""
    try:
        manifest = Manifest.model_validate(json.loads(text or ""))
    except (ValueError, ValidationError):
        return []
    return sorted({shard_name(path, key) for key in manifest.shards})


def encode(record: ReadinessRecord, path: str) -> dict[str, str]:
    """The parameters that hold `record` at `path` (name -> value): one when it fits a standard
    parameter, else the manifest and its shards. Raises RecordError naming the size and the limit
    when even that cannot be written (call it before any host changes)."""
    single = record.to_json()
    if len(single) <= PARAMETER_LIMIT:
        return {path: single}
    packed = json.dumps(record.digests, separators=(",", ":"), sort_keys=True).encode()
    text = base64.b64encode(zlib.compress(packed, 9)).decode()
    chunks = [text[i:i + PARAMETER_LIMIT] for i in range(0, len(text), PARAMETER_LIMIT)]
    keys = [hashlib.sha256(c.encode()).hexdigest()[:SHARD_KEY] for c in chunks]
    manifest = Manifest(env=record.env, load_balancer=record.load_balancer, written_at=record.written_at,
                        proxy_protocol_ports=record.proxy_protocol_ports, plain_ports=record.plain_ports,
                        load_balancers=record.load_balancers, instances=len(record.instances),
                        sha256=hashlib.sha256(text.encode()).hexdigest(), shards=keys,
                        ).model_dump_json(by_alias=True, exclude=None if record.load_balancers else {"load_balancers"})
    size = (f"the readiness record of {len(record.instances)} instance(s) with {len(record.digests)} digest(s) "
            f"takes {len(single)} characters, {len(text)} compressed in {len(chunks)} shard(s)")
    if len(manifest) > PARAMETER_LIMIT:
        raise RecordError(f"{size}, and their manifest {len(manifest)} characters: more than a standard parameter "
                          f"holds ({PARAMETER_LIMIT}); split the fleet into environments "
                          "(see docs/troubleshooting.md#the-readiness-record-is-too-large)")
    if len(shard_name(path, keys[0])) > NAME_LIMIT:
        raise RecordError(f"{size}, and the shard names under {path} would be longer than Parameter Store allows "
                          f"({NAME_LIMIT}): choose a shorter record.parameterPath "
                          "(see docs/troubleshooting.md#the-readiness-record-is-too-large)")
    return {path: manifest, **{shard_name(path, k): c for k, c in zip(keys, chunks, strict=True)}}


def decode(found: Mapping[str, str], path: str) -> tuple[ReadinessRecord | None, str | None]:
    """The record at `path` from the parameters found there (name -> value; others are ignored),
    or None and why: no record, or one that proves nothing (unreadable, or a write cut short)."""
    text = found.get(path)
    strays = sorted(n for n in own(found, path) if n != path)
    if text is None:
        if strays:
            return None, (f"no valid readiness record at {path}: {len(strays)} shard(s) but no manifest "
                          "(a write or a delete cut short)")
        return None, f"no readiness record at {path}"
    try:
        version = json.loads(text).get("version")
    except (ValueError, AttributeError):
        version = None
    if version != 2:
        try:
            return ReadinessRecord.from_json(text), None
        except RecordError as exc:
            return None, str(exc)
    try:
        return _unshard(found, path, Manifest.model_validate_json(text)), None
    except ValidationError as exc:
        return None, f"readiness record is not valid: manifest at {path}: {exc}"
    except RecordError as exc:
        return None, str(exc)


def _unshard(found: Mapping[str, str], path: str, manifest: Manifest) -> ReadinessRecord:
    """The record a manifest names, only when every shard is there with the content it names."""
    chunks = []
    for key in manifest.shards:
        name = shard_name(path, key)
        chunk = found.get(name)
        if chunk is None:
            raise RecordError(f"no valid readiness record at {path}: shard {name} is missing (a write cut short)")
        if hashlib.sha256(chunk.encode()).hexdigest()[:SHARD_KEY] != key:
            raise RecordError(f"no valid readiness record at {path}: shard {name} holds another write's content")
        chunks.append(chunk)
    text = "".join(chunks)
    if hashlib.sha256(text.encode()).hexdigest() != manifest.sha256:
        raise RecordError(f"no valid readiness record at {path}: its shards are not the ones its manifest was "
                          "written with")
    try:
        digests = json.loads(zlib.decompress(base64.b64decode(text, validate=True)))
        record = ReadinessRecord.model_validate({**manifest.model_dump(exclude={"version", "instances", "sha256",
                                                                               "shards"}), "digests": digests})
    except (ValueError, zlib.error, binascii.Error, ValidationError) as exc:
        raise RecordError(f"readiness record is not valid: shards at {path}: {exc}") from None
    if len(record.instances) != manifest.instances:
        raise RecordError(f"no valid readiness record at {path}: its shards name {len(record.instances)} "
                          f"instance(s), its manifest {manifest.instances}")
    return record
