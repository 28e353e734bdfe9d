"""known_hosts as an index: which raw lines name a host, found without building any key.

A known_hosts file of thousands of lines must cost a run almost nothing: building every key of
it (what paramiko's HostKeys does on every load) costs seconds, per connection. So the file is
read once per run into an index (plain names -> lines, hashed `|1|salt|hash` entries checked
with HMAC-SHA1, wildcard patterns), and only the lines that name a host the run connects to are
handed to the SSH edge, which decodes their keys.

Pure: no paramiko here. The matching follows OpenSSH's sshd(8) "SSH_KNOWN_HOSTS FILE FORMAT":
comma-separated patterns, `*` and `?` wildcards, `!` negation, `[host]:port` for a port other
than 22, names compared case-insensitively; markers `@revoked` (the key is never accepted for the
hosts it names) and `@cert-authority` (host certificates, which the kit does not check).
"""

from __future__ import annotations

import base64
import binascii
import fnmatch
import hashlib
import hmac
from dataclasses import dataclass, field

from core.errors import KitError

HASHED = "|1|"
REVOKED, CERT_AUTHORITY = "@revoked", "@cert-authority"
MARKERS = (REVOKED, CERT_AUTHORITY)
SSH_PORT = 22
_INNER, _OUTER = bytes(b ^ 0x36 for b in range(256)), bytes(b ^ 0x5C for b in range(256))  # HMAC's pads


class _Hmac:
    """HMAC-SHA1 under one salt, its padded key hashed once: each name it is asked about then costs
    two copies of a hash state, not a whole HMAC (thousands of hashed lines, for every host)."""

    def __init__(self, salt: bytes):
        key = (hashlib.sha1(salt).digest() if len(salt) > 64 else salt).ljust(64, b"\0")
        self._inner, self._outer = hashlib.sha1(key.translate(_INNER)), hashlib.sha1(key.translate(_OUTER))

    def digest(self, message: bytes) -> bytes:
        inner = self._inner.copy()
        inner.update(message)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.digest()


class KnownHostsError(KitError):
    """known_hosts cannot be read, or a line of it is malformed (the message names file and line)."""


@dataclass(frozen=True)
class Entry:
    """One key line: where it is, its marker (or ""), its key type and its base64 key, undecoded."""

    number: int
    marker: str
    key_type: str
    key: str


def lookup_name(host: str, port: int | None) -> str:
    """The name a host is known by: `host` on port 22, `[host]:port` otherwise (as ssh writes it)."""
    host = host.lower()
    return host if port in (None, SSH_PORT) else f"[{host}]:{port}"


def _glob(pattern: str, name: str) -> bool:
    """OpenSSH's wildcards: `*` and `?` only (no character classes)."""
    return fnmatch.fnmatchcase(name, pattern.replace("[", "[[]") if "[" in pattern else pattern)


@dataclass
class KnownHosts:
    """The index of one known_hosts file, built once per run (`parse`)."""

    source: str
    plain: dict[str, list[Entry]] = field(default_factory=dict)  # exact lower-case name -> lines
    hashed: list[tuple[_Hmac, bytes, Entry]] = field(default_factory=list)  # (HMAC under its salt, digest, line)
    patterns: list[tuple[list[str], list[str], Entry]] = field(default_factory=list)  # (positive, negated, line)
    negated: list[tuple[list[str], set[str], Entry]] = field(default_factory=list)  # exact names with a `!` beside

    @classmethod
    def parse(cls, text: str, source: str) -> KnownHosts:
        """Index every line: blank lines and `#` comments are skipped; a malformed line is refused with
        its number (a key field that is not base64 is malformed; the key itself is not built here)."""
        index = cls(source)
        for number, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            index._add(number, line)
        return index

    def _add(self, number: int, line: str) -> None:
        fields = line.split()
        marker = ""
        if fields[0].startswith("@"):
            marker = fields.pop(0).lower()
            if marker not in MARKERS:
                raise self._bad(number, f"unknown marker {marker!r} (known: {', '.join(MARKERS)})")
        if len(fields) < 3:
            raise self._bad(number, "not `[marker] hosts key-type base64-key [comment]`")
        hosts, key_type, key = fields[:3]
        try:
            base64.b64decode(key, validate=True)
        except (binascii.Error, ValueError):
            raise self._bad(number, f"the {key_type} key is not base64") from None
        entry = Entry(number, marker, key_type, key)
        if hosts.startswith(HASHED):
            salt_hash = hosts[len(HASHED):].split("|")
            try:
                salt, digest = (base64.b64decode(part, validate=True) for part in salt_hash)
            except (binascii.Error, ValueError):
                raise self._bad(number, "a hashed host name is not |1|salt|hash in base64") from None
            self.hashed.append((_Hmac(salt), digest, entry))
            return
        names = [n.lower() for n in hosts.split(",") if n]
        positive = [n for n in names if not n.startswith("!")]
        negated = [n[1:] for n in names if n.startswith("!")]
        if any(c in n for n in names for c in "*?"):
            self.patterns.append((positive, negated, entry))
        elif negated:
            self.negated.append((positive, set(negated), entry))
        else:
            for name in positive:
                self.plain.setdefault(name, []).append(entry)

    def _bad(self, number: int, why: str) -> KnownHostsError:
        return KnownHostsError(f"known_hosts {self.source} line {number}: {why}")

    def entries(self, host: str, port: int | None = None) -> list[Entry]:
        """Every line that names `host` (on `port`), in file order, marked ones included."""
        name = lookup_name(host, port)
        found = list(self.plain.get(name, ()))
        encoded = name.encode()
        found += [e for mac, digest, e in self.hashed if hmac.compare_digest(mac.digest(encoded), digest)]
        found += [e for positive, negated, e in self.negated if name in positive and name not in negated]
        found += [e for positive, negated, e in self.patterns
                  if any(_glob(p, name) for p in positive) and not any(_glob(p, name) for p in negated)]
        return sorted(found, key=lambda e: e.number)

    def keys(self, host: str, port: int | None = None) -> list[Entry]:
        """The keys a host may present: its plain lines less any key a `@revoked` line names for it.

        Refuses a host known only through `@cert-authority` lines: the kit checks host keys, not
        host certificates, and would otherwise refuse it as unknown without saying why."""
        found = self.entries(host, port)
        revoked = {(e.key_type, e.key) for e in found if e.marker == REVOKED}
        usable = [e for e in found if not e.marker and (e.key_type, e.key) not in revoked]
        authorities = [e for e in found if e.marker == CERT_AUTHORITY]
        if not usable and authorities:
            raise self._bad(authorities[0].number,
                            f"{lookup_name(host, port)} is known only through @cert-authority: the kit checks "
                            "host keys, not host certificates; add the host's own key (ssh-keyscan)")
        return usable

    def revoked(self, host: str, port: int | None, key_type: str, key: str) -> Entry | None:
        """The `@revoked` line that names this key for this host, if any."""
        for e in self.entries(host, port):
            if e.marker == REVOKED and (e.key_type, e.key) == (key_type, key):
                return e
        return None


def hash_name(name: str, salt: bytes) -> str:
    """A hashed host field as `ssh-keygen -H` writes it (for tests and tools)."""
    digest = hmac.digest(salt, name.encode(), "sha1")
    return f"{HASHED}{base64.b64encode(salt).decode()}|{base64.b64encode(digest).decode()}"
